#include "source/cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "nemofs/filesystem.h"
#include "util/io.h"

namespace nemofs::source {
namespace {

constexpr int kRecordVersion = 1;

uint64_t Fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

struct DirClose {
  void operator()(DIR* d) const { ::closedir(d); }
};
using DirPtr = std::unique_ptr<DIR, DirClose>;

bool IsEntryName(std::string_view name) {
  if (name.size() != 16) return false;
  return std::all_of(name.begin(), name.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

std::string RecordText(const SourceIdentity& id) {
  nlohmann::ordered_json j;
  j["nemofs_cache_entry"] = kRecordVersion;
  j["source"] = id.path;
  j["dev"] = id.dev;
  j["ino"] = id.ino;
  j["size"] = id.size;
  j["mtime_ns"] = id.mtime_ns;
  return j.dump() + "\n";
}

// Parses a record; false for anything that is not one (empty after a crash
// between creation and writing, damaged, another version).
bool ParseRecord(const std::string& text, SourceIdentity* id) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("nemofs_cache_entry", 0) != kRecordVersion) {
    return false;
  }
  try {
    id->path = j.at("source").get<std::string>();
    id->dev = j.at("dev").get<uint64_t>();
    id->ino = j.at("ino").get<uint64_t>();
    id->size = j.at("size").get<uint64_t>();
    id->mtime_ns = j.at("mtime_ns").get<int64_t>();
  } catch (const nlohmann::json::exception&) {
    return false;
  }
  return !id->path.empty();
}

Result<std::string> ReadFd(int fd, std::string_view what) {
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, FStat(fd, what));
  if (st.st_size > (1 << 20)) return Err(EFBIG, "{}: too large for a cache record", what);
  std::string text(static_cast<size_t>(st.st_size), '\0');
  NEMOFS_ASSIGN_OR_RETURN(size_t n, PreadUpTo(fd, text.data(), text.size(), 0, what));
  text.resize(n);
  return text;
}

// True when `path` still names the file open as `fd` (it was not removed
// and recreated while this process waited for the lock).
bool StillThere(int fd, const std::string& path) {
  struct stat a {
  }, b{};
  return ::fstat(fd, &a) == 0 && ::stat(path.c_str(), &b) == 0 && a.st_dev == b.st_dev &&
         a.st_ino == b.st_ino;
}

// Apparent size of the regular files directly in `dir` (entries are flat).
uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  DirPtr d(::opendir(dir.c_str()));
  if (!d) return 0;
  while (dirent* e = ::readdir(d.get())) {
    struct stat st {};
    if (::fstatat(::dirfd(d.get()), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISREG(st.st_mode)) {
      total += static_cast<uint64_t>(st.st_size);
    }
  }
  return total;
}

// Removes an entry whose record is open as `record` and exclusively locked:
// its files first, the record last, then the directory (which fails, and is
// left, if an opener has just made a new record in it).
bool RemoveLockedEntry(const std::string& dir, int record) {
  const std::string record_path = dir + "/" + std::string(kCacheEntryRecord);
  if (!StillThere(record, record_path)) return false;
  DirPtr d(::opendir(dir.c_str()));
  if (!d) return false;
  bool ok = true;
  while (dirent* e = ::readdir(d.get())) {
    std::string_view name = e->d_name;
    if (name == "." || name == ".." || name == kCacheEntryRecord) continue;
    if (::unlinkat(::dirfd(d.get()), e->d_name, 0) != 0 && errno != ENOENT) ok = false;
  }
  d.reset();
  if (!ok) return false;
  if (::unlink(record_path.c_str()) != 0) return false;
  ::rmdir(dir.c_str());
  return true;
}

struct Candidate {
  std::string dir;
  struct timespec last_use {};
  uint64_t bytes = 0;
};

}  // namespace

SourceIdentity SourceIdentity::Of(const std::string& real_path, const struct stat& st) {
  SourceIdentity id;
  id.path = real_path;
  id.dev = static_cast<uint64_t>(st.st_dev);
  id.ino = static_cast<uint64_t>(st.st_ino);
  id.size = static_cast<uint64_t>(st.st_size);
  id.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return id;
}

std::string CacheEntryName(const SourceIdentity& id) {
  // The same key as before records existed, so earlier entries are reused.
  std::string key = fmt::format("{}:{}:{}:{}.{:09}:{}", id.dev, id.ino, id.size,
                                id.mtime_ns / 1000000000, id.mtime_ns % 1000000000, id.path);
  return fmt::format("{:016x}", Fnv1a(key));
}

