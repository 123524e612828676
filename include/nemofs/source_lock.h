// The advisory lock a writable mount holds on its source (DESIGN.md §3): a
// second writable mount of the same source falls back to read-only, and
// `nemofs repack` refuses, both naming the holder.
//
// The lock is flock(2) on a lock file in /run/lock (else $TMPDIR or /tmp),
// named after a hash of the source's real path, not on the source itself:
// a commit of a compressed archive renames a new file over the source, which
// would leave a lock on the old inode behind. The file holds one line naming
// the holder (pid and mount point) for the other side's message. It is never
// deleted (deleting lock files races with lockers); it is a few bytes.
#pragma once

#include <memory>
#include <string>

#include "nemofs/result.h"

namespace nemofs {

class SourceLock {
 public:
  ~SourceLock();
  SourceLock(const SourceLock&) = delete;
  SourceLock& operator=(const SourceLock&) = delete;

  // Takes the lock for `source` (a real path) without waiting; `holder`
  // describes this process ("mount at /mnt/x"). EBUSY when another process
  // holds it, with its description in the message.
  static Result<std::unique_ptr<SourceLock>> Acquire(const std::string& source,
                                                     const std::string& holder);
  const std::string& path() const { return path_; }

 private:
  SourceLock(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
};

// The lock file used for `source` (for tests and messages).
std::string SourceLockPath(const std::string& source);

}  // namespace nemofs
