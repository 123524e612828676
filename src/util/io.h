// Checked file I/O helpers: full reads and writes, errors with errno + path.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "nemofs/result.h"
#include "util/fd.h"

namespace nemofs {

// Opens `path` read-only (O_CLOEXEC). Error names the path.
Result<UniqueFd> OpenReadOnly(const std::string& path);

// Reads exactly `len` bytes at `offset`; EIO naming `what` if the file is
// shorter, the errno of pread otherwise.
Status PreadFull(int fd, void* buf, size_t len, uint64_t offset, std::string_view what);

// Reads up to `len` bytes at `offset`; returns how many were read (short only at EOF).
Result<size_t> PreadUpTo(int fd, void* buf, size_t len, uint64_t offset, std::string_view what);

Status WriteFull(int fd, const void* buf, size_t len, std::string_view what);
// Writes all of `bytes` at `offset` (retrying short writes and EINTR).
Status PwriteFull(int fd, std::string_view bytes, uint64_t offset, std::string_view what);
// The same, into the file a read-only descriptor `fd` has open (reopened
// for writing through /proc/self/fd, whatever became of its name).
Status PwriteThroughReadOnly(int fd, std::string_view bytes, uint64_t offset,
                             std::string_view what);

Result<struct stat> Stat(const std::string& path, bool follow_symlinks = true);
Result<struct stat> FStat(int fd, std::string_view what);

// Reads a whole (small) file into memory; refuses files over `max_bytes`.
Result<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes);

// Creates `path` and its parents (mode 0700 for new ones).
Status MakeDirs(const std::string& path);

// "a + b" or an EOVERFLOW-free check; true when the sum fits in uint64_t.
inline bool AddOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_add_overflow(a, b, out);
}
inline bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

}  // namespace nemofs
