// The extraction cache's entries: one directory per compressed source
// version, <cache_dir>/<16 hex digits>/, holding the saved listing
// (index.cbor) and extracted members (m<ordinal>). Each entry carries a
// record, <entry>/nemofs-entry.json, naming the source path and identity
// (device, inode, size, mtime in ns) it was made for; the record's mtime is
// the entry's last use (written by the code, not atime). A process using an
// entry holds a shared flock on the record; removal takes an exclusive,
// non-blocking one and skips the entry when it cannot.
//
// Sweep removes entries whose source is gone (vanished) or is now another
// file or version (superseded), then the least recently used unlocked
// entries until the managed total is under the cap. It never touches
// anything else in the cache directory: unsaved/, logs, zarr chunks and
// directories without a record (such as entries of older versions).
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "nemofs/result.h"
#include "util/fd.h"

namespace nemofs::source {

inline constexpr std::string_view kCacheEntryRecord = "nemofs-entry.json";

struct SourceIdentity {
  std::string path;  // real path of the source
  uint64_t dev = 0;
  uint64_t ino = 0;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  static SourceIdentity Of(const std::string& real_path, const struct stat& st);
  bool SameVersion(const SourceIdentity& o) const {
    return dev == o.dev && ino == o.ino && size == o.size && mtime_ns == o.mtime_ns;
  }
};

// The entry directory name for `id`: 16 hex digits.
std::string CacheEntryName(const SourceIdentity& id);

// An entry in use: created if absent, its record written, a shared lock
// held until destruction (or Release).
class CacheEntry {
 public:
  static Result<CacheEntry> Acquire(const std::string& cache_dir, const SourceIdentity& id);
  CacheEntry() = default;
  CacheEntry(CacheEntry&&) = default;
  CacheEntry& operator=(CacheEntry&&) = default;
  const std::string& dir() const { return dir_; }
  bool valid() const { return record_.valid(); }
  // Stamps the last use (the record's mtime) with the current time.
  void Touch() const;

 private:
  std::string dir_;
  UniqueFd record_;  // holds the shared flock
};

struct SweepStats {
  uint64_t superseded = 0;  // entries removed because their source changed
  uint64_t vanished = 0;    // ... because their source no longer exists
  uint64_t evicted = 0;     // ... to get under the cap (least recently used first)
  uint64_t in_use = 0;      // entries skipped because a process holds them
  uint64_t bytes = 0;       // total of the entries left (apparent size)
};

// Removes superseded and vanished entries, then evicts unused entries,
// oldest last use first, until the total is at most `max_bytes` (0: no cap).
// Best effort: what cannot be read or removed is left and logged.
SweepStats SweepCache(const std::string& cache_dir, uint64_t max_bytes);

}  // namespace nemofs::source
