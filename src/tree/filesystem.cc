#include "nemofs/filesystem.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "checkpoint/catalog.h"
#include "checkpoint/layout.h"
#include "checkpoint/npy.h"
#include "nemofs/strings.h"
#include "source/source.h"
#include "source/stream_check.h"
#include "torch/zip_reader.h"
#include "tree/access.h"
#include "tree/filesystem_impl.h"
#include "tree/node_table.h"
#include "util/json_util.h"
#include "write/orphans.h"

namespace nemofs {

using source::Entry;
using source::EntryType;

void tree::NodeTable::Finish() {
  for (auto& n : nodes_) {
    std::sort(n.children.begin(), n.children.end());
  }
}

void tree::NodeTable::Remap(std::vector<uint64_t> inos) {
  // Built references are index + 1.
  auto to = [&](uint64_t built) { return inos.at(built - 1); };
  for (auto& n : nodes_) {
    n.parent = to(n.parent);
    if (n.npy_twin) n.npy_twin = to(n.npy_twin);
    for (auto& child : n.children) child.second = to(child.second);
  }
  index_.clear();
  index_.reserve(inos.size());
  for (size_t i = 0; i < inos.size(); ++i) index_.emplace(inos[i], static_cast<uint32_t>(i));
  inos_ = std::move(inos);
}

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

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]";
}

Json TensorIndex(const std::vector<checkpoint::Tensor>& tensors, const std::string& dir) {
  ObjectBuilder j;
  for (const auto& t : tensors) {
    j.Set(t.key, {{"dtype", torch::Info(t.dtype).name},
                  {"shape", t.shape},
                  {"nbytes", t.nbytes()},
                  {"path", dir + "/" + checkpoint::EscapeKey(t.key)}});
  }
  return std::move(j).Build();
}

std::shared_ptr<const std::string> Text(std::string s) {
  return std::make_shared<const std::string>(std::move(s));
}

uint64_t AddFile(tree::NodeTable& nodes, uint64_t dir, const std::string& name, int64_t sec,
                 uint32_t nsec) {
  tree::Node n;
  n.type = NodeType::kFile;
  n.perm = 0444;
  n.mtime_sec = sec;
  n.mtime_nsec = nsec;
  n.parent = dir;
  uint64_t ino = nodes.Add(std::move(n));
  nodes.Link(dir, name, ino);
  return ino;
}

}  // namespace

