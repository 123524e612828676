// Owners and modes of the tree (tree/access.h) and folder sources that never
// lead outside their folder (symlinks, a component swapped for a link).
#include "tree/access.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "nemofs/filesystem.h"
#include "source/source.h"
#include "test_util.h"

namespace nemofs {
namespace {

using testing::TempDir;
using tree::Access;
using tree::Combine;

TEST(Access, CombineKeepsOnlyWhatBothGrant) {
  // Same owner and group: the bitwise intersection.
  EXPECT_EQ(Combine({1, 1, 0644}, {1, 1, 0600}).mode, 0600u);
  EXPECT_EQ(Combine({1, 1, 0755}, {1, 1, 0644}).mode, 0644u);
  // Another owner: a's owner is judged by b's group and other bits.
  EXPECT_EQ(Combine({1, 1, 0644}, {2, 1, 0640}).mode, 0040u);
  EXPECT_EQ(Combine({1, 1, 0644}, {2, 1, 0644}).mode, 0444u);
  // Another group: a's group is judged by b's other bits.
  EXPECT_EQ(Combine({1, 1, 0644}, {1, 2, 0640}).mode, 0600u);
  // Never more than either side, whatever the owners.
  for (uint32_t a = 0; a < 0777; a += 7) {
    for (uint32_t b = 0; b < 0777; b += 11) {
      for (uint32_t ub : {1u, 2u}) {
        Access c = Combine({1, 1, a}, {ub, ub, b});
        EXPECT_EQ(c.mode & ~a, 0u);
        EXPECT_EQ(c.mode & 07 & ~b, 0u);
        EXPECT_EQ(c.uid, 1u);
      }
    }
  }
  EXPECT_EQ(tree::DirMode(0640), 0750u);
  EXPECT_EQ(tree::DirMode(0604), 0705u);
}

std::unique_ptr<Filesystem> Open(const std::string& path) {
  FilesystemOptions o;
  o.source = path;
  o.cache_dir = path + ".cache";
  auto fs = Filesystem::Open(o);
  EXPECT_TRUE(fs) << fs.error().message();
  return fs ? std::move(fs).value() : nullptr;
}

std::string ReadAll(Filesystem& fs, const std::string& path) {
  auto ino = fs.Resolve(path);
  if (!ino) return "<" + ino.error().message() + ">";
  auto plan = fs.Read(*ino, 0, 1 << 20);
  if (!plan) return "<" + plan.error().message() + ">";
  std::string buf(plan->size(), '\0');
  auto ok = ExecuteReadPlan(*plan, buf.data());
  if (!ok) return "<" + ok.error().message() + ">";
  return buf;
}

// An extracted .nemo folder with a secret beside it.
std::string MakeFolder(const TempDir& dir) {
  std::string src = dir.Join("ckpt");
  std::filesystem::create_directories(src + "/sub");
  testing::WriteFile(src + "/model_config.yaml", "a: 1\n");
  testing::WriteFile(src + "/sub/data.txt", "inside\n");
  testing::WriteFile(dir.Join("secret"), "secret\n");
  return src;
}

TEST(FolderSource, LinksOutOfTheFolderAreHiddenWithAWarning) {
  TempDir dir;
  std::string src = MakeFolder(dir);
  ASSERT_EQ(::symlink("../../secret", (src + "/sub/out").c_str()), 0);
  ASSERT_EQ(::symlink(dir.Join("secret").c_str(), (src + "/abs").c_str()), 0);
  ASSERT_EQ(::symlink("sub/data.txt", (src + "/in").c_str()), 0);
  auto fs = Open(src);
  ASSERT_TRUE(fs);
  EXPECT_EQ(fs->Resolve("archive/sub/out").error().code(), ENOENT);
  EXPECT_EQ(fs->Resolve("archive/abs").error().code(), ENOENT);
  EXPECT_EQ(ReadAll(*fs, "archive/in"), "inside\n");
  int warned = 0;
  for (const auto& w : fs->info().warnings) {
    if (w.find("leaves the source folder") != std::string::npos) ++warned;
  }
  EXPECT_EQ(warned, 2);
}

TEST(FolderSource, AComponentSwappedForALinkAfterOpeningCannotLeadOutside) {
  TempDir dir;
  std::string src = MakeFolder(dir);
  auto fs = Open(src);
  ASSERT_TRUE(fs);
  // Between the listing and the first read, sub/ becomes a link to a
  // folder outside with a file of the same name (a race an attacker wins).
  std::filesystem::create_directories(dir.Join("evil"));
  testing::WriteFile(dir.Join("evil/data.txt"), "secret\n");
  std::filesystem::rename(src + "/sub", dir.Join("moved"));
  ASSERT_EQ(::symlink(dir.Join("evil").c_str(), (src + "/sub").c_str()), 0);
  std::string got = ReadAll(*fs, "archive/sub/data.txt");
  EXPECT_EQ(got.find("secret"), std::string::npos) << got;
  EXPECT_NE(got.find("outside the source folder"), std::string::npos) << got;
}

TEST(FolderSource, ModesAndOwnersComeFromStat) {
  TempDir dir;
  std::string src = MakeFolder(dir);
  ASSERT_EQ(::chmod((src + "/sub/data.txt").c_str(), 0640), 0);
  ASSERT_EQ(::chown((src + "/sub/data.txt").c_str(), 123, 456), 0);
  ASSERT_EQ(::chmod((src + "/sub").c_str(), 0710), 0);
  auto fs = Open(src);
  ASSERT_TRUE(fs);
  auto a = fs->GetAttr(*fs->Resolve("archive/sub/data.txt"));
  EXPECT_EQ(a->perm, 0440u);  // write bits cleared: a read-only Filesystem
  EXPECT_EQ(a->uid, 123u);
  EXPECT_EQ(a->gid, 456u);
  EXPECT_EQ(fs->GetAttr(*fs->Resolve("archive/sub"))->perm, 0510u);
}

TEST(ArchiveSource, MembersTakeTheArchiveOwnerAndAreLimitedByItsMode) {
  TempDir dir;
  testing::TarBuilder t;
  t.AddFile("./model_config.yaml", "a: 1\n");
  t.AddHeader({"./open.txt", '0', 2, "", 0666}).AddData("x\n");
  t.AddHeader({"./closed.txt", '0', 2, "", 0600}).AddData("y\n").End();
  std::string src = dir.Join("x.nemo");
  testing::WriteFile(src, t.bytes());
  ASSERT_EQ(::chown(src.c_str(), 77, 88), 0);
  ASSERT_EQ(::chmod(src.c_str(), 0640), 0);
  auto fs = Open(src);
  ASSERT_TRUE(fs);
  auto open = fs->GetAttr(*fs->Resolve("archive/open.txt"));
  EXPECT_EQ(open->perm, 0440u);
  EXPECT_EQ(open->uid, 77u);
  EXPECT_EQ(open->gid, 88u);
  EXPECT_EQ(fs->GetAttr(*fs->Resolve("archive/closed.txt"))->perm, 0400u);
  EXPECT_EQ(fs->GetAttr(*fs->Resolve("archive"))->perm, 0550u);
}

}  // namespace
}  // namespace nemofs
