// Tensor files written through real mounts (issue 10): every source kind
// that can be patched in place, every way of writing (pwrite, dd, cp,
// numpy.memmap), a crash at every step of the commit, and the hot-journal
// hook of the next open. The oracle is tests/mount/check_tensor_writes.py:
// a fresh mount, Python zipfile's CRC check and torch.load of the files.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <sstream>

#include "mount_harness.h"
#include "test_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

std::string Checker() { return std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/check_tensor_writes.py"; }

// A private copy of tests/data/<fixture> (file or folder) in `dir`;
// "X.nemo|xz" (or |zstd) is X.nemo compressed by that tool; "real:X" is
// ../shared/real-fixtures/X.
constexpr std::string_view kReal = "real:";
std::string Copy(const std::string& fixture, const TempDir& dir) {
  const auto bar = fixture.find('|');
  const std::string base = fixture.substr(0, bar);
  const bool real = base.rfind(kReal, 0) == 0;
  const std::string from = real ? RealFixture(base.substr(kReal.size())) : TestData(base);
  std::string to = dir.Join(std::filesystem::path(base).filename().string());
  auto r = Sh("cp -a " + Q(from) + " " + Q(to) + " && chmod -R u+w " + Q(to));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  if (bar != std::string::npos) {
    const std::string tool = fixture.substr(bar + 1);
    const std::string packed = to + "." + tool;
    r = Sh(tool + " -c -q " + Q(to) + " > " + Q(packed) + " && rm " + Q(to));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    to = packed;
  }
  return to;
}

CommandResult WriteThrough(const Mount& m, const std::string& state, const std::string& method) {
  return Sh("/usr/bin/python3 " + Q(Checker()) + " write " + Q(m.path()) + " " + Q(state) + " " +
                method,
            300);
}

// A fresh read-only mount of `src` holds what `state` expects, and the
// stored files pass zipfile's CRC check and torch.load.
void ExpectStored(const std::string& src, const std::string& state,
                  const std::string& expect = "new") {
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  auto r = Sh("/usr/bin/python3 " + Q(Checker()) + " check " + Q(m->path()) + " " + Q(state) +
                  " " + Q(src) + " --expect " + expect,
              300);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("0 failures"), std::string::npos) << r.out;
  m->Unmount();
}

std::string Journals(const std::string& src) {
  return Sh("find " + Q(std::filesystem::path(src).parent_path().string()) +
            " -name '*nemofs-journal*'")
      .out;
}

struct Case {
  std::string fixture;
  std::string method;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return TestName(info.param.fixture + "_" + info.param.method);
}

class TensorWrite : public ::testing::TestWithParam<Case> {};

TEST_P(TensorWrite, RoundTripsAndLeavesEveryOtherTensorAlone) {
  const Case& c = GetParam();
  if (c.fixture.rfind(kReal, 0) == 0) NEMOFS_REQUIRE_REAL_FIXTURES();
  TempDir dir;
  std::string src = Copy(c.fixture, dir);
  std::string state = dir.Join("state.json");
  // What verify says of the fixture as made (zarr_zstd holds a blosc
  // array nemofs refuses): the write adds no problem.
  auto problems = [&] {
    auto v = Sh(Q(NemofsBinary()) + " verify -q " + Q(src) + " | grep '^problem:'");
    return v.out;
  };
  const std::string before = problems();
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = WriteThrough(*m, state, c.method);
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    m->Unmount();
  }
  ExpectStored(src, state);
  EXPECT_EQ(Journals(src), "");
  EXPECT_EQ(problems(), before);
  if (before.empty()) {
    auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
    EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, TensorWrite,
    ::testing::Values(Case{"tiny_gpt.nemo", "pwrite"}, Case{"tiny_gpt.nemo", "dd"},
                      Case{"tiny_gpt.nemo", "cp"}, Case{"tiny_gpt.nemo", "mmap"},
                      Case{"tiny_gpt_gnu.nemo", "pwrite"}, Case{"tiny_gpt_tp2.nemo", "cp"},
                      Case{"torch/tiny_gpt_swiglu_tp2.nemo", "pwrite"},
                      Case{"torch/tiny_gpt_tp2pp2.nemo", "cp"},
                      Case{"torch/lightning.ckpt", "pwrite"}, Case{"torch/dtypes.pt", "cp"},
                      Case{"torch/dtypes_legacy.pt", "pwrite"},
                      Case{"torch/megatron_lm_tp2", "dd"}, Case{"dist/nemo2", "pwrite"},
                      Case{"dist/torch_dist_v23", "cp"}, Case{"dist/zarr", "pwrite"},
                      // Compressed: the archive rewritten, the zarr chunk re-encoded.
                      Case{"tiny_gpt_gz.nemo", "pwrite"}, Case{"tiny_gpt_gz.nemo", "mmap"},
                      Case{"tiny_gpt.nemo|xz", "dd"}, Case{"tiny_gpt.nemo|zstd", "cp"},
                      Case{"dist/zarr_zstd", "pwrite"}, Case{"dist/zarr_zstd", "cp"},
                      // Written by NVIDIA's and PyTorch's own code (private copies).
                      Case{"real:nemo-tar/vad_marblenet.nemo", "pwrite"},
                      Case{"real:nemo-tar/vad_multilingual_marblenet.nemo", "mmap"},
                      Case{"real:legacy-torch-save/JasperDecoderForCTC-STEP-243800.pt", "cp"},
                      Case{"real:megatron-zarr/megatron_gpt--val_loss=10.86-step=2-consumed_samples="
                           "16.0",
                           "dd"}),
    CaseName);

