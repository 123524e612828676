// A new tree after a commit that changed what the checkpoint holds
// (Filesystem::Impl::Reload, tree/filesystem_impl.h): the source is opened
// and read again, and the new node table is numbered so that every path
// that stays keeps its inode.
#include <spdlog/spdlog.h>

#include <chrono>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "tree/filesystem_impl.h"

namespace nemofs {
namespace {

struct PathInfo {
  uint64_t ino = 0;
  NodeType type = NodeType::kFile;
  uint64_t parent = 0;  // the directory it is named in
  std::string_view name;
};

// Every path of the tree ("archive/x.yaml", "tensors/k") with its node;
// a node with several names is under each.
std::unordered_map<std::string, PathInfo> Paths(const tree::NodeTable& nodes, uint64_t root) {
  std::unordered_map<std::string, PathInfo> out;
  std::vector<std::pair<uint64_t, std::string>> todo{{root, ""}};
  std::unordered_set<uint64_t> seen{root};
  while (!todo.empty()) {
    auto [dir, prefix] = std::move(todo.back());
    todo.pop_back();
    const tree::Node* d = nodes.Get(dir);
    if (!d) continue;
    for (const auto& [name, child] : d->children) {
      const tree::Node* c = nodes.Get(child);
      if (!c) continue;
      std::string path = prefix + name;
      out.emplace(path, PathInfo{child, c->type, dir, name});
      if (c->type == NodeType::kDirectory && seen.insert(child).second) {
        todo.emplace_back(child, path + "/");
      }
    }
  }
  return out;
}

}  // namespace

Status Filesystem::Impl::Reload(std::string_view why,
                                const std::map<std::string, uint64_t>& carry) {
  const auto start = std::chrono::steady_clock::now();
  const TreeRef old = Current();
  NEMOFS_ASSIGN_OR_RETURN(std::unique_ptr<Tree> t, BuildTree(options));
  t->generation = old->generation + 1;
  t->info.read_only_reason = old->info.read_only_reason;

  // Inodes: a path that stays keeps its number (the first of its names
  // that the old tree had, for a node with several); a new path gets one
  // never used (Overlay::next_ino, shared with new files).
  const auto old_paths = Paths(old->nodes, old->root);
  const auto new_paths = Paths(t->nodes, t->root);  // built numbering: index + 1
  std::vector<uint64_t> inos(t->nodes.size(), 0);
  std::unordered_set<uint64_t> used;
  inos[t->root - 1] = kRootIno;
  used.insert(kRootIno);
  for (const auto& [path, ino] : carry) {
    auto it = new_paths.find(path);
    if (it == new_paths.end() || inos[it->second.ino - 1] || !used.insert(ino).second) continue;
    inos[it->second.ino - 1] = ino;
  }
  for (const auto& [path, info] : new_paths) {
    uint64_t& ino = inos[info.ino - 1];
    if (ino) continue;
    auto it = old_paths.find(path);
    if (it == old_paths.end() || it->second.type != info.type) continue;
    if (used.insert(it->second.ino).second) ino = it->second.ino;
  }
  size_t fresh = 0;
  for (uint64_t ino : inos) fresh += ino == 0;
  {
    std::lock_guard<std::mutex> lock(overlay.mu);
    uint64_t next = overlay.next_ino;
    overlay.next_ino += fresh;
    for (uint64_t& ino : inos) {
      if (!ino) ino = next++;
    }
    t->nodes.Remap(std::move(inos));
    // A new file the mount stored shows as that file (an overlay node) for
    // the mount's life; the tree's node of the same name stays hidden.
    // (Tensor directories keep it: their listing puts the file first,
    // and a structural commit needs the tree's tensor, e.g. to delete it.)
    for (const auto& [key, ino] : overlay.scratch_names) {
      if (overlay.tensor_dirs.count(key.first)) continue;
      tree::Node* dir = t->nodes.Get(key.first);
      if (!dir) continue;
      const std::string& name = key.second;  // (clang before 16 cannot capture a binding)
      std::erase_if(dir->children, [&](const auto& c) { return c.first == name; });
    }
  }
  ApplyWritePerms(*t);

  TreeRef next(std::move(t));
  tree.store(next, std::memory_order_release);

  // Staged tensor writes move over to the new tree's tensor of the same
  // file; one whose tensor is gone or has another size cannot be saved.
  size_t dropped = 0;
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    for (auto& [ino, s] : tensor_writes.staged) {
      const tree::Node* n = next->nodes.Get(ino);
      if (n && n->tensor && n->tensor->nbytes() == s->tensor->nbytes()) {
        s->tree = next;
        s->tensor = n->tensor;
        continue;
      }
      ++dropped;
      spdlog::error("tensor {}: its staged write is dropped: {} changed it ({})", s->tensor->key,
                    why, n && n->tensor ? "another size" : "gone");
      s->dirty = false;
      for (auto& [fh, h] : tensor_writes.handles) {
        if (h.ino != ino) continue;
        h.failed = Error(ESTALE, fmt::format("tensor {}: not saved: {} changed it while it was "
                                             "open for writing",
                                             s->tensor->key, why));
      }
    }
  }

  // What the kernel cached: the pages and attributes of every derived file
  // and directory, and the names that are gone.
  std::vector<uint64_t> changed;
  for (size_t i = 0; i < next->nodes.size(); ++i) {
    const tree::Node& n = next->nodes.At(i);
    if (n.type == NodeType::kDirectory || n.tensor || n.data || n.safetensors) {
      changed.push_back(next->nodes.InoAt(i));
    }
  }
  std::vector<std::pair<uint64_t, std::string>> gone;
  for (const auto& [path, info] : old_paths) {
    auto it = new_paths.find(path);
    // new_paths holds built numbers: compare through the new table.
    const bool same = it != new_paths.end() &&
                      next->nodes.InoAt(it->second.ino - 1) == info.ino;
    if (!same) gone.emplace_back(info.parent, std::string(info.name));
  }
  if (invalidate) invalidate(changed);
  if (invalidate_entries && !gone.empty()) invalidate_entries(gone);

  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("{}: read the checkpoint again ({}): {} tensor files (were {}), {} names gone, {} "
               "new, in {:.1f} ms",
               options.source, why, next->info.tensors, old->info.tensors, gone.size(), fresh, ms);
  if (dropped) {
    spdlog::warn("{} staged tensor write{} dropped by the reload", dropped,
                 dropped == 1 ? "" : "s");
  }
  return Ok();
}

}  // namespace nemofs
