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

#include <chrono>
#include <cstring>
#include <map>
#include <set>

#include "checkpoint/catalog.h"
#include "checkpoint/npy.h"
#include "checkpoint/tensor.h"
#include "torch/torch_file.h"
#include "torch/torch_repack.h"
#include "tree/filesystem_impl.h"
#include "util/fd.h"

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

}  // namespace

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

  // The weight file, parsed again (metadata only), and the edits.
  source::Source& src = *t->src;
  const std::string& path = t->structural_file;
  const source::Entry* entry = src.Find(path);
  if (!entry) return Err(EIO, "{}: weight file {} vanished", options.source, path);
  const std::string name =
      src.storage() == source::Storage::kFile ? src.path() : src.path() + ":" + path;
  NEMOFS_ASSIGN_OR_RETURN(source::FileRange range, src.Locate(entry->blob));
  FdReader reader(range.fd, range.offset, range.length);
  NEMOFS_ASSIGN_OR_RETURN(torch::TorchFile file, torch::LoadTorchFile(reader, name));
  std::vector<torch::TorchEdit> edits;
  std::set<std::pair<bool, std::string>> replaced;  // keys a new tensor takes over
  for (const auto& a : adds) replaced.emplace(a.optimizer, a.key);
  std::string summary;
  auto note = [&](const std::string& what) { summary += (summary.empty() ? "" : ", ") + what; };
  for (const auto& g : gone) {
    if (replaced.count({g.optimizer, g.key}) && g.new_key.empty()) continue;  // set in place
    NEMOFS_ASSIGN_OR_RETURN(checkpoint::TensorPlace at,
                            checkpoint::LocateTensorKey(file, g.optimizer, g.key, name));
    if (g.new_key.empty()) {
      edits.push_back(torch::TorchEdit::Remove(at.dict, at.key));
      note("deleted " + g.key);
      continue;
    }
    // The entry keeps its place; only its own part of the dotted key can
    // change (the dict it is in stays).
    std::string entry_name = g.new_key;
    if (!at.prefix.empty()) {
      if (g.new_key.rfind(at.prefix + ".", 0) != 0) {
        return Err(EINVAL, "{}: tensor {} cannot become {}: a rename changes only the part of the "
                   "key after {}",
                   name, g.key, g.new_key, at.prefix);
      }
      entry_name = g.new_key.substr(at.prefix.size() + 1);
    }
    edits.push_back(torch::TorchEdit::Rename(at.dict, at.key, entry_name));
    note("renamed " + g.key + " to " + g.new_key);
  }
  for (const auto& a : adds) {
    NEMOFS_ASSIGN_OR_RETURN(checkpoint::TensorPlace at,
                            checkpoint::LocateTensorKey(file, a.optimizer, a.key, name));
    torch::NewTensor nt;
    nt.dtype = a.dtype;
    nt.shape = a.shape;
    nt.bytes = a.bytes.bytes;
    std::string entry_name = a.key;
    if (at.key && !at.prefix.empty()) entry_name = a.key.substr(at.prefix.size() + 1);
    edits.push_back(torch::TorchEdit::SetTensor(at.dict, entry_name, std::move(nt)));
    note((at.key ? "replaced " : "added ") + a.key);
  }

  // The new file, then its store: the one commit point of the kind. A
  // plain tar takes it written in place after its last member (once);
  // other kinds from a temp file.
  RepackOutput out;
  torch::TorchSource from{reader, range.fd, range.offset};
  torch::RepackResult packed;
  std::string_view bytes;
  const bool in_place = o.committer->StreamsNewFiles();
  if (!in_place) {
    NEMOFS_RETURN_IF_ERROR(out.Create(o.spill->dir));
    NEMOFS_ASSIGN_OR_RETURN(packed, torch::RepackTorchFile(file, from, edits, out.fd(), 0, name));
    NEMOFS_ASSIGN_OR_RETURN(bytes, out.Map(packed.bytes));
  }
  auto progress = ProgressLogger(path);
  Status st = Ok();
  if (src.storage() == source::Storage::kFile) {
    st = o.committer->ReplaceSingleFile(bytes, progress);
  } else {
    struct timespec now {};
    ::clock_gettime(CLOCK_REALTIME, &now);
    write::ConfigCommitter::NewFile f;
    f.path = path;
    f.data = bytes;
    f.mode = entry->mode & 07777;
    f.mtime_sec = now.tv_sec;
    f.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
    f.stored_before = true;  // it replaces the weight file
    if (in_place) {
      f.writer = [&](int fd, uint64_t offset) -> Result<uint64_t> {
        NEMOFS_ASSIGN_OR_RETURN(packed, torch::RepackTorchFile(file, from, edits, fd, offset, name));
        return packed.bytes;
      };
    }
    st = o.committer->StoreFiles({f}, progress);
  }
  for (const auto& n : packed.notes) spdlog::info("{}: {}", name, n);
  if (!st.ok()) {
    spdlog::error("{}: structural changes not stored ({}): {}; the checkpoint is unchanged and "
                  "they stay staged in this mount",
                  name, summary, st.error().message());
    return Err(st.error().code(), "{}: the tensor changes ({}) could not be stored: {}", name,
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
  spdlog::info("stored tensor changes in {} ({}, {}): {} ({:.1f} MiB written) in {:.1f} ms", name,
               o.committer->Describe(), why, summary, static_cast<double>(packed.bytes) / (1 << 20),
               ms);
  if (Status reloaded = Reload("tensor changes stored", carry); !reloaded.ok()) {
    spdlog::error("{}: stored, but this mount cannot read it again: {}; remount to see it", name,
                  reloaded.error().message());
    for (uint32_t b : {entry->blob}) {
      t->MarkStale(b, "its weight file was repacked and this mount could not read it again; "
                      "remount");
    }
  }
  return Ok();
}

}  // namespace nemofs