// A crash (NEMOFS_FAULT: _exit at that step) at every step of a commit:
// the next open rolls back, the tensor is bit-exactly the old value, the
// CRCs are valid, the journal is gone.
class TensorWriteCrash : public ::testing::TestWithParam<std::string> {};

TEST_P(TensorWriteCrash, NextOpenRollsBack) {
  const std::string step = GetParam();
  TempDir dir;
  std::string src = Copy("tiny_gpt.nemo", dir);
  std::string state = dir.Join("state.json");
  const std::string digest = Sh("sha256sum < " + Q(src)).out;
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=" + step});
    ASSERT_TRUE(m);
    // The write's fsync commits and the daemon dies at `step`: the python
    // writer sees an error (ENOTCONN) or is cut off; either way it fails.
    WriteThrough(*m, state, "pwrite");
    int status = m->ExpectDeath();
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77)
        << "status " << status << "\n" << m->Log();
  }
  ASSERT_TRUE(std::filesystem::exists(state)) << "the writer did not get to write its state";
  const bool journal_written = step != "journal:before-fsync";
  if (journal_written) {
    EXPECT_NE(Journals(src), "") << "no hot journal after a crash at " << step;
  }
  // `nemofs verify` is an open of the source: it rolls back and says so.
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(Journals(src), "");
  if (journal_written) {
    EXPECT_NE((v.out + v.err).find("rolled back"), std::string::npos) << v.out << v.err;
  }
  EXPECT_EQ(Sh("sha256sum < " + Q(src)).out, digest) << "not byte-identical after the rollback";
  ExpectStored(src, state, "old");
  // And it is writable again.
  std::string state2 = dir.Join("state2.json");
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = WriteThrough(*m, state2, "pwrite");
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    m->Unmount();
  }
  ExpectStored(src, state2);
}

INSTANTIATE_TEST_SUITE_P(Steps, TensorWriteCrash,
                         ::testing::Values("journal:before-fsync", "patch:half",
                                           "patch:before-meta", "patch:before-delete"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return TestName(info.param);
                         });

// A hot journal and a read-only open (-o ro): refused, saying what to run.
TEST(TensorWriteJournal, ReadOnlyOpenOfAHotJournalSaysWhatToRun) {
  TempDir dir;
  std::string src = Copy("tiny_gpt.nemo", dir);
  std::string state = dir.Join("state.json");
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=patch:half"});
    ASSERT_TRUE(m);
    WriteThrough(*m, state, "pwrite");
    m->ExpectDeath();
  }
  ASSERT_NE(Journals(src), "");
  TempDir mnt;
  auto r = Sh("timeout 30 " + Q(NemofsBinary()) + " mount -o ro " + Q(src) + " " + Q(mnt.path()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("nemofs verify"), std::string::npos) << r.err;
  Sh("fusermount3 -u " + Q(mnt.path()) + " 2>/dev/null");
  EXPECT_NE(Journals(src), "") << "a read-only open must not roll back";
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src));  // may write: rolls back
  EXPECT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_EQ(Journals(src), "");
  ExpectStored(src, state, "old");
}

