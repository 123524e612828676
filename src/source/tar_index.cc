#include "source/tar_index.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <string_view>

#include "util/io.h"

namespace nemofs::source {
namespace {

constexpr uint64_t kBlock = 512;
// Extended headers hold names and a few numbers; anything bigger is hostile.
constexpr uint64_t kMaxExtendedHeader = 1 << 20;

std::string_view FieldString(const unsigned char* block, size_t off, size_t len) {
  const char* p = reinterpret_cast<const char*>(block) + off;
  size_t n = 0;
  while (n < len && p[n] != '\0') ++n;
  return std::string_view(p, n);
}

// Octal ASCII (NUL/space padded) or GNU base-256. False if malformed.
bool ParseNumber(const unsigned char* block, size_t off, size_t len, int64_t* out) {
  const unsigned char* p = block + off;
  if (p[0] == 0x80 || p[0] == 0xff) {  // base-256, big-endian two's complement
    bool negative = p[0] == 0xff;
    uint64_t v = negative ? ~uint64_t{0} : 0;
    for (size_t i = 1; i < len; ++i) {
      if (!negative && (v >> 56) != 0) return false;  // would overflow
      v = (v << 8) | p[i];
    }
    if (!negative && v > static_cast<uint64_t>(INT64_MAX)) return false;
    *out = static_cast<int64_t>(v);
    return true;
  }
  size_t i = 0;
  while (i < len && p[i] == ' ') ++i;
  uint64_t v = 0;  // an empty field reads as 0, as tarfile does
  for (; i < len && p[i] >= '0' && p[i] <= '7'; ++i) {
    if (v > (static_cast<uint64_t>(INT64_MAX) >> 3)) return false;
    v = (v << 3) | static_cast<uint64_t>(p[i] - '0');
  }
  for (; i < len; ++i) {  // only NUL or space may follow the digits
    if (p[i] != ' ' && p[i] != '\0') return false;
  }
  *out = static_cast<int64_t>(v);
  return true;
}

bool ChecksumMatches(const unsigned char* block) {
  int64_t stored = 0;
  if (!ParseNumber(block, 148, 8, &stored)) return false;
  int64_t unsigned_sum = 0;
  int64_t signed_sum = 0;
  for (size_t i = 0; i < kBlock; ++i) {
    unsigned char c = (i >= 148 && i < 156) ? ' ' : block[i];
    unsigned_sum += c;
    signed_sum += static_cast<signed char>(c);
  }
  return stored == unsigned_sum || stored == signed_sum;
}

bool AllZero(const unsigned char* block) {
  return std::all_of(block, block + kBlock, [](unsigned char c) { return c == 0; });
}

bool ParseDecimal(std::string_view s, uint64_t* out) {
  // Leading zeros are digits like any other for GNU tar and Python's tarfile.
  while (s.size() > 1 && s[0] == '0') s.remove_prefix(1);
  if (s.empty() || s.size() > 19) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  *out = v;
  return true;
}

// PAX mtime: "[-]seconds[.fraction]".
bool ParsePaxTime(std::string_view s, int64_t* sec, uint32_t* nsec) {
  bool negative = !s.empty() && s[0] == '-';
  if (negative) s.remove_prefix(1);
  auto dot = s.find('.');
  uint64_t whole = 0;
  if (!ParseDecimal(s.substr(0, dot), &whole)) return false;
  uint64_t frac = 0;
  if (dot != std::string_view::npos) {
    std::string digits(s.substr(dot + 1, 9));
    if (digits.empty() && s.size() > dot + 1) return false;
    for (char c : s.substr(dot + 1)) {
      if (c < '0' || c > '9') return false;
    }
    digits.resize(9, '0');
    if (!ParseDecimal(digits, &frac)) return false;
  }
  *sec = negative ? -static_cast<int64_t>(whole) : static_cast<int64_t>(whole);
  *nsec = static_cast<uint32_t>(frac);
  if (negative && frac != 0) {  // -1.5 s = -2 s + 0.5 s
    *sec -= 1;
    *nsec = static_cast<uint32_t>(1000000000 - frac);
  }
  return true;
}

using PaxRecords = std::map<std::string, std::string, std::less<>>;

Status ParsePax(std::string_view data, uint64_t at, const std::string& name, PaxRecords* out) {
  size_t pos = 0;
  while (pos < data.size()) {
    if (data[pos] == '\0') break;  // padding after the last record
    size_t space = data.find(' ', pos);
    uint64_t len = 0;
    if (space == std::string_view::npos || !ParseDecimal(data.substr(pos, space - pos), &len) ||
        len < space - pos + 4 || len > data.size() - pos || data[pos + len - 1] != '\n') {
      return Err(EINVAL, "{}: PAX header at offset {} has a malformed record at byte {}", name, at,
                 pos);
    }
    std::string_view record = data.substr(space + 1, pos + len - 1 - (space + 1));
    size_t eq = record.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      return Err(EINVAL, "{}: PAX header at offset {} has a record without key=value at byte {}",
                 name, at, pos);
    }
    (*out)[std::string(record.substr(0, eq))] = std::string(record.substr(eq + 1));
    pos += len;
  }
  return Ok();
}

}  // namespace

