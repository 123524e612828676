// UTF-8 decoding shared by the pickle VM (Python str values) and the
// config validation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace nemofs {

// Decodes one UTF-8 sequence at s[*i] (surrogates accepted); advances *i.
// False (and *i unchanged) if malformed.
inline bool NextCodePoint(std::string_view s, size_t* i, uint32_t* cp) {
  auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  size_t p = *i;
  uint8_t c = b(p);
  size_t len;
  uint32_t v;
  if (c < 0x80) {
    *cp = c;
    *i = p + 1;
    return true;
  } else if ((c & 0xe0) == 0xc0) {
    len = 2;
    v = c & 0x1f;
  } else if ((c & 0xf0) == 0xe0) {
    len = 3;
    v = c & 0x0f;
  } else if ((c & 0xf8) == 0xf0) {
    len = 4;
    v = c & 0x07;
  } else {
    return false;
  }
  if (s.size() - p < len) return false;
  for (size_t k = 1; k < len; ++k) {
    if ((b(p + k) & 0xc0) != 0x80) return false;
    v = (v << 6) | (b(p + k) & 0x3f);
  }
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < kMin[len] || v > 0x10ffff) return false;
  *cp = v;
  *i = p + len;
  return true;
}

}  // namespace nemofs
