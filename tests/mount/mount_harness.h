// A real nemofs mount for tests: starts `nemofs mount -f` as a child, waits
// until the kernel shows the mount, and on destruction always unmounts and
// reaps that child (force-unmounting and killing only its own PID if it
// does not exit cleanly, which fails the test).
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "test_util.h"

namespace nemofs::testing {

std::string NemofsBinary();
bool IsMounted(const std::string& path);

struct MountOptions {
  // Off by default: tests mount committed fixtures, so the mount gets
  // `-o ro` unless a test asks for writes (on a copy).
  bool writable = false;
  std::vector<std::string> env;  // extra "NAME=value" for the daemon
  std::string cache_dir;         // --cache-dir; empty: a fresh one per mount (CacheDir())
};

class Mount {
 public:
  // nullptr (with a test failure recorded) if the mount did not come up.
  static std::unique_ptr<Mount> Start(const std::string& source,
                                      const std::vector<std::string>& extra_args = {},
                                      const MountOptions& options = {});
  static std::unique_ptr<Mount> StartWritable(const std::string& source,
                                              const std::vector<std::string>& env = {}) {
    return Start(source, {}, MountOptions{true, env});
  }
  ~Mount();

  const std::string& path() const { return mnt_; }
  std::string Log() const { return ReadFile(dir_.Join("daemon.log")); }
  pid_t pid() const { return pid_; }
  // The daemon's --cache-dir.
  std::string CacheDir() const { return cache_dir_; }
  // Unmounts now and expects the daemon to exit with status 0.
  void Unmount();
  // For crash tests: sends `sig` to the daemon (only if > 0), waits up to
  // 20 s for it to die, detaches the dead mount, and returns its wait
  // status (-1 if it did not exit: then it is SIGKILLed and the test fails).
  int ExpectDeath(int sig = 0);

 private:
  Mount() = default;
  TempDir dir_;
  std::string mnt_;
  std::string cache_dir_;
  pid_t pid_ = -1;
};

// `cmd` run by bash as the user and group nobody (65534), no other groups.
constexpr int kNobody = 65534;
std::string AsNobody(const std::string& cmd);

// The path of a tensor file of mount `m`: the first by name, or with
// `ls_flags` "-S" the largest.
std::string TensorFile(const Mount& m, const std::string& ls_flags = "");

// Process `pid`'s VmData (private writable memory: heap, anonymous maps)
// in bytes, from /proc.
uint64_t VmData(pid_t pid);

// Limits the daemon `pid`'s private writable memory (RLIMIT_DATA) to what
// it uses now plus `headroom` bytes: a test that it streams (a buffer of
// the data would be ENOMEM, bad_alloc). False (a failure recorded) if
// prlimit failed.
bool LimitDaemonMemory(pid_t pid, uint64_t headroom);

}  // namespace nemofs::testing
