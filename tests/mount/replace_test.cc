// Stored files replaced through the mount (issue 10 §5): a file of
// tokenizer/ or archive/ written with cp, a shell redirect or an editor is
// saved at the close like the config (an appended member of a plain tar, a
// rewrite of a compressed one, a replaced file of a folder), at any size;
// a replaced weight file is read again at once (a new tree). The oracle is
// GNU tar (or the folder's file) and a fresh mount.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <string>

#include "mount_harness.h"
#include "test_util.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

// tokenizer/NAME's member path in `src`, from `nemofs info --json`.
std::string TokenizerMember(const std::string& src, const std::string& name) {
  auto r = Sh(Q(NemofsBinary()) + " info --json " + Q(src) +
              " | /usr/bin/python3 -c \"import json,sys; print(next(t['member'] for t in "
              "json.load(sys.stdin)['tokenizer'] if t['name'] == '" +
              name + "'), end='')\"");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

class Replace : public ::testing::TestWithParam<std::string> {};

TEST_P(Replace, TokenizerFilesOfAnySizeAreStoredAtTheClose) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  const std::string before = Members(kind, src);
  const std::string vocab = TokenizerMember(src, "vocab.json");
  const std::string merges = TokenizerMember(src, "merges.txt");
  const std::string model = TokenizerMember(src, "tokenizer.model");
  ASSERT_FALSE(vocab.empty() || merges.empty() || model.empty());
  // A bigger file (cp), a smaller one (a redirect), an in-place edit (vim:
  // it cannot make its backup in tokenizer/, so it writes the file itself).
  std::string big(300 << 10, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  WriteFile(dir.Join("big.json"), big);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) + " && ls -l tokenizer/vocab.json | cut -c1-3 && cp " +
              Q(dir.Join("big.json")) + " tokenizer/vocab.json && echo 'a b' > tokenizer/merges.txt" +
              " && vim -u NONE -N -es -c 'normal Goadded by vim' -c wq archive/" + Q(model) +
              " </dev/null && cmp tokenizer/vocab.json " + Q(dir.Join("big.json")) +
              " && cat tokenizer/merges.txt");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_EQ(r.out, "-rw\na b\n") << "the file shows its write bit, and the new bytes at once";
  // The close stored them: the source has them before the unmount.
  EXPECT_EQ(Extracted(kind, src, vocab), big);
  EXPECT_EQ(Extracted(kind, src, merges), "a b\n");
  m->Unmount();
  EXPECT_NE(m->Log().find("replaced"), std::string::npos) << m->Log();
  EXPECT_EQ(Members(kind, src), before) << "the same names, no new ones";
  EXPECT_EQ(Extracted(kind, src, vocab), big);
  EXPECT_EQ(Extracted(kind, src, merges), "a b\n");
  EXPECT_NE(Extracted(kind, src, model).find("added by vim\n"), std::string::npos);
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  EXPECT_EQ(ReadFile(again->path() + "/tokenizer/merges.txt"), "a b\n");
  EXPECT_EQ(ReadFile(again->path() + "/tokenizer/vocab.json"), big);
  again->Unmount();
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  if (kind.tar) {
    EXPECT_EQ(Sh("tar -tf " + Q(src) + " >/dev/null").exit_code, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, Replace,
                         ::testing::Values("plain_tar", "gzip_tar", "extracted_nemo_folder"),
                         KindParamName);

// A stored file far larger than the daemon may allocate: its bytes go
// through a spill file under the cache folder, never the heap. The daemon
// runs with RLIMIT_DATA (heap and private maps) 160 MiB over what it uses;
// the file is 400 MB.
class ReplaceLarge : public ::testing::TestWithParam<std::string> {};

TEST_P(ReplaceLarge, AFileLargerThanTheDaemonsMemoryLimitIsStoredThroughASpillFile) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  const std::string model = TokenizerMember(src, "tokenizer.model");
  ASSERT_FALSE(model.empty());
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  ASSERT_TRUE(LimitDaemonMemory(m->pid(), 160ull << 20));
  auto r = Sh("head -c 400000000 /dev/urandom > " + Q(dir.Join("big.model")) + " && cp " +
             Q(dir.Join("big.model")) + " " + Q(m->path() + "/tokenizer/tokenizer.model") +
             " && cmp " + Q(dir.Join("big.model")) + " " +
             Q(m->path() + "/tokenizer/tokenizer.model"),
         300);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_EQ(::kill(m->pid(), 0), 0) << "the daemon died";
  m->Unmount();
  EXPECT_TRUE(Extracted(kind, src, model) == ReadFile(dir.Join("big.model")))
      << "the stored file is not the one written";
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src), 300);
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

