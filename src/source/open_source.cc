#include <sys/stat.h>

#include <cstring>

#include "source/sources_internal.h"
#include "util/io.h"

namespace nemofs::source {
namespace {

// Compression magics libarchive can stream (FORMATS.md §0: gzip for old .nemo).
const char* CompressionFilter(const unsigned char* b, size_t n) {
  if (n >= 2 && b[0] == 0x1f && b[1] == 0x8b) return "gzip";
  if (n >= 3 && std::memcmp(b, "BZh", 3) == 0) return "bzip2";
  if (n >= 6 && std::memcmp(b,
                            "\xfd"
                            "7zXZ\0",
                            6) == 0)
    return "xz";
  if (n >= 4 && std::memcmp(b, "\x28\xb5\x2f\xfd", 4) == 0) return "zstd";
  if (n >= 4 && std::memcmp(b, "\x04\x22\x4d\x18", 4) == 0) return "lz4";
  return nullptr;
}

}  // namespace

Result<std::unique_ptr<Source>> OpenSource(const std::string& path, const OpenOptions& options) {
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, Stat(path));
  if (S_ISDIR(st.st_mode)) return DirectorySource::Open(path);
  if (!S_ISREG(st.st_mode)) return Err(EINVAL, "{}: not a regular file or directory", path);
  if (st.st_size == 0) return Err(EINVAL, "{}: empty file", path);

  NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenReadOnly(path));
  unsigned char head[512] = {};
  NEMOFS_ASSIGN_OR_RETURN(size_t n, PreadUpTo(fd.get(), head, sizeof head, 0, path));
  if (n >= 263 && HasUstarMagic(head)) {
    return TarSource::Open(path, std::move(fd), static_cast<uint64_t>(st.st_size));
  }
  if (const char* filter = CompressionFilter(head, n)) {
    if (options.cache_dir.empty()) {
      return Err(EINVAL, "{}: compressed archive needs a cache directory", path);
    }
    return ArchiveSource::Open(path, filter, st, options.cache_dir, options.cache_max);
  }
  return FileSource::Open(path, std::move(fd), st);
}

}  // namespace nemofs::source
