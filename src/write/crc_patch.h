// The CRC-32 of a zip record after a change of part of it, from the old
// CRC and the old and new bytes of the changed span alone (FORMATS.md
// §3.4): CRC-32 is affine over GF(2), so with D = old XOR new,
//   crc(new record) = crc(old record) ^ shift_r(crc(D) ^ crc(0^n))
// where n is the span's length, r the number of record bytes after it, and
// shift_r zlib's crc32_combine(x, 0, r); and crc(D) ^ crc(0^n) is
// crc(old) ^ crc(new) (two passes over the span). O(n), never O(record);
// a span that is the whole record is one pass over the new bytes.
#pragma once

#include <cstdint>
#include <string_view>

namespace nemofs::write {

// `record_len`: the record's size; `at`: the span's offset in it; `old_bytes`
// and `new_bytes` the same length, inside the record.
uint32_t Crc32Patch(uint32_t old_crc, uint64_t record_len, uint64_t at, std::string_view old_bytes,
                    std::string_view new_bytes);

}  // namespace nemofs::write