Result<CacheEntry> CacheEntry::Acquire(const std::string& cache_dir, const SourceIdentity& id) {
  CacheEntry entry;
  entry.dir_ = cache_dir + "/" + CacheEntryName(id);
  const std::string record_path = entry.dir_ + "/" + std::string(kCacheEntryRecord);
  const std::string text = RecordText(id);
  // A sweep may remove the entry between our open and our lock: retry then.
  for (int attempt = 0; attempt < 100; ++attempt) {
    NEMOFS_RETURN_IF_ERROR(MakeDirs(entry.dir_));
    UniqueFd fd(::open(record_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!fd.valid()) {
      int e = errno;
      if (e == ENOENT) continue;  // the directory went away after MakeDirs
      return Err(e, "{}: cannot open the cache entry record: {}", record_path, std::strerror(e));
    }
    int r;
    while ((r = ::flock(fd.get(), LOCK_SH)) != 0 && errno == EINTR) {
    }
    if (r != 0) {
      int e = errno;
      return Err(e, "{}: cannot lock the cache entry: {}", record_path, std::strerror(e));
    }
    if (!StillThere(fd.get(), record_path)) continue;
    // Every holder writes the same bytes, so concurrent writers agree.
    auto old = ReadFd(fd.get(), record_path);
    if (!old || *old != text) {
      NEMOFS_RETURN_IF_ERROR(WriteFull(fd.get(), text.data(), text.size(), record_path));
      if (::ftruncate(fd.get(), static_cast<off_t>(text.size())) != 0) {
        int e = errno;
        return Err(e, "{}: cannot write the cache entry record: {}", record_path, std::strerror(e));
      }
    }
    entry.record_ = std::move(fd);
    entry.Touch();
    return entry;
  }
  return Err(EAGAIN, "{}: the cache entry keeps being removed while opened", entry.dir_);
}

void CacheEntry::Touch() const {
  if (record_.valid()) ::futimens(record_.get(), nullptr);
}

SweepStats SweepCache(const std::string& cache_dir, uint64_t max_bytes) {
  SweepStats stats;
  std::vector<std::string> names;
  if (DirPtr d{::opendir(cache_dir.c_str())}) {
    while (dirent* e = ::readdir(d.get())) {
      if (IsEntryName(e->d_name)) names.emplace_back(e->d_name);
    }
  }
  std::vector<Candidate> unused;
  for (const auto& name : names) {
    const std::string dir = cache_dir + "/" + name;
    const std::string record_path = dir + "/" + std::string(kCacheEntryRecord);
    struct stat dst {};
    if (::lstat(dir.c_str(), &dst) != 0 || !S_ISDIR(dst.st_mode)) continue;
    // O_NOFOLLOW: a record is a regular file we wrote, never a link.
    UniqueFd fd(::open(record_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!fd.valid()) continue;  // no record: not an entry this version manages
    struct stat rst {};
    if (::fstat(fd.get(), &rst) != 0 || !S_ISREG(rst.st_mode)) continue;
    uint64_t bytes = DirBytes(dir);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      ++stats.in_use;
      stats.bytes += bytes;
      continue;
    }
    if (!StillThere(fd.get(), record_path)) continue;  // removed meanwhile
    auto text = ReadFd(fd.get(), record_path);
    SourceIdentity id;
    if (text && ParseRecord(*text, &id)) {
      struct stat sst {};
      bool gone = false, changed = false;
      if (::stat(id.path.c_str(), &sst) != 0) {
        gone = errno == ENOENT || errno == ENOTDIR;  // EACCES, EIO...: keep it
      } else {
        changed = !SourceIdentity::Of(id.path, sst).SameVersion(id);
      }
      if ((gone || changed) && RemoveLockedEntry(dir, fd.get())) {
        ++(gone ? stats.vanished : stats.superseded);
        continue;
      }
    }
    // An unreadable record (a crash before it was written) leaves the entry
    // to the cap alone.
    ::fstat(fd.get(), &rst);
    unused.push_back({dir, rst.st_mtim, bytes});
    stats.bytes += bytes;
  }
  if (max_bytes == 0 || stats.bytes <= max_bytes) return stats;
  std::sort(unused.begin(), unused.end(), [](const Candidate& a, const Candidate& b) {
    if (a.last_use.tv_sec != b.last_use.tv_sec) return a.last_use.tv_sec < b.last_use.tv_sec;
    return a.last_use.tv_nsec < b.last_use.tv_nsec;
  });
  for (const auto& c : unused) {
    if (stats.bytes <= max_bytes) break;
    const std::string record_path = c.dir + "/" + std::string(kCacheEntryRecord);
    UniqueFd fd(::open(record_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!fd.valid() || ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;  // taken meanwhile
    struct stat rst {};
    if (::fstat(fd.get(), &rst) != 0 || rst.st_mtim.tv_sec != c.last_use.tv_sec ||
        rst.st_mtim.tv_nsec != c.last_use.tv_nsec) {
      continue;  // used since the scan: no longer the oldest
    }
    uint64_t bytes = DirBytes(c.dir);
    if (RemoveLockedEntry(c.dir, fd.get())) {
      ++stats.evicted;
      stats.bytes -= std::min(stats.bytes, bytes);
    }
  }
  return stats;
}

}  // namespace nemofs::source

namespace nemofs {

Result<uint64_t> ParseByteSize(std::string_view text) {
  std::string_view s = text;
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  std::string number(s.substr(0, i));
  std::string_view unit = s.substr(i);
  if (number.empty() || std::count(number.begin(), number.end(), '.') > 1 || number == ".") {
    return Err(EINVAL, "'{}': not a size (examples: 0, 500M, 20G, 1.5T)", text);
  }
  int shift = 0;
  if (!unit.empty()) {
    switch (std::toupper(static_cast<unsigned char>(unit[0]))) {
      case 'K':
        shift = 10;
        break;
      case 'M':
        shift = 20;
        break;
      case 'G':
        shift = 30;
        break;
      case 'T':
        shift = 40;
        break;
      case 'B':
        shift = 0;
        break;
      default:
        return Err(EINVAL, "'{}': unknown size unit (use K, M, G or T)", text);
    }
    std::string_view rest = unit.substr(1);
    if (shift > 0 && !rest.empty() && (rest[0] == 'i' || rest[0] == 'I')) rest.remove_prefix(1);
    if (shift > 0 && !rest.empty() && (rest[0] == 'B' || rest[0] == 'b')) rest.remove_prefix(1);
    if (!rest.empty()) return Err(EINVAL, "'{}': unknown size unit (use K, M, G or T)", text);
  }
  long double value = std::strtold(number.c_str(), nullptr) * std::ldexp(1.0L, shift);
  if (!(value <= 0x1p64L - 1.0L)) return Err(ERANGE, "'{}': size too large", text);
  return static_cast<uint64_t>(value);
}

}  // namespace nemofs
