// A folder's multi-path commit with one commit point (write/folder_txn.h):
// what it applies, a crash at each step (the real fault points, in a forked
// child), and journals that are not nemofs's own.
#include "write/folder_txn.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "test_util.h"
#include "util/fd.h"
#include "write/config_commit.h"
#include "write/fault.h"

namespace nemofs::write {
namespace {

namespace fs = std::filesystem;
using nemofs::testing::ReadFile;
using nemofs::testing::TempDir;

void Put(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// Every file of the folder (relative path -> content).
std::map<std::string, std::string> Files(const std::string& root) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    if (e.is_regular_file()) out[fs::relative(e.path(), root).string()] = ReadFile(e.path().string());
  }
  return out;
}

void MakeSource(const TempDir& d) {
  Put(d.Join("w/a/.zarray"), "A");
  Put(d.Join("w/a/0"), "a0");
  Put(d.Join("w/b/.zarray"), "B");
  Put(d.Join("w/c/.zarray"), "C");
  Put(d.Join("keep.txt"), "keep");
}

// The change every test commits: a removed, b renamed to b2, c replaced,
// d new (a folder), notes.txt new (a file).
Status Change(int root, const std::string& shown) {
  NEMOFS_ASSIGN_OR_RETURN(auto t, FolderTransaction::Begin(root, shown));
  NEMOFS_RETURN_IF_ERROR(t->Remove("w/a"));
  NEMOFS_RETURN_IF_ERROR(t->Move("w/b", "w/b2"));
  for (const char* name : {"w/c", "w/d"}) {
    NEMOFS_ASSIGN_OR_RETURN(UniqueFd dir, t->NewFolder(name));
    UniqueFd f(::openat(dir.get(), ".zarray", O_WRONLY | O_CREAT | O_EXCL, 0644));
    if (!f.valid() || ::write(f.get(), "new", 3) != 3) return Err(EIO, "write");
  }
  NEMOFS_RETURN_IF_ERROR(t->NewFile("notes.txt", "n"));
  return t->Commit();
}

const std::map<std::string, std::string> kAfter = {
    {"w/b2/.zarray", "B"}, {"w/c/.zarray", "new"}, {"w/d/.zarray", "new"},
    {"keep.txt", "keep"},  {"notes.txt", "n"}};
const std::map<std::string, std::string> kBefore = {
    {"w/a/.zarray", "A"}, {"w/a/0", "a0"}, {"w/b/.zarray", "B"}, {"w/c/.zarray", "C"},
    {"keep.txt", "keep"}};

TEST(FolderTransaction, CommitsEveryChangeAndLeavesNothingBehind) {
  TempDir d;
  MakeSource(d);
  UniqueFd root(::open(d.path().c_str(), O_RDONLY | O_DIRECTORY));
  ASSERT_TRUE(Change(root.get(), d.path()).ok());
  EXPECT_EQ(Files(d.path()), kAfter);
  EXPECT_FALSE(fs::exists(d.Join(kFolderCommitJournal)));
  EXPECT_EQ(std::distance(fs::directory_iterator(d.path()), fs::directory_iterator()), 3);
}

TEST(FolderTransaction, NotCommittedLeavesTheFolderAsItWas) {
  TempDir d;
  MakeSource(d);
  UniqueFd root(::open(d.path().c_str(), O_RDONLY | O_DIRECTORY));
  {
    auto t = FolderTransaction::Begin(root.get(), d.path());
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->NewFile("w/x", "x").ok());
    ASSERT_TRUE((*t)->Remove("w/a").ok());
  }
  EXPECT_EQ(Files(d.path()), kBefore);
  EXPECT_EQ(std::distance(fs::directory_iterator(d.path()), fs::directory_iterator()), 2);
}

