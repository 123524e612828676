#include "write/orphans.h"

#include <signal.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string_view>

#include "source/source.h"

namespace nemofs::write {
namespace {

constexpr std::string_view kRewriteMarker = ".nemofs-rewrite.";
constexpr std::string_view kRepackMarker = ".nemofs-repack.";

// The pid a temp name ends with; 0 if none.
long PidOf(std::string_view name) {
  auto dot = name.rfind('.');
  if (dot == std::string_view::npos || dot + 1 >= name.size() || name.size() - dot > 11) return 0;
  long pid = 0;
  for (char c : name.substr(dot + 1)) {
    if (c < '0' || c > '9') return 0;
    pid = pid * 10 + (c - '0');
  }
  return pid;
}

bool Alive(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

void Consider(const std::filesystem::directory_entry& e, std::string_view must_start,
              std::vector<Orphan>* out) {
  const std::string name = e.path().filename().string();
  const bool temp = source::IsCommitTempName(name) ||
                    name.find(kRewriteMarker) != std::string::npos ||
                    name.find(kRepackMarker) != std::string::npos;
  if (!temp || (!must_start.empty() && name.find(must_start) == std::string::npos)) return;
  std::error_code ec;
  if (!e.is_regular_file(ec) || e.is_symlink(ec)) return;
  if (Alive(PidOf(name))) return;
  out->push_back({e.path().string(), static_cast<uint64_t>(e.file_size(ec))});
}

}  // namespace

std::vector<Orphan> FindOrphans(const std::string& path) {
  std::vector<Orphan> out;
  std::error_code ec;
  namespace fs = std::filesystem;
  if (fs::is_directory(path, ec)) {
    for (fs::recursive_directory_iterator it(path, fs::directory_options::skip_permission_denied,
                                             ec),
         end;
         !ec && it != end; it.increment(ec)) {
      if (it->is_symlink(ec)) {
        it.disable_recursion_pending();
        continue;
      }
      Consider(*it, "", &out);
    }
    return out;
  }
  const fs::path p(path);
  const std::string base = p.filename().string();
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  for (const auto& e : fs::directory_iterator(dir, fs::directory_options::skip_permission_denied,
                                              ec)) {
    Consider(e, base, &out);
  }
  return out;
}

Status RemoveOrphans(const std::vector<Orphan>& orphans) {
  Status first = Ok();
  for (const auto& o : orphans) {
    if (::unlink(o.path.c_str()) != 0 && errno != ENOENT && first.ok()) {
      first = Err(errno, "{}: cannot remove: {}", o.path, std::strerror(errno));
    }
  }
  return first;
}

}  // namespace nemofs::write