namespace {

// tensors/, optimizer/, ranks/, index.json, checkpoint.json, model.safetensors.
void AddTensorViews(Tree& impl, uint64_t root, int64_t sec, uint32_t nsec,
                    const std::string& source, const std::string& format) {
  tree::NodeTable& nodes = impl.nodes;
  const checkpoint::Catalog& cat = impl.catalog;
  auto add_tensors = [&](uint64_t dir, const std::vector<checkpoint::Tensor>& tensors) {
    for (const auto& t : tensors) {
      uint64_t ino = AddFile(nodes, dir, checkpoint::EscapeKey(t.key), sec, nsec);
      nodes.Get(ino)->size = t.nbytes();
      nodes.Get(ino)->tensor = &t;
    }
  };
  auto add_dir = [&](uint64_t parent, const std::string& name) {
    return EnsureDir(nodes, parent, name, sec, nsec);
  };
  // Weights that cannot be read (a whole file, or malformed tensors) still
  // give an (empty) tensors/: the error is printed and logged by `mount`,
  // listed by `info`, `verify` and `ls`.
  if (!cat.tensors.empty() || !cat.errors.empty() || !cat.bad.empty()) {
    const uint64_t tdir = add_dir(root, "tensors");
    add_tensors(tdir, cat.tensors);
    // npy/: each tensor numpy has a type for, as KEY.npy (bfloat16 as
    // '<u2', its dtype in the xattr).
    uint64_t npy = 0;
    for (const auto& t : cat.tensors) {
      auto header = checkpoint::MakeNpyHeader(t.dtype, t.shape);
      if (!header) continue;
      if (!npy) npy = add_dir(root, "npy");
      uint64_t ino = AddFile(nodes, npy, checkpoint::EscapeKey(t.key) + ".npy", sec, nsec);
      tree::Node* n = nodes.Get(ino);
      n->tensor = &t;
      n->npy_header = Text(std::move(*header));
      n->size = n->npy_header->size() + t.nbytes();
      for (const auto& [name, child] : nodes.Get(tdir)->children) {
        if (nodes.Get(child)->tensor == &t) nodes.Get(child)->npy_twin = ino;
      }
    }
  }
  if (!cat.optimizer.empty()) add_tensors(add_dir(root, "optimizer"), cat.optimizer);
  if (!cat.ranks.empty()) {
    uint64_t ranks = add_dir(root, "ranks");
    for (const auto& r : cat.ranks) add_tensors(add_dir(ranks, r.name), r.tensors);
  }
  if (cat.tensors.empty() && cat.optimizer.empty() && cat.ranks.empty() && cat.bad.empty() &&
      cat.checkpoint_json.empty()) {
    return;
  }

  nlohmann::ordered_json index;
  index["format"] = format;
  index["source"] = source;
  index["tensors"] = TensorIndex(cat.tensors, "tensors");
  if (!cat.optimizer.empty()) index["optimizer"] = TensorIndex(cat.optimizer, "optimizer");
  if (!cat.ranks.empty()) {
    ObjectBuilder ranks;
    for (const auto& r : cat.ranks) ranks.Set(r.name, TensorIndex(r.tensors, "ranks/" + r.name));
    index["ranks"] = std::move(ranks).Build();
  }
  if (!cat.unmerged.empty()) index["unmerged"] = cat.unmerged;
  if (!cat.bad.empty()) index["unreadable"] = cat.bad;
  auto add_text = [&](const std::string& name, std::string text) {
    uint64_t ino = AddFile(nodes, root, name, sec, nsec);
    nodes.Get(ino)->data = Text(std::move(text));
    nodes.Get(ino)->size = nodes.Get(ino)->data->size();
  };
  add_text("index.json", index.dump(2) + "\n");
  if (!cat.checkpoint_json.empty()) add_text("checkpoint.json", cat.checkpoint_json);

  // model.safetensors over tensors/. Nothing is left out silently: what it
  // cannot hold is named in its __metadata__ and in info(); when every
  // tensor is malformed it is an empty one that names them.
  if (cat.tensors.empty() && cat.bad.empty()) return;
  Safetensors& st = impl.safetensors;
  auto& omitted = impl.info.safetensors_omitted;
  for (const auto& t : cat.tensors) {
    const auto& info = torch::Info(t.dtype);
    if (info.safetensors.empty()) {
      omitted.emplace_back(t.key, fmt::format("{}: safetensors has no such dtype", info.name));
    }
  }
  for (const auto& [key, why] : cat.unmerged) {
    omitted.emplace_back(key, "only in ranks/: " + why);
  }
  for (const auto& [key, why] : cat.bad) omitted.emplace_back(key, "unreadable: " + why);
  if (!cat.optimizer.empty()) {
    omitted.emplace_back("optimizer/", fmt::format("{} optimizer tensor{}: not model weights",
                                                   cat.optimizer.size(),
                                                   cat.optimizer.size() == 1 ? "" : "s"));
  }
  Json meta = {{"format", "pt"}, {"source", source}};
  if (!omitted.empty()) {
    ObjectBuilder list;
    for (const auto& [name, why] : omitted) list.Set(name, why);
    meta["nemofs.omitted"] = std::move(list).Build().dump();
  }
  ObjectBuilder header;
  header.Set("__metadata__", std::move(meta));
  uint64_t data = 0;
  for (const auto& t : cat.tensors) {
    const auto& info = torch::Info(t.dtype);
    if (info.safetensors.empty()) continue;
    header.Set(t.key, {{"dtype", info.safetensors},
                       {"shape", t.shape},
                       {"data_offsets", {data, data + t.nbytes()}}});
    st.segments.push_back({data, &t});
    data += t.nbytes();
  }
  std::string json = std::move(header).Build().dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string head(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) head[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  head += json;
  for (auto& seg : st.segments) seg.start += head.size();
  st.size = head.size() + data;
  st.head = Text(std::move(head));
  uint64_t ino = AddFile(nodes, root, "model.safetensors", sec, nsec);
  nodes.Get(ino)->size = st.size;
  nodes.Get(ino)->safetensors = true;
}

}  // namespace

Result<ReadPlan> Tree::ReadSafetensors(uint64_t offset, uint64_t size) const {
  ReadPlan plan;
  const uint64_t end = std::min(safetensors.size, offset + size);
  const std::string& head = *safetensors.head;
  if (offset < head.size()) {
    plan.AddMemory(head.data() + offset, std::min<uint64_t>(head.size(), end) - offset);
    plan.keepalive.push_back(safetensors.head);
  }
  auto it =
      std::upper_bound(safetensors.segments.begin(), safetensors.segments.end(), offset,
                       [](uint64_t off, const Safetensors::Segment& s) { return off < s.start; });
  if (it != safetensors.segments.begin()) --it;
  for (; it != safetensors.segments.end() && it->start < end; ++it) {
    uint64_t seg_end = it->start + it->tensor->nbytes();
    if (seg_end <= offset) continue;
    uint64_t from = std::max(offset, it->start);
    uint64_t to = std::min(end, seg_end);
    NEMOFS_ASSIGN_OR_RETURN(ReadPlan part, checkpoint::PlanTensorRead(*it->tensor, *src,
                                                                      from - it->start, to - from));
    plan.Append(part);
  }
  return plan;
}

std::vector<uint64_t> Tree::NodesOfBlobs(const std::set<uint32_t>& blobs) const {
  std::vector<uint64_t> out;
  for (size_t i = 0; i < nodes.size(); ++i) {
    const tree::Node& n = nodes.At(i);
    if (n.type != NodeType::kFile) continue;
    bool hit = n.safetensors || (n.blob != source::kNoBlob && blobs.count(n.blob));
    if (!hit && n.tensor) {
      for (const auto& c : n.tensor->chunks) {
        hit = hit || blobs.count(c.lazy ? c.lazy->blob() : c.blob);
      }
    }
    if (hit) out.push_back(nodes.InoAt(i));
  }
  return out;
}

Result<std::unique_ptr<Filesystem>> Filesystem::Open(const FilesystemOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  // The source's identity before reading it: a commit refuses to write if
  // anything else changed it since (ESTALE).
  write::FileIdentity identity;
  // The hot-journal hook: an interrupted patch is undone before anything
  // reads the source.
  std::string rolled_back;
  if (options.journal != JournalPolicy::kLeave) {
    NEMOFS_ASSIGN_OR_RETURN(
        rolled_back, write::RollBackInterruptedPatch(
                         options.source, options.journal != JournalPolicy::kRefuse,
                         options.journal == JournalPolicy::kRollBackLocked));
  }
  if (options.writable) {
    NEMOFS_ASSIGN_OR_RETURN(identity, write::IdentityOf(options.source));
  }
  NEMOFS_ASSIGN_OR_RETURN(std::unique_ptr<Tree> tree, Impl::BuildTree(options));
  if (!rolled_back.empty()) tree->info.warnings.insert(tree->info.warnings.begin() +
                                                           static_cast<long>(
                                                               tree->src->warnings().size()),
                                                       rolled_back);
  if (options.writable) NEMOFS_RETURN_IF_ERROR(impl->EnableWrites(*tree, identity));
  impl->overlay.cache_dir = options.cache_dir;
  if (!options.cache_dir.empty()) impl->overlay.spill->dir = options.cache_dir + "/spill";
  impl->tree.store(TreeRef(std::move(tree)));
  // Building the catalog allocated every pickle value of every weight file;
  // hand those pages back instead of keeping them for the mount's life.
  ::malloc_trim(0);
  return std::unique_ptr<Filesystem>(new Filesystem(std::move(impl)));
}

Result<std::unique_ptr<Tree>> Filesystem::Impl::BuildTree(const FilesystemOptions& options) {
  auto impl = std::make_unique<Tree>();
  source::OpenOptions so;
  so.cache_dir = options.cache_dir;
  so.cache_max = options.cache_max;
  NEMOFS_ASSIGN_OR_RETURN(impl->src, source::OpenSource(options.source, so));
  NEMOFS_ASSIGN_OR_RETURN(checkpoint::Layout layout, checkpoint::Recognize(*impl->src));
  source::Source& src = *impl->src;
  tree::NodeTable& nodes = impl->nodes;

  // Owners and modes (tree/access.h): a folder's entries carry their own;
  // an archive's members get the archive file's owner, limited to its mode.
  struct stat source_st {};
  if (::stat(options.source.c_str(), &source_st) != 0) {
    return Err(errno, "{}: {}", options.source, std::strerror(errno));
  }
  const bool folder = S_ISDIR(source_st.st_mode);
  auto access_of = [&](const Entry& e) {
    if (folder) return tree::Access{e.uid, e.gid, e.mode & 0777};
    // Execute bits are the member's own (run.sh in a .nemo), for whoever
    // may read the archive.
    uint32_t limit = tree::DirMode(source_st.st_mode & 0777);
    return tree::Access{source_st.st_uid, source_st.st_gid, e.mode & limit};
  };
  // Who may write is the source's business: a folder file's own write
  // bits, an archive file's for everything in it.
  const uint32_t archive_write = source_st.st_mode & 0222;
  auto set_access = [&](tree::Node* n, const tree::Access& a, uint32_t write_bits) {
    n->uid = a.uid;
    n->gid = a.gid;
    uint32_t mode = n->type == NodeType::kDirectory ? tree::DirMode(a.mode) : a.mode;
    if (n->type == NodeType::kSymlink) mode = 0777;
    n->perm = mode & ~0222u;
    n->write_perm = n->type == NodeType::kSymlink ? 0 : write_bits & 0222u;
  };

  const Entry& src_root = src.entries().front();
  const tree::Access root_access =
      folder ? access_of(src_root)
             : tree::Access{source_st.st_uid, source_st.st_gid, tree::DirMode(source_st.st_mode & 0777)};
  const uint64_t root = nodes.Add(DirNode(src_root.mtime_sec, src_root.mtime_nsec, 1));
  const uint64_t archive = nodes.Add(DirNode(src_root.mtime_sec, src_root.mtime_nsec, root));
  impl->root = root;
  impl->archive = archive;
  nodes.Link(root, "archive", archive);
  nodes.Get(root)->nlink++;

  // archive/: the source as stored. Entries come parents first.
  CheckpointInfo& info = impl->info;
  std::map<std::string, uint64_t, std::less<>> by_path{{"", archive}};
  std::vector<tree::Access> blob_access;  // by blob
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
        n.size = e.size;
        n.blob = e.blob;
        info.source_bytes += e.size;
        ++info.files;
        break;
      case EntryType::kSymlink:
        n.type = NodeType::kSymlink;
        n.size = e.link_target.size();
        n.link_target = e.link_target;
        break;
    }
    n.entry = static_cast<uint32_t>(i);
    tree::Access a = access_of(e);
    set_access(&n, a, folder ? e.mode : archive_write);
    if (n.blob != source::kNoBlob) {
      if (blob_access.size() <= n.blob) blob_access.resize(n.blob + 1);
      blob_access[n.blob] = a;
    }
    uint64_t ino = nodes.Add(std::move(n));
    nodes.Link(parent, base, ino);
    by_path.emplace(e.path, ino);
  }

  // config.yaml: the config member's own node.
  uint64_t config_ino = 0;
  if (!layout.config_path.empty()) {
    config_ino = by_path.at(layout.config_path);
    nodes.Link(root, "config.yaml", config_ino);
    nodes.Get(config_ino)->nlink++;
    info.config = layout.config_path;
    info.config_bytes = nodes.Get(config_ino)->size;
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
  impl->config_ino = config_ino;
  impl->config_path = layout.config_path;
  layout.cache_dir = options.cache_dir;
  impl->catalog = checkpoint::BuildCatalog(src, layout);
  for (const auto& w : layout.weight_files) impl->weight_paths.insert(w.path);
  if (!layout.per_rank && layout.dist_backend.empty() && layout.weight_files.size() == 1 &&
      impl->catalog.errors.empty()) {
    impl->structural_file = layout.weight_files[0].path;
  }
  // Per-rank structural writes need one commit point over all the rank
  // files: a tar's (one append, or one rewrite), a folder's roll-forward
  // journal (write/folder_txn.h).
  if (layout.per_rank && layout.dist_backend.empty() && impl->catalog.merge &&
      impl->catalog.errors.empty() &&
      (src.storage() == source::Storage::kPlainTar ||
       src.storage() == source::Storage::kCompressedTar ||
       src.storage() == source::Storage::kFolder)) {
    impl->rank_files = layout.weight_files;
    for (const auto& r : impl->catalog.ranks) {
      for (const auto& x : r.tensors) impl->rank_keys.emplace(r.name, x.key);
    }
  }
  // DCP / torch_dist folders take new items in a new .distcp and a new
  // .metadata (dist/dcp_writer.h; inside a .nemo archive, two members of
  // one commit); zarr folders new array folders moved in by one journal
  // (write/folder_txn.h); a zarr inside an archive a rewrite of it.
  if ((layout.dist_backend == "torch_dist" || layout.dist_backend == "dcp") &&
      (src.storage() == source::Storage::kFolder || src.storage() == source::Storage::kPlainTar ||
       src.storage() == source::Storage::kCompressedTar) &&
      impl->catalog.errors.empty()) {
    impl->dcp = true;
    impl->dcp_dir = layout.dist_dir;
  }
  if (layout.dist_backend == "zarr" &&
      (src.storage() == source::Storage::kFolder || src.storage() == source::Storage::kPlainTar ||
       src.storage() == source::Storage::kCompressedTar) &&
      impl->catalog.errors.empty()) {
    impl->zarr = true;
    impl->zarr_dir = layout.dist_dir;
  }
  if (!layout.dist_backend.empty()) {
    for (const Entry& e : src.entries()) {
      if (e.type == EntryType::kFile &&
          (layout.dist_dir.empty() || e.path.rfind(layout.dist_dir + "/", 0) == 0)) {
        impl->weight_paths.insert(e.path);
      }
    }
  }
  const uint64_t first_view = nodes.size() + 1;
  AddTensorViews(*impl, root, src_root.mtime_sec, src_root.mtime_nsec, options.source,
                 checkpoint::FormatId(layout.format));
  // Files a user created in the root of a writable mount are stored at the
  // checkpoint's top level (README "Writes"): top-level regular files that
  // the layout does not use (not the config, a tokenizer file or a weight
  // file, not a NeMo artifact "<32 hex>_name") show in the root as well,
  // unless the root has that name already.
  if (layout.format == checkpoint::Format::kNemo ||
      layout.format == checkpoint::Format::kNemoFolder ||
      layout.format == checkpoint::Format::kNemo2) {
    std::set<std::string, std::less<>> used{layout.config_path};
    for (const auto& t : layout.tokenizer) used.insert(t.entry_path);
    for (const auto& w : layout.weight_files) used.insert(w.path);
    std::set<std::string, std::less<>> taken;
    for (const auto& [name, ino] : nodes.Get(root)->children) taken.insert(name);
    for (const Entry& e : src.entries()) {
      if (e.type != source::EntryType::kFile || e.path.empty() ||
          e.path.find('/') != std::string::npos || used.count(e.path) || taken.count(e.path) ||
          checkpoint::StripArtifactPrefix(e.path) != e.path) {
        continue;
      }
      auto it = by_path.find(e.path);
      if (it == by_path.end()) continue;
      nodes.Link(root, e.path, it->second);
      nodes.Get(it->second)->nlink++;
      taken.insert(e.path);
    }
  }
  // The root, archive/ and tokenizer/ directories are the source root's; the
  // tensor views get the intersection of the files their bytes come from.
  const uint32_t root_write = folder ? src_root.mode : archive_write;
  for (uint64_t ino : {root, archive}) set_access(nodes.Get(ino), root_access, root_write);
  // Archive entries are nodes archive+1 .. archive+entries-1; tokenizer/
  // directories follow them.
  for (uint64_t ino = archive + src.entries().size(); ino < first_view; ++ino) {
    set_access(nodes.Get(ino), root_access, 0);
  }
  {
    auto tensor_access = [&](const checkpoint::Tensor& t, tree::Access acc) {
      for (const auto& c : t.chunks) {
        if (c.blob != source::kNoBlob && c.blob < blob_access.size()) {
          acc = tree::Combine(acc, blob_access[c.blob]);
        }
      }
      return acc;
    };
    // Everything derived from the weights as a whole (index.json,
    // checkpoint.json, model.safetensors, the view directories).
    tree::Access all = root_access;
    std::vector<bool> seen(blob_access.size(), false);
    auto add_all = [&](const std::vector<checkpoint::Tensor>& ts) {
      for (const auto& t : ts) {
        for (const auto& c : t.chunks) {
          if (c.blob < blob_access.size() && !seen[c.blob]) {
            seen[c.blob] = true;
            all = tree::Combine(all, blob_access[c.blob]);
          }
        }
      }
    };
    const checkpoint::Catalog& cat = impl->catalog;
    add_all(cat.tensors);
    add_all(cat.optimizer);
    for (const auto& r : cat.ranks) add_all(r.tensors);
    // Weight files without tensors still feed checkpoint.json.
    auto add_entry = [&](const Entry& e) {
      if (e.blob < blob_access.size() && !seen[e.blob]) {
        seen[e.blob] = true;
        all = tree::Combine(all, blob_access[e.blob]);
      }
    };
    for (const auto& w : layout.weight_files) {
      if (const Entry* e = src.Find(w.path)) add_entry(*e);
    }
    if (!layout.dist_backend.empty()) {
      for (const Entry& e : src.entries()) {
        if (layout.dist_dir.empty() || e.path.rfind(layout.dist_dir + "/", 0) == 0) add_entry(e);
      }
    }
    for (uint64_t ino = first_view; ino <= nodes.size(); ++ino) {
      tree::Node* n = nodes.Get(ino);
      // A tensor file may be written where every file its bytes are in may be
      // (tensor writes: tree/tensor_writes.cc).
      uint32_t tensor_write = 0;
      if (n->tensor && !n->npy_header) {
        tensor_write = folder ? 0222u : archive_write;
        for (const auto& c : n->tensor->chunks) {
          const uint32_t blob = c.lazy ? c.lazy->blob() : c.blob;
          if (folder && blob < blob_access.size()) tensor_write &= blob_access[blob].mode;
        }
      }
      set_access(n, n->tensor ? tensor_access(*n->tensor, root_access) : all, tensor_write);
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
  const checkpoint::Catalog& cat = impl->catalog;
  info.warnings.insert(info.warnings.end(), cat.warnings.begin(), cat.warnings.end());
  for (const auto& t : cat.tensors) info.tensor_bytes += t.nbytes();
  for (const auto& t : cat.optimizer) info.optimizer_bytes += t.nbytes();
  info.tensors = cat.tensors.size();
  info.optimizer_tensors = cat.optimizer.size();
  for (const auto& r : cat.ranks) info.rank_tensors += r.tensors.size();
  info.ranks = cat.ranks.size();
  info.unmerged = cat.unmerged;
  info.weight_errors = cat.errors;
  return impl;
}

Filesystem::Filesystem(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Filesystem::~Filesystem() = default;

Result<NodeAttr> Filesystem::GetAttr(uint64_t ino) const {
  const TreeRef t = impl_->Current();
  if (impl_->IsOverlayIno(*t, ino)) return impl_->OverlayAttr(*t, ino);
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Impl::Node(*t, ino));
  NodeAttr a = Impl::Attr(ino, *n);
  if (n->tensor && !n->npy_header) impl_->StagedAttr(ino, &a);
  return a;
}

void Filesystem::SetInvalidator(std::function<void(const std::vector<uint64_t>&)> fn) {
  impl_->invalidate = std::move(fn);
}

void Filesystem::SetEntryInvalidator(
    std::function<void(const std::vector<std::pair<uint64_t, std::string>>&)> fn) {
  impl_->invalidate_entries = std::move(fn);
}

Result<NodeAttr> Filesystem::Lookup(uint64_t parent, std::string_view name) const {
  const TreeRef t = impl_->Current();
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* dir, Impl::Node(*t, parent));
  if (dir->type != NodeType::kDirectory) return Err(ENOTDIR, "inode {} is not a directory", parent);
  if (name == ".") return Impl::Attr(parent, *dir);
  if (impl_->overlay.tensor_dirs.count(parent) && name != "..") {
    NEMOFS_ASSIGN_OR_RETURN(uint64_t ino, impl_->LookupTensorDir(parent, name));
    return GetAttr(ino);
  }
  if (parent == impl_->overlay.npy_dir && parent && name != "..") {
    NEMOFS_ASSIGN_OR_RETURN(uint64_t ino, impl_->LookupNpy(name));
    return GetAttr(ino);
  }
  if (name == "..") return GetAttr(dir->parent);
  auto it = std::lower_bound(
      dir->children.begin(), dir->children.end(), name,
      [](const std::pair<std::string, uint64_t>& c, std::string_view n) { return c.first < n; });
  if (it == dir->children.end() || it->first != name) {
    if (impl_->overlay.scratch_dirs.count(parent)) return impl_->LookupScratch(parent, name);
    return Err(ENOENT, "no '{}' in inode {}", name, parent);
  }
  return GetAttr(it->second);
}

Status Filesystem::ReadDir(uint64_t ino, uint64_t offset,
                           const std::function<bool(const DirEntry&, uint64_t)>& fn) const {
  const TreeRef t = impl_->Current();
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* dir, Impl::Node(*t, ino));
  if (dir->type != NodeType::kDirectory) return Err(ENOTDIR, "inode {} is not a directory", ino);
  if (impl_->overlay.tensor_dirs.count(ino) || (ino == impl_->overlay.npy_dir && ino)) {
    const auto listing = ino == impl_->overlay.npy_dir ? impl_->NpyListing()
                                                       : impl_->TensorDirListing(ino);
    for (uint64_t i = offset; i < listing.size(); ++i) {
      const tree::Node* n = t->nodes.Get(listing[i].second);
      DirEntry e{listing[i].first, listing[i].second, n ? n->type : NodeType::kFile};
      if (!fn(e, i + 1)) break;
    }
    return Ok();
  }
  for (uint64_t i = offset; i < dir->children.size(); ++i) {
    const auto& [name, child] = dir->children[i];
    DirEntry e{name, child, t->nodes.Get(child)->type};
    if (!fn(e, i + 1)) return Ok();
  }
  if (!impl_->overlay.scratch_dirs.count(ino)) return Ok();
  // Scratch files follow the checkpoint's own entries.
  auto scratch = impl_->ScratchChildren(ino);
  const uint64_t base = dir->children.size();
  for (uint64_t i = offset > base ? offset - base : 0; i < scratch.size(); ++i) {
    DirEntry e{scratch[i].first, scratch[i].second, NodeType::kFile};
    if (!fn(e, base + i + 1)) break;
  }
  return Ok();
}