TEST(FolderTransaction, RefusesPathsOutsideTheFolderOrItsOwn) {
  TempDir d;
  MakeSource(d);
  UniqueFd root(::open(d.path().c_str(), O_RDONLY | O_DIRECTORY));
  auto t = FolderTransaction::Begin(root.get(), d.path());
  ASSERT_TRUE(t.ok());
  for (const char* bad : {"../x", "/etc/passwd", "w/../../x", "", "w//a", ".nemofs-commit",
                          "w/./a", ".commit.nemofs-tmp.1"}) {
    EXPECT_EQ((*t)->Remove(bad).error().code(), EINVAL) << bad;
  }
  EXPECT_EQ((*t)->NewFile("a/../../b", "x").error().code(), EINVAL);
}

// A crash at each fault point (a forked child _exit(77)s there); the
// next open (RollBackInterruptedPatch, as every open runs it) gives the
// old folder before the commit point and the new one after it; a second
// open does nothing more.
class FolderCommitCrash : public ::testing::TestWithParam<std::pair<const char*, bool>> {};

TEST_P(FolderCommitCrash, TheNextOpenGivesTheOldFolderOrTheNew) {
  const auto [step, committed] = GetParam();
  TempDir d;
  MakeSource(d);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("NEMOFS_FAULT", step, 1);
    UniqueFd root(::open(d.path().c_str(), O_RDONLY | O_DIRECTORY));
    Status st = Change(root.get(), d.path());
    ::_exit(st.ok() ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == kFaultExitCode) << status;
  EXPECT_EQ(fs::exists(d.Join(kFolderCommitJournal)), committed);
  auto done = RollBackInterruptedPatch(d.path(), true, false);
  ASSERT_TRUE(done.ok()) << done.error().message();
  EXPECT_EQ(*done, "") << "a finished commit is logged, not a problem of the source";
  EXPECT_FALSE(fs::exists(d.Join(kFolderCommitJournal)));
  std::map<std::string, std::string> files = Files(d.path());
  // Before the commit point the stage and the journal's temp are orphans
  // (their process is gone): not part of the checkpoint; repack removes them.
  bool orphans = false;
  for (auto it = files.begin(); it != files.end();) {
    const bool temp = it->first.find(".nemofs-tmp.") != std::string::npos;
    orphans |= temp;
    it = temp ? files.erase(it) : std::next(it);
  }
  EXPECT_EQ(orphans, !committed);
  EXPECT_EQ(files, committed ? kAfter : kBefore);
  auto again = RollBackInterruptedPatch(d.path(), true, false);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, "");
}

INSTANTIATE_TEST_SUITE_P(Steps, FolderCommitCrash,
                         ::testing::Values(std::make_pair("folder-commit:staged", false),
                                           std::make_pair("folder-commit:journal", true),
                                           std::make_pair("folder-commit:half", true),
                                           std::make_pair("folder-commit:applied", true)),
                         [](const auto& info) {
                           std::string n = info.param.first;
                           return n.substr(n.find(':') + 1);
                         });

// A journal nemofs did not write (or one naming a path outside the folder)
// is refused with EIO naming it; nothing is moved.
TEST(FolderTransaction, AForeignJournalIsRefusedAndNothingMoves) {
  for (const char* text :
       {"not json", R"({"nemofs_folder_commit":1,"stage":".commit.nemofs-tmp.9","out":["../x"],"in":[]})",
        R"({"nemofs_folder_commit":1,"stage":"../up","out":[],"in":[]})",
        R"({"nemofs_folder_commit":1,"stage":".commit.nemofs-tmp.9","out":["w/a"],"in":[["old/5","w/z"]]})",
        R"({"nemofs_folder_commit":2,"stage":".commit.nemofs-tmp.9","out":[],"in":[]})"}) {
    TempDir d;
    MakeSource(d);
    fs::create_directories(d.Join(".commit.nemofs-tmp.9/new"));
    Put(d.Join(kFolderCommitJournal), text);
    auto r = RollBackInterruptedPatch(d.path(), true, false);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.error().code(), EIO) << text;
    EXPECT_NE(r.error().message().find(kFolderCommitJournal), std::string::npos);
    EXPECT_TRUE(fs::exists(d.Join("w/a/0"))) << text;
  }
}

}  // namespace
}  // namespace nemofs::write
