#include "write/crc_patch.h"

#include <zlib.h>

#include <cstdlib>

namespace nemofs::write {

uint32_t Crc32Patch(uint32_t old_crc, uint64_t record_len, uint64_t at, std::string_view old_bytes,
                    std::string_view new_bytes) {
  // Callers pass spans of one record: equal lengths, inside it.
  if (new_bytes.size() != old_bytes.size() || at > record_len ||
      old_bytes.size() > record_len - at) {
    std::abort();
  }
  const uint64_t n = old_bytes.size();
  auto crc = [](std::string_view b) {
    return crc32_z(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(b.data()), b.size());
  };
  // The whole record rewritten: its CRC is the new bytes' (one pass).
  if (at == 0 && n == record_len) return static_cast<uint32_t>(crc(new_bytes));
  // CRC-32 is affine: for equal lengths crc(a ^ b) = crc(a) ^ crc(b) ^
  // crc(0^n), so crc(delta) ^ crc(0^n) = crc(old) ^ crc(new): two passes,
  // no delta buffer, no pass over zeros.
  const uLong crc_d = crc(old_bytes) ^ crc(new_bytes);
  const uint64_t trailing = record_len - at - n;
  const uLong shifted = crc32_combine64(crc_d, 0, static_cast<z_off64_t>(trailing));
  return old_crc ^ static_cast<uint32_t>(shifted);
}

}  // namespace nemofs::write
