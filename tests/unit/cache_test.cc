// The extraction cache's entry rules (source/cache.h), on real files in a
// temporary directory: the record, superseded and vanished sources, entries
// in use, what is never touched (unsaved/, foreign files), the LRU cap.
#include "source/cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "nemofs/filesystem.h"
#include "source/source.h"
#include "test_util.h"
#include "util/io.h"

namespace nemofs::source {
namespace {

using testing::ReadFile;
using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;
using testing::WriteFile;

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

SourceIdentity IdentityOf(const std::string& path) {
  auto st = Stat(path);
  EXPECT_TRUE(st.ok());
  return SourceIdentity::Of(path, *st);
}

// Replaces `path` as a save does: a new file renamed over it (new inode).
void Rewrite(const std::string& path, const std::string& data) {
  WriteFile(path + ".new", data);
  ASSERT_EQ(::rename((path + ".new").c_str(), path.c_str()), 0);
}

// Sets an entry's last use to `sec` seconds after the epoch.
void SetLastUse(const std::string& entry_dir, int64_t sec) {
  struct timespec t[2] = {{sec, 0}, {sec, 0}};
  std::string record = entry_dir + "/" + std::string(kCacheEntryRecord);
  ASSERT_EQ(::utimensat(AT_FDCWD, record.c_str(), t, 0), 0);
}

// Makes an unused entry for `source` holding one member of `bytes` bytes.
std::string MakeEntry(const std::string& cache, const std::string& source, size_t bytes) {
  auto entry = CacheEntry::Acquire(cache, IdentityOf(source));
  EXPECT_TRUE(entry.ok()) << entry.error().message();
  WriteFile(entry->dir() + "/m1", std::string(bytes, 'x'));
  return entry->dir();
}

uint64_t EntryBytes(const std::string& dir) {
  uint64_t total = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir)) total += f.file_size();
  return total;
}

TEST(CacheEntry, RecordNamesTheSourcePathAndIdentity) {
  TempDir dir;
  std::string src = dir.Join("a.nemo");
  WriteFile(src, "version 1");
  SourceIdentity id = IdentityOf(src);
  auto entry = CacheEntry::Acquire(dir.Join("cache"), id);
  ASSERT_TRUE(entry.ok()) << entry.error().message();
  EXPECT_EQ(entry->dir(), dir.Join("cache/") + CacheEntryName(id));
  auto j = nlohmann::json::parse(ReadFile(entry->dir() + "/" + std::string(kCacheEntryRecord)));
  struct stat st {};
  ASSERT_EQ(::stat(src.c_str(), &st), 0);
  EXPECT_EQ(j["source"], src);
  EXPECT_EQ(j["dev"].get<uint64_t>(), st.st_dev);
  EXPECT_EQ(j["ino"].get<uint64_t>(), st.st_ino);
  EXPECT_EQ(j["size"].get<uint64_t>(), static_cast<uint64_t>(st.st_size));
  EXPECT_EQ(j["mtime_ns"].get<int64_t>(), st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec);
  // Another version of the same path gets another entry.
  Rewrite(src, "version 2, longer");
  EXPECT_NE(CacheEntryName(IdentityOf(src)), CacheEntryName(id));
}

TEST(CacheEntry, AcquireTakesASharedLockAndStampsTheLastUse) {
  TempDir dir;
  std::string src = dir.Join("a.nemo");
  WriteFile(src, "x");
  auto entry = CacheEntry::Acquire(dir.Join("cache"), IdentityOf(src));
  ASSERT_TRUE(entry.ok());
  std::string record = entry->dir() + "/" + std::string(kCacheEntryRecord);
  UniqueFd fd(::open(record.c_str(), O_RDONLY));
  ASSERT_TRUE(fd.valid());
  EXPECT_EQ(::flock(fd.get(), LOCK_EX | LOCK_NB), -1);  // held shared by `entry`
  EXPECT_EQ(::flock(fd.get(), LOCK_SH | LOCK_NB), 0);   // others may share it
  ::flock(fd.get(), LOCK_UN);
  SetLastUse(entry->dir(), 1000);
  entry->Touch();
  auto st = Stat(record);
  EXPECT_GT(st->st_mtim.tv_sec, 1000);
  *entry = CacheEntry();  // released
  EXPECT_EQ(::flock(fd.get(), LOCK_EX | LOCK_NB), 0);
}

