// The node table behind nemofs::Filesystem (see include/nemofs/filesystem.h
// for the inode scheme). Built once per tree (tree/filesystem_impl.h Tree),
// immutable afterwards. As built, node i has inode i + 1; a table built
// again after a commit (Impl::Reload) is renumbered (Remap) so that every
// path that stays keeps its inode, and new paths get numbers never used.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "checkpoint/tensor.h"
#include "nemofs/filesystem.h"
#include "source/source.h"

namespace nemofs::tree {

struct Node {
  NodeType type = NodeType::kFile;
  uint32_t perm = 0444;
  // Write bits the source grants (tar member and archive file, or the file's
  // own mode): `perm` gets them only when the tree makes the node writable.
  uint32_t write_perm = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint64_t size = 0;
  uint32_t nlink = 1;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
  uint64_t parent = 0;  // inode of the first parent
  // kFile: bytes come from the source blob, or from `data` when set, or
  // from a tensor of the catalog (`tensor`), or from the synthesized
  // safetensors file (`safetensors`).
  uint32_t blob = source::kNoBlob;
  // archive/ nodes: the index of their source::Entry; kNoEntry elsewhere.
  static constexpr uint32_t kNoEntry = UINT32_MAX;
  uint32_t entry = kNoEntry;
  std::shared_ptr<const std::string> data;
  const checkpoint::Tensor* tensor = nullptr;
  bool safetensors = false;
  // npy/KEY.npy (issue 11 §7): `tensor`'s bytes after this synthesized
  // .npy header. Such a node is a read view: never written as a tensor.
  std::shared_ptr<const std::string> npy_header;
  // A tensor file of tensors/: its npy/ twin's inode (0: none).
  uint64_t npy_twin = 0;
  std::string link_target;                                 // kSymlink
  std::vector<std::pair<std::string, uint64_t>> children;  // kDirectory: sorted by name
};

class NodeTable {
 public:
  uint64_t Add(Node node) {
    nodes_.push_back(std::move(node));
    return nodes_.size();
  }
  Node* Get(uint64_t ino) {
    return const_cast<Node*>(static_cast<const NodeTable*>(this)->Get(ino));
  }
  const Node* Get(uint64_t ino) const {
    if (index_.empty()) return ino >= 1 && ino <= nodes_.size() ? &nodes_[ino - 1] : nullptr;
    auto it = index_.find(ino);
    return it == index_.end() ? nullptr : &nodes_[it->second];
  }
  bool Has(uint64_t ino) const { return Get(ino) != nullptr; }
  uint64_t size() const { return nodes_.size(); }
  // Node `index` (0-based, in build order) and its inode.
  Node& At(size_t index) { return nodes_[index]; }
  const Node& At(size_t index) const { return nodes_[index]; }
  uint64_t InoAt(size_t index) const { return inos_.empty() ? index + 1 : inos_[index]; }
  // Gives node i inode `inos[i]` (distinct, non-zero; the root's stays 1),
  // rewriting every parent and child reference.
  void Remap(std::vector<uint64_t> inos);

  // Links `child` into directory `dir` as `name` (children are sorted later).
  void Link(uint64_t dir, std::string name, uint64_t child) {
    nodes_[dir - 1].children.emplace_back(std::move(name), child);
  }
  // Sorts every directory's children by name; call once after building.
  void Finish();

 private:
  std::vector<Node> nodes_;
  std::vector<uint64_t> inos_;                       // by index; empty: index + 1
  std::unordered_map<uint64_t, uint32_t> index_;     // inode -> index; empty: ino - 1
};

}  // namespace nemofs::tree
