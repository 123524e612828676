// The rollback journal (write/journal.h), the incremental zip CRC-32
// (write/crc_patch.h) and the tensor range map's scatter side
// (checkpoint/tensor.h PlanTensorWrite).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <random>

#include "checkpoint/tensor.h"
#include "test_util.h"
#include "util/fd.h"
#include "write/crc_patch.h"
#include "write/journal.h"

namespace nemofs::write {
namespace {

using testing::ReadFile;
using testing::TempDir;
using testing::WriteFile;

uint32_t FullCrc(const std::string& s) {
  return static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(s.data()), s.size()));
}

std::string Random(std::mt19937& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

TEST(Crc32Patch, EqualsTheCrcOfTheWholeNewRecord) {
  std::mt19937 rng(7);
  for (int round = 0; round < 300; ++round) {
    size_t len = 1 + rng() % (round < 10 ? 3'000'000 : 5000);
    std::string rec = Random(rng, len);
    uint32_t crc = FullCrc(rec);
    for (int spans = 1 + rng() % 3; spans-- > 0;) {
      size_t at = rng() % len;
      size_t n = 1 + rng() % (len - at);
      if (round % 7 == 0) at = 0, n = len;  // the whole record
      std::string old = rec.substr(at, n);
      std::string now = Random(rng, n);
      rec.replace(at, n, now);
      crc = Crc32Patch(crc, len, at, old, now);
    }
    ASSERT_EQ(crc, FullCrc(rec)) << "round " << round << " len " << len;
  }
}

struct Folder {
  TempDir dir;
  UniqueFd fd{::open(dir.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  PatchRoot root() const { return PatchRoot{fd.get(), dir.path(), "a.bin.nemofs-journal"}; }
  std::string Journal() const { return dir.Join("a.bin.nemofs-journal"); }
};

TEST(Journal, PatchesAndRemovesItsJournal) {
  Folder f;
  WriteFile(f.dir.Join("a.bin"), std::string(100, 'a'));
  ASSERT_TRUE(ApplyPatch(f.root(), {{"a.bin", 10, "XYZ"}, {"a.bin", 50, "Q"}}, {{"a.bin", 0, "M"}}).ok());
  std::string want(100, 'a');
  want.replace(10, 3, "XYZ");
  want[50] = 'Q';
  want[0] = 'M';
  EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), want);
  EXPECT_FALSE(*HasHotJournal(f.root()));
}

TEST(Journal, RefusesOverlapsRegionsPastTheEndAndLinksWritingNothing) {
  Folder f;
  WriteFile(f.dir.Join("a.bin"), std::string(10, 'a'));
  ASSERT_EQ(::symlink("a.bin", f.dir.Join("link").c_str()), 0);
  auto overlap = ApplyPatch(f.root(), {{"a.bin", 0, "xxx"}, {"a.bin", 2, "yy"}}, {});
  EXPECT_EQ(overlap.error().code(), EINVAL);
  auto past = ApplyPatch(f.root(), {{"a.bin", 8, "xxx"}}, {});
  EXPECT_EQ(past.error().code(), EINVAL);
  auto link = ApplyPatch(f.root(), {{"link", 0, "x"}}, {});
  EXPECT_FALSE(link.ok());
  auto dotdot = ApplyPatch(f.root(), {{"../a.bin", 0, "x"}}, {});
  EXPECT_FALSE(dotdot.ok());
  EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), std::string(10, 'a'));
  EXPECT_FALSE(*HasHotJournal(f.root()));
}

// A crash at each step (a child _exits there), then a rollback: the old bytes.
TEST(Journal, ACrashAtEveryStepRollsBackToTheOldBytes) {
  for (const char* step : {"journal:before-fsync", "patch:half", "patch:before-meta",
                           "patch:before-delete"}) {
    Folder f;
    const std::string old = std::string(4096, 'o');
    WriteFile(f.dir.Join("a.bin"), old);
    pid_t pid = ::fork();
    if (pid == 0) {
      ::setenv("NEMOFS_FAULT", step, 1);
      auto st = ApplyPatch(f.root(), {{"a.bin", 100, std::string(2000, 'n')}}, {{"a.bin", 0, "CRC!"}});
      ::_exit(st.ok() ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77) << step;
    ASSERT_TRUE(*HasHotJournal(f.root())) << step;
    auto done = RollBackHotJournal(f.root());
    ASSERT_TRUE(done.ok()) << step << ": " << done.error().message();
    EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), old) << step;
    EXPECT_FALSE(*HasHotJournal(f.root())) << step;
    // Idempotent: a second rollback has nothing to do.
    EXPECT_EQ(*RollBackHotJournal(f.root()), "");
  }
}