TEST(SweepCache, RemovesTheEntryOfASupersededSource) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::string src = dir.Join("a.nemo");
  WriteFile(src, "version 1");
  std::string old_entry = MakeEntry(cache, src, 100);
  Rewrite(src, "version 2");
  std::string new_entry = MakeEntry(cache, src, 100);
  ASSERT_NE(old_entry, new_entry);
  SweepStats s = SweepCache(cache, 0);
  EXPECT_EQ(s.superseded, 1u);
  EXPECT_FALSE(Exists(old_entry));
  EXPECT_TRUE(Exists(new_entry + "/m1"));
  EXPECT_EQ(s.bytes, EntryBytes(new_entry));
}

TEST(SweepCache, RemovesTheEntryOfAVanishedSource) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::string gone = dir.Join("gone.nemo"), kept = dir.Join("kept.nemo");
  WriteFile(gone, "a");
  WriteFile(kept, "b");
  std::string gone_entry = MakeEntry(cache, gone, 10);
  std::string kept_entry = MakeEntry(cache, kept, 10);
  ASSERT_EQ(::unlink(gone.c_str()), 0);
  SweepStats s = SweepCache(cache, 0);
  EXPECT_EQ(s.vanished, 1u);
  EXPECT_EQ(s.superseded, 0u);
  EXPECT_FALSE(Exists(gone_entry));
  EXPECT_TRUE(Exists(kept_entry + "/m1"));
}

TEST(SweepCache, NeverRemovesAnEntryInUse) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::string src = dir.Join("a.nemo");
  WriteFile(src, "version 1");
  auto held = CacheEntry::Acquire(cache, IdentityOf(src));
  ASSERT_TRUE(held.ok());
  WriteFile(held->dir() + "/m1", std::string(1000, 'x'));
  Rewrite(src, "version 2");  // superseded, over any cap, but in use
  SweepStats s = SweepCache(cache, 1);
  EXPECT_EQ(s.in_use, 1u);
  EXPECT_EQ(s.superseded + s.vanished + s.evicted, 0u);
  EXPECT_TRUE(Exists(held->dir() + "/m1"));
  // Held by another process too (the daemon of a mount).
  std::string record = held->dir() + "/" + std::string(kCacheEntryRecord);
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t child = ::fork();
  if (child == 0) {
    int fd = ::open(record.c_str(), O_RDONLY);
    ::flock(fd, LOCK_SH);
    char c = 1;
    (void)!::write(ready[1], &c, 1);
    ::sleep(30);  // killed by the parent
    ::_exit(0);
  }
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  *held = CacheEntry();  // this process lets go; the child still holds it
  s = SweepCache(cache, 1);
  EXPECT_EQ(s.in_use, 1u);
  EXPECT_TRUE(Exists(record));
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ::close(ready[0]);
  ::close(ready[1]);
  s = SweepCache(cache, 0);  // no one holds it now
  EXPECT_EQ(s.superseded, 1u);
  EXPECT_FALSE(Exists(record));
}

TEST(SweepCache, NeverTouchesUnsavedOrAnythingWithoutARecord) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  ASSERT_EQ(Sh("mkdir -p " + ShellQuote(cache + "/unsaved/1700000000-42") + " " +
               ShellQuote(cache + "/0123456789abcdef") + " " +
               ShellQuote(cache + "/zarr-00000000000000aa"))
                .exit_code,
            0);
  WriteFile(cache + "/unsaved/1700000000-42/model_config.yaml", "lost: no\n");
  WriteFile(cache + "/0123456789abcdef/m0", std::string(1000, 'x'));  // an older version's entry
  WriteFile(cache + "/zarr-00000000000000aa/0", "chunk");
  WriteFile(cache + "/nemofs.log", "log");
  WriteFile(cache + "/fedcba9876543210", "a file with an entry's name");
  // A record file that is a link is not an entry either.
  ASSERT_EQ(::mkdir((cache + "/00000000000000aa").c_str(), 0700), 0);
  WriteFile(dir.Join("elsewhere.json"), "{}");
  ASSERT_EQ(::symlink(dir.Join("elsewhere.json").c_str(),
                      (cache + "/00000000000000aa/" + std::string(kCacheEntryRecord)).c_str()),
            0);
  SweepStats s = SweepCache(cache, 1);
  EXPECT_EQ(s.superseded + s.vanished + s.evicted + s.in_use, 0u);
  for (const char* p :
       {"unsaved/1700000000-42/model_config.yaml", "0123456789abcdef/m0", "zarr-00000000000000aa/0",
        "nemofs.log", "fedcba9876543210", "00000000000000aa/nemofs-entry.json"}) {
    EXPECT_TRUE(Exists(cache + "/" + p)) << p;
  }
  EXPECT_TRUE(Exists(dir.Join("elsewhere.json")));
}

