// The structural commit (issue 11, DESIGN.md §4): tensors added, deleted or
// renamed in tensors/ and optimizer/ are stored by repacking the weight
// file they are in, in its own format (torch/torch_repack.h), then stored
// like a replaced file — an appended member of a plain tar, a rewrite of a
// compressed one, a file renamed over in a folder, the single file renamed
// over — each with its own one commit point; then the checkpoint is read
// again (Impl::Reload), so index.json, model.safetensors and the tensor
// files show what it holds.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <set>

#include "checkpoint/catalog.h"
#include "checkpoint/merge.h"
#include "checkpoint/npy.h"
#include "checkpoint/tensor.h"
#include "checkpoint/zarr.h"
#include "dist/dcp_writer.h"
#include "torch/torch_file.h"
#include "torch/torch_repack.h"
#include "tree/filesystem_impl.h"
#include "util/atomic_replace.h"
#include "util/fd.h"
#include "util/io.h"
#include "write/folder_txn.h"

namespace nemofs {
namespace {

// The repacked file: an unlinked temp file in the spill folder, mapped
// read-only for the store once written.
class RepackOutput {
 public:
  ~RepackOutput() {
    if (map_ && map_ != MAP_FAILED) ::munmap(map_, size_);
  }
  Status Create(const std::string& dir) {
    const std::string where = dir.empty() ? "/tmp" : dir;
    ::mkdir(where.c_str(), 0700);
    fd_ = UniqueFd(::open(where.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    if (!fd_.valid()) {
      return Err(errno == ENOSPC ? ENOSPC : EIO, "{}: cannot create the repacked weight file: {}",
                 where, std::strerror(errno));
    }
    return Ok();
  }
  int fd() const { return fd_.get(); }
  Result<std::string_view> Map(uint64_t size) {
    size_ = size;
    if (size == 0) return std::string_view();
    map_ = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd_.get(), 0);
    if (map_ == MAP_FAILED) return Err(errno, "cannot map the repacked weight file: {}", std::strerror(errno));
    return std::string_view(static_cast<const char*>(map_), size);
  }

 private:
  UniqueFd fd_;
  void* map_ = nullptr;
  uint64_t size_ = 0;
};

// Stored bytes mapped read-only (a member of a plain tar, a decompressed
// member in the cache).
class MappedRange {
 public:
  ~MappedRange() {
    if (map_ && map_ != MAP_FAILED) ::munmap(map_, span_);
  }
  Status Map(const source::FileRange& r, const std::string& what) {
    if (r.length == 0) return Ok();
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t start = r.offset / page * page;
    span_ = r.offset - start + r.length;
    map_ = ::mmap(nullptr, span_, PROT_READ, MAP_SHARED, r.fd, static_cast<off_t>(start));
    if (map_ == MAP_FAILED) return Err(errno, "{}: cannot map it: {}", what, std::strerror(errno));
    bytes_ = std::string_view(static_cast<const char*>(map_) + (r.offset - start), r.length);
    return Ok();
  }
  std::string_view bytes() const { return bytes_; }