// A region to the end of its file (a re-encoded zarr chunk): the file
// takes the new size, and a crash at any step rolls back to the old bytes
// and the old size, for a file that grows and one that shrinks.
TEST(Journal, AToEndRegionChangesTheSizeAndRollsBackToTheOldSize) {
  for (size_t new_size : {size_t{3000}, size_t{200}}) {
    Folder f;
    const std::string old = std::string(1000, 'o');
    const std::string now = std::string(new_size, 'n');
    WriteFile(f.dir.Join("a.bin"), old);
    Region r{"a.bin", 10, now, "", true};
    ASSERT_TRUE(ApplyPatch(f.root(), {r}, {}).ok());
    EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), old.substr(0, 10) + now);
    WriteFile(f.dir.Join("a.bin"), old);
    for (const char* step : {"patch:half", "patch:before-delete"}) {
      pid_t pid = ::fork();
      if (pid == 0) {
        ::setenv("NEMOFS_FAULT", step, 1);
        _exit(ApplyPatch(f.root(), {r}, {}).ok() ? 0 : 1);
      }
      int status = 0;
      ASSERT_EQ(::waitpid(pid, &status, 0), pid);
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77) << step;
      auto done = RollBackHotJournal(f.root());
      ASSERT_TRUE(done.ok()) << step << ": " << done.error().message();
      EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), old) << step << " " << new_size;
    }
  }
  // It starts inside the file and nothing of that file may follow it.
  Folder f;
  WriteFile(f.dir.Join("a.bin"), std::string(100, 'a'));
  EXPECT_EQ(ApplyPatch(f.root(), {Region{"a.bin", 101, "x", "", true}}, {}).error().code(), EINVAL);
  EXPECT_EQ(ApplyPatch(f.root(), {Region{"a.bin", 10, "x", "", true}}, {{"a.bin", 50, "y"}})
                .error()
                .code(),
            EINVAL);
  EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), std::string(100, 'a'));
}

TEST(Journal, ACutOffJournalChangesNothingAndABadRecordIsAnErrorThatStays) {
  Folder f;
  WriteFile(f.dir.Join("a.bin"), std::string(64, 'o'));
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("NEMOFS_FAULT", "patch:before-delete", 1);
    (void)ApplyPatch(f.root(), {{"a.bin", 8, std::string(16, 'n')}}, {});
    ::_exit(1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  const std::string journal = ReadFile(f.Journal());
  const std::string patched = ReadFile(f.dir.Join("a.bin"));
  ASSERT_NE(patched, std::string(64, 'o'));
  // Every cut: incomplete, so removed and the (patched) file left as it is.
  for (size_t cut = 0; cut < journal.size(); ++cut) {
    WriteFile(f.Journal(), journal.substr(0, cut));
    auto done = RollBackHotJournal(f.root());
    ASSERT_TRUE(done.ok()) << cut;
    ASSERT_EQ(ReadFile(f.dir.Join("a.bin")), patched) << cut;
    ASSERT_FALSE(*HasHotJournal(f.root())) << cut;
  }
  // A flipped old byte: with the trailer as it was, the journal is cut off
  // (removed, file untouched); with the trailer's checksum made to match, the
  // record's own checksum catches it: EIO, and the journal stays.
  std::string bad = journal;
  bad[bad.size() - 25] ^= 1;  // inside the last record's old bytes
  WriteFile(f.Journal(), bad);
  EXPECT_TRUE(RollBackHotJournal(f.root()).ok());
  EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), patched);
  uint32_t crc = FullCrc(bad.substr(0, bad.size() - 20));
  for (int i = 0; i < 4; ++i) bad[bad.size() - 4 + i] = static_cast<char>((crc >> (8 * i)) & 0xff);
  WriteFile(f.Journal(), bad);
  auto done = RollBackHotJournal(f.root());
  ASSERT_FALSE(done.ok());
  EXPECT_EQ(done.error().code(), EIO);
  EXPECT_NE(done.error().message().find("checksum"), std::string::npos) << done.error().message();
  EXPECT_TRUE(*HasHotJournal(f.root()));
  EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), patched);
}

