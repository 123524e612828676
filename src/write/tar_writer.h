// Writing tar blocks: ustar headers, PAX records, padding; full writes and
// fsync with errors naming the file. Shared by the crash-safe append and
// repack.
#pragma once

#include <cstdint>
#include <string>

#include "nemofs/result.h"
#include "util/io.h"  // PwriteFull

namespace nemofs::write {

inline constexpr uint64_t kBlock = 512;
inline constexpr uint64_t kRecord = 10240;

// A ustar header block (checksum computed). Sizes must fit 11 octal digits.
std::string Header(const std::string& name, char type, uint64_t size, int64_t mtime, uint32_t mode,
                   const std::string& link = "");
// Copies the owner fields (uid, gid, user and group names) of the ustar
// header `from` into `header` and recomputes its checksum. No-op unless
// `from` is a 512-byte ustar (or GNU) header.
void CopyOwner(const std::string& from, std::string* header);
// Owner fields of a ustar header.
struct TarOwner {
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::string uname;
  std::string gname;
};
inline constexpr uint32_t kMaxUstarId = 07777777;  // 7 octal digits
inline constexpr size_t kMaxUstarOwnerName = 32;   // uname/gname field size (NUL optional)
// Writes `owner` into the ustar header `header` and recomputes its checksum:
// ids larger than kMaxUstarId and names longer than 32 bytes are stored as 0
// / cut, for PAX records (uid, gid, uname, gname) to carry.
void SetOwner(const TarOwner& owner, std::string* header);
// "<len> key=value\n".
std::string PaxRecord(const std::string& key, const std::string& value);
// Zero-pads `s` to a multiple of `to`.
void Pad(std::string* s, uint64_t to);
Status Sync(int fd, const std::string& what);

}  // namespace nemofs::write
