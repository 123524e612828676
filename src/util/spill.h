// The bytes of a file being written through the mount (a new or replaced
// file, a tensor's staged edit): in memory while small, in an unlinked
// file of a spill folder past that, so that a multi-GB file written
// through the daemon costs disk space, not RAM.
//
// A snapshot (Snapshot) is the bytes as they are at that moment, as one
// contiguous view (a read-only shared mapping of the spill file, or the
// memory): a commit streams it into the checkpoint while the file stays
// writable. A write while a snapshot is alive copies the buffer first
// (only the parts a spill file holds data in), so a snapshot never
// changes under its reader and a mapping is never truncated under it.
//
// Not thread-safe: the caller serialises calls on one SpillBytes (the
// overlay's lock); snapshots may be read and dropped from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "nemofs/result.h"

namespace nemofs {

struct SpillPool {
  // Where spill files are created (unlinked at once: nothing is left
  // behind by a crash). "" = the system's temp folder ($TMPDIR, /tmp).
  std::string dir;
  // A buffer larger than this lives in a spill file.
  uint64_t file_above = 4ull << 20;
  // All buffers' memory together; past it a growing buffer moves to a file.
  uint64_t memory_budget = 256ull << 20;
  std::atomic<uint64_t> memory{0};
  std::atomic<uint64_t> files{0};  // spill files open (for tests and logs)
};

class SpillBytes {
 public:
  explicit SpillBytes(std::shared_ptr<SpillPool> pool);
  ~SpillBytes();
  SpillBytes(const SpillBytes&) = delete;
  SpillBytes& operator=(const SpillBytes&) = delete;

  uint64_t size() const;
  bool empty() const { return size() == 0; }
  bool in_file() const;

  // Writes `data` at `offset`, growing the buffer (a gap reads as zeros).
  // ENOSPC/EIO (naming the spill folder) when the spill file cannot take it;
  // the buffer is unchanged then.
  Status Write(uint64_t offset, std::string_view data);
  // Cuts the buffer to `size` bytes, or grows it with zeros.
  Status Resize(uint64_t size);
  // Replaces the content with `data`.
  Status Assign(std::string_view data);
  // Puts `length` bytes at `offset` of descriptor `fd` at `at` of the buffer
  // (the kernel copies, file to file, once the buffer is in a spill file).
  Status CopyFrom(int fd, uint64_t offset, uint64_t length, uint64_t at, std::string_view what);
  // Exchanges the contents of two buffers (of one pool or two).
  void Swap(SpillBytes& other) noexcept {
    pool_.swap(other.pool_);
    storage_.swap(other.storage_);
  }
  // Up to `n` bytes at `offset` (fewer at the end).
  Result<std::string> Read(uint64_t offset, uint64_t n) const;

  struct View {
    std::string_view bytes;
    std::shared_ptr<const void> owner;  // keeps `bytes` valid
  };
  // The whole content as of now (see the file comment).
  Result<View> Snapshot() const;

 private:
  struct Storage;
  // Makes the storage this buffer's alone (copying it if a snapshot holds
  // it), moving it to a file if it is to reach `grow_to` bytes and that is
  // over the limits.
  Status Prepare(uint64_t grow_to);

  std::shared_ptr<SpillPool> pool_;
  std::shared_ptr<Storage> storage_;
};

}  // namespace nemofs
