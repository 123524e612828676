// The advisory lock a writable mount holds on its source (DESIGN.md §3): a
// second writable mount of the same source falls back to read-only, and
// `nemofs repack` refuses, both naming the holder.
//
// The lock is flock(2) LOCK_EX on a descriptor of the source itself (the
// file, or the folder opened O_DIRECTORY): it belongs to the inode, so a hard
// link, a bind mount or a symlink of the source is the same lock, and there
// is no lock file to forge, hold or leave behind. The holder is named from
// what the kernel says (/proc/locks: the pid; /proc/PID/cmdline), never from
// anything a user can write.
//
// A replacement of the source file by this process (a compressed archive's
// commit, an in-place repack: util/atomic_replace) renames a new inode over
// the path; ReplaceFile locks the new file before the rename and hands the
// lock over to it (LockHandover below), so the lock follows the path.
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>

#include "nemofs/result.h"

namespace nemofs {

class SourceLock {
 public:
  ~SourceLock();
  SourceLock(const SourceLock&) = delete;
  SourceLock& operator=(const SourceLock&) = delete;

  // Locks `source` (a path of a file or folder) without waiting. EBUSY when
  // another open file description holds it, with the holder described;
  // any other code when the lock cannot be taken here at all (NFS without
  // flock support, a folder on NFS): the message is "cannot lock SOURCE
  // (reason)". On EBADF a regular file is reopened O_RDWR and retried (NFS
  // wants a file opened for writing for an exclusive flock).
  static Result<std::unique_ptr<SourceLock>> Acquire(const std::string& source);

  // In a child after fork (the mount's daemon): the lock is inherited, but
  // /proc/locks names the process that took it, which is about to exit.
  // Retakes it in this process's name (shared, then exclusive on the same
  // descriptor: another nemofs cannot take LOCK_EX in between). False if
  // the exclusive lock could not be retaken (a foreign LOCK_SH holder came
  // in between); the shared lock still keeps every other writer out.
  bool ClaimForThisProcess();

  dev_t dev() const;
  ino_t ino() const;

 private:
  friend class LockHandover;
  explicit SourceLock(int fd);
  int fd_;
};

// One FLOCK line of /proc/locks: "N: FLOCK  ADVISORY  WRITE PID MM:mm:INODE 0 EOF".
struct FlockEntry {
  bool write = false;
  pid_t pid = 0;
  unsigned major = 0;  // in hex in the file
  unsigned minor = 0;
  uint64_t inode = 0;
};

// Parses one line of /proc/locks; nullopt for other lock kinds and for
// blocked waiters ("N: -> FLOCK ...").
std::optional<FlockEntry> ParseFlockLine(const std::string& line);

// The pid of the process that holds a write flock on dev:ino, per `locks`
// (the text of /proc/locks).
std::optional<pid_t> FlockHolder(const std::string& locks, dev_t dev, ino_t ino);

// "a writable nemofs mount at /mnt/x (pid N)", "nemofs repack (pid N)" or
// "process N (comm)", from /proc/PID; "another process" if it has exited.
std::string DescribeLockHolder(pid_t pid);

// Used by ReplaceFile: when this process holds the SourceLock of `target`,
// the constructor locks `new_fd` (the complete temp that is about to be
// renamed over it); Commit() after the rename makes that the lock's
// descriptor and releases the old inode. Without Commit() the temp's lock
// is dropped. Does nothing for a target nobody in this process locked.
class LockHandover {
 public:
  LockHandover(const std::string& target, int new_fd);
  ~LockHandover();
  LockHandover(const LockHandover&) = delete;
  LockHandover& operator=(const LockHandover&) = delete;
  void Commit();

 private:
  SourceLock* lock_ = nullptr;
  int fd_ = -1;
};

}  // namespace nemofs