bool HasUstarMagic(const unsigned char* block) { return std::memcmp(block + 257, "ustar", 5) == 0; }

Result<TarIndex> IndexTar(int fd, uint64_t base, uint64_t length, const std::string& name) {
  TarIndex index;
  unsigned char block[kBlock];
  uint64_t offset = 0;
  PaxRecords pax_local;
  PaxRecords pax_global;
  std::string gnu_long_name;
  std::string gnu_long_link;
  bool have_long_name = false;
  bool have_long_link = false;
  bool pending_extended = false;
  uint64_t member_start = 0;

  for (;;) {
    if (offset == length) {
      index.end_offset = offset;
      break;  // no end-of-archive marker: accepted, as Python's tarfile does
    }
    if (length - offset < kBlock) {
      return Err(EINVAL, "{}: truncated tar header at offset {} ({} of 512 bytes present)", name,
                 offset, length - offset);
    }
    NEMOFS_RETURN_IF_ERROR(PreadFull(fd, block, kBlock, base + offset, name));
    if (AllZero(block)) {
      index.end_offset = offset;
      index.has_end_marker = true;
      break;
    }
    if (!ChecksumMatches(block)) {
      if (offset == 0 && !HasUstarMagic(block)) {
        return Err(EINVAL, "{}: not a tar archive (no valid header at offset 0)", name);
      }
      return Err(EINVAL, "{}: tar header at offset {} has a bad checksum", name, offset);
    }
    if (!pending_extended) member_start = offset;
    if (std::memcmp(block + 257, "ustar  ", 8) == 0) index.gnu = true;

    int64_t size_field = 0;
    if (!ParseNumber(block, 124, 12, &size_field) || size_field < 0) {
      return Err(EINVAL, "{}: tar header at offset {} has an invalid size field", name, offset);
    }
    char type = static_cast<char>(block[156]);
    uint64_t data_offset = offset + kBlock;
    uint64_t size = static_cast<uint64_t>(size_field);

    auto read_extended = [&](std::string* out) -> Status {
      if (size > kMaxExtendedHeader) {
        return Err(EINVAL, "{}: extended header at offset {} claims {} bytes (limit {})", name,
                   offset, size, kMaxExtendedHeader);
      }
      if (size > length - data_offset) {
        return Err(EINVAL,
                   "{}: extended header at offset {} runs past the end of the archive ({} bytes "
                   "from offset {}, file has {} bytes)",
                   name, offset, size, data_offset, length);
      }
      out->resize(size);
      return PreadFull(fd, out->data(), size, base + data_offset, name);
    };
    auto next_after = [&](uint64_t data_size) -> Result<uint64_t> {
      uint64_t padded = (data_size + kBlock - 1) / kBlock * kBlock;
      uint64_t end = 0;
      if (data_size > UINT64_MAX - kBlock || AddOverflows(data_offset, padded, &end)) {
        return Err(EINVAL, "{}: size at offset {} overflows", name, offset);
      }
      return end;
    };

    if (type == 'x' || type == 'g' || type == 'L' || type == 'K') {
      std::string data;
      NEMOFS_RETURN_IF_ERROR(read_extended(&data));
      if (type == 'x' || type == 'g') {
        index.pax = true;
        NEMOFS_RETURN_IF_ERROR(
            ParsePax(data, offset, name, type == 'x' ? &pax_local : &pax_global));
      } else {
        index.gnu = true;
        auto nul = data.find('\0');
        if (nul != std::string::npos) data.resize(nul);
        (type == 'L' ? gnu_long_name : gnu_long_link) = data;
        (type == 'L' ? have_long_name : have_long_link) = true;
      }
      NEMOFS_ASSIGN_OR_RETURN(offset, next_after(size));
      offset = std::min(offset, length);  // a cut in the padding ends the archive here
      pending_extended = true;
      continue;
    }

    TarMember m;
    m.type = type;
    m.header_offset = member_start;
    m.data_offset = data_offset;
    int64_t mode = 0;
    int64_t mtime = 0;
    if (!ParseNumber(block, 100, 8, &mode) || !ParseNumber(block, 136, 12, &mtime)) {
      return Err(EINVAL, "{}: tar header at offset {} has an invalid mode or mtime field", name,
                 offset);
    }
    m.mode = static_cast<uint32_t>(mode) & 07777;
    m.mtime_sec = mtime;
    // Owner ids: a malformed field reads as 0 (tarfile is as lenient; the
    // ids only matter to repack).
    int64_t uid = 0, gid = 0;
    if (ParseNumber(block, 108, 8, &uid) && uid >= 0 && uid <= UINT32_MAX) {
      m.uid = static_cast<uint32_t>(uid);
    }
    if (ParseNumber(block, 116, 8, &gid) && gid >= 0 && gid <= UINT32_MAX) {
      m.gid = static_cast<uint32_t>(gid);
    }
    if (HasUstarMagic(block)) {
      m.uname = std::string(FieldString(block, 265, 32));
      m.gname = std::string(FieldString(block, 297, 32));
    }
    std::string header_name(FieldString(block, 0, 100));
    std::string_view prefix = FieldString(block, 345, 155);
    if (std::memcmp(block + 257, "ustar\0", 6) == 0 && !prefix.empty()) {
      header_name = std::string(prefix) + "/" + header_name;
    }
    m.name = header_name;
    m.link_name = std::string(FieldString(block, 157, 100));

    // Extended values: global records first, then the member's own.
    for (const PaxRecords* records : {&pax_global, &pax_local}) {
      for (const auto& [key, value] : *records) {
        if (key == "path") {
          m.name = value;
        } else if (key == "linkpath") {
          m.link_name = value;
        } else if (key == "size") {
          if (!ParseDecimal(value, &size)) {
            return Err(EINVAL, "{}: PAX size '{}' for the member at offset {} is not a number",
                       name, value, offset);
          }
        } else if (key == "uid" || key == "gid") {
          uint64_t id = 0;
          if (ParseDecimal(value, &id) && id <= UINT32_MAX) {
            (key == "uid" ? m.uid : m.gid) = static_cast<uint32_t>(id);
          }
        } else if (key == "uname") {
          m.uname = value;
        } else if (key == "gname") {
          m.gname = value;
        } else if (key == "mtime") {
          if (!ParsePaxTime(value, &m.mtime_sec, &m.mtime_nsec)) {
            return Err(EINVAL, "{}: PAX mtime '{}' for the member at offset {} is not a time", name,
                       value, offset);
          }
        }
      }
    }
    if (have_long_name) m.name = gnu_long_name;
    if (have_long_link) m.link_name = gnu_long_link;
    if (m.type == '\0' && !m.name.empty() && m.name.back() == '/') m.type = '5';
    m.size = size;

    // As Python's tarfile: data follows regular files and unknown types only.
    bool has_data = m.type == '0' || m.type == '\0' || m.type == '7' || m.type == 'S' ||
                    std::string_view("123456").find(m.type) == std::string_view::npos;
    uint64_t next = data_offset;
    if (has_data) {
      if (size > length - data_offset) {
        return Err(EINVAL,
                   "{}: member '{}' (header at offset {}) has {} bytes of data but the archive "
                   "ends {} bytes after its header",
                   name, m.name, offset, size, length - data_offset);
      }
      NEMOFS_ASSIGN_OR_RETURN(next, next_after(size));
      next = std::min(next, length);  // tolerate missing padding after the last member
    } else {
      m.size = 0;
    }
    index.members.push_back(std::move(m));
    pax_local.clear();
    have_long_name = have_long_link = false;
    gnu_long_name.clear();
    gnu_long_link.clear();
    pending_extended = false;
    offset = next;
  }
  if (pending_extended) {
    return Err(EINVAL, "{}: extended header at offset {} is not followed by a member", name,
               member_start);
  }
  return index;
}

}  // namespace nemofs::source
