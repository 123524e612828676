// One way to replace a file so that its readers see the whole old or the
// whole new content, never a mix, whatever happens in between: write a temp
// file in the same folder, fsync it, rename it over the target, fsync the
// folder. Used by config commits, compressed-archive rewrites, `repack` and
// the caches (which skip the fsyncs: a lost cache file only costs time).
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>

#include "nemofs/result.h"
#include "util/fd.h"

namespace nemofs {

// The folder part of `path` ("." without one, "/" for a file in the root).
std::string DirOf(const std::string& path);

struct ReplaceOptions {
  // The temp file, in the target's folder. Callers name it so that a temp
  // left behind by a crash is recognised (and its pid checked) later.
  std::string temp_path;
  // Mode of the finished file. The temp is created 0600 and gets this mode
  // only once complete: nobody reads a half-written file.
  mode_t mode = 0600;
  // Owner of the finished file, best effort (only root can give a file away).
  std::optional<std::pair<uid_t, gid_t>> owner;
  // fsync the file before the rename and the folder after it.
  bool durable = true;
  // Whether a failed fsync of the folder (after the rename, when the new
  // content is already in place) is reported as an error.
  bool folder_sync_is_error = false;
  // Crash-test hooks, called after the temp is complete and after the rename.
  std::function<void()> on_written;
  std::function<void()> on_renamed;
};

// Opens the folder `rel` (relative to `root_fd`; "" or "." is the root
// itself) to write into it, for a root process writing into a folder that
// someone else owns: no component may be a symbolic link (ELOOP), ".." or
// anything else leading outside `root_fd` is refused (EXDEV), each with an
// error naming `shown_root`/`rel`. openat2(RESOLVE_BENEATH |
// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS), or, without openat2, an
// O_NOFOLLOW walk. With `create`, missing folders are made (mkdirat, one
// component at a time, each opened O_NOFOLLOW before the next) with
// `mkdir_mode` and, best effort, `owner`. The descriptor is O_RDONLY (it
// can be fsynced and listed).
Result<UniqueFd> OpenFolderBeneath(int root_fd, const std::string& shown_root,
                                   const std::string& rel, bool create = false,
                                   mode_t mkdir_mode = 0755,
                                   std::optional<std::pair<uid_t, gid_t>> owner = std::nullopt);

// What OpenFolderBeneath does without openat2 (ENOSYS, or EPERM from a
// seccomp filter), or to make missing
// folders: one O_NOFOLLOW openat (and mkdirat) per component. Exposed for
// tests.
Result<UniqueFd> OpenFolderBeneathByWalk(
    int root_fd, const std::string& shown_root, const std::string& rel, bool create,
    mode_t mkdir_mode = 0755, std::optional<std::pair<uid_t, gid_t>> owner = std::nullopt);

// ReplaceFile relative to the open folder `dirfd`: options.temp_path and
// `name` are plain names in it (no '/'); `shown_dir` names the folder in
// errors. Nothing is resolved by path: the temp is created with
// openat(O_EXCL | O_NOFOLLOW), renamed with renameat, the folder fsynced
// through `dirfd`.
Status ReplaceFileAt(int dirfd, const std::string& shown_dir, const std::string& name,
                     const ReplaceOptions& options, const std::function<Status(int fd)>& write);

// Removes `<prefix><pid>` files in the open folder `dirfd` whose process is
// gone: what a save interrupted by a crash left behind. Best effort;
// `shown_dir` names the folder in the log.
void RemoveStaleTempsAt(int dirfd, const std::string& shown_dir, const std::string& prefix);

// Creates options.temp_path (O_EXCL, never following a symlink; the name
// holds the caller's pid and callers serialize replacements of one target,
// so a file of that name is a leftover of a dead process with a reused pid
// and is removed first), lets `write` fill it
// through its descriptor, finishes it (owner, mode, fsync) and renames it
// over `target`. On any error the temp is removed and `target` is untouched.
// The temp must be in the target's folder: that folder is opened once and
// the rest is ReplaceFileAt.
Status ReplaceFile(const std::string& target, const ReplaceOptions& options,
                   const std::function<Status(int fd)>& write);

}  // namespace nemofs
