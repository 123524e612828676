#include "nemofs/filesystem.h"

#include <fcntl.h>

#include <algorithm>
#include <map>

#include "checkpoint/layout.h"
#include "nemofs/strings.h"
#include "source/source.h"
#include "tree/node_table.h"

namespace nemofs {

using source::Entry;
using source::EntryType;

void tree::NodeTable::Finish() {
  for (auto& n : nodes_) {
    std::sort(n.children.begin(), n.children.end());
  }
}

struct Filesystem::Impl {
  std::unique_ptr<source::Source> src;
  tree::NodeTable nodes;
  CheckpointInfo info;

  Result<const tree::Node*> Node(uint64_t ino) const {
    const tree::Node* n = nodes.Get(ino);
    if (!n) return Err(ENOENT, "no inode {}", ino);
    return n;
  }
  NodeAttr Attr(uint64_t ino, const tree::Node& n) const {
    NodeAttr a;
    a.ino = ino;
    a.type = n.type;
    a.perm = n.perm;
    a.size = n.size;
    a.nlink = n.nlink;
    a.mtime_sec = n.mtime_sec;
    a.mtime_nsec = n.mtime_nsec;
    return a;
  }
};

namespace {

tree::Node DirNode(int64_t sec, uint32_t nsec, uint64_t parent) {
  tree::Node n;
  n.type = NodeType::kDirectory;
  n.perm = 0555;
  n.nlink = 2;
  n.mtime_sec = sec;
  n.mtime_nsec = nsec;
  n.parent = parent;
  return n;
}

// Creates (or finds) the directory chain `path` under `root`.
uint64_t EnsureDir(tree::NodeTable& nodes, uint64_t root, const std::string& path, int64_t sec,
                   uint32_t nsec) {
  uint64_t cur = root;
  for (std::string_view view : Split(path, '/')) {
    if (view.empty()) continue;
    std::string part(view);
    uint64_t next = 0;
    for (const auto& [name, ino] : nodes.Get(cur)->children) {
      if (name == part) next = ino;
    }
    if (!next) {
      next = nodes.Add(DirNode(sec, nsec, cur));
      nodes.Link(cur, part, next);
      nodes.Get(cur)->nlink++;
    }
    cur = next;
  }
  return cur;
}

void SplitPath(const std::string& path, std::string* dir, std::string* base) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) {
    dir->clear();
    *base = path;
  } else {
    *dir = path.substr(0, slash);
    *base = path.substr(slash + 1);
  }
}

}  // namespace

Result<std::unique_ptr<Filesystem>> Filesystem::Open(const FilesystemOptions& options) {
  auto impl = std::make_unique<Impl>();
  source::OpenOptions so;
  so.cache_dir = options.cache_dir;
  NEMOFS_ASSIGN_OR_RETURN(impl->src, source::OpenSource(options.source, so));
  NEMOFS_ASSIGN_OR_RETURN(checkpoint::Layout layout, checkpoint::Recognize(*impl->src));
  source::Source& src = *impl->src;
  tree::NodeTable& nodes = impl->nodes;

  const Entry& src_root = src.entries().front();
  uint64_t root = nodes.Add(DirNode(src_root.mtime_sec, src_root.mtime_nsec, 1));
  uint64_t archive = nodes.Add(DirNode(src_root.mtime_sec, src_root.mtime_nsec, root));
  nodes.Link(root, "archive", archive);
  nodes.Get(root)->nlink++;

  // archive/: the source as stored. Entries come parents first.
  CheckpointInfo& info = impl->info;
  std::map<std::string, uint64_t, std::less<>> by_path{{"", archive}};
  for (size_t i = 1; i < src.entries().size(); ++i) {
    const Entry& e = src.entries()[i];
    std::string dir, base;
    SplitPath(e.path, &dir, &base);
    uint64_t parent = by_path.at(dir);
    tree::Node n;
    n.mtime_sec = e.mtime_sec;
    n.mtime_nsec = e.mtime_nsec;
    n.parent = parent;
    switch (e.type) {
      case EntryType::kDirectory:
        n = DirNode(e.mtime_sec, e.mtime_nsec, parent);
        nodes.Get(parent)->nlink++;
        ++info.directories;
        break;
      case EntryType::kFile:
        n.type = NodeType::kFile;
        n.perm = (e.mode & 0111) ? 0555 : 0444;
        n.size = e.size;
        n.blob = e.blob;
        info.source_bytes += e.size;
        ++info.files;
        break;
      case EntryType::kSymlink:
        n.type = NodeType::kSymlink;
        n.perm = 0777;
        n.size = e.link_target.size();
        n.link_target = e.link_target;
        break;
    }
    uint64_t ino = nodes.Add(std::move(n));
    nodes.Link(parent, base, ino);
    by_path.emplace(e.path, ino);
  }

  // config.yaml: the config member's own node.
  if (!layout.config_path.empty()) {
    uint64_t ino = by_path.at(layout.config_path);
    nodes.Link(root, "config.yaml", ino);
    nodes.Get(ino)->nlink++;
    info.config = layout.config_path;
    info.config_bytes = nodes.Get(ino)->size;
  }
  // tokenizer/: the artifact members' own nodes.
  if (!layout.tokenizer.empty()) {
    uint64_t tok = EnsureDir(nodes, root, "tokenizer", src_root.mtime_sec, src_root.mtime_nsec);
    for (const auto& t : layout.tokenizer) {
      std::string dir, base;
      SplitPath(t.name, &dir, &base);
      uint64_t parent =
          dir.empty() ? tok : EnsureDir(nodes, tok, dir, src_root.mtime_sec, src_root.mtime_nsec);
      uint64_t ino = by_path.at(t.entry_path);
      nodes.Link(parent, base, ino);
      nodes.Get(ino)->nlink++;
      info.tokenizer.push_back({t.name, t.entry_path, t.reference});
    }
  }
  nodes.Finish();

  info.source = options.source;
  info.source_kind = src.Kind();
  info.format = checkpoint::FormatId(layout.format);
  info.description = layout.description;
  info.weights = layout.weights;
  info.warnings = src.warnings();
  info.warnings.insert(info.warnings.end(), layout.warnings.begin(), layout.warnings.end());
  return std::unique_ptr<Filesystem>(new Filesystem(std::move(impl)));
}

