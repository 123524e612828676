// util/spill.h: staged bytes in memory, moved to an unlinked spill file past
// the limits; snapshots that never change under their reader.
#include "util/spill.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

#include "test_util.h"
#include "util/fd.h"

namespace nemofs {
namespace {

using testing::TempDir;

std::shared_ptr<SpillPool> Pool(const TempDir& dir, uint64_t file_above = 64) {
  auto pool = std::make_shared<SpillPool>();
  pool->dir = dir.Join("spill");
  pool->file_above = file_above;
  return pool;
}

std::string All(const SpillBytes& b) {
  auto r = b.Read(0, b.size());
  EXPECT_TRUE(r.ok());
  return r.ok() ? *r : "";
}

TEST(Spill, SmallBytesStayInMemoryLargeOnesMoveToAFileAndReadTheSame) {
  TempDir dir;
  auto pool = Pool(dir);
  SpillBytes b(pool);
  ASSERT_TRUE(b.Write(0, "hello").ok());
  EXPECT_FALSE(b.in_file());
  EXPECT_EQ(pool->memory.load(), 5u);
  EXPECT_EQ(pool->files.load(), 0u);
  // A gap reads as zeros; past 64 bytes it lives in a file.
  ASSERT_TRUE(b.Write(100, "world").ok());
  EXPECT_TRUE(b.in_file());
  EXPECT_EQ(pool->memory.load(), 0u);
  EXPECT_EQ(pool->files.load(), 1u);
  EXPECT_EQ(All(b), "hello" + std::string(95, '\0') + "world");
  // The file is unlinked: nothing is left in the folder.
  EXPECT_EQ(testing::Sh("ls -A " + testing::ShellQuote(pool->dir)).out, "");
  ASSERT_TRUE(b.Resize(3).ok());
  EXPECT_EQ(All(b), "hel");
  ASSERT_TRUE(b.Resize(6).ok());
  EXPECT_EQ(All(b), std::string("hel\0\0\0", 6));
  ASSERT_TRUE(b.Resize(0).ok());  // emptied: back in memory
  EXPECT_FALSE(b.in_file());
  EXPECT_EQ(pool->files.load(), 0u);
}

TEST(Spill, TheMemoryBudgetSendsGrowthToFiles) {
  TempDir dir;
  auto pool = Pool(dir, 1000);
  pool->memory_budget = 150;
  SpillBytes a(pool), b(pool);
  ASSERT_TRUE(a.Write(0, std::string(100, 'a')).ok());
  ASSERT_TRUE(b.Write(0, std::string(40, 'b')).ok());
  EXPECT_FALSE(b.in_file());
  ASSERT_TRUE(b.Write(40, std::string(40, 'b')).ok());  // 180 > 150
  EXPECT_TRUE(b.in_file());
  EXPECT_EQ(pool->memory.load(), 100u);
  EXPECT_EQ(All(b), std::string(80, 'b'));
}

// A snapshot is the bytes at that moment: later writes, truncates and
// O_TRUNC copy first, in memory and in a file alike.
TEST(Spill, ASnapshotNeverChangesUnderItsReader) {
  TempDir dir;
  for (uint64_t file_above : {uint64_t{1} << 20, uint64_t{8}}) {
    auto pool = Pool(dir, file_above);
    SpillBytes b(pool);
    ASSERT_TRUE(b.Write(0, "0123456789abcdef").ok());
    auto snap = b.Snapshot();
    ASSERT_TRUE(snap.ok());
    EXPECT_EQ(snap->bytes, "0123456789abcdef");
    ASSERT_TRUE(b.Write(2, "XY").ok());
    ASSERT_TRUE(b.Resize(4).ok());
    EXPECT_EQ(snap->bytes, "0123456789abcdef") << "file_above " << file_above;
    EXPECT_EQ(All(b), "01XY");
    auto second = b.Snapshot();
    ASSERT_TRUE(second.ok());
    ASSERT_TRUE(b.Resize(0).ok());
    ASSERT_TRUE(b.Write(0, "new").ok());
    EXPECT_EQ(second->bytes, "01XY");
    EXPECT_EQ(snap->bytes, "0123456789abcdef");
  }
}

// The copy made for a write under a snapshot takes only what a sparse
// spill file holds data in (a staged tensor's file is mostly a hole): two
// 1 GiB files fit a 16 MiB tmpfs.
TEST(Spill, ACopyOfASparseFileStaysSparse) {
  TempDir dir;
  testing::SmallTmpfs small(dir.Join("small"), "16m");
  ASSERT_TRUE(small.mounted());
  auto pool = std::make_shared<SpillPool>();
  pool->dir = dir.Join("small");
  pool->file_above = 64;
  SpillBytes b(pool);
  const uint64_t size = 1ull << 30;
  ASSERT_TRUE(b.Write(size - 4, "tail").ok());
  ASSERT_TRUE(b.Write(4096 * 10, "head").ok());
  auto snap = b.Snapshot();
  ASSERT_TRUE(snap.ok());
  auto st = b.Write(0, "z");  // copies
  ASSERT_TRUE(st.ok()) << st.error().message();
  EXPECT_EQ(pool->files.load(), 2u);
  EXPECT_EQ(snap->bytes.substr(0, 1), std::string(1, '\0'));
  EXPECT_EQ(snap->bytes.substr(4096 * 10, 4), "head");
  EXPECT_EQ(snap->bytes.substr(size - 4), "tail");
  for (auto [at, want] : {std::pair<uint64_t, std::string>{0, "z"}, {4096 * 10, "head"},
                          {size - 4, "tail"}}) {
    auto r = b.Read(at, want.size());
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, want) << "at " << at;
  }
  EXPECT_EQ(b.size(), size);
}

TEST(Spill, CopyFromTakesBytesOfAnotherFile) {
  TempDir dir;
  std::string path = dir.Join("src.bin");
  std::string content;
  for (int i = 0; i < 5000; ++i) content += static_cast<char>(i * 7);
  testing::WriteFile(path, content);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  for (uint64_t file_above : {uint64_t{1} << 20, uint64_t{100}}) {
    SpillBytes b(Pool(dir, file_above));
    ASSERT_TRUE(b.CopyFrom(fd.get(), 10, 4000, 0, path).ok());
    ASSERT_TRUE(b.CopyFrom(fd.get(), 0, 10, 4000, path).ok());
    EXPECT_EQ(All(b), content.substr(10, 4000) + content.substr(0, 10));
    // Past the end of the file: EIO, the buffer as it was.
    auto bad = b.CopyFrom(fd.get(), 4990, 100, 0, path);
    EXPECT_FALSE(bad.ok());
    EXPECT_EQ(b.size(), 4010u);
  }
}

TEST(Spill, AFullSpillFolderIsENOSPCNamingItAndTheBytesStayAsTheyWere) {
  TempDir dir;
  testing::SmallTmpfs small(dir.Join("small"), "1m");
  ASSERT_TRUE(small.mounted());
  auto pool = std::make_shared<SpillPool>();
  pool->dir = dir.Join("small");
  pool->file_above = 16;
  SpillBytes b(pool);
  ASSERT_TRUE(b.Write(0, std::string(100, 'a')).ok());
  auto st = b.Write(100, std::string(4 << 20, 'b'));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code(), ENOSPC);
  EXPECT_NE(st.error().message().find(pool->dir), std::string::npos) << st.error().message();
  EXPECT_EQ(b.size(), 100u);
  EXPECT_EQ(All(b), std::string(100, 'a'));
}

}  // namespace
}  // namespace nemofs
