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

// Creates options.temp_path (O_EXCL, never following a symlink; the name
// holds the caller's pid and callers serialize replacements of one target,
// so a file of that name is a leftover of a dead process with a reused pid
// and is removed first), lets `write` fill it
// through its descriptor, finishes it (owner, mode, fsync) and renames it
// over `target`. On any error the temp is removed and `target` is untouched.
Status ReplaceFile(const std::string& target, const ReplaceOptions& options,
                   const std::function<Status(int fd)>& write);

}  // namespace nemofs
