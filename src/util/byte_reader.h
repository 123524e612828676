// Random access to the bytes of one blob (a file, a tar member, a cached
// extraction), offsets relative to the blob. Parsers of nested formats
// (torch.save zips, legacy pickles) read through this, so that metadata can
// come either from a descriptor or from the parts of a compressed member
// captured while it streamed past (see ArchiveSource).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"

namespace nemofs {

class ByteReader {
 public:
  virtual ~ByteReader() = default;
  virtual uint64_t size() const = 0;
  // Exactly `len` bytes at `offset`. ENODATA when this reader does not hold
  // them (a SparseReader), EIO/errno for I/O errors. `what` names the blob.
  virtual Status Read(uint64_t offset, void* buf, size_t len, std::string_view what) const = 0;
};

// `length` bytes at `base` of a descriptor.
class FdReader final : public ByteReader {
 public:
  FdReader(int fd, uint64_t base, uint64_t length) : fd_(fd), base_(base), length_(length) {}
  uint64_t size() const override { return length_; }
  Status Read(uint64_t offset, void* buf, size_t len, std::string_view what) const override;

 private:
  int fd_;
  uint64_t base_;
  uint64_t length_;
};

// A window [offset, offset+length) of another reader (an item inside a .distcp).
class SubReader final : public ByteReader {
 public:
  SubReader(const ByteReader& base, uint64_t offset, uint64_t length)
      : base_(base), offset_(offset), length_(length) {}
  uint64_t size() const override { return length_; }
  Status Read(uint64_t offset, void* buf, size_t len, std::string_view what) const override {
    if (offset > length_ || len > length_ - offset) {
      return Err(EIO, "{}: read of {} bytes at offset {} is beyond its {} bytes", what, len, offset,
                 length_);
    }
    return base_.Read(offset_ + offset, buf, len, what);
  }

 private:
  const ByteReader& base_;
  uint64_t offset_;
  uint64_t length_;
};

// Some regions of a blob held in memory; reads outside them are ENODATA.
class SparseReader final : public ByteReader {
 public:
  struct Region {
    uint64_t offset;
    std::string bytes;
  };
  SparseReader(uint64_t size, std::vector<Region> regions);
  uint64_t size() const override { return size_; }
  const std::vector<Region>& regions() const { return regions_; }
  Status Read(uint64_t offset, void* buf, size_t len, std::string_view what) const override;

 private:
  uint64_t size_;
  std::vector<Region> regions_;  // sorted by offset
};

}  // namespace nemofs
