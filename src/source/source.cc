#include "source/source.h"

#include <algorithm>
#include <map>
#include <set>

#include "nemofs/strings.h"

namespace nemofs::source {

bool NormalizePath(std::string_view raw, std::string* out) {
  if (!raw.empty() && raw.front() == '/') return false;
  std::string result;
  for (std::string_view part : Split(raw, '/')) {
    if (part.empty() || part == ".") continue;
    if (part == "..") return false;
    if (!result.empty()) result += '/';
    result += part;
  }
  *out = std::move(result);
  return true;
}

namespace {

std::string Parent(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

// Does a symlink at `path` pointing at `target` stay inside the tree?
bool LinkStaysInside(const std::string& path, const std::string& target) {
  if (target.empty() || target.front() == '/') return false;
  int depth = 0;
  std::string parent = Parent(path);
  if (!parent.empty()) depth = static_cast<int>(std::count(parent.begin(), parent.end(), '/')) + 1;
  for (std::string_view part : Split(target, '/')) {
    if (part.empty() || part == ".") continue;
    depth += part == ".." ? -1 : 1;
    if (depth < 0) return false;
  }
  return true;
}

}  // namespace

void Source::SetEntries(std::vector<Entry> raw, std::vector<std::string> warnings) {
  std::map<std::string, Entry> by_path;  // last one wins
  Entry root;
  root.type = EntryType::kDirectory;
  root.mode = 0755;
  for (auto& e : raw) {
    std::string norm;
    if (!NormalizePath(e.path, &norm)) {
      warnings.push_back(fmt::format("hidden '{}': absolute path or '..' component", e.path));
      continue;
    }
    if (e.type == EntryType::kSymlink && !LinkStaysInside(norm, e.link_target)) {
      warnings.push_back(
          fmt::format("hidden '{}': symbolic link to '{}' leaves the tree", e.path, e.link_target));
      continue;
    }
    if (norm.empty()) {
      if (e.type == EntryType::kDirectory) {
        root.mtime_sec = e.mtime_sec;
        root.mtime_nsec = e.mtime_nsec;
        root.mode = e.mode;
        root.uid = e.uid;
        root.gid = e.gid;
        root.uname = e.uname;
        root.gname = e.gname;
      }
      continue;
    }
    e.path = norm;
    by_path[norm] = std::move(e);
  }
  // Children of a non-directory cannot exist; parents that were never listed
  // are implicit directories.
  std::vector<std::string> implicit;
  for (auto it = by_path.begin(); it != by_path.end();) {
    std::string parent = Parent(it->first);
    bool blocked = false;
    while (!parent.empty()) {
      auto p = by_path.find(parent);
      if (p != by_path.end() && p->second.type != EntryType::kDirectory) {
        blocked = true;
        break;
      }
      if (p == by_path.end()) implicit.push_back(parent);
      parent = Parent(parent);
    }
    if (blocked) {
      warnings.push_back(
          fmt::format("hidden '{}': its parent '{}' is not a directory", it->first, parent));
      it = by_path.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& dir : implicit) {
    if (by_path.count(dir)) continue;
    Entry d;
    d.path = dir;
    d.type = EntryType::kDirectory;
    d.mode = 0755;
    d.mtime_sec = root.mtime_sec;
    d.mtime_nsec = root.mtime_nsec;
    d.uid = root.uid;
    d.gid = root.gid;
    d.uname = root.uname;
    d.gname = root.gname;
    by_path.emplace(dir, std::move(d));
  }
  entries_.clear();
  entries_.reserve(by_path.size() + 1);
  entries_.push_back(std::move(root));
  for (auto& [path, e] : by_path) entries_.push_back(std::move(e));  // sorted: parents first
  warnings_ = std::move(warnings);
}

Result<std::shared_ptr<const ByteReader>> Source::MetadataReader(uint32_t blob) {
  NEMOFS_ASSIGN_OR_RETURN(FileRange r, Locate(blob));
  return std::shared_ptr<const ByteReader>(std::make_shared<FdReader>(r.fd, r.offset, r.length));
}

const Entry* Source::Find(std::string_view path) const {
  // entries_[0] is the root; the rest are sorted by path.
  if (path.empty()) return &entries_[0];
  auto it = std::lower_bound(entries_.begin() + 1, entries_.end(), path,
                             [](const Entry& e, std::string_view p) { return e.path < p; });
  if (it == entries_.end() || it->path != path) return nullptr;
  return &*it;
}

Result<std::string> Source::ReadAll(const Entry& entry, uint64_t max_bytes) {
  if (entry.type != EntryType::kFile) {
    return Err(EISDIR, "{}: '{}' is not a file", path_, entry.path);
  }
  if (entry.size > max_bytes) {
    return Err(EFBIG, "{}: '{}' is {} bytes, more than the {} byte limit", path_, entry.path,
               entry.size, max_bytes);
  }
  NEMOFS_ASSIGN_OR_RETURN(ReadPlan plan, Plan(entry.blob, 0, entry.size));
  std::string out(entry.size, '\0');
  NEMOFS_RETURN_IF_ERROR(ExecuteReadPlan(plan, out.data()));
  return out;
}

}  // namespace nemofs::source
