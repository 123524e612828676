#include "util/atomic_replace.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string_view>
#include <vector>

#include "nemofs/source_lock.h"
#include "util/fd.h"

namespace nemofs {

std::string DirOf(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

namespace {

std::string Shown(const std::string& root, const std::string& rel) {
  if (rel.empty() || rel == ".") return root;
  return root + "/" + rel;
}

Error BeneathError(int e, const std::string& shown) {
  if (e == ELOOP) {
    return Err(ELOOP, "{}: a symbolic link is in the way; refusing to write through it", shown);
  }
  if (e == EXDEV) return Err(EXDEV, "{}: resolves outside the source folder; refusing", shown);
  return Err(e, "{}: {}", shown, std::strerror(e));
}

}  // namespace

Result<UniqueFd> OpenFolderBeneath(int root_fd, const std::string& shown_root,
                                   const std::string& rel, bool create, mode_t mkdir_mode,
                                   std::optional<std::pair<uid_t, gid_t>> owner) {
  const std::string shown = Shown(shown_root, rel);
  if (!rel.empty() && rel[0] == '/') return BeneathError(EXDEV, shown);
  struct open_how how {};
  how.flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  const std::string path = rel.empty() ? "." : rel;
  for (;;) {
    long fd = ::syscall(SYS_openat2, root_fd, path.c_str(), &how, sizeof how);
    if (fd >= 0) return UniqueFd(static_cast<int>(fd));
    if (errno == EINTR || errno == EAGAIN) continue;
    if (errno == ENOSYS || errno == EPERM || (errno == ENOENT && create)) break;
    return BeneathError(errno, shown);
  }
  return OpenFolderBeneathByWalk(root_fd, shown_root, rel, create, mkdir_mode, owner);
}

Result<UniqueFd> OpenFolderBeneathByWalk(int root_fd, const std::string& shown_root,
                                         const std::string& rel, bool create, mode_t mkdir_mode,
                                         std::optional<std::pair<uid_t, gid_t>> owner) {
  const std::string shown = Shown(shown_root, rel);
  std::vector<std::string> parts;
  if (!rel.empty() && rel[0] == '/') return BeneathError(EXDEV, shown);
  for (size_t start = 0; start <= rel.size();) {
    size_t slash = rel.find('/', start);
    if (slash == std::string::npos) slash = rel.size();
    std::string part = rel.substr(start, slash - start);
    if (part == "..") return BeneathError(EXDEV, shown);
    if (!part.empty() && part != ".") parts.push_back(std::move(part));
    start = slash + 1;
  }
  // One component at a time, never following a symbolic link: the same
  // result without openat2, and the way to make the missing folders.
  UniqueFd dir(::openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return BeneathError(errno, shown_root);
  std::string so_far;
  for (const auto& part : parts) {
    so_far += (so_far.empty() ? "" : "/") + part;
    constexpr int kFlags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
    UniqueFd next(::openat(dir.get(), part.c_str(), kFlags));
    if (!next.valid() && errno == ENOENT && create) {
      if (::mkdirat(dir.get(), part.c_str(), mkdir_mode) != 0 && errno != EEXIST) {
        return BeneathError(errno, Shown(shown_root, so_far));
      }
      next = UniqueFd(::openat(dir.get(), part.c_str(), kFlags));
      if (next.valid() && owner) (void)!::fchown(next.get(), owner->first, owner->second);
    }
    if (!next.valid()) {
      int e = errno;
      // A symbolic link to a folder: O_NOFOLLOW | O_DIRECTORY may say ENOTDIR.
      struct stat st {};
      if (e == ENOTDIR && ::fstatat(dir.get(), part.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
          S_ISLNK(st.st_mode)) {
        e = ELOOP;
      }
      return BeneathError(e, Shown(shown_root, so_far));
    }
    dir = std::move(next);
  }
  return dir;
}

void RemoveStaleTempsAt(int dirfd, const std::string& shown_dir, const std::string& prefix) {
  int fd = ::openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  std::unique_ptr<DIR, int (*)(DIR*)> d(::fdopendir(fd), &::closedir);
  if (!d) {
    ::close(fd);
    return;
  }
  while (const dirent* e = ::readdir(d.get())) {
    std::string_view name = e->d_name;
    if (name.size() <= prefix.size() || name.substr(0, prefix.size()) != prefix) continue;
    std::string_view digits = name.substr(prefix.size());
    if (digits.find_first_not_of("0123456789") != std::string_view::npos || digits.size() > 9) {
      continue;
    }
    pid_t pid = static_cast<pid_t>(std::stol(std::string(digits)));
    if (pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    if (::unlinkat(dirfd, std::string(name).c_str(), 0) == 0) {
      spdlog::info("removed {}/{}: left behind by a save that was interrupted", shown_dir, name);
    }
  }
}

Status ReplaceFileAt(int dirfd, const std::string& shown_dir, const std::string& name,
                     const ReplaceOptions& options, const std::function<Status(int fd)>& write) {
  const std::string& tmp_name = options.temp_path;
  const std::string target = shown_dir + "/" + name;
  const std::string tmp = shown_dir + "/" + tmp_name;
  if (name.empty() || tmp_name.empty() || name.find('/') != std::string::npos ||
      tmp_name.find('/') != std::string::npos || name == "." || name == "..") {
    return Err(EINVAL, "{}: the file and its temp must be plain names in the folder ({})", target,
               tmp_name);
  }
  constexpr int kFlags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
  UniqueFd fd(::openat(dirfd, tmp_name.c_str(), kFlags, 0600));
  if (!fd.valid() && errno == EEXIST && ::unlinkat(dirfd, tmp_name.c_str(), 0) == 0) {
    fd = UniqueFd(::openat(dirfd, tmp_name.c_str(), kFlags, 0600));
  }
  if (!fd.valid()) {
    int e = errno;
    return Err(e, "{}: cannot create {}: {}", target, tmp, std::strerror(e));
  }
  auto fail = [&](Error e) -> Status {
    ::unlinkat(dirfd, tmp_name.c_str(), 0);
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
  if (::renameat(dirfd, tmp_name.c_str(), dirfd, name.c_str()) != 0) {
    int e = errno;
    return fail(Err(e, "{}: cannot replace with {}: {}", target, tmp, std::strerror(e)));
  }
  handover.Commit();
  if (options.durable && ::fsync(dirfd) != 0 && options.folder_sync_is_error) {
    int e = errno;
    return Err(e, "{}: fsync of the directory failed: {}", shown_dir, std::strerror(e));
  }
  if (options.on_renamed) options.on_renamed();
  return Ok();
}

Status ReplaceFile(const std::string& target, const ReplaceOptions& options,
                   const std::function<Status(int fd)>& write) {
  const std::string dir = DirOf(target);
  if (DirOf(options.temp_path) != dir) {
    return Err(EINVAL, "{}: the temp {} is not in its folder", target, options.temp_path);
  }
  UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dfd.valid()) {
    int e = errno;
    return Err(e, "{}: cannot open its folder {}: {}", target, dir, std::strerror(e));
  }
  ReplaceOptions at = options;
  at.temp_path = options.temp_path.substr(options.temp_path.rfind('/') + 1);
  return ReplaceFileAt(dfd.get(), dir, target.substr(target.rfind('/') + 1), at, write);
}

}  // namespace nemofs