// A crash in the middle of a rollback, then another rollback: the old bytes.
TEST(Journal, ARollbackCutOffHalfwayIsDoneAgain) {
  Folder f;
  const std::string old(4096, 'o');
  WriteFile(f.dir.Join("a.bin"), old);
  auto crash_at = [&](const char* step, bool rollback) {
    pid_t pid = ::fork();
    if (pid == 0) {
      ::setenv("NEMOFS_FAULT", step, 1);
      if (rollback) {
        (void)RollBackHotJournal(f.root());
      } else {
        (void)ApplyPatch(f.root(), {{"a.bin", 10, std::string(3000, 'n')}}, {});
      }
      ::_exit(1);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  ASSERT_EQ(crash_at("patch:before-delete", false), 77);
  ASSERT_EQ(crash_at("rollback:half", true), 77);
  const std::string half = ReadFile(f.dir.Join("a.bin"));
  EXPECT_NE(half, old) << "the rollback was to stop halfway";
  ASSERT_TRUE(*HasHotJournal(f.root()));
  ASSERT_TRUE(RollBackHotJournal(f.root()).ok());
  EXPECT_EQ(ReadFile(f.dir.Join("a.bin")), old);
  EXPECT_FALSE(*HasHotJournal(f.root()));
}

// A full disk while the journal is written: ENOSPC, the file byte-identical,
// no journal left.
TEST(Journal, AFullDiskWhileJournalingIsENOSPCAndChangesNothing) {
  TempDir dir;
  const std::string fs_dir = dir.Join("small");
  auto r = testing::Sh("mkdir " + testing::ShellQuote(fs_dir) + " && mount -t tmpfs -o size=2m tmpfs " +
                       testing::ShellQuote(fs_dir));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string file = fs_dir + "/a.bin";
  const std::string old(1536 * 1024, 'o');
  WriteFile(file, old);
  {
    UniqueFd fd(::open(fs_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    PatchRoot root{fd.get(), fs_dir, "a.bin.nemofs-journal"};
    auto st = ApplyPatch(root, {{"a.bin", 0, std::string(1024 * 1024, 'n')}}, {});
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().code(), ENOSPC) << st.error().message();
    EXPECT_FALSE(*HasHotJournal(root));
  }
  EXPECT_EQ(ReadFile(file), old);
  testing::Sh("umount -l " + testing::ShellQuote(fs_dir));
}

TEST(Journal, ParseSurvivesRandomBytes) {
  std::mt19937 rng(3);
  for (int i = 0; i < 2000; ++i) {
    std::string b = Random(rng, rng() % 200);
    if (i % 3) b = (i % 3 == 1 ? "NEMOFSJ1" : "NEMOFSJ2") + b;
    auto parsed = ParseJournal(b, "fuzz");
    if (parsed.ok()) {
      EXPECT_FALSE(parsed->complete);
    }
  }
}

}  // namespace
}  // namespace nemofs::write

namespace nemofs::checkpoint {
namespace {

Tensor Make(std::vector<int64_t> shape) {
  Tensor t;
  t.key = "w";
  t.dtype = torch::DType::kUInt8;
  t.shape = shape;
  return t;
}

TEST(PlanTensorWrite, TwoShardsGetTheirHalves) {
  Tensor t = Make({2, 4});
  Chunk a{{0, 0}, {2, 2}, 0, 0, {}, "", nullptr, "", {}};
  Chunk b{{0, 2}, {2, 2}, 1, 0, {}, "", nullptr, "", {}};
  t.chunks = {a, b};
  auto w = PlanTensorWrite(t, 0, "abcdefgh");
  ASSERT_TRUE(w.ok()) << w.error().message();
  ASSERT_EQ(w->size(), 2u);
  EXPECT_EQ((*w)[0].blob, 0u);
  EXPECT_EQ((*w)[0].bytes, "abef");
  EXPECT_EQ((*w)[1].bytes, "cdgh");
}

TEST(PlanTensorWrite, TransposedViewWritesTheStoredOrder) {
  Tensor t = Make({2, 3});  // stored as 3x2, viewed transposed
  Chunk c{{0, 0}, {2, 3}, 0, 0, {1, 2}, "", nullptr, "", {}};
  t.chunks = {c};
  auto w = PlanTensorWrite(t, 0, "abcdef");
  ASSERT_TRUE(w.ok()) << w.error().message();
  ASSERT_EQ(w->size(), 1u);
  EXPECT_EQ((*w)[0].bytes, "adbecf");
}

TEST(PlanTensorWrite, ExpandedViewNeedsOneValuePerStoredByte) {
  Tensor t = Make({3, 2});  // one stored row of 2 broadcast to 3 rows
  Chunk c{{0, 0}, {3, 2}, 0, 0, {0, 1}, "", nullptr, "", {}};
  t.chunks = {c};
  auto ok = PlanTensorWrite(t, 0, "xyxyxy");
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_EQ((*ok)[0].bytes, "xy");
  EXPECT_EQ(PlanTensorWrite(t, 0, "xyxyxz").error().code(), EINVAL);
  EXPECT_EQ(PlanTensorWrite(t, 2, "xy").error().code(), EINVAL);
}

TEST(PlanTensorWrite, OverlappingStridesAreTreatedLikeAnExpand) {
  Tensor t = Make({3, 2});  // rows overlap: row i starts at element i
  Chunk c{{0, 0}, {3, 2}, 0, 0, {1, 1}, "", nullptr, "", {}};
  t.chunks = {c};
  EXPECT_EQ(PlanTensorWrite(t, 0, "ab").error().code(), EINVAL);  // partial
  auto whole = PlanTensorWrite(t, 0, "abbccd");                     // consistent
  ASSERT_TRUE(whole.ok()) << whole.error().message();
  EXPECT_EQ((*whole)[0].bytes, "abcd");
  EXPECT_EQ(PlanTensorWrite(t, 0, "abxccd").error().code(), EINVAL);
}

// The runs of the range map tile any range exactly, in order, for random
// box-chunked tensors.
TEST(MapTensorRange, RunsTileTheRange) {
  std::mt19937 rng(11);
  for (int round = 0; round < 200; ++round) {
    const int64_t rows = 1 + rng() % 7, cols = 1 + rng() % 9;
    Tensor t = Make({rows, cols});
    t.dtype = round % 2 ? torch::DType::kFloat32 : torch::DType::kUInt8;
    const int64_t split_r = rng() % rows, split_c = rng() % cols;
    uint32_t blob = 0;
    for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, split_r}, {split_r, rows}}) {
      for (auto [c0, c1] : {std::pair<int64_t, int64_t>{0, split_c}, {split_c, cols}}) {
        if (r1 > r0 && c1 > c0) {
          t.chunks.push_back(Chunk{{r0, c0}, {r1 - r0, c1 - c0}, blob++, 0, {}, "", nullptr, "", {}});
        }
      }
    }
    const uint64_t n = t.nbytes();
    const uint64_t off = rng() % n, len = 1 + rng() % (n - off);
    uint64_t next = off;
    ASSERT_TRUE(MapTensorRange(t, off, len, [&](const StoredRun& r) -> Status {
                  EXPECT_EQ(r.tensor_offset, next);
                  EXPECT_GT(r.length, 0u);
                  next += r.length;
                  return Ok();
                }).ok());
    EXPECT_EQ(next, off + len) << "round " << round;
  }
}

TEST(PlanTensorWrite, MissingChunksAreEROFS) {
  Tensor t = Make({2});
  Chunk c{{0}, {2}, source::kNoBlob, 0, {}, "shard 3 is missing", nullptr, "", {}};
  t.chunks = {c};
  auto w = PlanTensorWrite(t, 0, "ab");
  EXPECT_EQ(w.error().code(), EROFS);
  EXPECT_NE(w.error().message().find("shard 3"), std::string::npos);
}

}  // namespace
}  // namespace nemofs::checkpoint
