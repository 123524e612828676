// Stored files replaced through the mount (issue 10 §5): a file of
// tokenizer/ or archive/ written with cp, a shell redirect or an editor is
// saved at the close like the config (an appended member of a plain tar, a
// rewrite of a compressed one, a replaced file of a folder), at any size;
// a replaced weight file makes its tensors ESTALE until a remount. The
// oracle is GNU tar (or the folder's file) and a fresh mount.
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

// The weight file replaced whole (with another torch.save file): this
// mount's tensors say ESTALE and the log says why; a remount shows the new
// file's tensors.
TEST(ReplaceWeights, TensorsOfAReplacedWeightFileAreEstaleUntilARemount) {
  const SourceKind& kind = Kind("plain_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto t = Sh("ls " + Q(m->path() + "/tensors") + " | head -1");
  const std::string tensor = m->path() + "/tensors/" + t.out.substr(0, t.out.find('\n'));
  auto r = Sh("cp " + Q(TestData("torch/dtypes.pt")) + " " +
              Q(m->path() + "/archive/model_weights.ckpt") + " && cmp " +
              Q(TestData("torch/dtypes.pt")) + " " + Q(m->path() + "/archive/model_weights.ckpt"));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  auto stale = Sh("cat " + Q(tensor) + " > /dev/null");
  EXPECT_NE(stale.exit_code, 0);
  EXPECT_NE(stale.err.find("Stale file handle"), std::string::npos) << stale.err;
  auto w = Sh("printf x | dd of=" + Q(tensor) + " conv=notrunc status=none");
  EXPECT_NE(w.exit_code, 0) << "a tensor write into the replaced file's old bytes";
  m->Unmount();
  EXPECT_NE(m->Log().find("reads ESTALE from now on"), std::string::npos) << m->Log();
  auto ls = Sh(Q(NemofsBinary()) + " ls " + Q(src));
  EXPECT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_NE(ls.out.find("float64"), std::string::npos) << ls.out;
}

// What stays read-only: the synthesized files, and the one file of a
// single-file checkpoint (its tensors are written through tensors/).
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
    for (const char* f : {"model.safetensors", "index.json", "checkpoint.json"}) {
      auto r = Sh("printf x | dd of=" + Q(m->path() + "/" + f) + " conv=notrunc status=none");
      EXPECT_NE(r.exit_code, 0) << f;
      EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << f << ": " << r.err;
    }
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
