// Config commits under failure (DESIGN.md §4 "Writes", commit rules): a
// crash at every step of every kind of commit, SIGKILL at random instants
// during a stream of saves, a full disk, a source replaced underneath the
// mount, and a read-only source. After each, the source must be valid and
// hold exactly the old or exactly the new config, as GNU tar, Python
// tarfile, `nemofs verify`, `nemofs cat` and a fresh mount see it.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <functional>
#include <random>
#include <sstream>
#include <thread>

#include "mount_harness.h"
#include "test_util.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

void ExpectVerifies(const std::string& source) {
  auto r = Sh(Q(NemofsBinary()) + " verify " + Q(source));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

// The archive as the format's own readers see it: GNU tar lists it, Python
// tarfile reads every member; returns the config's text per tarfile.
std::string TarConfig(const std::string& source) {
  auto gnu = Sh("tar -tf " + Q(source) + " >/dev/null");
  EXPECT_EQ(gnu.exit_code, 0) << "tar -tf: " << gnu.err;
  auto py =
      Sh("/usr/bin/python3 -c 'import sys, tarfile\n"
         "t = tarfile.open(sys.argv[1])\n"
         "t.getmembers()\n"
         "sys.stdout.buffer.write(t.extractfile(\"./model_config.yaml\").read())' " +
         Q(source));
  EXPECT_EQ(py.exit_code, 0) << "tarfile: " << py.err;
  return py.out;
}

// Every way to read the source agrees on `expected`; it passes `verify`.
void ExpectSourceHolds(const SourceKind& kind, const std::string& source,
                       const std::string& expected) {
  if (kind.tar) {
    EXPECT_TRUE(SameText(TarConfig(source), expected)) << "Python tarfile";
  } else {
    EXPECT_TRUE(SameText(ReadFile(source + "/" + kind.member), expected)) << kind.member;
  }
  ExpectVerifies(source);
  EXPECT_TRUE(SameText(CatConfig(source), expected)) << "nemofs cat";
}

// Files a commit leaves beside its target while it runs.
std::string CommitLeftovers(const std::string& dir) {
  return Sh("find " + Q(dir) + " -name '*.nemofs-tmp.*' -o -name '*.nemofs-rewrite.*'").out;
}

bool ExitedWith(int status, int code) { return WIFEXITED(status) && WEXITSTATUS(status) == code; }

std::string DescribeStatus(int status) {
  if (status < 0) return "no exit (" + std::to_string(status) + ")";
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "signal " + std::to_string(WTERMSIG(status));
  return "status " + std::to_string(status);
}

// Copies `file` over the mount's config.yaml with cp; returns the result.
CommandResult CpToConfig(const std::string& file, const Mount& m) {
  return Sh("cp " + Q(file) + " " + Q(m.path() + "/config.yaml"));
}

// An edit after whatever happened before: must commit and be seen by a
// fresh `nemofs cat`, the archive readers and `verify`.
void ExpectEditable(const SourceKind& kind, const std::string& src, const TempDir& dir,
                    const std::string& text) {
  SCOPED_TRACE("a later edit");
  WriteFile(dir.Join("later.yaml"), text);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = CpToConfig(dir.Join("later.yaml"), *m);
  EXPECT_EQ(r.exit_code, 0) << r.err << "\nlog:\n" << m->Log();
  EXPECT_TRUE(SameText(ReadFile(m->path() + "/config.yaml"), text));
  m->Unmount();
  ExpectSourceHolds(kind, src, text);
}

// ---- 1. a crash at each step of each kind of commit ------------------------

struct CrashCase {
  std::string kind;
  std::string step;
  bool committed;  // the step is after the commit point
};

void PrintTo(const CrashCase& c, std::ostream* os) { *os << c.kind << " at " << c.step; }

class Crash : public ::testing::TestWithParam<CrashCase> {};

TEST_P(Crash, LeavesOldOrNew) {
  const CrashCase& c = GetParam();
  const SourceKind& kind = Kind(c.kind);
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  const std::string old_text = CatConfig(src);
  ASSERT_FALSE(old_text.empty());
  const std::string new_text = old_text + "nemofs_crash_test: " + TestName(c.step) + "\n";
  WriteFile(dir.Join("new.yaml"), new_text);
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=" + c.step});
    ASSERT_TRUE(m);
    // The daemon dies inside the commit, so cp fails: its status says nothing.
    CpToConfig(dir.Join("new.yaml"), *m);
    int status = m->ExpectDeath();
    ASSERT_TRUE(ExitedWith(status, 77)) << "daemon: " << DescribeStatus(status) << "; log:\n"
                                        << m->Log();
  }
  // The temp file a crash before the rename leaves behind, which what
  // follows must ignore, and the next save removes.
  const std::string temp_dir = kind.tar ? dir.path() : src;
  if (c.step == "folder:written" || c.step == "rewrite:written") {
    std::string left = CommitLeftovers(temp_dir);
    EXPECT_NE(left.find(c.step == "folder:written" ? ".nemofs-tmp." : ".nemofs-rewrite."),
              std::string::npos)
        << "no leftover in " << temp_dir;
  }
  const std::string& expected = c.committed ? new_text : old_text;
  ExpectSourceHolds(kind, src, expected);
  {
    auto fresh = Mount::Start(src);
    ASSERT_TRUE(fresh);
    EXPECT_TRUE(SameText(ReadFile(fresh->path() + "/config.yaml"), expected)) << "fresh mount";
    if (!kind.tar) {
      auto ls = Sh("ls -RA " + Q(fresh->path() + "/archive"));
      EXPECT_EQ(ls.exit_code, 0) << ls.err;
      EXPECT_NE(ls.out.find(kind.member.substr(kind.member.rfind('/') + 1)), std::string::npos)
          << ls.out;
      EXPECT_EQ(ls.out.find(".nemofs-tmp."), std::string::npos) << ls.out;
    }
  }
  ExpectEditable(kind, src, dir, old_text + "after_crash: " + TestName(c.step) + "\n");
  EXPECT_EQ(CommitLeftovers(temp_dir), "") << "the next save removes what a crash left";
}

