#include "util/io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

namespace nemofs {

Result<UniqueFd> OpenReadOnly(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return Err(e, "{}: cannot open: {}", path, std::strerror(e));
  }
  return UniqueFd(fd);
}

Result<size_t> PreadUpTo(int fd, void* buf, size_t len, uint64_t offset, std::string_view what) {
  size_t done = 0;
  auto* p = static_cast<char*>(buf);
  while (done < len) {
    ssize_t n = ::pread(fd, p + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      return Err(e, "{}: read of {} bytes at offset {} failed: {}", what, len, offset,
                 std::strerror(e));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Status PreadFull(int fd, void* buf, size_t len, uint64_t offset, std::string_view what) {
  NEMOFS_ASSIGN_OR_RETURN(size_t got, PreadUpTo(fd, buf, len, offset, what));
  if (got != len) {
    return Err(EIO, "{}: file ends at offset {}, expected {} bytes at offset {}", what,
               offset + got, len, offset);
  }
  return Ok();
}

Status WriteFull(int fd, const void* buf, size_t len, std::string_view what) {
  const auto* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      return Err(e, "{}: write failed: {}", what, std::strerror(e));
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return Ok();
}

Status PwriteFull(int fd, std::string_view bytes, uint64_t offset, std::string_view what) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n =
        ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      return Err(e, "{}: write at offset {} failed: {}", what, offset + done, std::strerror(e));
    }
    done += static_cast<size_t>(n);
  }
  return Ok();
}

Status PwriteThroughReadOnly(int fd, std::string_view bytes, uint64_t offset,
                             std::string_view what) {
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
  UniqueFd w(::open(self.c_str(), O_WRONLY | O_CLOEXEC));
  if (!w.valid()) {
    return Err(errno, "{}: cannot reopen for writing: {}", what, std::strerror(errno));
  }
  return PwriteFull(w.get(), bytes, offset, what);
}

Result<struct stat> Stat(const std::string& path, bool follow_symlinks) {
  struct stat st {};
  int rc = follow_symlinks ? ::stat(path.c_str(), &st) : ::lstat(path.c_str(), &st);
  if (rc != 0) {
    int e = errno;
    return Err(e, "{}: {}", path, std::strerror(e));
  }
  return st;
}

Result<struct stat> FStat(int fd, std::string_view what) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    return Err(e, "{}: {}", what, std::strerror(e));
  }
  return st;
}

Result<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenReadOnly(path));
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, FStat(fd.get(), path));
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return Err(EFBIG, "{}: {} bytes is larger than the {} byte limit", path, st.st_size, max_bytes);
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  NEMOFS_ASSIGN_OR_RETURN(size_t got, PreadUpTo(fd.get(), out.data(), out.size(), 0, path));
  out.resize(got);
  return out;
}

Status MakeDirs(const std::string& path) {
  if (path.empty()) return Ok();
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    partial = path.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), 0700) != 0 && errno != EEXIST) {
      int e = errno;
      return Err(e, "{}: cannot create directory: {}", partial, std::strerror(e));
    }
  }
  return Ok();
}

}  // namespace nemofs
