// Reader of the zip container torch.save writes (FORMATS.md §3.2, §3.5),
// working on any byte range of a file: a standalone .pt, a tar member of a
// .nemo, an item inside a .distcp.
//
// Accepted layout: classic EOCD (50 4B 05 06) within the last 64 KiB + 22
// bytes of the range, optional ZIP64 locator (50 4B 06 07) right before it
// pointing at a ZIP64 EOCD (50 4B 06 06); central-directory entries
// (50 4B 01 02) with ZIP64 extras (id 0x0001) for 0xFFFFFFFF fields; local
// headers (50 4B 03 04) used only for `30 + name length + extra length`
// (PyTorch leaves sizes and CRC there zero). All offsets are relative to the
// start of the range. The archive name is everything before the first '/'
// of the first central-directory entry, as PyTorch's reader defines it.
//
// Every offset and size is checked against the range; a malformed archive
// is an EINVAL error naming it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"
#include "util/byte_reader.h"

namespace nemofs::torch {

struct ZipEntry {
  std::string name;
  uint16_t flags = 0;   // general purpose bits (central directory); bit 3: data descriptor
  uint16_t method = 0;  // 0 = stored (all torch.save records)
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;
  uint64_t local_header_offset = 0;  // relative to the range
  uint64_t data_offset = 0;          // relative to the range
  uint64_t cd_offset = 0;            // of its central-directory entry, relative to the range
};

// Where a stored record and the fields holding its CRC-32 lie, for a patch
// of its bytes (FORMATS.md §3.4): offsets relative to the byte range of the
// blob (source file or member) the record is in. `size` = 0 with
// `present` false: not in a zip (a legacy torch.save storage).
struct ZipRecordPos {
  bool present = false;
  uint64_t local_header = 0;  // "PK\3\4"; its CRC at +14 is the real one unless bit 3 is set
  uint64_t central = 0;       // central-directory entry; its CRC at +16
  uint64_t data = 0;          // first byte of the record
  uint64_t size = 0;
  uint16_t flags = 0;         // bit 3: a data descriptor follows the data
  ZipRecordPos Shifted(uint64_t by) const {
    ZipRecordPos p = *this;
    p.local_header += by;
    p.central += by;
    p.data += by;
    return p;
  }
};

class ZipArchive {
 public:
  // `name` is used in errors ("x.nemo:model_weights.ckpt").
  // The reader must outlive the archive.
  static Result<ZipArchive> Open(const ByteReader& reader, std::string name);

  const std::string& name() const { return name_; }
  const std::vector<ZipEntry>& entries() const { return entries_; }
  // "model_weights" for records "model_weights/data.pkl", ...
  const std::string& prefix() const { return prefix_; }
  const ZipEntry* Find(std::string_view full_name) const;
  // Finds "<prefix>/<record>".
  const ZipEntry* FindRecord(std::string_view record) const;
  // Reads a stored entry into memory, refusing more than `max_bytes`.
  Result<std::string> Read(const ZipEntry& entry, uint64_t max_bytes) const;

 private:
  const ByteReader* reader_ = nullptr;
  uint64_t length_ = 0;
  std::string name_;
  std::string prefix_;
  std::vector<ZipEntry> entries_;
  std::vector<uint32_t> by_name_;  // indices sorted by name
};

// True if the 4 bytes are a local file header signature ("PK\3\4").
bool IsZipMagic(std::string_view first_bytes);

}  // namespace nemofs::torch