TEST(SweepCache, EvictsTheLeastRecentlyUsedUnusedEntriesDownToTheCap) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::vector<std::string> entries;
  for (int i = 0; i < 4; ++i) {
    std::string src = dir.Join("s" + std::to_string(i) + ".nemo");
    WriteFile(src, std::to_string(i));
    entries.push_back(MakeEntry(cache, src, 1000));
  }
  // Last use: entry 2 oldest, then 0, then 3, then 1.
  SetLastUse(entries[2], 1000);
  SetLastUse(entries[0], 2000);
  SetLastUse(entries[3], 3000);
  SetLastUse(entries[1], 4000);
  const uint64_t each = EntryBytes(entries[0]);
  // Room for two and a half entries: the two oldest go.
  SweepStats s = SweepCache(cache, 2 * each + each / 2);
  EXPECT_EQ(s.evicted, 2u);
  EXPECT_EQ(s.bytes, 2 * each);
  EXPECT_FALSE(Exists(entries[2]));
  EXPECT_FALSE(Exists(entries[0]));
  EXPECT_TRUE(Exists(entries[3] + "/m1"));
  EXPECT_TRUE(Exists(entries[1] + "/m1"));
  // 0 means no cap.
  s = SweepCache(cache, 0);
  EXPECT_EQ(s.evicted, 0u);
  EXPECT_EQ(s.bytes, 2 * each);
}

TEST(SweepCache, TheCapSkipsEntriesInUseAndEvictsTheNextOldest) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::string a = dir.Join("a.nemo"), b = dir.Join("b.nemo"), c = dir.Join("c.nemo");
  WriteFile(a, "a");
  WriteFile(b, "b");
  WriteFile(c, "c");
  auto held = CacheEntry::Acquire(cache, IdentityOf(a));  // oldest, but in use
  ASSERT_TRUE(held.ok());
  WriteFile(held->dir() + "/m1", std::string(1000, 'x'));
  std::string eb = MakeEntry(cache, b, 1000);
  std::string ec = MakeEntry(cache, c, 1000);
  SetLastUse(held->dir(), 1000);
  SetLastUse(eb, 2000);
  SetLastUse(ec, 3000);
  SweepStats s = SweepCache(cache, EntryBytes(held->dir()) + EntryBytes(ec));
  EXPECT_EQ(s.evicted, 1u);
  EXPECT_EQ(s.in_use, 1u);
  EXPECT_TRUE(Exists(held->dir() + "/m1"));
  EXPECT_FALSE(Exists(eb));
  EXPECT_TRUE(Exists(ec + "/m1"));
  // Under a cap smaller than the entry in use, everything else goes, it stays.
  s = SweepCache(cache, 1);
  EXPECT_EQ(s.evicted, 1u);
  EXPECT_TRUE(Exists(held->dir() + "/m1"));
  EXPECT_FALSE(Exists(ec));
}

TEST(SweepCache, AnEntryWithADamagedRecordIsLeftToTheCap) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::string src = dir.Join("a.nemo");
  WriteFile(src, "a");
  std::string entry = MakeEntry(cache, src, 100);
  std::string record = entry + "/" + std::string(kCacheEntryRecord);
  WriteFile(record, "");  // as after a crash before the record was written
  ASSERT_EQ(::unlink(src.c_str()), 0);
  SweepStats s = SweepCache(cache, 0);
  EXPECT_EQ(s.vanished, 0u);  // its source is unknown
  EXPECT_TRUE(Exists(entry + "/m1"));
  s = SweepCache(cache, 1);
  EXPECT_EQ(s.evicted, 1u);
  EXPECT_FALSE(Exists(entry));
}