 private:
  void* map_ = nullptr;
  uint64_t span_ = 0;
  std::string_view bytes_;
};

// A file for ConfigCommitter::StoreFiles / RewriteArchive, stamped now.
write::ConfigCommitter::NewFile StoredFile(std::string path, std::string_view data, uint32_t mode,
                                           bool stored_before) {
  struct timespec now {};
  ::clock_gettime(CLOCK_REALTIME, &now);
  write::ConfigCommitter::NewFile f;
  f.path = std::move(path);
  f.data = data;
  f.mode = mode & 07777;
  f.mtime_sec = now.tv_sec;
  f.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
  f.stored_before = stored_before;
  return f;
}

struct NewOne {
  std::shared_ptr<ScratchFile> file;
  uint64_t version = 0;
  std::string key;
  bool optimizer = false;
  SpillBytes::View bytes;
  torch::DType dtype = torch::DType::kFloat32;
  std::vector<int64_t> shape;
};

struct Gone {
  std::string key;
  bool optimizer = false;
  std::string new_key;  // empty: deleted
};

// One weight file to repack: the file as parsed, its edits, its new bytes.
struct RepackJob {
  std::string path;  // entry path
  std::string name;  // for messages
  const source::Entry* entry = nullptr;
  source::FileRange range;
  std::unique_ptr<FdReader> reader;
  torch::TorchFile file;
  std::vector<torch::TorchEdit> edits;
  RepackOutput out;
  torch::RepackResult packed;
  std::string_view bytes;  // the repacked file (not in place)
};

// A deletion (new_key empty) or rename of tree key `key` of the file.
Status AddGoneEdit(RepackJob& j, bool optimizer, const std::string& key,
                   const std::string& new_key) {
  NEMOFS_ASSIGN_OR_RETURN(checkpoint::TensorPlace at,
                          checkpoint::LocateTensorKey(j.file, optimizer, key, j.name));
  if (new_key.empty()) {
    j.edits.push_back(torch::TorchEdit::Remove(at.dict, at.key));
    return Ok();
  }
  // The entry keeps its place; only its own part of the dotted key can
  // change (the dict it is in stays).
  std::string entry_name = new_key;
  if (!at.prefix.empty()) {
    if (new_key.rfind(at.prefix + ".", 0) != 0) {
      return Err(EINVAL, "{}: tensor {} cannot become {}: a rename changes only the part of the "
                 "key after {}",
                 j.name, key, new_key, at.prefix);
    }
    entry_name = new_key.substr(at.prefix.size() + 1);
  }
  j.edits.push_back(torch::TorchEdit::Rename(at.dict, at.key, entry_name));
  return Ok();
}

// Tree key `key` set to a new tensor (`bytes` outlive the repack); whether
// the file had that key.
Result<bool> AddSetEdit(RepackJob& j, bool optimizer, const std::string& key, torch::DType dtype,
                        const std::vector<int64_t>& shape, std::string_view bytes) {
  NEMOFS_ASSIGN_OR_RETURN(checkpoint::TensorPlace at,
                          checkpoint::LocateTensorKey(j.file, optimizer, key, j.name));
  torch::NewTensor nt;
  nt.dtype = dtype;
  nt.shape = shape;
  nt.bytes = bytes;
  std::string entry_name = key;
  if (at.key && !at.prefix.empty()) entry_name = key.substr(at.prefix.size() + 1);
  j.edits.push_back(torch::TorchEdit::SetTensor(at.dict, entry_name, std::move(nt)));
  return at.key != nullptr;
}

// Which rank files hold which of their own keys (Tree::rank_keys).
class RankKeys {
 public:
  explicit RankKeys(const Tree& t) : t_(t) {}
  bool Holds(const checkpoint::WeightFile& w, const std::string& key) const {
    return t_.rank_keys.count({fmt::format("tp{}_pp{}", w.tp, w.pp), key}) != 0;
  }
  // The PP stages whose rank files hold `key` (none: a new key).
  std::vector<int> Stages(const std::string& key) const {
    std::set<int> out;
    for (const auto& w : t_.rank_files) {
      if (Holds(w, key)) out.insert(w.pp);
    }
    return {out.begin(), out.end()};
  }