INSTANTIATE_TEST_SUITE_P(
    WriteSafety, Crash,
    ::testing::Values(CrashCase{"plain_tar", "tar-append:before", false},
                      CrashCase{"plain_tar", "tar-append:data-written", false},
                      CrashCase{"plain_tar", "tar-append:committed", true},
                      CrashCase{"gzip_tar", "rewrite:written", false},
                      CrashCase{"gzip_tar", "rewrite:renamed", true},
                      CrashCase{"nemo2_folder", "folder:written", false},
                      CrashCase{"nemo2_folder", "folder:renamed", true},
                      CrashCase{"extracted_nemo_folder", "folder:written", false},
                      CrashCase{"extracted_nemo_folder", "folder:renamed", true}),
    [](const auto& info) { return TestName(info.param.kind + "_" + info.param.step); });

// ---- 2. SIGKILL at a random instant during a stream of saves ---------------

class KillLoop : public ::testing::TestWithParam<std::string> {};

TEST_P(KillLoop, LeavesTheLastAcknowledgedOrTheInFlightText) {
  const SourceKind& kind = Kind(GetParam());
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> delay_ms(20, 150);
  for (int round = 0; round < 6; ++round) {
    int delay = delay_ms(rng);
    SCOPED_TRACE("round " + std::to_string(round) + ", SIGKILL after " + std::to_string(delay) +
                 " ms");
    TempDir dir;
    std::string src = MakeSource(kind, dir);
    const std::string old_text = CatConfig(src);
    WriteFile(dir.Join("orig.yaml"), old_text);
    auto text_of = [&](int i) {
      return i == 0 ? old_text : "step: " + std::to_string(i) + "\n" + old_text;
    };
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    // The target goes through archive/.., which exists only while the mount
    // does: a cp after the kill can never create a file in the bare
    // mount point. The loop stops at the first failed save.
    std::string target = m->path() + "/archive/../config.yaml";
    const std::string script = "cd " + Q(dir.path()) + " && target=" + Q(target) + R"(
for i in $(seq 1 1000); do
  { printf 'step: %d\n' "$i"; cat orig.yaml; } > in.yaml || exit 2
  cp in.yaml "$target" 2>>cp.err || break
  echo "$i" >> acked
done)";
    CommandResult loop;
    std::thread writer([&] { loop = Sh(script, 60); });
    std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    int status = m->ExpectDeath(SIGKILL);
    writer.join();
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "daemon: " << DescribeStatus(status) << "; log:\n"
        << m->Log();
    EXPECT_EQ(loop.exit_code, 0) << loop.err;
    // Saves are acknowledged 1, 2, ..., n in order.
    std::istringstream acked_in(ReadFile(dir.Join("acked")));
    int n = 0;
    for (int i; acked_in >> i;) {
      EXPECT_EQ(i, n + 1) << "acked out of order";
      n = i;
    }
    EXPECT_LT(n, 1000) << "the loop ended before the kill";
    SCOPED_TRACE(std::to_string(n) +
                 " saves acknowledged; cp errors: " + ReadFile(dir.Join("cp.err")));
    // The source: valid, holding the last acknowledged text or the one in
    // flight, and nothing else.
    std::string stored;
    if (kind.tar) {
      stored = TarConfig(src);
    } else {
      stored = ReadFile(src + "/" + kind.member);
    }
    ExpectVerifies(src);
    std::string cat = CatConfig(src);
    EXPECT_TRUE(SameText(cat, stored)) << "nemofs cat vs the format's reader";
    bool last = cat == text_of(n);
    bool in_flight = cat == text_of(n + 1);
    EXPECT_TRUE(last || in_flight)
        << "the config is neither save " << n << " nor " << n + 1 << "; it starts with:\n"
        << cat.substr(0, 200);
  }
}

