// The FUSE low-level adapter: one core call and exactly one reply per op.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nemofs/filesystem.h"

namespace nemofs::mountcmd {

struct FuseMountConfig {
  std::string mountpoint;                 // absolute
  std::string source;                     // absolute, shown as the fsname
  std::vector<std::string> fuse_options;  // -o values passed to libfuse
  bool foreground = false;
  bool read_only = true;
  // Called in the daemon right after the daemonizing fork.
  std::function<void()> in_daemon;
};

// statfs numbers in 4 KiB blocks: used = the checkpoint, free/avail = the
// source file system's (0 when not writable), blocks = used + free.
struct StatFsNumbers {
  uint64_t blocks = 0;
  uint64_t free = 0;
  uint64_t avail = 0;
};
StatFsNumbers ComputeStatFs(uint64_t used_bytes, bool writable, const std::string& source);

// Mounts `fs`, daemonizes unless foreground (returning in the parent only
// after the mount is ready), then serves requests until unmounted or
// signalled. Returns the process exit code.
int MountAndServe(Filesystem& fs, const FuseMountConfig& config);

}  // namespace nemofs::mountcmd