 private:
  const Tree& t_;
};

// The bytes of a slice of global tensor bytes `global` (C order): a view
// of them when the slice is one run, else copied into a spill buffer kept
// in `keep`.
Result<std::string_view> SliceBytes(std::string_view global, const std::vector<int64_t>& shape,
                                    torch::DType dtype, const checkpoint::RankSlice& sl,
                                    const std::shared_ptr<SpillPool>& spill,
                                    std::vector<SpillBytes::View>* keep) {
  if (shape.empty()) return global;
  uint64_t row = torch::Info(dtype).itemsize;  // bytes of one index of dim sl.dim
  for (size_t d = sl.dim + 1; d < shape.size(); ++d) row *= static_cast<uint64_t>(shape[d]);
  uint64_t outer = 1;
  for (size_t d = 0; d < sl.dim; ++d) outer *= static_cast<uint64_t>(shape[d]);
  const uint64_t span = static_cast<uint64_t>(shape[sl.dim]) * row;
  if (outer == 1 && sl.ranges.size() == 1) {
    return global.substr(static_cast<uint64_t>(sl.ranges[0].first) * row,
                         static_cast<uint64_t>(sl.ranges[0].second - sl.ranges[0].first) * row);
  }
  SpillBytes buf(spill);
  std::string window;
  uint64_t at = 0;
  for (uint64_t o = 0; o < outer; ++o) {
    for (const auto& [b, e] : sl.ranges) {
      window.append(global.substr(o * span + static_cast<uint64_t>(b) * row,
                                  static_cast<uint64_t>(e - b) * row));
      if (window.size() >= (8u << 20)) {
        NEMOFS_RETURN_IF_ERROR(buf.Write(at, window));
        at += window.size();
        window.clear();
      }
    }
  }
  NEMOFS_RETURN_IF_ERROR(buf.Write(at, window));
  NEMOFS_ASSIGN_OR_RETURN(SpillBytes::View view, buf.Snapshot());
  keep->push_back(std::move(view));
  return keep->back().bytes;
}

}  // namespace

Status Filesystem::Impl::CheckStoredKey(const Tree& t, const std::string& key,
                                        const std::vector<int64_t>& shape,
                                        const std::string& old_key, uint64_t dir) const {
  if (dir != 0 && (t.dcp || t.zarr)) {
    bool in_optimizer = false;
    for (const auto& [name, ino] : t.nodes.Get(t.root)->children) {
      if (ino == dir) in_optimizer = name == "optimizer";
    }
    if (in_optimizer != (key.rfind("optimizer.", 0) == 0)) {
      return Err(EINVAL, "'{}' in {}/: a distributed checkpoint's keys are optimizer state by "
                 "their 'optimizer.' prefix, so it would show in {}/ once stored; name it {}",
                 key, in_optimizer ? "optimizer" : "tensors", in_optimizer ? "tensors" : "optimizer",
                 in_optimizer ? "optimizer." + key : "without that prefix in tensors/");
    }
  }
  if (t.zarr && (key.empty() || key.front() == '.' || key.find('/') != std::string::npos)) {
    return Err(EINVAL, "'{}' cannot be the key of a zarr checkpoint's tensor: each key is the "
               "name of its array's folder (no '/', no leading '.')",
               key);
  }
  if (t.rank_files.empty()) return Ok();
  const checkpoint::MergeConfig& cfg = *t.catalog.merge;
  const RankKeys rank_keys(t);
  const std::string& held = old_key.empty() ? key : old_key;
  NEMOFS_ASSIGN_OR_RETURN(auto local, checkpoint::RankKeyOf(held, cfg));
  const std::vector<int> stages = rank_keys.Stages(local.first);
  NEMOFS_ASSIGN_OR_RETURN(auto slices, checkpoint::SplitForRanks(key, shape, cfg, stages));
  if (old_key.empty()) return Ok();
  NEMOFS_ASSIGN_OR_RETURN(auto before, checkpoint::SplitForRanks(old_key, shape, cfg, stages));
  bool same = before.size() == slices.size();
  for (size_t i = 0; same && i < slices.size(); ++i) {
    same = before[i].tp == slices[i].tp && before[i].pp == slices[i].pp &&
           before[i].shape == slices[i].shape && before[i].dim == slices[i].dim &&
           before[i].ranges == slices[i].ranges;
  }
  if (!same) {
    return Err(EINVAL, "{} cannot become {} in a per-rank checkpoint: the new name puts it on "
               "other pipeline stages or splits it over the TP ranks by another rule (copy it "
               "to the new name and delete the old one instead)",
               old_key, key);
  }
  return Ok();
}

Status Filesystem::Impl::StoreDcpInArchive(const Tree& t, const std::vector<dist::DcpEdit>& edits,
                                           const std::string& shown, uint64_t* written) {
  source::Source& src = *t.src;
  Overlay& o = overlay;
  const std::string prefix = t.dcp_dir.empty() ? "" : t.dcp_dir + "/";
  const std::string md_path = prefix + dist::kDcpMetadataName;
  const source::Entry* md = src.Find(md_path);
  if (!md) return Err(EIO, "{}: its {} vanished", shown, dist::kDcpMetadataName);
  NEMOFS_ASSIGN_OR_RETURN(std::string bytes, src.ReadAll(*md, dist::kMaxDcpMetadataBytes));
  NEMOFS_ASSIGN_OR_RETURN(dist::LoadedDcp loaded,
                          dist::ParseDcpMetadataBytes(std::move(bytes), shown + "/" + md_path));
  NEMOFS_ASSIGN_OR_RETURN(auto plan, dist::PlanDcpEdits(loaded, shown, edits));
  std::set<std::string> files;
  for (const auto& e : src.entries()) {
    if (e.path.rfind(prefix, 0) == 0 && e.path.find('/', prefix.size()) == std::string::npos) {
      files.insert(e.path.substr(prefix.size()));
    }
  }
  const bool in_place = o.committer->StreamsNewFiles();
  std::vector<write::ConfigCommitter::NewFile> out;
  RepackOutput items;  // not in place: the new .distcp, written first
  std::string distcp;
  uint64_t item_bytes = 0;
  std::string metadata;
  if (plan->has_items()) {
    distcp = dist::FreeDistcpName(loaded, files);
    plan->SetNewFile(distcp);
    write::ConfigCommitter::NewFile f = StoredFile(prefix + distcp, {}, md->mode, false);
    const std::string what = shown + "/" + distcp;
    if (in_place) {
      f.writer = [&plan, &item_bytes, what](int fd, uint64_t offset) -> Result<uint64_t> {
        NEMOFS_ASSIGN_OR_RETURN(item_bytes, plan->WriteItems(fd, offset, what));
        return item_bytes;
      };
    } else {
      NEMOFS_RETURN_IF_ERROR(items.Create(o.spill->dir));
      NEMOFS_ASSIGN_OR_RETURN(item_bytes, plan->WriteItems(items.fd(), 0, what));
      NEMOFS_ASSIGN_OR_RETURN(f.data, items.Map(item_bytes));
    }
    out.push_back(std::move(f));
  }
  write::ConfigCommitter::NewFile m = StoredFile(md_path, {}, md->mode, true);
  if (in_place) {
    // After the items' writer: their offsets are in the new .metadata.
    m.writer = [&plan, &metadata, shown, md_path](int fd, uint64_t offset) -> Result<uint64_t> {
      NEMOFS_ASSIGN_OR_RETURN(metadata, plan->Metadata(shown + "/" + md_path));
      NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, metadata, offset, shown + "/" + md_path));
      return metadata.size();
    };
  } else {
    NEMOFS_ASSIGN_OR_RETURN(metadata, plan->Metadata(shown + "/" + md_path));
    m.data = metadata;
  }
  out.push_back(std::move(m));
  NEMOFS_RETURN_IF_ERROR(o.committer->StoreFiles(out, ProgressLogger(src.path())));
  *written = item_bytes + metadata.size();
  for (const auto& n : plan->notes()) spdlog::info("{}: {}", shown, n);
  return Ok();
}