INSTANTIATE_TEST_SUITE_P(Kinds, ReplaceLarge,
                         ::testing::Values("plain_tar", "extracted_nemo_folder"),
                         KindParamName);

// A crash inside the store of a replaced file (at its close) leaves the
// member old or new, never broken: the next mount reads one of them whole
// and `verify` passes. The file is 8 MB: staged in a spill file.
struct ReplaceCrashCase {
  std::string kind;
  std::string step;
  bool committed;
};

void PrintTo(const ReplaceCrashCase& c, std::ostream* os) { *os << c.kind << " at " << c.step; }

class ReplaceCrash : public ::testing::TestWithParam<ReplaceCrashCase> {};

TEST_P(ReplaceCrash, LeavesTheOldFileOrTheNewOne) {
  const ReplaceCrashCase& c = GetParam();
  const SourceKind& kind = Kind(c.kind);
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  const std::string merges = TokenizerMember(src, "merges.txt");
  ASSERT_FALSE(merges.empty());
  const std::string old = Extracted(kind, src, merges);
  std::string fresh(8 << 20, '\0');
  for (size_t i = 0; i < fresh.size(); ++i) fresh[i] = static_cast<char>('a' + (i * 7) % 26);
  WriteFile(dir.Join("new.txt"), fresh);
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=" + c.step});
    ASSERT_TRUE(m);
    // The close stores it: the daemon dies there (exit 77), the cp fails.
    auto r = Sh("cp " + Q(dir.Join("new.txt")) + " " + Q(m->path() + "/tokenizer/merges.txt"), 60);
    EXPECT_NE(r.exit_code, 0) << "the daemon should have died in the store";
    int status = m->ExpectDeath();
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77) << status << "\n" << m->Log();
  }
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  const std::string shown = ReadFile(again->path() + "/tokenizer/merges.txt");
  again->Unmount();
  EXPECT_TRUE(shown == (c.committed ? fresh : old))
      << "merges.txt has " << shown.size() << " bytes; old " << old.size() << ", new "
      << fresh.size() << " (expected the " << (c.committed ? "new" : "old") << " one)";
  EXPECT_TRUE(Extracted(kind, src, merges) == shown);
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

INSTANTIATE_TEST_SUITE_P(
    Steps, ReplaceCrash,
    ::testing::Values(ReplaceCrashCase{"plain_tar", "tar-append:data-written", false},
                      ReplaceCrashCase{"plain_tar", "tar-append:committed", true},
                      ReplaceCrashCase{"gzip_tar", "rewrite:written", false},
                      ReplaceCrashCase{"gzip_tar", "rewrite:renamed", true},
                      ReplaceCrashCase{"extracted_nemo_folder", "folder:written", false},
                      ReplaceCrashCase{"extracted_nemo_folder", "folder:renamed", true}),
    [](const auto& info) { return TestName(info.param.kind + "_" + info.param.step); });

// The weight file replaced whole (with another torch.save file): the
// mount reads the checkpoint again at the commit, so tensors/, index.json
// and model.safetensors show the new file's tensors at once (the oracle:
// `nemofs cat` of that file), names that are gone are gone, paths that stay
// keep their inode, and the new tensors can be written in place.
class ReplaceWeights : public ::testing::TestWithParam<std::string> {};

