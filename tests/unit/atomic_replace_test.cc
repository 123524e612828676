// util/atomic_replace: the one way files are replaced (config commits,
// archive rewrites, repack, caches).
#include "util/atomic_replace.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "test_util.h"
#include "util/io.h"

namespace nemofs {
namespace {

using testing::ReadFile;
using testing::TempDir;
using testing::WriteFile;

Status WriteText(int fd, const std::string& text) {
  return WriteFull(fd, text.data(), text.size(), "test");
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
