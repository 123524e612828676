#include "write/crc_patch.h"

#include <zlib.h>

#include <algorithm>
#include <array>
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
  constexpr size_t kStep = 64 << 10;
  static const std::array<unsigned char, kStep> zeros{};
  std::array<unsigned char, kStep> delta;
  uLong crc_d = crc32(0L, Z_NULL, 0);
  uLong crc_z = crc32(0L, Z_NULL, 0);
  for (uint64_t p = 0; p < n; p += kStep) {
    const size_t len = static_cast<size_t>(std::min<uint64_t>(kStep, n - p));
    for (size_t i = 0; i < len; ++i) {
      delta[i] = static_cast<unsigned char>(old_bytes[p + i] ^ new_bytes[p + i]);
    }
    crc_d = crc32(crc_d, delta.data(), static_cast<uInt>(len));
    crc_z = crc32(crc_z, zeros.data(), static_cast<uInt>(len));
  }
  const uint64_t trailing = record_len - at - n;
  const uLong shifted = crc32_combine64(crc_d ^ crc_z, 0, static_cast<z_off64_t>(trailing));
  return old_crc ^ static_cast<uint32_t>(shifted);
}

}  // namespace nemofs::write