TEST(SweepCache, ReopeningACompressedSourceAfterARewriteLeavesOneEntry) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::string src = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt_gz.nemo")) + " " + ShellQuote(src)).exit_code,
            0);
  auto entries = [&] {
    std::vector<std::string> names;
    for (const auto& f : std::filesystem::directory_iterator(cache)) {
      if (Exists(f.path().string() + "/" + std::string(kCacheEntryRecord))) {
        names.push_back(f.path().filename().string());
      }
    }
    return names;
  };
  OpenOptions options;
  options.cache_dir = cache;
  options.cache_max = kDefaultCacheMax;
  auto first = OpenSource(src, options);
  ASSERT_TRUE(first.ok()) << first.error().message();
  ASSERT_EQ(entries().size(), 1u);
  std::string first_name = entries()[0];
  // Rewritten (as a save of a compressed .nemo does) while the first is open.
  ASSERT_EQ(Sh("cp " + ShellQuote(src) + " " + ShellQuote(src + ".new") + " && mv " +
               ShellQuote(src + ".new") + " " + ShellQuote(src))
                .exit_code,
            0);
  auto second = OpenSource(src, options);
  ASSERT_TRUE(second.ok()) << second.error().message();
  EXPECT_EQ(entries().size(), 2u);  // the first is still in use
  first->reset();
  auto third = OpenSource(src, options);
  ASSERT_TRUE(third.ok());
  auto left = entries();
  ASSERT_EQ(left.size(), 1u);
  EXPECT_NE(left[0], first_name);
  EXPECT_EQ(left[0], CacheEntryName(IdentityOf(src)));
  EXPECT_TRUE(Exists(cache + "/" + left[0] + "/index.cbor"));
}

// Processes acquiring, filling and releasing entries of the same sources
// while each sweeps with a cap of 1 byte (every unused entry is evicted):
// no one ever loses a file of an entry it holds.
TEST(SweepCache, ConcurrentSweepsNeverRemoveAnEntryWhileItIsHeld) {
  TempDir dir;
  std::string cache = dir.Join("cache");
  std::vector<std::string> sources;
  for (int i = 0; i < 2; ++i) {
    sources.push_back(dir.Join("s" + std::to_string(i) + ".nemo"));
    WriteFile(sources.back(), std::to_string(i));
  }
  constexpr int kProcesses = 4, kRounds = 150;
  std::vector<pid_t> children;
  for (int p = 0; p < kProcesses; ++p) {
    pid_t pid = ::fork();
    if (pid == 0) {
      int lost = 0;
      uint64_t evicted = 0;
      for (int r = 0; r < kRounds; ++r) {
        const std::string& src = sources[(p + r) % sources.size()];
        auto entry = CacheEntry::Acquire(cache, IdentityOf(src));
        if (!entry.ok()) ::_exit(2);
        std::string mine = entry->dir() + "/m" + std::to_string(p);
        int fd = ::open(mine.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || ::write(fd, "data", 4) != 4) ::_exit(3);
        ::close(fd);
        evicted += SweepCache(cache, 1).evicted;
        struct stat st {};
        if (::stat(mine.c_str(), &st) != 0 ||
            ::stat((entry->dir() + "/" + std::string(kCacheEntryRecord)).c_str(), &st) != 0) {
          ++lost;
        }
      }
      ::_exit(lost ? 1 : (evicted > 0 ? 0 : 4));
    }
    ASSERT_GT(pid, 0);
    children.push_back(pid);
  }
  int evicting = 0;
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    int code = WEXITSTATUS(status);
    EXPECT_TRUE(code == 0 || code == 4)
        << "child exit " << code << " (1: lost a held file, 2: acquire failed, 3: entry gone)";
    evicting += code == 0;
  }
  EXPECT_GT(evicting, 0) << "no sweep evicted anything: the race was not exercised";
}

TEST(ParseByteSize, SuffixesArePowersOf1024) {
  EXPECT_EQ(*ParseByteSize("0"), 0u);
  EXPECT_EQ(*ParseByteSize("4096"), 4096u);
  EXPECT_EQ(*ParseByteSize("500M"), 500ull << 20);
  EXPECT_EQ(*ParseByteSize("20G"), 20ull << 30);
  EXPECT_EQ(*ParseByteSize("20g"), 20ull << 30);
  EXPECT_EQ(*ParseByteSize("20GiB"), 20ull << 30);
  EXPECT_EQ(*ParseByteSize("20GB"), 20ull << 30);
  EXPECT_EQ(*ParseByteSize("2T"), 2ull << 40);
  EXPECT_EQ(*ParseByteSize("1.5K"), 1536u);
  EXPECT_EQ(*ParseByteSize("7B"), 7u);
  for (const char* bad : {"", "G", "-5", "12X", "1.2.3", "5 G", "20GiBs", "."}) {
    auto r = ParseByteSize(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_EQ(r.error().code(), EINVAL) << bad;
    }
  }
  EXPECT_FALSE(ParseByteSize("99999999T").ok());
}

}  // namespace
}  // namespace nemofs::source