// Sizes: a rewrite of another size is EINVAL at close, nothing written
// (without a new shape: structure_test.cc); a compressed source says why
// it cannot patch.
TEST(TensorWriteRules, WrongSizeIsEinvalAndNothingIsWritten) {
  TempDir dir;
  std::string src = Copy("tiny_gpt.nemo", dir);
  const std::string digest = Sh("sha256sum < " + Q(src)).out;
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  std::string path = TensorFile(*m);
  auto r = Sh("head -c 3 /dev/zero > " + Q(path));
  EXPECT_NE(r.exit_code, 0) << "a 3-byte rewrite of a tensor must fail at close";
  EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
  m->Unmount();
  EXPECT_EQ(Sh("sha256sum < " + Q(src)).out, digest);
}

// A compressed .nemo: the commit rewrites the archive (same compression,
// GNU tar reads it), with progress in the log; the mount shows the new
// bytes at once, and a crash before the rename leaves the old archive.
TEST(TensorWriteCompressed, RewriteIsLoggedAndACrashLeavesTheOldArchive) {
  TempDir dir;
  std::string src = Copy("tiny_gpt_gz.nemo", dir);
  const std::string digest = Sh("sha256sum < " + Q(src)).out;
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=rewrite:written"});
    ASSERT_TRUE(m);
    WriteThrough(*m, dir.Join("crashed.json"), "pwrite");
    int status = m->ExpectDeath();
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77) << status << m->Log();
  }
  EXPECT_EQ(Sh("sha256sum < " + Q(src)).out, digest) << "a crash before the rename changed it";
  std::string state = dir.Join("state.json");
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = WriteThrough(*m, state, "pwrite");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  // This mount shows the new bytes already.
  auto live = Sh("/usr/bin/python3 " + Q(Checker()) + " check " + Q(m->path()) + " " + Q(state) +
                 " " + Q(src) + " --expect new");
  EXPECT_EQ(live.exit_code, 0) << live.out << live.err;
  m->Unmount();
  EXPECT_NE(m->Log().find("a rewrite of the tar (gzip) archive"), std::string::npos) << m->Log();
  EXPECT_NE(m->Log().find("100%"), std::string::npos) << m->Log();
  EXPECT_EQ(Sh("gzip -t " + Q(src)).exit_code, 0);
  EXPECT_EQ(Sh("tar -tzf " + Q(src) + " >/dev/null").exit_code, 0);
  EXPECT_EQ(Sh("ls " + Q(dir.path()) + " | grep -c nemofs-rewrite").out, "0\n");
  ExpectStored(src, state);
}

// A zstd zarr tensor stitched from several chunk files: each chunk file is
// re-encoded and replaced under the journal; a crash halfway rolls all of
// them back. The chunk files' own archive/ view says ESTALE until a remount.
TEST(TensorWriteCompressed, ZarrChunksAreReplacedUnderTheJournal) {
  TempDir dir;
  std::string src = Copy("dist/zarr_zstd", dir);
  const std::string before = Sh("cd " + Q(src) + " && find . -type f | sort | xargs sha256sum").out;
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=patch:half"});
    ASSERT_TRUE(m);
    WriteThrough(*m, dir.Join("crashed.json"), "cp");
    m->ExpectDeath();
  }
  EXPECT_NE(Sh("ls -A " + Q(src)).out.find(".nemofs-journal"), std::string::npos);
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_NE((v.out + v.err).find("rolled back"), std::string::npos) << v.out << v.err;
  EXPECT_EQ(Sh("cd " + Q(src) + " && find . -type f | sort | xargs sha256sum").out, before);

  std::string state = dir.Join("state.json");
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = WriteThrough(*m, state, "cp");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  auto chunk = Sh("cat " + Q(m->path() + "/archive/model.embedding.word_embeddings.weight/0.0") +
                  " > /dev/null");
  EXPECT_NE(chunk.exit_code, 0);
  EXPECT_NE(chunk.err.find("Stale file handle"), std::string::npos) << chunk.err;
  m->Unmount();
  EXPECT_NE(m->Log().find("re-encoded"), std::string::npos) << m->Log();
  EXPECT_NE(Sh("cd " + Q(src) + " && find . -type f | sort | xargs sha256sum").out, before);
  ExpectStored(src, state);
}

