#include "write/orphans.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string_view>

#include "dist/dcp_writer.h"
#include "source/source.h"
#include "util/fd.h"

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
  if (e.is_symlink(ec)) return;
  const bool folder = e.is_directory(ec);  // a folder commit's stage (write/folder_txn.h)
  if (!folder && !e.is_regular_file(ec)) return;
  if (Alive(PidOf(name))) return;
  uint64_t bytes = 0;
  if (folder) {
    for (std::filesystem::recursive_directory_iterator it(e.path(), ec), end; !ec && it != end;
         it.increment(ec)) {
      if (it->is_regular_file(ec) && !it->is_symlink(ec)) bytes += it->file_size(ec);
    }
  } else {
    bytes = static_cast<uint64_t>(e.file_size(ec));
  }
  out->push_back({e.path().string(), bytes});
}

}  // namespace

std::vector<std::string> DcpFolders(const std::string& path) {
  std::vector<std::string> out;
  std::error_code ec;
  namespace fs = std::filesystem;
  if (fs::is_regular_file(fs::path(path) / ".metadata", ec)) out.push_back(path);
  for (fs::recursive_directory_iterator it(path, fs::directory_options::skip_permission_denied, ec),
       end;
       !ec && it != end; it.increment(ec)) {
    if (it->is_symlink(ec)) {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_directory(ec) && fs::is_regular_file(it->path() / ".metadata", ec)) {
      out.push_back(it->path().string());
    }
  }
  return out;
}

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
      if (!out.empty() && out.back().path == it->path().string() && it->is_directory(ec)) {
        it.disable_recursion_pending();  // a stage folder: counted whole
      }
    }
    // DCP folders: .distcp files a commit wrote that .metadata does not use.
    for (const std::string& folder : DcpFolders(path)) {
      UniqueFd fd(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!fd.valid()) continue;
      auto loaded = dist::LoadDcpMetadata(fd.get(), folder);
      if (!loaded) continue;  // verify reports an unreadable .metadata itself
      for (const std::string& name : dist::ListDcpOrphans(fd.get(), *loaded)) {
        const std::string full = folder + "/" + name;
        if (std::any_of(out.begin(), out.end(), [&](const Orphan& o) { return o.path == full; })) {
          continue;
        }
        out.push_back({full, static_cast<uint64_t>(fs::file_size(full, ec))});
      }
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
    std::error_code ec;
    std::filesystem::remove_all(o.path, ec);  // a file, or a stage folder (never follows links)
    if (ec && ec.value() != ENOENT && first.ok()) {
      first = Err(ec.value(), "{}: cannot remove: {}", o.path, ec.message());
    }
  }
  return first;
}

}  // namespace nemofs::write