INSTANTIATE_TEST_SUITE_P(WriteSafety, KillLoop,
                         ::testing::ValuesIn(OneKindPerCommit()), KindParamName);

// ---- 3. a full disk ----------------------------------------------------------

// About 64 KiB of valid YAML: top-level keys the config does not have.
std::string ExtraKeys() {
  std::string extra;
  for (int i = 0; extra.size() < (64 << 10); ++i) {
    extra += "full_disk_padding_" + std::to_string(i) + ": \"some text that takes room\"\n";
  }
  return extra;
}

class FullDisk : public ::testing::TestWithParam<std::string> {};

TEST_P(FullDisk, SaveFailsWithENOSPCAndChangesNothing) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string fs_dir = dir.Join("fs");
  SmallTmpfs tmpfs(fs_dir, "2m");
  ASSERT_TRUE(tmpfs.mounted());
  std::string src = MakeSourceAt(kind, fs_dir + "/" + (kind.tar ? "src.nemo" : "src"));
  const std::string old_text = CatConfig(src);
  const std::string extra = ExtraKeys();
  const std::string big = old_text + extra;
  WriteFile(dir.Join("big.yaml"), big);
  WriteFile(dir.Join("extra.yaml"), extra);
  // Fill every block left.
  Sh("dd if=/dev/zero of=" + Q(fs_dir + "/fill") + " bs=4k");
  ASSERT_EQ(Sh("stat -f -c %a " + Q(fs_dir)).out, "0\n") << "the tmpfs is not full";
  const std::string digest = SourceDigest(src);

  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  // cp: the close that commits fails.
  auto r = CpToConfig(dir.Join("big.yaml"), *m);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("No space left on device"), std::string::npos)
      << "cp: " << r.err << "\nlog:\n"
      << m->Log();
  EXPECT_EQ(SourceDigest(src), digest) << "the source changed after the failed cp";
  EXPECT_TRUE(SameText(ReadFile(m->path() + "/config.yaml"), old_text));
  EXPECT_EQ(CommitLeftovers(fs_dir), "");
  // sed -i: the rename that commits fails.
  r = Sh("cd " + Q(m->path()) + " && sed -i '$r " + dir.Join("extra.yaml") + "' config.yaml");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("No space left on device"), std::string::npos)
      << "sed -i: " << r.err << "\nlog:\n"
      << m->Log();
  EXPECT_EQ(SourceDigest(src), digest) << "the source changed after the failed sed -i";
  EXPECT_TRUE(SameText(ReadFile(m->path() + "/config.yaml"), old_text));
  EXPECT_EQ(CommitLeftovers(fs_dir), "");

  // Room again: the same edit succeeds on the same mount.
  ASSERT_EQ(Sh("rm " + Q(fs_dir + "/fill")).exit_code, 0);
  r = CpToConfig(dir.Join("big.yaml"), *m);
  EXPECT_EQ(r.exit_code, 0) << "cp with room: " << r.err << "\nlog:\n" << m->Log();
  EXPECT_TRUE(SameText(ReadFile(m->path() + "/config.yaml"), big));
  m->Unmount();
  EXPECT_TRUE(SameText(CatConfig(src), big));
  if (kind.tar) {
    EXPECT_TRUE(SameText(TarConfig(src), big));
  }
  ExpectVerifies(src);
}