TEST_P(ReplaceWeights, TheTreeShowsTheNewFilesTensorsAtOnce) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  const std::string weights = "model_weights.ckpt";
  const std::string repl = TestData("torch/dtypes.pt");
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  const std::string old_tensor = TensorFile(*m);
  auto inode = [&](const std::string& rel) {
    return Sh("stat -c %i " + Q(m->path() + "/" + rel)).out;
  };
  const std::string config_ino = inode("config.yaml");
  const std::string weights_ino = inode("archive/" + weights);
  const std::string tensors_ino = inode("tensors");
  auto r = Sh("cp " + Q(repl) + " " + Q(m->path() + "/archive/" + weights) + " && cmp " +
              Q(repl) + " " + Q(m->path() + "/archive/" + weights));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  // tensors/ now lists dtypes.pt's tensors, byte for byte what `nemofs cat`
  // of that file gives.
  auto oracle = Sh(Q(NemofsBinary()) + " cat " + Q(repl) +
                   " index.json | /usr/bin/python3 -c \"import json,sys; "
                   "print(''.join(v['path'][8:] + '\\n' for v in json.load(sys.stdin)['tensors']"
                   ".values()), end='')\" | sort");
  ASSERT_EQ(oracle.exit_code, 0) << oracle.err;
  EXPECT_EQ(Sh("cd " + Q(m->path()) + " && ls tensors | sort").out, oracle.out) << m->Log();
  EXPECT_NE(Sh("stat " + Q(old_tensor)).exit_code, 0) << "the old tensor file is gone";
  std::string first = oracle.out.substr(0, oracle.out.find('\n'));
  ASSERT_FALSE(first.empty());
  auto cat = Sh(Q(NemofsBinary()) + " cat " + Q(repl) + " tensors/" + Q(first) + " | sha256sum");
  EXPECT_EQ(Sh("sha256sum < " + Q(m->path() + "/tensors/" + first)).out, cat.out);
  auto index = Sh("/usr/bin/python3 -c \"import json,sys; print(sorted(json.load(open(sys.argv[1]))"
                  "['tensors']))\" " + Q(m->path() + "/index.json"));
  EXPECT_NE(index.out.find("'" + first + "'"), std::string::npos) << index.out;
  auto st = Sh("/usr/bin/python3 -c \"import json,struct,sys; f=open(sys.argv[1],'rb'); "
               "n=struct.unpack('<Q', f.read(8))[0]; print(sorted(k for k in json.loads(f.read(n)) "
               "if k != '__metadata__'))\" " + Q(m->path() + "/model.safetensors"));
  EXPECT_NE(st.out.find("'" + first + "'"), std::string::npos) << st.out << st.err;
  EXPECT_EQ(inode("config.yaml"), config_ino);
  EXPECT_EQ(inode("archive/" + weights), weights_ino);
  EXPECT_EQ(inode("tensors"), tensors_ino);
  // A tensor of the new file, patched in place, is in the checkpoint after
  // the unmount.
  const std::string patched = m->path() + "/tensors/" + first;
  r = Sh("printf 'NEMO' | dd of=" + Q(patched) + " conv=notrunc status=none");
  EXPECT_EQ(r.exit_code, 0) << r.err << m->Log();
  m->Unmount();
  EXPECT_NE(m->Log().find("read the checkpoint again"), std::string::npos) << m->Log();
  auto after = Sh(Q(NemofsBinary()) + " cat " + Q(src) + " tensors/" + Q(first) + " | head -c 4");
  EXPECT_EQ(after.out, "NEMO") << after.err;
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src));
  EXPECT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_NE(ls.out.find("float64"), std::string::npos) << ls.out;
  auto verify = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(verify.exit_code, 0) << verify.out << verify.err;
}

// Readers all along while the weight file is replaced back and forth:
// every read of a tensor file is a whole tensor of one of the two files
// (or ENOENT for a name the other file lacks), never EIO or mixed bytes,
// and the daemon lives on.
TEST_P(ReplaceWeights, ReadersDuringReplacementsSeeOneFileOrTheOther) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  const std::string mine = dir.Join("weights.orig");
  ASSERT_EQ(Sh("cp " + Q(m->path() + "/archive/model_weights.ckpt") + " " + Q(mine)).exit_code, 0);
  // Digests of every tensor of either file, from `nemofs cat` of each.
  std::string digests;
  for (const std::string& f : {mine, TestData("torch/dtypes.pt")}) {
    auto r = Sh("f=" + Q(f) + "; for k in $(" + Q(NemofsBinary()) +
                " cat \"$f\" index.json | /usr/bin/python3 -c \"import json,sys; "
                "print(' '.join(v['path'] for v in json.load(sys.stdin)['tensors'].values()))\"); do "
                "printf '%s %s\\n' \"${k#tensors/}\" $(" + Q(NemofsBinary()) +
                " cat \"$f\" \"$k\" | sha256sum | cut -c1-64); done");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    digests += r.out;
  }
  WriteFile(dir.Join("digests"), digests);
  const std::string reader =
      "for i in $(seq 25); do for f in tensors/*; do "
      "d=$({ sha256sum < \"$f\"; } 2>/dev/null | cut -c1-64) || continue; "
      "[ -n \"$d\" ] || continue; "
      "grep -qx \"${f#tensors/} $d\" " + Q(dir.Join("digests")) +
      " || { [ -e \"$f\" ] && echo \"BAD $f $d\"; }; done; done";
  auto r = Sh("cd " + Q(m->path()) + " && (" + reader + ") > " + Q(dir.Join("r1")) + " 2>&1 & (" +
                  "cd " + Q(m->path()) + " && " + reader + ") > " + Q(dir.Join("r2")) + " 2>&1 & " +
                  "cd " + Q(m->path()) + " && for i in 1 2 3 4 5 6; do cp " +
                  Q(TestData("torch/dtypes.pt")) + " archive/model_weights.ckpt && cp " + Q(mine) +
                  " archive/model_weights.ckpt || echo CPFAIL; done; wait",
              300);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out, "") << r.err << m->Log();
  EXPECT_EQ(ReadFile(dir.Join("r1")) + ReadFile(dir.Join("r2")), "");
  EXPECT_EQ(::kill(m->pid(), 0), 0) << "the daemon died";
  // The last copy is the original file again.
  EXPECT_EQ(Sh("cmp " + Q(mine) + " " + Q(m->path() + "/archive/model_weights.ckpt")).exit_code, 0);
  m->Unmount();
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