Status Filesystem::CheckOpen(uint64_t ino, int flags) const {
  const TreeRef t = impl_->Current();
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Impl::Node(*t, ino));
  if (n->type == NodeType::kDirectory && (flags & O_ACCMODE) != O_RDONLY) {
    return Err(EISDIR, "inode {} is a directory", ino);
  }
  if (((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC)) && !impl_->IsOverlayIno(*t, ino) &&
      !impl_->IsTensorIno(*t, ino)) {
    return Err(EROFS, "inode {} is read-only{}", ino,
               impl_->overlay.writable
                   ? " (config.yaml, tensor files, stored files of tokenizer/ and archive/, "
                     "and new files can be written)"
                   : "");
  }
  return Ok();
}

Result<ReadPlan> Filesystem::Read(uint64_t ino, uint64_t offset, uint64_t size,
                                  uint64_t fh) const {
  const TreeRef t = impl_->Current();
  if (impl_->IsOverlayIno(*t, ino)) return impl_->ReadOverlay(ino, offset, size, fh);
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Impl::Node(*t, ino));
  if (n->type == NodeType::kDirectory) return Err(EISDIR, "inode {} is a directory", ino);
  if (n->type != NodeType::kFile) return Err(EINVAL, "inode {} is not a regular file", ino);
  // A tensor being written, read through a writing handle: its staged bytes.
  if (n->tensor && impl_->IsTensorIno(*t, ino)) {
    if (auto staged = impl_->ReadStagedTensor(ino, fh, offset, size); staged) {
      return std::move(*staged);
    }
  }
  NEMOFS_RETURN_IF_ERROR(t->CheckStale(*n, fmt::format("inode {}", ino)));
  if (offset >= n->size) return ReadPlan{};
  size = std::min(size, n->size - offset);
  if (n->data) {
    ReadPlan plan;
    plan.AddMemory(n->data->data() + offset, size);
    plan.keepalive.push_back(n->data);
    return plan;
  }
  if (n->npy_header) {
    const std::string& h = *n->npy_header;
    ReadPlan plan;
    if (offset < h.size()) {
      const uint64_t k = std::min<uint64_t>(size, h.size() - offset);
      plan.AddMemory(h.data() + offset, k);
      plan.keepalive.push_back(n->npy_header);
      offset += k;
      size -= k;
    }
    if (size) {
      NEMOFS_ASSIGN_OR_RETURN(ReadPlan part, checkpoint::PlanTensorRead(
                                                 *n->tensor, *t->src, offset - h.size(), size));
      plan.Append(part);
    }
    impl_->HoldForRead(t, &plan);
    return plan;
  }
  Result<ReadPlan> plan = n->tensor         ? checkpoint::PlanTensorRead(*n->tensor, *t->src,
                                                                         offset, size)
                          : n->safetensors ? t->ReadSafetensors(offset, size)
                                           : t->src->Plan(n->blob, offset, size);
  if (plan.ok()) impl_->HoldForRead(t, &*plan);
  return plan;
}