INSTANTIATE_TEST_SUITE_P(WriteSafety, FullDisk,
                         ::testing::ValuesIn(OneKindPerCommit()), KindParamName);

// ---- 4. the source replaced underneath the mount ---------------------------

class ReplacedSource : public ::testing::TestWithParam<std::string> {};

TEST_P(ReplacedSource, SaveFailsWithESTALEAndLeavesTheReplacementAlone) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  // What is put in the source's place: another archive, another config.
  std::string other = dir.Join("other");
  if (kind.name == "plain_tar") {
    ASSERT_EQ(Sh("cp " + Q(TestData("tiny_gpt_gnu.nemo")) + " " + Q(other)).exit_code, 0);
  } else if (kind.name == "gzip_tar") {
    ASSERT_EQ(Sh("gzip -1 -n -c " + Q(TestData("tiny_gpt_gnu.nemo")) + " > " + Q(other)).exit_code,
              0);
  } else {
    WriteFile(other, ReadFile(TestData(kind.data) + "/" + kind.member) + "replaced: true\n");
  }
  for (const std::string how : {"cp_in_place", "mv_over"}) {
    SCOPED_TRACE(how);
    TempDir run;
    std::string src = MakeSource(kind, run);
    std::string target = kind.tar ? src : src + "/" + kind.member;
    const std::string old_text = CatConfig(src);
    WriteFile(run.Join("new.yaml"), old_text + "edited: true\n");
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    std::string inode_before = Sh("stat -c %i " + Q(target)).out;
    if (how == "cp_in_place") {
      ASSERT_EQ(Sh("cp " + Q(other) + " " + Q(target)).exit_code, 0);
      EXPECT_EQ(Sh("stat -c %i " + Q(target)).out, inode_before) << "cp made a new inode";
    } else {
      ASSERT_EQ(Sh("cp " + Q(other) + " " + Q(run.Join("incoming")) + " && mv " +
                   Q(run.Join("incoming")) + " " + Q(target))
                    .exit_code,
                0);
      EXPECT_NE(Sh("stat -c %i " + Q(target)).out, inode_before) << "mv kept the inode";
    }
    const std::string replaced = SourceDigest(src);
    auto r = CpToConfig(run.Join("new.yaml"), *m);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("Stale file handle"), std::string::npos) << "cp: " << r.err << "\nlog:\n"
                                                                  << m->Log();
    r = Sh("cd " + Q(m->path()) + " && sed -i '$a edited_by_sed: true' config.yaml");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("Stale file handle"), std::string::npos) << "sed -i: " << r.err;
    m->Unmount();
    EXPECT_EQ(SourceDigest(target), SourceDigest(other)) << "the replacement was written to";
    EXPECT_EQ(SourceDigest(src), replaced);
    EXPECT_EQ(CommitLeftovers(run.path()), "");
  }
}

INSTANTIATE_TEST_SUITE_P(WriteSafety, ReplacedSource,
                         ::testing::ValuesIn(OneKindPerCommit()), KindParamName);

// ---- 5. a read-only source -------------------------------------------------

class ReadOnlySource : public ::testing::TestWithParam<std::string> {};

TEST_P(ReadOnlySource, MountsReadOnlyAndRefusesEditsWithEROFS) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string target = kind.tar ? src : src + "/" + kind.member;
  ASSERT_EQ(Sh("chmod 0444 " + Q(target)).exit_code, 0);
  const std::string old_text = CatConfig(src);
  const std::string digest = SourceDigest(src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("echo 'a: 1' > " + Q(m->path() + "/config.yaml"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << r.err;
  r = Sh("cd " + Q(m->path()) + " && sed -i '$a b: 2' config.yaml");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << r.err;
  EXPECT_EQ(ReadFile(m->path() + "/config.yaml"), old_text);
  // The log says why the mount is read-only.
  EXPECT_NE(m->Log().find("read-only: " + target + " has no write permission"), std::string::npos)
      << m->Log();
  m->Unmount();
  EXPECT_EQ(SourceDigest(src), digest);
  EXPECT_EQ(Sh("stat -c %a " + Q(target)).out, "444\n");
}

INSTANTIATE_TEST_SUITE_P(WriteSafety, ReadOnlySource,
                         ::testing::Values("plain_tar", "nemo2_folder"), KindParamName);

}  // namespace
}  // namespace nemofs::testing
