#include "mountinfo.h"

#include <fstream>
#include <sstream>
#include <vector>

namespace nemofs::mountcmd {
namespace {

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      int v = 0;
      bool ok = true;
      for (size_t j = 1; j <= 3; ++j) {
        char c = s[i + j];
        if (c < '0' || c > '7') ok = false;
        v = v * 8 + (c - '0');
      }
      if (ok) {
        out.push_back(static_cast<char>(v));
        i += 3;
        continue;
      }
    }
    out.push_back(s[i]);
  }
  return out;
}

// Every line of /proc/self/mountinfo, in order.
std::vector<MountEntry> AllMounts() {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  std::vector<MountEntry> out;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::vector<std::string> f;
    std::string word;
    while (fields >> word) f.push_back(word);
    // id parent major:minor root mountpoint options [optional...] - fstype source superopts
    if (f.size() < 7) continue;
    size_t dash = 6;
    while (dash < f.size() && f[dash] != "-") ++dash;
    if (dash + 1 >= f.size()) continue;
    out.push_back(MountEntry{f[2], Unescape(f[4]), f[dash + 1],
                             dash + 2 < f.size() ? Unescape(f[dash + 2]) : std::string()});
  }
  return out;
}

}  // namespace

std::optional<MountEntry> FindMount(const std::string& path) {
  std::optional<MountEntry> found;
  for (auto& m : AllMounts()) {
    if (m.mountpoint == path) found = std::move(m);
  }
  return found;
}

std::optional<std::string> MountDevice(const std::string& path) {
  auto m = FindMount(path);
  if (!m) return std::nullopt;
  return m->device;
}

}  // namespace nemofs::mountcmd
