// /proc/self/mountinfo queries (no FUSE round trips, so safe from the daemon).
#pragma once

#include <optional>
#include <string>

namespace nemofs::mountcmd {

struct MountEntry {
  std::string device;      // "major:minor"
  std::string mountpoint;  // unescaped
  std::string fstype;      // e.g. "fuse.nemofs"
  std::string source;      // the fsname, e.g. "nemofs:/data/model.nemo"
};

// The mount whose mount point is exactly `path` (absolute); the last one if stacked.
std::optional<MountEntry> FindMount(const std::string& path);
std::optional<std::string> MountDevice(const std::string& path);


}  // namespace nemofs::mountcmd
