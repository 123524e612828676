#include "util/atomic_replace.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "nemofs/source_lock.h"
#include "util/fd.h"

namespace nemofs {

std::string DirOf(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

Status ReplaceFile(const std::string& target, const ReplaceOptions& options,
                   const std::function<Status(int fd)>& write) {
  const std::string& tmp = options.temp_path;
  constexpr int kFlags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
  UniqueFd fd(::open(tmp.c_str(), kFlags, 0600));
  if (!fd.valid() && errno == EEXIST && ::unlink(tmp.c_str()) == 0) {
    fd = UniqueFd(::open(tmp.c_str(), kFlags, 0600));
  }
  if (!fd.valid()) {
    int e = errno;
    return Err(e, "{}: cannot create {}: {}", target, tmp, std::strerror(e));
  }
  auto fail = [&](Error e) -> Status {
    ::unlink(tmp.c_str());
    return e;
  };
  if (auto st = write(fd.get()); !st.ok()) return fail(st.error());
  // Owner first: chown clears set-id bits that the chmod then restores.
  // Without the privilege to give the file away it stays ours.
  if (options.owner) (void)!::fchown(fd.get(), options.owner->first, options.owner->second);
  if (::fchmod(fd.get(), options.mode) != 0) {
    int e = errno;
    return fail(Err(e, "{}: cannot set the mode of {}: {}", target, tmp, std::strerror(e)));
  }
  if (options.durable && ::fsync(fd.get()) != 0) {
    int e = errno;
    return fail(Err(e, "{}: fsync failed: {}", tmp, std::strerror(e)));
  }
  // A source this process holds the lock of (a writable mount's archive,
  // an in-place repack): the new file is locked before it takes the path.
  LockHandover handover(target, fd.get());
  fd.Reset();
  if (options.on_written) options.on_written();
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    int e = errno;
    return fail(Err(e, "{}: cannot replace with {}: {}", target, tmp, std::strerror(e)));
  }
  handover.Commit();
  if (options.durable) {
    const std::string dir = DirOf(target);
    UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dfd.valid() && ::fsync(dfd.get()) != 0 && options.folder_sync_is_error) {
      int e = errno;
      return Err(e, "{}: fsync of the directory failed: {}", dir, std::strerror(e));
    }
  }
  if (options.on_renamed) options.on_renamed();
  return Ok();
}

}  // namespace nemofs