Result<std::string> Filesystem::ReadLink(uint64_t ino) const {
  const TreeRef t = impl_->Current();
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Impl::Node(*t, ino));
  if (n->type != NodeType::kSymlink) return Err(EINVAL, "inode {} is not a symbolic link", ino);
  return n->link_target;
}

Result<std::string> Filesystem::GetXattr(uint64_t ino, std::string_view name) const {
  const TreeRef t = impl_->Current();
  if (!t->nodes.Has(ino) && impl_->IsOverlayIno(*t, ino)) {  // a new file: none
    NEMOFS_RETURN_IF_ERROR(impl_->OverlayAttr(*t, ino));
    if (auto v = impl_->NewTensorXattr(ino, name)) return *v;
    return Err(ENODATA, "inode {} has no attribute {}", ino, name);
  }
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Impl::Node(*t, ino));
  if (ino == kRootIno) {
    if (name == "user.nemofs.format") return t->info.format;
    if (name == "user.nemofs.source") return t->info.source;
  }
  if (n->tensor) {
    if (auto r = impl_->RetypeOf(ino); r && (name == "user.nemofs.dtype" ||
                                              name == "user.nemofs.shape")) {
      return name == "user.nemofs.dtype" ? std::string(torch::Info(r->dtype).name)
                                         : ShapeText(r->shape);
    }
    if (name == "user.nemofs.dtype") return std::string(torch::Info(n->tensor->dtype).name);
    if (name == "user.nemofs.shape") return ShapeText(n->tensor->shape);
    if (name == "user.nemofs.key") return n->tensor->key;
  }
  return Err(ENODATA, "inode {} has no attribute {}", ino, name);
}