// `nemofs info` says what a writable mount can write and how it commits.
TEST(TensorWriteInfo, InfoSaysWhatIsWritableAndHow) {
  TempDir dir;
  auto line = [](const std::string& src) {
    auto r = Sh(Q(NemofsBinary()) + " info " + Q(src) + " | grep '^writable:'");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  };
  const std::string plain = line(TestData("tiny_gpt.nemo"));
  EXPECT_NE(plain.find("config.yaml, 20 of 20 tensor files, tokenizer/ and archive/ files, new files; "
                       "tensors patched in place"),
            std::string::npos)
      << plain;
  EXPECT_NE(line(TestData("tiny_gpt_gz.nemo")).find("rewrites the whole archive"),
            std::string::npos);
  // The blosc array is not shown; both zstd ones are writable.
  EXPECT_NE(line(TestData("dist/zarr_zstd")).find("2 of 2 tensor files, tokenizer/ and archive/"),
            std::string::npos);
  std::string ro = Copy("tiny_gpt.nemo", dir);
  ASSERT_EQ(::chmod(ro.c_str(), 0444), 0);
  EXPECT_NE(line(ro).find("nothing (" + ro + " has no write permission)"), std::string::npos)
      << line(ro);
}

// A reader that has the tensor file mapped sees the new bytes after a
// commit by another process: the commit drops the kernel's cached pages
// (keep_cache and long attribute timeouts are on for tensor files).
TEST(TensorWriteCoherence, MappedReaderSeesTheCommit) {
  TempDir dir;
  std::string src = Copy("tiny_gpt.nemo", dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  std::string path = TensorFile(*m, "-S");
  int fd = ::open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  off_t size = ::lseek(fd, 0, SEEK_END);
  ASSERT_GT(size, 0);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ASSERT_NE(map, MAP_FAILED);
  const unsigned char* bytes = static_cast<const unsigned char*>(map);
  const unsigned char before = bytes[0];  // faults the page in: cached
  char hex[8];
  std::snprintf(hex, sizeof hex, "%02x", static_cast<unsigned>(before ^ 0xff));
  auto r = Sh(std::string("printf '\\x") + hex + "' | dd of=" + Q(path) +
              " conv=notrunc status=none");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  bool seen = false;
  for (int i = 0; i < 200 && !seen; ++i) {  // the invalidation is asynchronous
    seen = *static_cast<volatile const unsigned char*>(bytes) == (before ^ 0xff);
    if (!seen) ::usleep(10000);
  }
  EXPECT_TRUE(seen) << "the mapping still shows the old byte after the commit";
  ::munmap(map, size);
  ::close(fd);
  m->Unmount();
}

// A tensor larger than the daemon may allocate, rewritten whole with dd:
// the staged bytes, the old bytes the journal keeps and the commit go
// through spill files and mapped views, never the heap (RLIMIT_DATA 160 MiB
// over what the daemon uses; the tensor is 384 MiB).
TEST(TensorWriteLarge, ATensorLargerThanTheDaemonsMemoryLimitIsCommittedThroughSpillFiles) {
  TempDir dir;
  const std::string src = dir.Join("big.nemo");
  const uint64_t nbytes = 384ull << 20;
  auto made = Sh("/usr/bin/python3 " +
                     Q(std::string(NEMOFS_SOURCE_DIR) + "/scripts/bench/make_tensor_nemo.py") +
                     " write " + Q(src) + " " + std::to_string(nbytes) + " " +
                     std::to_string(nbytes) + " | /usr/bin/python3 -c \"import json,sys; b = "
                     "json.load(sys.stdin)['big']; print(b['key'], b['tar_offset'])\"",
                 300);
  ASSERT_EQ(made.exit_code, 0) << made.out << made.err;
  std::istringstream fields(made.out);
  std::string key;
  uint64_t tar_offset = 0;
  fields >> key >> tar_offset;
  ASSERT_FALSE(key.empty());
  ASSERT_EQ(Sh("head -c " + std::to_string(nbytes) + " /dev/urandom > " + Q(dir.Join("new.bin")))
                .exit_code,
            0);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  ASSERT_TRUE(LimitDaemonMemory(m->pid(), 160ull << 20));
  const std::string file = m->path() + "/tensors/" + key;
  auto r = Sh("dd if=" + Q(dir.Join("new.bin")) + " of=" + Q(file) +
                  " bs=4M conv=notrunc status=none && cmp " + Q(dir.Join("new.bin")) + " " +
                  Q(file),
              300);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_EQ(::kill(m->pid(), 0), 0) << "the daemon died";
  m->Unmount();
  EXPECT_NE(m->Log().find(key), std::string::npos);
  // The tar holds the new bytes where the tensor's were; its CRCs verify.
  r = Sh("dd if=" + Q(src) + " bs=4M iflag=skip_bytes,count_bytes skip=" +
             std::to_string(tar_offset) + " count=" + std::to_string(nbytes) +
             " status=none | cmp - " + Q(dir.Join("new.bin")),
         300);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Journals(src), "");
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src), 300);
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

