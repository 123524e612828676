// Small string helpers shared by the core and the command line.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace nemofs {

// Splits `s` at every `sep`, keeping empty parts ("a//b" -> "a", "", "b";
// "" -> ""). The views point into `s`.
inline std::vector<std::string_view> Split(std::string_view s, char sep) {
  std::vector<std::string_view> parts;
  size_t pos = 0;
  for (;;) {
    size_t next = s.find(sep, pos);
    if (next == std::string_view::npos) {
      parts.push_back(s.substr(pos));
      return parts;
    }
    parts.push_back(s.substr(pos, next - pos));
    pos = next + 1;
  }
}

// "dir/name", or "name" when dir is "" (the root of a source).
inline std::string JoinPath(const std::string& dir, const std::string& name) {
  return dir.empty() ? name : dir + "/" + name;
}

}  // namespace nemofs
