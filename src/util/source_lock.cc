#include "nemofs/source_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace nemofs {
namespace {

std::string LockDir() {
  struct stat st {};
  if (::stat("/run/lock", &st) == 0 && S_ISDIR(st.st_mode) && ::access("/run/lock", W_OK) == 0) {
    return "/run/lock";
  }
  const char* tmp = std::getenv("TMPDIR");
  return tmp && *tmp ? tmp : "/tmp";
}

// FNV-1a 64: a stable name for a path (not a security boundary: the lock is
// advisory, and the file holds nothing but a description).
uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string ReadHolder(int fd) {
  char buf[512];
  ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return "another process";
  std::string s(buf, static_cast<size_t>(n));
  while (!s.empty() && (s.back() == '\n' || s.back() == '\0')) s.pop_back();
  return s.empty() ? "another process" : s;
}

}  // namespace

std::string SourceLockPath(const std::string& source) {
  return fmt::format("{}/nemofs-{:016x}.lock", LockDir(), Fnv1a(source));
}

SourceLock::~SourceLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

Result<std::unique_ptr<SourceLock>> SourceLock::Acquire(const std::string& source,
                                                        const std::string& holder) {
  std::string path = SourceLockPath(source);
  // 0644 and O_NOFOLLOW: lockers of other users open it read-only (flock
  // needs no write access); a planted symlink is refused.
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0 && (errno == EACCES || errno == EPERM)) {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  }
  if (fd < 0) {
    int e = errno;
    return Err(e, "{}: cannot open the lock file {}: {}", source, path, std::strerror(e));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    std::string who = ReadHolder(fd);
    ::close(fd);
    if (e == EWOULDBLOCK) return Err(EBUSY, "{} is in use: {}", source, who);
    return Err(e, "{}: cannot lock {}: {}", source, path, std::strerror(e));
  }
  std::string line = holder + "\n";
  if (::ftruncate(fd, 0) == 0) {
    ssize_t n = ::pwrite(fd, line.data(), line.size(), 0);
    (void)n;  // a read-only lock file: the holder is just not described
  }
  return std::unique_ptr<SourceLock>(new SourceLock(fd, std::move(path)));
}

}  // namespace nemofs
