// util/atomic_replace: the one way files are replaced (config commits,
// archive rewrites, repack, caches). ReplaceFileAt and OpenFolderBeneath
// never write through a symbolic link or outside the folder they start from.
#include "util/atomic_replace.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"
#include "util/io.h"

namespace nemofs {
namespace {

using testing::ReadFile;
using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::WriteFile;

// Both ways to open a folder beneath the root: openat2, and the walk used
// without it.
using OpenFn = Result<UniqueFd> (*)(int, const std::string&, const std::string&, bool, mode_t,
                                    std::optional<std::pair<uid_t, gid_t>>);
const std::pair<const char*, OpenFn> kOpeners[] = {{"openat2", &OpenFolderBeneath},
                                                   {"walk", &OpenFolderBeneathByWalk}};

std::string Listing(const std::string& dir) { return Sh("ls -A " + ShellQuote(dir)).out; }

UniqueFd OpenRoot(const std::string& path) {
  return UniqueFd(::open(path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
}

Status WriteText(int fd, const std::string& text) {
  return WriteFull(fd, text.data(), text.size(), "temp");
}

ReplaceOptions Temp(const std::string& name) {
  ReplaceOptions o;
  o.temp_path = name;
  o.mode = 0644;
  return o;
}

TEST(ReplaceFileAt, ReplacesTheFileInTheOpenFolderAndLeavesNoTemp) {
  TempDir dir;
  ASSERT_EQ(Sh("mkdir -p " + ShellQuote(dir.Join("root/a/b"))).exit_code, 0);
  WriteFile(dir.Join("root/a/b/f.txt"), "old");
  UniqueFd root = OpenRoot(dir.Join("root"));
  ASSERT_TRUE(root.valid());
  auto folder = OpenFolderBeneath(root.get(), dir.Join("root"), "a/b");
  ASSERT_TRUE(folder.ok()) << folder.error().message();
  auto st = ReplaceFileAt(folder->get(), dir.Join("root/a/b"), "f.txt", Temp(".f.tmp.1"),
                          [](int fd) { return WriteText(fd, "new"); });
  ASSERT_TRUE(st.ok()) << st.error().message();
  EXPECT_EQ(ReadFile(dir.Join("root/a/b/f.txt")), "new");
  EXPECT_EQ(Listing(dir.Join("root/a/b")), "f.txt\n");
  struct stat s {};
  ASSERT_EQ(::stat(dir.Join("root/a/b/f.txt").c_str(), &s), 0);
  EXPECT_EQ(s.st_mode & 07777, 0644u);
}

TEST(ReplaceFileAt, RefusesAPathInTheNameOrTheTemp) {
  TempDir dir;
  UniqueFd fd(::open(dir.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  bool called = false;
  auto write = [&](int out) {
    called = true;
    return WriteText(out, "x");
  };
  auto st = ReplaceFileAt(fd.get(), dir.path(), "../escape", Temp(".t.1"), write);
  EXPECT_FALSE(st.ok());
  st = ReplaceFileAt(fd.get(), dir.path(), "f", Temp("../.t.1"), write);
  EXPECT_FALSE(st.ok());
  EXPECT_FALSE(called);
  EXPECT_EQ(Listing(dir.path()), "");
}

TEST(ReplaceFileAt, ASymlinkAtTheTempNameIsNotFollowed) {
  TempDir dir;
  ASSERT_EQ(
      Sh("mkdir " + ShellQuote(dir.Join("root")) + " " + ShellQuote(dir.Join("outside"))).exit_code,
      0);
  // A leftover temp name that is a link to a file elsewhere: removed (it
  // is the link that goes, not its target), never written through.
  WriteFile(dir.Join("outside/victim"), "victim");
  ASSERT_EQ(::symlink(dir.Join("outside/victim").c_str(), dir.Join("root/.f.tmp.1").c_str()), 0);
  UniqueFd fd(::open(dir.Join("root").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  auto st = ReplaceFileAt(fd.get(), dir.Join("root"), "f", Temp(".f.tmp.1"),
                          [](int out) { return WriteText(out, "new"); });
  ASSERT_TRUE(st.ok()) << st.error().message();
  EXPECT_EQ(ReadFile(dir.Join("outside/victim")), "victim");
  EXPECT_EQ(ReadFile(dir.Join("root/f")), "new");
}

TEST(OpenFolderBeneath, RefusesASymlinkedComponentWithELOOPNamingThePath) {
  TempDir dir;
  ASSERT_EQ(Sh("mkdir -p " + ShellQuote(dir.Join("root/a")) + " " + ShellQuote(dir.Join("outside")))
                .exit_code,
            0);
  // Middle and last component alike; a link to a folder inside the root too.
  ASSERT_EQ(::symlink(dir.Join("outside").c_str(), dir.Join("root/a/out").c_str()), 0);
  ASSERT_EQ(::symlink("a", dir.Join("root/inside").c_str()), 0);
  UniqueFd root = OpenRoot(dir.Join("root"));
  for (auto [how, open] : kOpeners) {
    for (std::string rel : {"a/out", "a/out/sub", "inside"}) {
      for (bool create : {false, true}) {
        SCOPED_TRACE(std::string(how) + " " + rel + (create ? " create" : ""));
        auto r = open(root.get(), dir.Join("root"), rel, create, 0755, std::nullopt);
        ASSERT_FALSE(r.ok());
        EXPECT_EQ(r.error().code(), ELOOP) << r.error().message();
        EXPECT_NE(r.error().message().find(dir.Join("root")), std::string::npos)
            << r.error().message();
        EXPECT_NE(r.error().message().find("symbolic link"), std::string::npos)
            << r.error().message();
      }
    }
  }
  EXPECT_EQ(Listing(dir.Join("outside")), "");
}

TEST(OpenFolderBeneath, RefusesDotDotAndAbsolutePathsWithEXDEV) {
  TempDir dir;
  ASSERT_EQ(Sh("mkdir -p " + ShellQuote(dir.Join("root/a"))).exit_code, 0);
  UniqueFd root = OpenRoot(dir.Join("root"));
  for (auto [how, open] : kOpeners) {
    for (std::string rel : {"..", "a/../..", "/tmp"}) {
      SCOPED_TRACE(std::string(how) + " " + rel);
      auto r = open(root.get(), dir.Join("root"), rel, true, 0755, std::nullopt);
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.error().code(), EXDEV) << r.error().message();
    }
  }
}

TEST(OpenFolderBeneath, CreatesMissingFoldersOneByOne) {
  for (auto [how, open] : kOpeners) {
    SCOPED_TRACE(how);
    TempDir dir;
    ASSERT_EQ(Sh("mkdir " + ShellQuote(dir.Join("root"))).exit_code, 0);
    UniqueFd root = OpenRoot(dir.Join("root"));
    auto missing = open(root.get(), dir.Join("root"), "x/y", false, 0755, std::nullopt);
    ASSERT_FALSE(missing.ok());
    EXPECT_EQ(missing.error().code(), ENOENT);
    auto made = open(root.get(), dir.Join("root"), "x/y", true, 0750, std::nullopt);
    ASSERT_TRUE(made.ok()) << made.error().message();
    struct stat s {};
    ASSERT_EQ(::stat(dir.Join("root/x/y").c_str(), &s), 0);
    EXPECT_TRUE(S_ISDIR(s.st_mode));
    struct stat through {};
    ASSERT_EQ(::fstat(made->get(), &through), 0);
    EXPECT_EQ(through.st_ino, s.st_ino);
    EXPECT_EQ(s.st_mode & 07777, 0750u);
    auto root_itself = open(root.get(), dir.Join("root"), "", false, 0755, std::nullopt);
    ASSERT_TRUE(root_itself.ok()) << root_itself.error().message();
  }
}

TEST(ReplaceFile, StillReplacesByPathAndRefusesATempInAnotherFolder) {
  TempDir dir;
  WriteFile(dir.Join("f"), "old");
  auto st = ReplaceFile(dir.Join("f"), Temp(dir.Join("f.tmp.1")),
                        [](int fd) { return WriteText(fd, "new"); });
  ASSERT_TRUE(st.ok()) << st.error().message();
  EXPECT_EQ(ReadFile(dir.Join("f")), "new");
  EXPECT_EQ(Listing(dir.path()), "f\n");
  st = ReplaceFile(dir.Join("f"), Temp("/tmp/elsewhere.1"),
                   [](int fd) { return WriteText(fd, "x"); });
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(ReadFile(dir.Join("f")), "new");
}

TEST(ReplaceFile, ReplacesTheTargetWithTheModeAndLeavesNoTemp) {
  TempDir dir;
  const std::string target = dir.Join("a.nemo");
  WriteFile(target, "old");
  ReplaceOptions options;
  options.temp_path = dir.Join(".a.nemo.tmp");
  options.mode = 0640;
  bool written = false, renamed = false;
  options.on_written = [&] {
    written = true;
    EXPECT_EQ(ReadFile(target), "old");  // not replaced before the rename
  };
  options.on_renamed = [&] { renamed = true; };
  ASSERT_TRUE(ReplaceFile(target, options, [](int fd) { return WriteText(fd, "new"); }).ok());
  EXPECT_EQ(ReadFile(target), "new");
  struct stat st {};
  ASSERT_EQ(::stat(target.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_TRUE(written);
  EXPECT_TRUE(renamed);
  EXPECT_NE(::access(options.temp_path.c_str(), F_OK), 0);
}

TEST(ReplaceFile, AFailedWriteLeavesTheTargetAndRemovesTheTemp) {
  TempDir dir;
  const std::string target = dir.Join("a.nemo");
  WriteFile(target, "old");
  ReplaceOptions options;
  options.temp_path = dir.Join(".a.nemo.tmp");
  auto st = ReplaceFile(target, options, [](int fd) -> Status {
    NEMOFS_RETURN_IF_ERROR(WriteText(fd, "half"));
    return Err(ENOSPC, "disk full");
  });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), ENOSPC);
  EXPECT_EQ(ReadFile(target), "old");
  EXPECT_NE(::access(options.temp_path.c_str(), F_OK), 0);
}

TEST(ReplaceFile, ALeftoverTempIsReplacedAndATempSymlinkIsNotFollowed) {
  TempDir dir;
  const std::string target = dir.Join("a.nemo");
  ReplaceOptions options;
  options.temp_path = dir.Join(".a.nemo.tmp");
  // A leftover of a dead process with the same pid: removed, then used.
  WriteFile(options.temp_path, "stale stale stale");
  ASSERT_TRUE(ReplaceFile(target, options, [](int fd) { return WriteText(fd, "new"); }).ok());
  EXPECT_EQ(ReadFile(target), "new");
  // A symlink in the temp's place: removed (unlink does not follow it), and
  // the file it points at is never written.
  const std::string victim = dir.Join("victim");
  WriteFile(victim, "victim");
  ASSERT_EQ(::symlink(victim.c_str(), options.temp_path.c_str()), 0);
  ASSERT_TRUE(ReplaceFile(target, options, [](int fd) { return WriteText(fd, "newer"); }).ok());
  EXPECT_EQ(ReadFile(target), "newer");
  EXPECT_EQ(ReadFile(victim), "victim");
}

TEST(ReplaceFile, AMissingFolderIsAnErrorNamingTheTarget) {
  TempDir dir;
  ReplaceOptions options;
  options.temp_path = dir.Join("no/such/.t.tmp");
  auto st = ReplaceFile(dir.Join("no/such/t"), options, [](int) -> Status { return Ok(); });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), ENOENT);
  EXPECT_NE(st.error().message().find("no/such/t"), std::string::npos) << st.error().message();
}

}  // namespace
}  // namespace nemofs