Result<std::vector<std::string>> Filesystem::ListXattr(uint64_t ino) const {
  const TreeRef t = impl_->Current();
  if (!t->nodes.Has(ino) && impl_->IsOverlayIno(*t, ino)) {
    NEMOFS_RETURN_IF_ERROR(impl_->OverlayAttr(*t, ino));
    std::vector<std::string> names;
    for (const char* n : {"user.nemofs.dtype", "user.nemofs.shape", "user.nemofs.key"}) {
      if (impl_->NewTensorXattr(ino, n)) names.emplace_back(n);
    }
    return names;
  }
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Impl::Node(*t, ino));
  if (ino == kRootIno) return std::vector<std::string>{"user.nemofs.format", "user.nemofs.source"};
  if (n->tensor) {
    return std::vector<std::string>{"user.nemofs.dtype", "user.nemofs.shape", "user.nemofs.key"};
  }
  return std::vector<std::string>{};
}

Status Filesystem::SetXattr(uint64_t ino, std::string_view name, std::string_view value) {
  if (!impl_->overlay.writable) return Err(EROFS, "the tree is read-only");
  return impl_->SetTensorXattr(ino, name, value);
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

CheckpointInfo Filesystem::info() const { return impl_->Current()->info; }

std::vector<std::string> Filesystem::Verify(
    const std::function<void(uint64_t, uint64_t)>& progress) const {
  const TreeRef t = impl_->Current();
  std::vector<std::string> problems = t->info.warnings;
  for (const auto& e : t->info.weight_errors) problems.push_back(e);
  source::Source& src = *t->src;
  // Totals for progress: tensor bytes + zip bytes.
  std::vector<const source::Entry*> zips;
  uint64_t total = 0, done = 0;
  for (const auto& e : src.entries()) {
    if (e.type != source::EntryType::kFile || e.size < 22) continue;
    char head[4] = {};
    auto plan = src.Plan(e.blob, 0, 4);
    if (plan && ExecuteReadPlan(*plan, head).ok() && std::string_view(head, 4) == "PK\x03\x04" &&
        e.path.find(".distcp") == std::string::npos) {
      zips.push_back(&e);
      total += e.size;
    }
  }
  std::vector<TensorEntry> tensors = ListTensors();
  for (const auto& t : tensors) total += t.nbytes;
  std::string buf(1 << 20, '\0');
  for (const auto& t : tensors) {
    auto ino = Resolve(t.path);
    if (!ino) continue;
    for (uint64_t off = 0; off < t.nbytes; off += buf.size()) {
      auto plan = Read(*ino, off, buf.size());
      Status st = plan ? ExecuteReadPlan(*plan, buf.data()) : Status(plan.error());
      if (!st.ok()) {
        problems.push_back(fmt::format("{}: {}", t.path, st.error().message()));
        break;
      }
      done += plan->size();
      if (progress) progress(done, total);
    }
  }
  for (const source::Entry* e : zips) {
    std::string what = src.path() + (src.storage() == source::Storage::kFile ? "" : ":" + e->path);
    auto range = src.Locate(e->blob);
    if (!range) {
      problems.push_back(range.error().message());
      continue;
    }
    FdReader reader(range->fd, range->offset, range->length);
    auto zip = torch::ZipArchive::Open(reader, what);
    if (!zip) {
      problems.push_back(zip.error().message());
      continue;
    }
    for (const auto& entry : zip->entries()) {
      if (entry.method != 0) continue;
      uLong crc = crc32(0L, Z_NULL, 0);
      bool read_all = true;
      for (uint64_t off = 0; off < entry.size; off += buf.size()) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), entry.size - off));
        auto st = reader.Read(entry.data_offset + off, buf.data(), n, what);
        if (!st.ok()) {
          problems.push_back(fmt::format("{}: record {}: {}", what, entry.name, st.error().message()));
          read_all = false;
          break;
        }
        crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n));
      }
      // A stored CRC of 0 is checked too: it is the CRC of empty data only.
      if (read_all && crc != entry.crc32) {
        problems.push_back(
            fmt::format("{}: record {} has CRC-32 {:08x}, its central directory says "
                        "{:08x}",
                        what, entry.name, crc, entry.crc32));
      }
    }
    done += e->size;
    if (progress) progress(done, total);
  }
  // The compressed stream itself (gzip CRC-32 and ISIZE of every member, the
  // xz/zstd/bzip2 checks): extraction into the cache stops at the last tar
  // member and never reads a gzip trailer.
  struct stat st {};
  if (src.Kind() != "directory" && ::stat(src.path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
    std::string bad = source::CheckStreamFile(src.path());
    if (!bad.empty()) problems.push_back(bad);
  }
  // Each problem once (a warning can also be a weight error).
  std::vector<std::string> unique;
  for (auto& p : problems) {
    if (std::find(unique.begin(), unique.end(), p) == unique.end()) unique.push_back(std::move(p));
  }
  return unique;
}