Status Filesystem::Impl::StoreStructure(std::string_view why) {
  Overlay& o = overlay;
  if (!o.writable || o.tensor_dirs.empty()) return Ok();
  std::lock_guard<std::mutex> commit_lock(o.commit_mu);
  const auto start = std::chrono::steady_clock::now();
  const TreeRef t = Current();

  // What changed, as of now (writes may go on meanwhile: the new tensors'
  // bytes are snapshots).
  std::vector<NewOne> adds;
  std::vector<Gone> gone;
  std::set<std::pair<uint64_t, std::string>, std::less<>> removed_done;
  std::map<std::pair<uint64_t, std::string>, uint64_t, std::less<>> renamed_done;
  std::map<std::string, uint64_t> carry;  // new tree path -> inode it is shown with
  std::vector<std::string> pending;       // new tensor files that are no tensor yet
  {
    std::lock_guard<std::mutex> lock(o.mu);
    for (uint64_t dir : o.tensor_dirs) {
      const tree::Node* d = t->nodes.Get(dir);
      if (!d) continue;
      const tree::Node* root = t->nodes.Get(t->root);
      std::string dir_name;
      for (const auto& [n, ino] : root->children) {
        if (ino == dir) dir_name = n;
      }
      const bool optimizer = dir_name == "optimizer";
      for (const auto& [name, ino] : d->children) {
        const tree::Node* n = t->nodes.Get(ino);
        const auto key = std::make_pair(dir, name);
        if (!n || !n->tensor || !o.removed.count(key)) continue;
        removed_done.insert(key);
        Gone g{n->tensor->key, optimizer, ""};
        for (auto it = o.renamed.lower_bound(std::make_pair(dir, std::string()));
             it != o.renamed.end() && it->first.first == dir; ++it) {
          if (it->second != ino) continue;
          g.new_key = checkpoint::UnescapeKey(it->first.second);
          renamed_done.insert(*it);
          carry[dir_name + "/" + it->first.second] = ino;
        }
        gone.push_back(std::move(g));
      }
      for (auto it = o.scratch_names.lower_bound(std::make_pair(dir, std::string()));
           it != o.scratch_names.end() && it->first.first == dir; ++it) {
        auto f = o.scratch.at(it->second);
        if (!f->tensor || !f->linked) continue;
        if (!f->dtype || !f->shape) {
          pending.push_back(dir_name + "/" + f->name);
          continue;
        }
        if (f->stored && f->version == f->stored_version) continue;
        NewOne a;
        a.file = f;
        a.version = f->version;
        a.key = checkpoint::UnescapeKey(f->name);
        a.optimizer = optimizer;
        a.dtype = *f->dtype;
        a.shape = *f->shape;
        uint64_t numel = 1;
        for (int64_t x : a.shape) numel *= static_cast<uint64_t>(x);
        if (f->data.size() != numel * torch::Info(a.dtype).itemsize) {
          pending.push_back(dir_name + "/" + f->name);
          continue;
        }
        auto snap = f->data.Snapshot();
        if (!snap) return snap.error();
        a.bytes = std::move(*snap);
        // The name it has in the new tree: it keeps the file's inode there
        // once the file is closed (a later store of it supersedes).
        adds.push_back(std::move(a));
      }
    }
  }
  // Tree tensors given another dtype or shape: their bytes as they are now
  // (staged over stored), into a spill buffer each.
  std::vector<std::unique_ptr<SpillBytes>> retyped_bytes;
  std::vector<uint64_t> retyped_done;
  {
    std::map<uint64_t, TensorWrites::Retype> retyped;
    {
      std::lock_guard<std::mutex> lock(tensor_writes.mu);
      retyped = tensor_writes.retyped;
    }
    for (const auto& [ino, r] : retyped) {
      const tree::Node* n = t->nodes.Get(ino);
      if (!n || !n->tensor || !o.tensor_dirs.count(n->parent)) continue;
      const tree::Node* d = t->nodes.Get(n->parent);
      std::string name;
      for (const auto& [child, child_ino] : d->children) {
        if (child_ino == ino) name = child;
      }
      std::string key = n->tensor->key;
      {
        std::lock_guard<std::mutex> lock(o.mu);
        if (o.removed.count(std::make_pair(n->parent, name))) {
          key.clear();  // deleted, unless renamed:
          for (const auto& [k, alias] : o.renamed) {
            if (alias == ino) key = checkpoint::UnescapeKey(k.second);
          }
        }
      }
      if (key.empty()) continue;
      std::shared_ptr<StagedTensor> staged;
      {
        std::lock_guard<std::mutex> lock(tensor_writes.mu);
        if (auto it = tensor_writes.staged.find(ino); it != tensor_writes.staged.end()) {
          staged = it->second;
        }
      }
      const uint64_t have = staged ? staged->edit.size() : n->tensor->nbytes();
      if (have != r.nbytes()) {
        spdlog::error("not stored: tensor {} as {} {}: that is {} bytes, its file has {} (write or "
                      "truncate it to that size)",
                      key, torch::Info(r.dtype).name, checkpoint::ShapeString(r.shape), r.nbytes(),
                      have);
        continue;
      }
      auto buf = std::make_unique<SpillBytes>(o.spill);
      constexpr uint64_t kWindow = 8 << 20;
      std::string chunk;
      for (uint64_t at = 0; at < have; at += kWindow) {
        const uint64_t len = std::min(kWindow, have - at);
        std::vector<tree::StagedEdit::Piece> pieces;
        if (staged) {
          std::lock_guard<std::mutex> lock(tensor_writes.mu);
          NEMOFS_ASSIGN_OR_RETURN(pieces, staged->edit.Pieces(at, len));
        } else {
          pieces.push_back({tree::StagedEdit::Piece::kBase, at, len, nullptr});
        }
        uint64_t pos = at;
        for (const auto& p : pieces) {
          if (p.kind == tree::StagedEdit::Piece::kStaged) {
            NEMOFS_RETURN_IF_ERROR(buf->Write(pos, std::string_view(p.bytes->data(), p.length)));
          } else if (p.kind == tree::StagedEdit::Piece::kBase) {
            NEMOFS_ASSIGN_OR_RETURN(ReadPlan plan, checkpoint::PlanTensorRead(
                                                       *n->tensor, *t->src, p.offset, p.length));
            chunk.resize(p.length);
            NEMOFS_RETURN_IF_ERROR(ExecuteReadPlan(plan, chunk.data()));
            NEMOFS_RETURN_IF_ERROR(buf->Write(pos, chunk));
          } else {
            NEMOFS_RETURN_IF_ERROR(buf->Resize(std::max(buf->size(), pos + p.length)));
          }
          pos += p.length;
        }
      }
      NEMOFS_RETURN_IF_ERROR(buf->Resize(have));
      NewOne a;
      a.key = key;
      a.optimizer = false;
      for (const auto& [rn, rino] : t->nodes.Get(t->root)->children) {
        if (rino == n->parent) a.optimizer = rn == "optimizer";
      }
      a.dtype = r.dtype;
      a.shape = r.shape;
      NEMOFS_ASSIGN_OR_RETURN(a.bytes, buf->Snapshot());
      retyped_bytes.push_back(std::move(buf));
      retyped_done.push_back(ino);
      adds.push_back(std::move(a));
    }
  }
  for (const auto& p : pending) {
    spdlog::warn("not stored: {} (a new tensor file without user.nemofs.dtype and "
                 "user.nemofs.shape matching its size; write it as KEY.npy, or set them)",
                 p);
  }
  if (adds.empty() && gone.empty()) return Ok();

  source::Source& src = *t->src;
  std::vector<std::unique_ptr<RepackJob>> jobs;
  std::vector<SpillBytes::View> slice_bytes;  // per-rank slices copied out
  std::string summary;
  auto note = [&](const std::string& what) { summary += (summary.empty() ? "" : ", ") + what; };
  std::string shown;
  std::string how = o.committer->Describe();
  uint64_t written = 0;
  Status st = Ok();
  if (t->dcp) {
    // A distributed checkpoint: new items in a new .distcp, a new
    // .metadata renamed over (its one commit point, dist/dcp_writer.h).
    how = "new .distcp file and .metadata rename";
    std::vector<dist::DcpEdit> edits;
    std::set<std::pair<bool, std::string>> replaced;
    for (const auto& a : adds) replaced.emplace(a.optimizer, a.key);
    for (const auto& g : gone) {
      if (replaced.count({g.optimizer, g.key}) && g.new_key.empty()) continue;
      edits.push_back(g.new_key.empty() ? dist::DcpEdit::Remove(g.key)
                                        : dist::DcpEdit::Rename(g.key, g.new_key));
      note(g.new_key.empty() ? "deleted " + g.key : "renamed " + g.key + " to " + g.new_key);
    }
    for (const auto& a : adds) {
      torch::NewTensor nt;
      nt.dtype = a.dtype;
      nt.shape = a.shape;
      nt.bytes = a.bytes.bytes;
      edits.push_back(dist::DcpEdit::SetTensor(a.key, std::move(nt)));
      note("set " + a.key);
    }
    if (src.storage() == source::Storage::kFolder) {
      // Beneath the folder the source was opened as (not its path again).
      NEMOFS_ASSIGN_OR_RETURN(UniqueFd dir,
                              OpenFolderBeneath(src.folder_fd(), src.path(), t->dcp_dir));
      shown = t->dcp_dir.empty() ? src.path() : src.path() + "/" + t->dcp_dir;
      auto loaded = dist::LoadDcpMetadata(dir.get(), shown);
      if (!loaded.ok()) {
        st = loaded.error();
      } else {
        auto done = dist::CommitDcpEdits(dir.get(), shown, *loaded, edits);
        if (done.ok()) {
          written = done->bytes_written;
          for (const auto& n : done->notes) spdlog::info("{}: {}", shown, n);
        } else {
          st = done.error();
        }
      }
    } else {
      // Inside a .nemo archive: the new .distcp and the new .metadata are
      // stored as two members in one commit of the archive (one append, the
      // second superseding the old .metadata, or one rewrite).
      how = o.committer->Describe() + " of a new .distcp and .metadata";
      shown = src.path() + ":" + (t->dcp_dir.empty() ? "." : t->dcp_dir);
      st = StoreDcpInArchive(*t, edits, shown, &written);
    }
  } else if (t->zarr && src.storage() != source::Storage::kFolder) {
    // A zarr inside a .nemo: members cannot be deleted by appending, so
    // the archive is rewritten (atomic replace, progress) without the
    // deleted and renamed arrays' members and with the new ones.
    how = fmt::format("rewrite of the {} (zarr arrays: a tar cannot delete members by appending)",
                      src.storage() == source::Storage::kPlainTar ? "plain tar" : "archive");
    shown = src.path();
    const std::string prefix = t->zarr_dir.empty() ? "" : t->zarr_dir + "/";
    st = [&]() -> Status {
      std::vector<write::ConfigCommitter::NewFile> files;
      std::vector<std::string> drop;
      std::deque<std::string> texts;  // the new .zarray texts
      std::vector<std::unique_ptr<MappedRange>> maps;  // renamed arrays' member bytes
      auto add_file = [&](const std::string& path, std::string_view data, uint32_t mode) {
        files.push_back(StoredFile(path, data, mode, false));
      };
      std::set<std::pair<bool, std::string>> replaced;
      for (const auto& a : adds) replaced.emplace(a.optimizer, a.key);
      for (const auto& g : gone) {
        if (replaced.count({g.optimizer, g.key}) && g.new_key.empty()) continue;
        drop.push_back(prefix + g.key);
        if (g.new_key.empty()) {
          note("deleted " + g.key);
          continue;
        }
        // The array's members again under the new key, their bytes read
        // where they are stored (mapped, not copied).
        const std::string from = prefix + g.key + "/";
        for (const auto& e : src.entries()) {
          if (e.type != source::EntryType::kFile || e.path.rfind(from, 0) != 0) continue;
          NEMOFS_ASSIGN_OR_RETURN(source::FileRange r, src.Locate(e.blob));
          auto m = std::make_unique<MappedRange>();
          NEMOFS_RETURN_IF_ERROR(m->Map(r, src.path() + ":" + e.path));
          add_file(prefix + g.new_key + "/" + e.path.substr(from.size()), m->bytes(), e.mode & 07777);
          maps.push_back(std::move(m));
        }
        note("renamed " + g.key + " to " + g.new_key);
      }
      for (const auto& a : adds) {
        drop.push_back(prefix + a.key);  // an array there now is replaced whole
        texts.emplace_back();
        NEMOFS_ASSIGN_OR_RETURN(auto array,
                                checkpoint::ZarrArrayFiles(shown + ":" + prefix + a.key, a.dtype,
                                                           a.shape, a.bytes.bytes, &texts.back()));
        for (const auto& [name, data] : array) add_file(prefix + a.key + "/" + name, data, 0644);
        note("set " + a.key);
      }
      for (const auto& f : files) written += f.data.size();  // and every other member again
      return o.committer->RewriteArchive(files, drop, ProgressLogger(src.path()));
    }();
  } else if (t->zarr) {
    // A zarr folder: each new tensor a new array folder, deleted ones
    // moved out, renamed ones moved, all under one roll-forward journal
    // (write/folder_txn.h).
    how = "zarr arrays staged and moved in by one journal";
    shown = src.path();
    const std::string prefix = t->zarr_dir.empty() ? "" : t->zarr_dir + "/";
    st = [&]() -> Status {
      // The folder the source was opened as (O_PATH: reopened readable, to fsync).
      NEMOFS_ASSIGN_OR_RETURN(UniqueFd root, OpenFolderBeneath(src.folder_fd(), src.path(), ""));
      NEMOFS_ASSIGN_OR_RETURN(auto txn, write::FolderTransaction::Begin(root.get(), src.path()));
      // New arrays belong to whoever owns the checkpoint folder (a root
      // mount writing into a user's folder), as new .distcp files do.
      NEMOFS_ASSIGN_OR_RETURN(struct stat root_st, FStat(root.get(), src.path()));
      const auto owner = std::make_optional(std::make_pair(root_st.st_uid, root_st.st_gid));
      std::set<std::pair<bool, std::string>> replaced;
      for (const auto& a : adds) replaced.emplace(a.optimizer, a.key);
      for (const auto& g : gone) {
        if (replaced.count({g.optimizer, g.key}) && g.new_key.empty()) continue;
        if (g.new_key.empty()) {
          NEMOFS_RETURN_IF_ERROR(txn->Remove(prefix + g.key));
          note("deleted " + g.key);
        } else {
          NEMOFS_RETURN_IF_ERROR(txn->Move(prefix + g.key, prefix + g.new_key));
          note("renamed " + g.key + " to " + g.new_key);
        }
      }
      for (const auto& a : adds) {
        NEMOFS_ASSIGN_OR_RETURN(UniqueFd dir, txn->NewFolder(prefix + a.key));
        NEMOFS_RETURN_IF_ERROR(checkpoint::WriteZarrArray(dir.get(), shown + "/" + prefix + a.key,
                                                          a.dtype, a.shape, a.bytes.bytes, owner));
        written += a.bytes.bytes.size();
        const auto& list = a.optimizer ? t->catalog.optimizer : t->catalog.tensors;
        const bool had = std::any_of(list.begin(), list.end(),
                                     [&](const checkpoint::Tensor& x) { return x.key == a.key; });
        note((had ? "replaced " : "added ") + a.key);
      }
      NEMOFS_RETURN_IF_ERROR(txn->Commit());
      return Ok();
    }();
  } else {
    // The weight files, parsed again (metadata only), and their edits: the
    // one weight file, or the rank files a per-rank change splits back to.
    auto job_of = [&](const std::string& path) -> Result<RepackJob*> {
      for (auto& j : jobs) {
        if (j->path == path) return j.get();
      }
      auto j = std::make_unique<RepackJob>();
      j->path = path;
      j->entry = src.Find(path);
      if (!j->entry) return Err(EIO, "{}: weight file {} vanished", options.source, path);
      j->name = src.storage() == source::Storage::kFile ? src.path() : src.path() + ":" + path;
      NEMOFS_ASSIGN_OR_RETURN(j->range, src.Locate(j->entry->blob));
      j->reader = std::make_unique<FdReader>(j->range.fd, j->range.offset, j->range.length);
      NEMOFS_ASSIGN_OR_RETURN(j->file, torch::LoadTorchFile(*j->reader, j->name));
      jobs.push_back(std::move(j));
      return jobs.back().get();
    };
    std::set<std::pair<bool, std::string>> replaced;  // keys a new tensor takes over
    for (const auto& a : adds) replaced.emplace(a.optimizer, a.key);
    if (t->rank_files.empty()) {
      NEMOFS_ASSIGN_OR_RETURN(RepackJob * j, job_of(t->structural_file));
      for (const auto& g : gone) {
        if (replaced.count({g.optimizer, g.key}) && g.new_key.empty()) continue;  // set in place
        NEMOFS_RETURN_IF_ERROR(AddGoneEdit(*j, g.optimizer, g.key, g.new_key));
        note((g.new_key.empty() ? "deleted " : "renamed " + g.key + " to ") +
             (g.new_key.empty() ? g.key : g.new_key));
      }
      for (const auto& a : adds) {
        NEMOFS_ASSIGN_OR_RETURN(bool existed, AddSetEdit(*j, a.optimizer, a.key, a.dtype, a.shape,
                                                         a.bytes.bytes));
        note((existed ? "replaced " : "added ") + a.key);
      }
    } else {
      const checkpoint::MergeConfig& cfg = *t->catalog.merge;
      const RankKeys rank_keys(*t);
      auto file_of = [&](int tp, int pp) -> const checkpoint::WeightFile* {
        for (const auto& w : t->rank_files) {
          if (w.tp == tp && w.pp == pp) return &w;
        }
        return nullptr;
      };
      for (const auto& g : gone) {
        if (replaced.count({g.optimizer, g.key}) && g.new_key.empty()) continue;
        NEMOFS_ASSIGN_OR_RETURN(auto local, checkpoint::RankKeyOf(g.key, cfg));
        std::string new_local;
        if (!g.new_key.empty()) {
          NEMOFS_ASSIGN_OR_RETURN(auto to, checkpoint::RankKeyOf(g.new_key, cfg));
          new_local = to.first;
        }
        int files = 0;
        for (const auto& w : t->rank_files) {
          if (local.second >= 0 && w.pp != local.second) continue;
          if (!rank_keys.Holds(w, local.first)) continue;
          NEMOFS_ASSIGN_OR_RETURN(RepackJob * j, job_of(w.path));
          NEMOFS_RETURN_IF_ERROR(AddGoneEdit(*j, false, local.first, new_local));
          ++files;
        }
        note((g.new_key.empty() ? "deleted " + g.key : "renamed " + g.key + " to " + g.new_key) +
             fmt::format(" ({} rank files)", files));
      }
      for (const auto& a : adds) {
        NEMOFS_ASSIGN_OR_RETURN(auto local, checkpoint::RankKeyOf(a.key, cfg));
        const std::vector<int> stages = rank_keys.Stages(local.first);
        NEMOFS_ASSIGN_OR_RETURN(auto slices, checkpoint::SplitForRanks(a.key, a.shape, cfg, stages));
        bool existed = false;
        for (const auto& sl : slices) {
          const checkpoint::WeightFile* w = file_of(sl.tp, sl.pp);
          if (!w) {
            return Err(EIO, "{}: no rank file for TP rank {} of PP stage {}", options.source, sl.tp,
                       sl.pp);
          }
          NEMOFS_ASSIGN_OR_RETURN(std::string_view part,
                                  SliceBytes(a.bytes.bytes, a.shape, a.dtype, sl, o.spill,
                                             &slice_bytes));
          NEMOFS_ASSIGN_OR_RETURN(RepackJob * j, job_of(w->path));
          NEMOFS_ASSIGN_OR_RETURN(bool had, AddSetEdit(*j, false, sl.key, a.dtype, sl.shape, part));
          existed |= had;
        }
        note(fmt::format("{}{} ({} rank files)", existed ? "replaced " : "added ", a.key,
                         slices.size()));
      }
    }

    // The new files, then their store: the one commit point of the kind. A
    // plain tar takes them written in place after its last member (once);
    // other kinds from temp files.
    const bool in_place = o.committer->StreamsNewFiles();
    if (!in_place) {
      for (auto& j : jobs) {
        NEMOFS_RETURN_IF_ERROR(j->out.Create(o.spill->dir));
        torch::TorchSource from{*j->reader, j->range.fd, j->range.offset};
        NEMOFS_ASSIGN_OR_RETURN(j->packed,
                                torch::RepackTorchFile(j->file, from, j->edits, j->out.fd(), 0, j->name));
        NEMOFS_ASSIGN_OR_RETURN(j->bytes, j->out.Map(j->packed.bytes));
      }
    }
    shown = jobs.size() == 1 ? jobs[0]->name
                                               : fmt::format("{} ({} rank files)", src.path(), jobs.size());
    auto progress = ProgressLogger(jobs.size() == 1 ? jobs[0]->path : src.path());
    if (src.storage() == source::Storage::kFile) {
      st = o.committer->ReplaceSingleFile(jobs[0]->bytes, progress);
    } else if (src.storage() == source::Storage::kFolder && !t->rank_files.empty()) {
      // An extracted per-rank folder: every changed rank file is replaced
      // under one roll-forward journal (write/folder_txn.h), its one commit
      // point, not renamed over one by one.
      how = "rank files replaced under one journal";
      st = [&]() -> Status {
        // The folder the source was opened as (O_PATH: reopened readable, to fsync).
        NEMOFS_ASSIGN_OR_RETURN(UniqueFd root, OpenFolderBeneath(src.folder_fd(), src.path(), ""));
        NEMOFS_ASSIGN_OR_RETURN(auto txn, write::FolderTransaction::Begin(root.get(), src.path()));
        for (const auto& j : jobs) {
          NEMOFS_RETURN_IF_ERROR(txn->NewFile(j->path, j->bytes, j->entry->mode & 07777,
                                              std::make_pair(j->entry->uid, j->entry->gid)));
        }
        return txn->Commit();
      }();
    } else {
      std::vector<write::ConfigCommitter::NewFile> files;
      for (auto& jp : jobs) {
        RepackJob* j = jp.get();
        // It replaces the weight file.
        write::ConfigCommitter::NewFile f = StoredFile(j->path, j->bytes, j->entry->mode, true);
        if (in_place) {
          f.writer = [j](int fd, uint64_t offset) -> Result<uint64_t> {
            torch::TorchSource from{*j->reader, j->range.fd, j->range.offset};
            NEMOFS_ASSIGN_OR_RETURN(j->packed,
                                    torch::RepackTorchFile(j->file, from, j->edits, fd, offset, j->name));
            return j->packed.bytes;
          };
        }
        files.push_back(std::move(f));
      }
      st = o.committer->StoreFiles(files, progress);
    }
    for (const auto& j : jobs) {
      written += j->packed.bytes;
      for (const auto& n : j->packed.notes) spdlog::info("{}: {}", j->name, n);
    }
  }
  if (!st.ok()) {
    spdlog::error("{}: structural changes not stored ({}): {}; the checkpoint is unchanged and "
                  "they stay staged in this mount",
                  shown, summary, st.error().message());
    return Err(st.error().code(), "{}: the tensor changes ({}) could not be stored: {}", shown,
               summary, st.error().message());
  }
  {
    std::lock_guard<std::mutex> lock(o.mu);
    for (const auto& a : adds) {
      if (!a.file) continue;  // a retyped tree tensor
      a.file->stored = true;
      a.file->stored_version = std::max(a.file->stored_version, a.version);
    }
    for (const auto& k : removed_done) o.removed.erase(k);
    for (const auto& [k, ino] : renamed_done) {
      if (auto it = o.renamed.find(k); it != o.renamed.end() && it->second == ino) o.renamed.erase(it);
    }
  }
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    for (uint64_t ino : retyped_done) {
      tensor_writes.retyped.erase(ino);
      auto it = tensor_writes.staged.find(ino);
      if (it != tensor_writes.staged.end() && it->second->handles == 0) {
        tensor_writes.staged.erase(it);
        tensor_writes.staged_count.store(tensor_writes.staged.size());
      }
    }
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("stored tensor changes in {} ({}, {}): {} ({:.1f} MiB written) in {:.1f} ms", shown,
               how, why, summary, static_cast<double>(written) / (1 << 20), ms);
  if (Status reloaded = Reload("tensor changes stored", carry); !reloaded.ok()) {
    spdlog::error("{}: stored, but this mount cannot read it again: {}; remount to see it", shown,
                  reloaded.error().message());
    for (const auto& j : jobs) {
      t->MarkStale(j->entry->blob, "its weight file was repacked and this mount could not read it "
                                   "again; remount");
    }
  }
  return Ok();
}

}  // namespace nemofs
