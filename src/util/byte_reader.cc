#include "util/byte_reader.h"

#include <algorithm>
#include <cstring>

#include "util/io.h"

namespace nemofs {

Status FdReader::Read(uint64_t offset, void* buf, size_t len, std::string_view what) const {
  if (offset > length_ || len > length_ - offset) {
    return Err(EIO, "{}: read of {} bytes at offset {} is beyond its {} bytes", what, len, offset,
               length_);
  }
  return PreadFull(fd_, buf, len, base_ + offset, what);
}

SparseReader::SparseReader(uint64_t size, std::vector<Region> regions)
    : size_(size), regions_(std::move(regions)) {
  std::sort(regions_.begin(), regions_.end(),
            [](const Region& a, const Region& b) { return a.offset < b.offset; });
}

Status SparseReader::Read(uint64_t offset, void* buf, size_t len, std::string_view what) const {
  if (offset > size_ || len > size_ - offset) {
    return Err(EIO, "{}: read of {} bytes at offset {} is beyond its {} bytes", what, len, offset,
               size_);
  }
  // The last region starting at or before `offset` that covers the whole range.
  auto it = std::upper_bound(regions_.begin(), regions_.end(), offset,
                             [](uint64_t off, const Region& r) { return off < r.offset; });
  while (it != regions_.begin()) {
    --it;
    if (offset + len <= it->offset + it->bytes.size()) {
      std::memcpy(buf, it->bytes.data() + (offset - it->offset), len);
      return Ok();
    }
    if (it->offset + (1 << 24) < offset) break;  // regions are small; stop looking far back
  }
  return Err(ENODATA, "{}: bytes {}..{} were not captured", what, offset, offset + len);
}

}  // namespace nemofs