// One per way of saving: an appended member, a rewrite, a folder's file.
INSTANTIATE_TEST_SUITE_P(Kinds, ReplaceWeights,
                         ::testing::Values("plain_tar", "gzip_tar", "extracted_nemo_folder"),
                         KindParamName);

// What stays read-only: the synthesized files (model.safetensors takes
// only a valid safetensors file), and the one file of a single-file
// checkpoint (its tensors are written through tensors/).
// Through a mount shared with -o allow_other, only who may write a file
// may replace it: `nobody` can neither replace root's tokenizer file or
// archive member nor write a tensor (EACCES), and nothing is stored.
TEST(ReplaceRules, OthersOfASharedMountCannotReplaceWhatTheyMayNotWrite) {
  TempDir dir;
  const SourceKind& kind = Kind("plain_tar");
  std::string src = MakeSource(kind, dir);
  ASSERT_EQ(Sh("chmod 644 " + Q(src)).exit_code, 0);
  const std::string digest = Sh("sha256sum < " + Q(src)).out;
  MountOptions options;
  options.writable = true;
  auto m = Mount::Start(src, {"-o", "allow_other"}, options);
  ASSERT_TRUE(m);
  // nobody may reach the mount point.
  for (auto p = std::filesystem::path(m->path()); p != p.parent_path(); p = p.parent_path()) {
    if (p.string() == "/tmp") break;
    ::chmod(p.c_str(), 0755);
  }
  auto r = Sh(AsNobody("cd " + Q(m->path()) + " && cat tokenizer/merges.txt > /dev/null"));
  ASSERT_EQ(r.exit_code, 0) << "nobody cannot even read: " << r.err;
  for (const std::string& write :
       {std::string("echo x > tokenizer/merges.txt"), std::string("echo x >> archive/") +
                                                          TokenizerMember(src, "vocab.json"),
        "printf x | dd of=" + Q(TensorFile(*m)) + " conv=notrunc status=none"}) {
    r = Sh(AsNobody("cd " + Q(m->path()) + " && " + write));
    EXPECT_NE(r.exit_code, 0) << write;
    EXPECT_NE(r.err.find("Permission denied"), std::string::npos) << write << ": " << r.err;
  }
  m->Unmount();
  EXPECT_EQ(Sh("sha256sum < " + Q(src)).out, digest) << "the source changed";
}

TEST(ReplaceRules, SynthesizedFilesAndASingleFileSourceStayReadOnly) {
  TempDir dir;
  std::string src = MakeSource(Kind("plain_tar"), dir);
  const std::string digest = SourceDigest(src);
  {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    for (const char* f : {"index.json", "checkpoint.json"}) {
      auto r = Sh("printf x | dd of=" + Q(m->path() + "/" + f) + " conv=notrunc status=none");
      EXPECT_NE(r.exit_code, 0) << f;
      EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << f << ": " << r.err;
    }
    // model.safetensors is written back whole (structure_test.cc): a byte
    // over its header length makes it invalid, refused at the close.
    auto r = Sh("printf x | dd of=" + Q(m->path() + "/model.safetensors") +
                " conv=notrunc status=none");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
    m->Unmount();
  }
  EXPECT_EQ(SourceDigest(src), digest);
  std::string ckpt = dir.Join("lightning.ckpt");
  ASSERT_EQ(Sh("cp " + Q(TestData("torch/lightning.ckpt")) + " " + Q(ckpt)).exit_code, 0);
  auto m = Mount::StartWritable(ckpt);
  ASSERT_TRUE(m);
  auto r = Sh("printf x | dd of=" + Q(m->path() + "/archive/lightning.ckpt") +
              " conv=notrunc status=none");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << r.err;
  m->Unmount();
  EXPECT_NE(m->Log().find("write its tensors through tensors/"), std::string::npos) << m->Log();
}

}  // namespace
}  // namespace nemofs::testing
