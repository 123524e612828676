#include "nemofs/source_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <vector>

namespace nemofs {
namespace {

// The locks this process holds, for LockHandover.
std::mutex& RegistryMutex() {
  static std::mutex mu;
  return mu;
}
std::vector<SourceLock*>& Registry() {
  static std::vector<SourceLock*> locks;
  return locks;
}

std::string ReadProcFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> SplitNul(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find('\0', start);
    if (end == std::string::npos) end = s.size();
    out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

std::string Basename(const std::string& p) {
  auto slash = p.rfind('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

// Undoes mountinfo's octal escapes ("\040" for a space).
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    auto digit = [&](size_t k) { return s[k] >= '0' && s[k] <= '7'; };
    if (s[i] == '\\' && i + 3 < s.size() && digit(i + 1) && digit(i + 2) && digit(i + 3)) {
      out.push_back(static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8)));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

// The mount points of the fuse.nemofs mounts the kernel lists.
std::vector<std::string> NemofsMountPoints() {
  std::vector<std::string> points;
  std::istringstream info(ReadProcFile("/proc/self/mountinfo"));
  for (std::string line; std::getline(info, line);) {
    std::istringstream f(line);
    std::string id, parent, devno, root, point, word, type;
    f >> id >> parent >> devno >> root >> point;
    while (f >> word && word != "-") {
    }
    f >> type;
    if (type == "fuse.nemofs") points.push_back(Unescape(point));
  }
  return points;
}

// The mount point of a `nemofs mount SOURCE MOUNTPOINT ...` command line (or
// the fstab form `nemofs SOURCE MOUNTPOINT -o ...`), only if the kernel
// lists a nemofs mount there (a command line is whatever its process wrote);
// empty otherwise.
std::string MountPointOf(const std::vector<std::string>& argv) {
  if (argv.size() < 3 || Basename(argv[0]).rfind("nemofs", 0) != 0) return {};
  size_t i = 1;
  if (argv[1] == "mount") {
    ++i;
  } else if (argv[1].empty() || argv[1][0] == '-') {
    return {};
  }
  static const char* const kWithValue[] = {"-o", "--cache-dir", "--cache-max", "--log-level",
                                           "--log-file"};
  std::vector<std::string> positional;
  for (; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (!a.empty() && a[0] == '-') {
      if (std::find(std::begin(kWithValue), std::end(kWithValue), a) != std::end(kWithValue)) ++i;
      continue;
    }
    positional.push_back(a);
  }
  if (positional.size() != 2) return {};
  std::string mnt = positional[1];
  while (mnt.size() > 1 && mnt.back() == '/') mnt.pop_back();
  // A relative one is relative to where the mount was run (the daemon has
  // left it): the nemofs mount whose path ends with it, if only one does.
  const std::string tail = "/" + mnt;
  std::string found;
  int matches = 0;
  for (const auto& point : NemofsMountPoints()) {
    if (point == mnt) return point;
    if (mnt[0] != '/' && point.size() > tail.size() &&
        point.compare(point.size() - tail.size(), tail.size(), tail) == 0) {
      found = point;
      ++matches;
    }
  }
  return matches == 1 ? found : std::string();
}

}  // namespace

std::optional<FlockEntry> ParseFlockLine(const std::string& line) {
  std::istringstream in(line);
  std::string id, kind, mode, access, pid, where;
  if (!(in >> id >> kind) || kind != "FLOCK") return std::nullopt;  // also "->" waiters
  if (!(in >> mode >> access >> pid >> where)) return std::nullopt;
  FlockEntry e;
  e.write = access == "WRITE";
  unsigned maj = 0, min = 0;
  unsigned long long ino = 0;
  char* end = nullptr;
  long p = std::strtol(pid.c_str(), &end, 10);
  if (end == pid.c_str() || *end != '\0' || p <= 0) return std::nullopt;
  if (std::sscanf(where.c_str(), "%x:%x:%llu", &maj, &min, &ino) != 3) return std::nullopt;
  e.pid = static_cast<pid_t>(p);
  e.major = maj;
  e.minor = min;
  e.inode = ino;
  return e;
}

std::optional<pid_t> FlockHolder(const std::string& locks, dev_t dev, ino_t ino) {
  std::istringstream in(locks);
  std::string line;
  std::optional<pid_t> by_inode;
  int inode_matches = 0;
  while (std::getline(in, line)) {
    auto e = ParseFlockLine(line);
    if (!e || !e->write || e->inode != static_cast<uint64_t>(ino)) continue;
    if (e->major == major(dev) && e->minor == minor(dev)) return e->pid;
    // Some file systems (btrfs subvolumes) report another st_dev than the
    // superblock's device that /proc/locks prints: the inode alone, if unique.
    by_inode = e->pid;
    ++inode_matches;
  }
  if (inode_matches == 1) return by_inode;
  return std::nullopt;
}

std::string DescribeLockHolder(pid_t pid) {
  const std::string proc = "/proc/" + std::to_string(pid);
  auto argv = SplitNul(ReadProcFile(proc + "/cmdline"));
  if (argv.empty()) return fmt::format("another process (pid {}, exited)", pid);
  std::string mnt = MountPointOf(argv);
  if (!mnt.empty()) return fmt::format("a writable nemofs mount at {} (pid {})", mnt, pid);
  if (argv.size() >= 2 && Basename(argv[0]).rfind("nemofs", 0) == 0 && argv[1] == "repack") {
    return fmt::format("nemofs repack (pid {})", pid);
  }
  std::string comm = ReadProcFile(proc + "/comm");
  while (!comm.empty() && comm.back() == '\n') comm.pop_back();
  return fmt::format("process {} ({})", pid, comm.empty() ? Basename(argv[0]) : comm);
}

SourceLock::SourceLock(int fd) : fd_(fd) {
  std::lock_guard<std::mutex> g(RegistryMutex());
  Registry().push_back(this);
}

SourceLock::~SourceLock() {
  std::lock_guard<std::mutex> g(RegistryMutex());
  auto& r = Registry();
  r.erase(std::remove(r.begin(), r.end(), this), r.end());
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the flock
}

dev_t SourceLock::dev() const {
  struct stat st {};
  return ::fstat(fd_, &st) == 0 ? st.st_dev : 0;
}

ino_t SourceLock::ino() const {
  struct stat st {};
  return ::fstat(fd_, &st) == 0 ? st.st_ino : 0;
}

Result<std::unique_ptr<SourceLock>> SourceLock::Acquire(const std::string& source) {
  // O_RDONLY is enough for flock locally; O_NONBLOCK so that a FIFO given as
  // a source does not hang here (the source's own open refuses it).
  int fd = ::open(source.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    int e = errno;
    return Err(e, "cannot lock {} (cannot open it: {})", source, std::strerror(e));
  }
  int rc = ::flock(fd, LOCK_EX | LOCK_NB);
  int e = rc == 0 ? 0 : errno;
  struct stat st {};
  bool have_id = ::fstat(fd, &st) == 0;
  if (rc != 0 && e == EBADF && have_id && S_ISREG(st.st_mode)) {
    // NFS wants a file opened for writing for an exclusive flock (flock(2));
    // a writable mount needs write access to a file source anyway.
    int wfd = ::open(source.c_str(), O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (wfd >= 0) {
      ::close(fd);
      fd = wfd;
      rc = ::flock(fd, LOCK_EX | LOCK_NB);
      e = rc == 0 ? 0 : errno;
      have_id = ::fstat(fd, &st) == 0;
    }
  }
  if (rc != 0) {
    ::close(fd);
    // Only a holder makes EBUSY; anything else (EBADF for a folder on NFS,
    // ENOLCK, EOPNOTSUPP...) means the lock cannot be had here at all.
    if (e != EWOULDBLOCK) return Err(e, "cannot lock {} ({})", source, std::strerror(e));
    std::optional<pid_t> pid;
    if (have_id) pid = FlockHolder(ReadProcFile("/proc/locks"), st.st_dev, st.st_ino);
    return Err(EBUSY, "{} is in use: {}", source,
               pid ? DescribeLockHolder(*pid) : std::string("another process holds its lock"));
  }
  return std::unique_ptr<SourceLock>(new SourceLock(fd));
}

bool SourceLock::ClaimForThisProcess() {
  // No registry mutex: right after a fork another (now absent) thread may
  // have held it; fd_ does not change before the daemon serves.
  // A conversion replaces the lock with one of this process; EX -> SH can
  // not fail, and no nemofs takes LOCK_SH, so SH -> EX fails only for a
  // foreign LOCK_SH holder (and then loses the lock: retake SH).
  if (::flock(fd_, LOCK_SH | LOCK_NB) != 0) return false;
  if (::flock(fd_, LOCK_EX | LOCK_NB) == 0) return true;
  (void)::flock(fd_, LOCK_SH | LOCK_NB);
  return false;
}

LockHandover::LockHandover(const std::string& target, int new_fd) {
  struct stat st {};
  if (::stat(target.c_str(), &st) != 0) return;
  std::lock_guard<std::mutex> g(RegistryMutex());
  for (SourceLock* l : Registry()) {
    struct stat ls {};
    if (::fstat(l->fd_, &ls) == 0 && ls.st_dev == st.st_dev && ls.st_ino == st.st_ino) {
      int fd = ::fcntl(new_fd, F_DUPFD_CLOEXEC, 0);
      if (fd < 0) return;
      // The temp is this process's own 0600 file: nobody else holds it.
      if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        ::close(fd);
        return;
      }
      lock_ = l;
      fd_ = fd;
      return;
    }
  }
}

LockHandover::~LockHandover() {
  if (fd_ >= 0) ::close(fd_);
}

void LockHandover::Commit() {
  if (!lock_) return;
  std::lock_guard<std::mutex> g(RegistryMutex());
  auto& r = Registry();
  if (std::find(r.begin(), r.end(), lock_) == r.end()) return;  // released meanwhile
  ::close(lock_->fd_);                                          // the old inode, now unlinked
  lock_->fd_ = std::exchange(fd_, -1);
  lock_ = nullptr;
}

}  // namespace nemofs