std::vector<std::string> Filesystem::Orphans() const {
  std::vector<std::string> out;
  for (const auto& o : write::FindOrphans(impl_->Current()->info.source)) {
    out.push_back(fmt::format("{}: left by an interrupted commit ({} bytes; not part of the "
                              "checkpoint); `nemofs repack` removes it",
                              o.path, o.bytes));
  }
  return out;
}

std::string Filesystem::DescribeWritable() const {
  return impl_->DescribeWritable(!impl_->Current()->info.config.empty());
}

std::vector<TensorEntry> Filesystem::ListTensors() const {
  std::vector<TensorEntry> out;
  auto add = [&](const std::vector<checkpoint::Tensor>& tensors, const std::string& dir) {
    for (const auto& t : tensors) {
      out.push_back({dir + "/" + checkpoint::EscapeKey(t.key), t.key,
                     std::string(torch::Info(t.dtype).name), t.shape, t.nbytes()});
    }
  };
  const TreeRef t = impl_->Current();
  add(t->catalog.tensors, "tensors");
  add(t->catalog.optimizer, "optimizer");
  for (const auto& r : t->catalog.ranks) add(r.tensors, "ranks/" + r.name);
  return out;
}
uint64_t Filesystem::node_count() const { return impl_->Current()->nodes.size(); }

}  // namespace nemofs
