#include "torch/zip_reader.h"

#include <algorithm>
#include <cstring>

#include "util/io.h"

namespace nemofs::torch {
namespace {

constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint32_t kCdSig = 0x02014b50;
constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint64_t kMaxEntries = 1 << 24;

uint16_t U16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t U32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t U64(const unsigned char* p) {
  return static_cast<uint64_t>(U32(p)) | (static_cast<uint64_t>(U32(p + 4)) << 32);
}

}  // namespace

bool IsZipMagic(std::string_view b) { return b.size() >= 4 && b.substr(0, 4) == "PK\x03\x04"; }

Result<ZipArchive> ZipArchive::Open(const ByteReader& reader, std::string name) {
  ZipArchive zip;
  const uint64_t length = reader.size();
  zip.reader_ = &reader;
  zip.length_ = length;
  zip.name_ = std::move(name);
  const std::string& what = zip.name_;
  auto bad = [&](std::string_view problem) {
    return Err(EINVAL, "{}: not a valid torch.save zip: {}", what, problem);
  };
  if (length < 22) return bad(fmt::format("{} bytes is too short for a zip", length));

  // 1. End of central directory, scanning backwards over a possible comment:
  // first the last KiB (torch.save writes no comment), then the largest window.
  std::string tail;
  uint64_t tail_len = 0;
  int64_t eocd = -1;
  for (uint64_t window : {uint64_t{1024}, uint64_t{65535 + 22}}) {
    tail_len = std::min<uint64_t>(length, window);
    tail.assign(tail_len, '\0');
    NEMOFS_RETURN_IF_ERROR(reader.Read(length - tail_len, tail.data(), tail_len, what));
    const auto* t = reinterpret_cast<const unsigned char*>(tail.data());
    for (int64_t i = static_cast<int64_t>(tail_len) - 22; i >= 0; --i) {
      if (U32(t + i) == kEocdSig && static_cast<uint64_t>(i) + 22 + U16(t + i + 20) <= tail_len) {
        eocd = i;
        break;
      }
    }
    if (eocd >= 0 || tail_len == length) break;
  }
  if (eocd < 0) return bad("no end-of-central-directory record");
  const auto* t = reinterpret_cast<const unsigned char*>(tail.data());
  uint64_t eocd_abs = length - tail_len + static_cast<uint64_t>(eocd);
  uint64_t entries = U16(t + eocd + 10);
  uint64_t cd_size = U32(t + eocd + 12);
  uint64_t cd_offset = U32(t + eocd + 16);

  // 2. ZIP64 (always present in torch.save files).
  if (eocd_abs >= 20) {
    unsigned char loc[20];
    NEMOFS_RETURN_IF_ERROR(reader.Read(eocd_abs - 20, loc, 20, what));
    if (U32(loc) == kZip64LocatorSig) {
      uint64_t z64 = U64(loc + 8);
      if (z64 > length || length - z64 < 56) return bad("ZIP64 locator points outside the file");
      unsigned char rec[56];
      NEMOFS_RETURN_IF_ERROR(reader.Read(z64, rec, 56, what));
      if (U32(rec) != kZip64EocdSig) return bad("ZIP64 end-of-central-directory signature missing");
      entries = U64(rec + 32);
      cd_size = U64(rec + 40);
      cd_offset = U64(rec + 48);
    }
  }
  if (cd_offset > length || cd_size > length - cd_offset) {
    return bad(fmt::format("central directory at {} (+{} bytes) lies outside the {} bytes",
                           cd_offset, cd_size, length));
  }
  if (entries > kMaxEntries || entries > cd_size / 46 + 1) {
    return bad(fmt::format("{} entries cannot fit a {} byte central directory", entries, cd_size));
  }

  // 3. Central directory entries.
  std::string cd(cd_size, '\0');
  NEMOFS_RETURN_IF_ERROR(reader.Read(cd_offset, cd.data(), cd_size, what));
  const auto* c = reinterpret_cast<const unsigned char*>(cd.data());
  uint64_t pos = 0;
  zip.entries_.reserve(entries);
  for (uint64_t i = 0; i < entries; ++i) {
    if (cd_size - pos < 46 || U32(c + pos) != kCdSig) {
      return bad(
          fmt::format("central directory entry {} at offset {} is malformed", i, cd_offset + pos));
    }
    ZipEntry e;
    e.cd_offset = cd_offset + pos;
    e.flags = U16(c + pos + 8);
    e.method = U16(c + pos + 10);
    e.crc32 = U32(c + pos + 16);
    e.compressed_size = U32(c + pos + 20);
    e.size = U32(c + pos + 24);
    uint16_t name_len = U16(c + pos + 28);
    uint16_t extra_len = U16(c + pos + 30);
    uint16_t comment_len = U16(c + pos + 32);
    e.local_header_offset = U32(c + pos + 42);
    uint64_t need = 46ull + name_len + extra_len + comment_len;
    if (cd_size - pos < need) return bad(fmt::format("central directory entry {} is truncated", i));
    e.name.assign(cd.data() + pos + 46, name_len);
    // ZIP64 extra: 8-byte values for whichever 32-bit fields are saturated, in order.
    const unsigned char* x = c + pos + 46 + name_len;
    for (uint64_t xp = 0; xp + 4 <= extra_len;) {
      uint16_t id = U16(x + xp);
      uint16_t len = U16(x + xp + 2);
      if (xp + 4 + len > extra_len)
        return bad(fmt::format("entry '{}' has a bad extra field", e.name));
      if (id == 0x0001) {
        const unsigned char* v = x + xp + 4;
        uint64_t left = len;
        auto take = [&](uint64_t* field) -> bool {
          if (left < 8) return false;
          *field = U64(v);
          v += 8;
          left -= 8;
          return true;
        };
        if ((e.size == 0xFFFFFFFF && !take(&e.size)) ||
            (e.compressed_size == 0xFFFFFFFF && !take(&e.compressed_size)) ||
            (e.local_header_offset == 0xFFFFFFFF && !take(&e.local_header_offset))) {
          return bad(fmt::format("entry '{}' has a short ZIP64 extra field", e.name));
        }
      }
      xp += 4ull + len;
    }
    pos += need;

    // Data offset from the local header's own name and extra lengths.
    if (e.local_header_offset > length || length - e.local_header_offset < 30) {
      return bad(fmt::format("entry '{}': local header offset {} lies outside the {} bytes", e.name,
                             e.local_header_offset, length));
    }
    unsigned char lh[30];
    NEMOFS_RETURN_IF_ERROR(reader.Read(e.local_header_offset, lh, 30, what));
    if (U32(lh) != kLocalSig) {
      return bad(
          fmt::format("entry '{}': no local header at offset {}", e.name, e.local_header_offset));
    }
    e.data_offset = e.local_header_offset + 30 + U16(lh + 26) + U16(lh + 28);
    if (e.data_offset > length || e.compressed_size > length - e.data_offset) {
      return bad(fmt::format("entry '{}': {} bytes at offset {} run past the end ({} bytes)",
                             e.name, e.compressed_size, e.data_offset, length));
    }
    zip.entries_.push_back(std::move(e));
  }
  if (zip.entries_.empty()) return bad("no entries");
  auto slash = zip.entries_[0].name.find('/');
  if (slash == std::string::npos) {
    return bad(fmt::format("first record '{}' has no archive folder", zip.entries_[0].name));
  }
  zip.prefix_ = zip.entries_[0].name.substr(0, slash);
  zip.by_name_.resize(zip.entries_.size());
  for (uint32_t i = 0; i < zip.by_name_.size(); ++i) zip.by_name_[i] = i;
  std::stable_sort(zip.by_name_.begin(), zip.by_name_.end(), [&](uint32_t a, uint32_t b) {
    return zip.entries_[a].name < zip.entries_[b].name;
  });
  return zip;
}

const ZipEntry* ZipArchive::Find(std::string_view full_name) const {
  auto it = std::lower_bound(by_name_.begin(), by_name_.end(), full_name,
                             [&](uint32_t i, std::string_view n) { return entries_[i].name < n; });
  // Several entries of one name: the last in the central directory wins, as in miniz.
  const ZipEntry* found = nullptr;
  for (; it != by_name_.end() && entries_[*it].name == full_name; ++it) found = &entries_[*it];
  return found;
}

const ZipEntry* ZipArchive::FindRecord(std::string_view record) const {
  return Find(prefix_ + "/" + std::string(record));
}

Result<std::string> ZipArchive::Read(const ZipEntry& entry, uint64_t max_bytes) const {
  if (entry.method != 0) {
    return Err(EINVAL, "{}: record '{}' is compressed (method {}); torch.save stores records",
               name_, entry.name, entry.method);
  }
  if (entry.size != entry.compressed_size) {
    return Err(EINVAL, "{}: record '{}' has size {} but stores {} bytes", name_, entry.name,
               entry.size, entry.compressed_size);
  }
  if (entry.size > max_bytes) {
    return Err(EFBIG, "{}: record '{}' is {} bytes, over the {} byte limit", name_, entry.name,
               entry.size, max_bytes);
  }
  std::string out(entry.size, '\0');
  NEMOFS_RETURN_IF_ERROR(reader_->Read(entry.data_offset, out.data(), out.size(),
                                       fmt::format("{}:{}", name_, entry.name)));
  return out;
}

}  // namespace nemofs::torch