// Two writers on different tensors and readers during the commits: every
// read is a whole version (tests/mount/check_tensor_writes.py race). In a
// gzip .nemo each commit is a rewrite of the archive: readers go on reading
// the old bytes meanwhile, and see the new ones whole after it.
class TensorWriteConcurrency : public ::testing::TestWithParam<std::string> {};

TEST_P(TensorWriteConcurrency, ReadersSeeWholeVersionsWhileTwoWritersCommit) {
  TempDir dir;
  std::string src = Copy(GetParam(), dir);
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("/usr/bin/python3 " + Q(Checker()) + " race " + Q(m->path()) + " 40", 300);
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NE(r.out.find(", 0 torn reads"), std::string::npos) << r.out;
    m->Unmount();
  }
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TensorWriteConcurrency,
                         ::testing::Values("tiny_gpt.nemo", "tiny_gpt_gz.nemo"),
                         [](const auto& info) { return TestName(info.param); });

// SIGKILL of the daemon at random instants during a stream of dd and
// numpy.memmap writes: after each, the next open rolls back if needed, the
// source verifies (CRCs), and every tensor is a whole version.
TEST(TensorWriteCrash, SigkillLoopLeavesWholeVersions) {
  TempDir dir;
  std::string src = Copy("tiny_gpt.nemo", dir);
  for (int round = 0; round < 6; ++round) {
    std::string state = dir.Join("kill" + std::to_string(round) + ".json");
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    // The writer runs in the background; the kill comes 0..150 ms in.
    std::string cmd = "(/usr/bin/python3 " + Q(Checker()) + " write " + Q(m->path()) + " " +
                      Q(state) + " " + (round % 2 ? "mmap" : "dd") + " --all >/dev/null 2>&1 &) ; sleep 0." +
                      std::to_string(round * 3 % 10) + "5";
    Sh(cmd);
    m->ExpectDeath(SIGKILL);
    ::usleep(300000);  // the writer gets its error
    auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
    EXPECT_EQ(Journals(src), "") << "round " << round;
    // verify's own exit code may be 1 only for the rollback it reports.
    EXPECT_EQ(v.out.find("CRC"), std::string::npos) << v.out << v.err;
    if (!std::filesystem::exists(state)) continue;  // killed before it began
    // Each changed tensor is whole: old or new (checked per file).
    auto fresh = Mount::Start(src);
    ASSERT_TRUE(fresh);
    auto old_check = Sh("/usr/bin/python3 " + Q(Checker()) + " check " + Q(fresh->path()) + " " +
                            Q(state) + " " + Q(src) + " --expect either",
                        300);
    EXPECT_EQ(old_check.exit_code, 0) << old_check.out << old_check.err;
    fresh->Unmount();
  }
}

}  // namespace
}  // namespace nemofs::testing