Filesystem::Filesystem(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Filesystem::~Filesystem() = default;

Result<NodeAttr> Filesystem::GetAttr(uint64_t ino) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, impl_->Node(ino));
  return impl_->Attr(ino, *n);
}

Result<NodeAttr> Filesystem::Lookup(uint64_t parent, std::string_view name) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* dir, impl_->Node(parent));
  if (dir->type != NodeType::kDirectory) return Err(ENOTDIR, "inode {} is not a directory", parent);
  if (name == ".") return impl_->Attr(parent, *dir);
  if (name == "..") return GetAttr(dir->parent);
  auto it = std::lower_bound(
      dir->children.begin(), dir->children.end(), name,
      [](const std::pair<std::string, uint64_t>& c, std::string_view n) { return c.first < n; });
  if (it == dir->children.end() || it->first != name) {
    return Err(ENOENT, "no '{}' in inode {}", name, parent);
  }
  return GetAttr(it->second);
}

Status Filesystem::ReadDir(uint64_t ino, uint64_t offset,
                           const std::function<bool(const DirEntry&, uint64_t)>& fn) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* dir, impl_->Node(ino));
  if (dir->type != NodeType::kDirectory) return Err(ENOTDIR, "inode {} is not a directory", ino);
  for (uint64_t i = offset; i < dir->children.size(); ++i) {
    const auto& [name, child] = dir->children[i];
    DirEntry e{name, child, impl_->nodes.Get(child)->type};
    if (!fn(e, i + 1)) break;
  }
  return Ok();
}

Status Filesystem::CheckOpen(uint64_t ino, int flags) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, impl_->Node(ino));
  if (n->type == NodeType::kDirectory && (flags & O_ACCMODE) != O_RDONLY) {
    return Err(EISDIR, "inode {} is a directory", ino);
  }
  if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC)) {
    return Err(EROFS, "inode {} is read-only", ino);
  }
  return Ok();
}

Result<ReadPlan> Filesystem::Read(uint64_t ino, uint64_t offset, uint64_t size) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, impl_->Node(ino));
  if (n->type == NodeType::kDirectory) return Err(EISDIR, "inode {} is a directory", ino);
  if (n->type != NodeType::kFile) return Err(EINVAL, "inode {} is not a regular file", ino);
  if (offset >= n->size) return ReadPlan{};
  size = std::min(size, n->size - offset);
  if (n->data) {
    ReadPlan plan;
    plan.AddMemory(n->data->data() + offset, size);
    plan.keepalive.push_back(n->data);
    return plan;
  }
  return impl_->src->Plan(n->blob, offset, size);
}

Result<std::string> Filesystem::ReadLink(uint64_t ino) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, impl_->Node(ino));
  if (n->type != NodeType::kSymlink) return Err(EINVAL, "inode {} is not a symbolic link", ino);
  return n->link_target;
}

Result<std::string> Filesystem::GetXattr(uint64_t ino, std::string_view name) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, impl_->Node(ino));
  (void)n;
  if (ino == kRootIno) {
    if (name == "user.nemofs.format") return impl_->info.format;
    if (name == "user.nemofs.source") return impl_->info.source;
  }
  return Err(ENODATA, "inode {} has no attribute {}", ino, name);
}

Result<std::vector<std::string>> Filesystem::ListXattr(uint64_t ino) const {
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, impl_->Node(ino));
  (void)n;
  if (ino == kRootIno) return std::vector<std::string>{"user.nemofs.format", "user.nemofs.source"};
  return std::vector<std::string>{};
}

Result<uint64_t> Filesystem::Resolve(std::string_view path) const {
  std::string norm;
  if (!source::NormalizePath(path, &norm)) {
    return Err(EINVAL, "'{}': use a relative path inside the tree, without '..'", path);
  }
  uint64_t cur = kRootIno;
  for (std::string_view part : Split(norm, '/')) {
    if (part.empty()) continue;  // the root itself
    auto attr = Lookup(cur, part);
    if (!attr) {
      return Err(attr.error().code(), "'{}': {}", path,
                 attr.error().code() == ENOENT ? "no such file in the tree" : "not a directory");
    }
    cur = attr->ino;
  }
  return cur;
}

const CheckpointInfo& Filesystem::info() const { return impl_->info; }
uint64_t Filesystem::node_count() const { return impl_->nodes.size(); }

}  // namespace nemofs
