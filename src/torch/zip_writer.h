// A streaming writer of torch.save zips, laid out byte for byte as
// PyTorch's writer (caffe2/serialize/inline_container.cc over its miniz
// fork) lays them out (FORMATS.md §3.2):
// * records stored (method 0), in the order added, each local header with
//   version 0, flags 0x0808 (UTF-8 names, data descriptor), time 0 and CRC
//   and sizes 0, then (for a record >= 4 GiB or a header at >= 4 GiB) a
//   ZIP64 extra of the size, 0 and/or the header offset, then the "FB"
//   padding extra that puts the data at a multiple of 64 from the zip start;
// * after the data a data descriptor (PK\7\8, CRC, sizes; 8-byte sizes when
//   the header had a ZIP64 extra); an empty record has flags 0x0800 and none;
// * the central directory (real CRCs, 0xFFFFFFFF + a ZIP64 extra for large
//   fields), a ZIP64 end record and locator (always), the classic end record.
//
// Nothing of a record is held in memory beyond a copy buffer: data comes
// from memory, from a descriptor range (copy_file_range, falling back to
// pread/pwrite) or from a ByteReader. Offsets in the results are relative
// to the zip's start (`base` of the output descriptor), which is also what
// the 64-byte alignment is relative to. Not thread-safe; one writer per zip.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"
#include "util/byte_reader.h"

namespace nemofs::torch {

struct ZipWrittenRecord {
  std::string name;           // full name, "<archive>/data/0"
  uint64_t local_header = 0;  // relative to the zip start
  uint64_t data = 0;          // first data byte, relative to the zip start
  uint64_t size = 0;
  uint32_t crc32 = 0;
  uint64_t central = 0;  // its central-directory entry (set by Finish)
};

class ZipWriter {
 public:
  // Writes at `base` of `fd` (which must be open for writing; pwrite, so the
  // file offset is not used). `what` names the output in errors.
  ZipWriter(int fd, uint64_t base, std::string what);

  // A record from memory.
  Status Add(std::string name, std::string_view data);
  // `length` bytes at `offset` of `src_fd`. With a known CRC the bytes are
  // copied by the kernel (copy_file_range; holes of the source are skipped
  // when the destination lies beyond the end of the output file, so a sparse
  // source stays sparse); without one they are read to compute it.
  Status AddCopy(std::string name, uint64_t length, int src_fd, uint64_t offset,
                 std::optional<uint32_t> crc32);
  // The same from any reader (read through a buffer).
  Status AddCopy(std::string name, uint64_t length, const ByteReader& src, uint64_t offset,
                 std::optional<uint32_t> crc32);

  // Central directory and end records. Returns the zip's total size.
  Result<uint64_t> Finish();

  uint64_t size() const { return at_; }  // bytes written so far
  const std::vector<ZipWrittenRecord>& records() const { return records_; }

 private:
  Result<ZipWrittenRecord*> Begin(std::string name, uint64_t size);
  Status End(ZipWrittenRecord* r, uint32_t crc);
  Status Put(std::string_view bytes);

  int fd_;
  uint64_t base_;
  std::string what_;
  uint64_t at_ = 0;
  bool finished_ = false;
  std::vector<ZipWrittenRecord> records_;
};

// CRC-32 (zlib's) of bytes, continuing from `crc`.
uint32_t Crc32(std::string_view bytes, uint32_t crc = 0);

}  // namespace nemofs::torch
