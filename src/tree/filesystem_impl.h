// Filesystem::Impl: what filesystem.cc (the immutable tree) and writes.cc
// (the config edit and scratch files) share.
#pragma once

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <atomic>
#include <functional>
#include <set>
#include <shared_mutex>
#include <vector>
#include <string>
#include <utility>

#include <spdlog/spdlog.h>

#include "checkpoint/catalog.h"
#include "torch/dtype.h"
#include "nemofs/filesystem.h"
#include "source/source.h"
#include "tree/node_table.h"
#include "tree/staged_edit.h"
#include "util/spill.h"
#include "write/config_commit.h"

namespace nemofs::dist {
struct DcpEdit;
}  // namespace nemofs::dist

namespace nemofs {

// model.safetensors, synthesized: an 8-byte little-endian header length,
// the JSON header (padded with spaces to a multiple of 8), then the C-order
// bytes of every tensor in header order.
struct Safetensors {
  std::shared_ptr<const std::string> head;  // length prefix + header
  struct Segment {
    uint64_t start;
    const checkpoint::Tensor* tensor;
  };
  std::vector<Segment> segments;
  uint64_t size = 0;
};

// A file created next to the config: staged (memory, or a spill file past
// a few MiB: util/spill.h) until it is stored in the checkpoint (at fsync
// or unmount); editors' temp files never are.
struct Tree;

struct ScratchFile {
  explicit ScratchFile(std::shared_ptr<SpillPool> pool) : data(std::move(pool)) {}
  uint64_t ino = 0;
  uint64_t parent = 0;
  std::string name;
  SpillBytes data;
  uint32_t mode = 0644;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
  bool linked = true;  // false once unlinked or renamed over the config
  int handles = 0;
  // Storing in the checkpoint (issue 16 §5): `version` counts changes,
  // `stored_version` is the one last stored; `stored` once any was.
  uint64_t version = 1;
  uint64_t stored_version = 0;
  bool stored = false;
  // Non-empty: this is not a new file but a stored member or folder file
  // being replaced (issue 10 §5: a tokenizer/ or archive/ file written),
  // at that path; `ino` is the member's own node, and it is in no
  // directory's scratch names (the tree links it).
  std::string member;
  size_t stored_digest = 0;  // of what was stored (data, mode, mtime): equal = nothing to do
  // In a tensor directory (issue 11): a new tensor file, stored by the
  // next structural commit (Impl::StoreStructure) as tensor `name`
  // (unescaped). Its dtype and shape come from the user.nemofs.* xattrs
  // (raw bytes) or, for "KEY.npy", from the header: at the last close such
  // a file becomes the raw tensor file KEY (ConvertNpyLocked).
  bool tensor = false;
  // model.safetensors written whole (issue 11 §4): at its close, parsed
  // and applied as the tensor changes it implies (Impl::ApplySafetensors).
  bool safetensors = false;
  std::optional<torch::DType> dtype;
  std::optional<std::vector<int64_t>> shape;
  // Set by a failed write into it (EFBIG, ENOSPC): its content is not what
  // was meant, so it is not stored (fsync fails, unmount names it) until it
  // is rewritten from scratch (an O_TRUNC open or a truncate to 0 clears it).
  std::optional<Error> write_failed;
};

struct OpenHandle {
  uint64_t ino = 0;
  bool writer = false;
  std::shared_ptr<const std::string> snapshot;  // config, opened for reading
  std::shared_ptr<ScratchFile> scratch;
  // Set by a failed write (or ftruncate) on this handle: its flush and
  // fsync then commit nothing and return this error (issue 16 §4).
  std::optional<Error> failed;
  // The config: this handle wrote into (or ftruncated) the shared edit. Only
  // such a handle's close/fsync saves the edit; any other one (touch's
  // O_WRONLY|O_CREAT open, a reader) stores at most a staged time.
  bool wrote = false;
  // The processes (thread group ids) that wrote through it; empty = unknown.
  std::set<int> writer_tgids;
};

// Mutable state of a writable Filesystem (writes.cc). `mu` guards all of it
// except `committer`, which `commit_mu` serialises.
struct Overlay {
  bool writable = false;
  uint64_t config_ino = 0;
  std::string config_name;  // for messages: "config.yaml (model_config.yaml in X)"
  std::set<uint64_t> scratch_dirs;
  // Where a new file of each scratch directory is stored: the member path
  // prefix ("" = the checkpoint's top level, "context/").
  std::map<uint64_t, std::string> store_prefix;
  std::string cache_dir;  // a failed store leaves the files under <cache_dir>/unsaved/
  // Where staged bytes go past a few MiB: unlinked files under
  // <cache_dir>/spill (util/spill.h).
  std::shared_ptr<SpillPool> spill = std::make_shared<SpillPool>();
  std::set<std::pair<uint64_t, std::string>> config_names;  // (directory, name)
  std::unique_ptr<write::ConfigCommitter> committer;
  std::mutex commit_mu;

  mutable std::mutex mu;
  std::shared_ptr<const std::string> committed;  // the config text as committed
  // The edit of the open writing handles (tree/staged_edit.h): what they
  // wrote, as extents over `edit_base` (the text committed when the edit
  // began, or after its last commit).
  bool editing = false;                          // a writing handle holds `edit`
  bool dirty = false;                            // the edit differs from `committed`
  uint64_t generation = 0;                       // bumped by every change of the edit
  std::unique_ptr<tree::StagedEdit> edit;
  std::shared_ptr<const std::string> edit_base;
  int writers = 0;
  // mtime of config.yaml: of the edit while one is open, else of the last
  // commit (unset: the source's).
  bool mtime_set = false;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
  bool commit_mtime_set = false;
  int64_t commit_mtime_sec = 0;
  uint32_t commit_mtime_nsec = 0;
  // A time set on the config (touch -d) and not written into the source
  // yet: the next config commit writes it (a change of the text after it
  // drops it: that save's own time wins). A time alone is committed at the
  // next close or fsync of a config handle, or at unmount.
  bool mtime_staged = false;
  int64_t staged_mtime_sec = 0;
  uint32_t staged_mtime_nsec = 0;
  // Structural writes (issue 11) in the directories of tensor files
  // (tensors/, optimizer/) of a source with one torch.save weight file:
  // new tensors are scratch files there (ScratchFile::tensor); a deleted
  // tree tensor is a hidden name (`removed`), a renamed one a hidden name
  // and a new one for its inode (`renamed`). Shown at once; stored by the
  // next structural commit (fsync of a tensor file, unmount).
  std::set<uint64_t> tensor_dirs;
  // npy/ of such a source, and the tensors/ it shows (KEY.npy for KEY):
  // its listing follows tensors/ (committed tensors only; rm and mv in it
  // are those of tensors/, a new KEY.npy goes to tensors/).
  uint64_t npy_dir = 0;
  uint64_t npy_tensors = 0;
  std::set<std::pair<uint64_t, std::string>, std::less<>> removed;
  std::map<std::pair<uint64_t, std::string>, uint64_t, std::less<>> renamed;
  std::map<uint64_t, std::shared_ptr<ScratchFile>> scratch;        // by inode
  std::map<std::pair<uint64_t, std::string>, uint64_t, std::less<>> scratch_names;
  uint64_t next_ino = 0;
  std::map<uint64_t, OpenHandle> handles;
  uint64_t next_fh = 1;
};

// A tensor file opened for writing (issue 10): its staged bytes as sparse
// extents over the stored content, shared by its writing handles, until a
// commit (fsync, close, the last release) patches them into the source.
struct StagedTensor {
  StagedTensor(std::shared_ptr<SpillPool> pool, std::shared_ptr<const Tree> in,
               const checkpoint::Tensor* t)
      : tree(std::move(in)), tensor(t), edit(std::move(pool), t->nbytes()) {}
  // The tree whose catalog `tensor` is in (Impl::Reload moves it to the next).
  std::shared_ptr<const Tree> tree;
  const checkpoint::Tensor* tensor = nullptr;
  tree::StagedEdit edit;  // over the stored bytes
  bool dirty = false;       // differs from what is stored
  uint64_t generation = 0;  // bumped by every change
  int handles = 0;
  int64_t mtime_sec = 0;  // of the last change
  uint32_t mtime_nsec = 0;
};

struct TensorHandle {
  uint64_t ino = 0;
  bool wrote = false;  // this handle's close commits
  std::optional<Error> failed;
};

// Writes of tensor files (tree/tensor_writes.cc). `mu` guards the maps;
// `patch_mu` is held exclusively while stored bytes are patched and shared
// by every read of stored bytes of a writable mount (through the read
// plan's life), so that a read sees a patch whole or not at all.
struct TensorWrites {
  mutable std::mutex mu;
  std::map<uint64_t, std::shared_ptr<StagedTensor>> staged;  // by inode
  std::map<uint64_t, TensorHandle> handles;                  // by fh
  uint64_t next_fh = uint64_t{1} << 62;  // apart from the overlay's handles
  std::atomic<size_t> staged_count{0};   // staged.size(), read without `mu`
  // A tree tensor given another dtype or shape (user.nemofs.* set on it,
  // issue 11): what it is to become; its bytes are the staged ones (or the
  // stored ones, for a reshape of the same size), stored by the next
  // structural commit. By inode.
  struct Retype {
    torch::DType dtype;
    std::vector<int64_t> shape;
    uint64_t nbytes() const;
  };
  std::map<uint64_t, Retype> retyped;
  mutable std::shared_mutex patch_mu;
};

// The tree as built from the source at one moment (DESIGN.md §2): the
// source, its catalog, the node table and what is derived from them.
// Immutable once published, except for its atomic and mutex-guarded
// members. A commit that changes what the checkpoint holds (a replaced
// weight file) builds the next one (Impl::Reload) and publishes it in its
// place, keeping the inode of every path that stays. Whoever uses one holds
// it (shared_ptr) for as long: a request from its start to its end, a read
// plan until its reply is sent, a staged tensor write while it points into
// its catalog.
struct Tree {
  uint64_t generation = 0;  // 0 as opened, +1 per reload
  std::unique_ptr<source::Source> src;
  checkpoint::Catalog catalog;  // tensors the nodes point into; never resized after build
  Safetensors safetensors;
  tree::NodeTable nodes;
  CheckpointInfo info;
  // Entry paths the catalog was read from (weight files, distributed
  // checkpoint files): replacing one of them makes a new tree.
  std::set<std::string, std::less<>> weight_paths;
  uint64_t root = 1;
  uint64_t archive = 0;
  uint64_t config_ino = 0;  // 0 without a config
  std::string config_path;
  // Tensors can be added, removed and renamed (issue 11): one torch.save
  // weight file (not per-rank, not a distributed checkpoint); its path.
  std::string structural_file;
  // Or a per-rank checkpoint (not expert-parallel, every rank file read):
  // its rank files, a change of a merged tensor split back to each by
  // catalog.merge's rules.
  std::vector<checkpoint::WeightFile> rank_files;
  // Which rank file holds which of its own keys: (rank folder "tp0_pp1",
  // key) of every model tensor of every rank, set with rank_files.
  std::set<std::pair<std::string, std::string>> rank_keys;
  // Or a PyTorch DCP / Megatron torch_dist folder (a folder source): its
  // folder, relative to the source's ("" = the source itself).
  bool dcp = false;
  std::string dcp_dir;
  // Or a Megatron-Core zarr folder (a folder source): its folder, as dcp_dir.
  // A change is arrays staged and moved in by one roll-forward journal
  // (write/folder_txn.h).
  bool zarr = false;
  std::string zarr_dir;
  bool structural() const {
    return !structural_file.empty() || !rank_files.empty() || dcp || zarr;
  }

  // Blobs whose stored bytes no longer match what the tree shows (a chunk
  // file re-encoded by a tensor write has another size; a copy that could
  // not be refreshed): the files reading them say ESTALE, with why, until
  // a remount.
  // `file_only`: only the blob's own file is stale (a re-encoded chunk:
  // its tensor reads the decoded copy, which has the new bytes).
  struct Stale {
    std::string why;
    bool file_only = false;
  };
  mutable std::mutex stale_mu;
  mutable std::map<uint32_t, Stale> stale;  // by blob
  mutable std::atomic<bool> any_stale{false};
  void MarkStale(uint32_t blob, std::string why, bool file_only = false) const {
    std::lock_guard<std::mutex> lock(stale_mu);
    auto [it, added] = stale.emplace(blob, Stale{why, file_only});
    if (!added && !file_only) it->second = Stale{std::move(why), false};
    any_stale.store(true);
  }
  // ESTALE naming `shown` if node `n` reads a stale blob.
  Status CheckStale(const tree::Node& n, std::string_view shown) const {
    if (!any_stale.load()) return Ok();
    std::lock_guard<std::mutex> lock(stale_mu);
    const std::string* w = nullptr;
    if (n.blob != source::kNoBlob) {
      if (auto it = stale.find(n.blob); it != stale.end()) w = &it->second.why;
    }
    if (n.tensor) {
      for (const auto& c : n.tensor->chunks) {
        auto it = stale.find(c.lazy ? c.lazy->blob() : c.blob);
        if (!w && it != stale.end() && !it->second.file_only) w = &it->second.why;
      }
    }
    if (!w) return Ok();
    return Err(ESTALE, "{}: {}", shown, *w);
  }
  // Every node (inode) whose bytes come from one of `blobs`.
  std::vector<uint64_t> NodesOfBlobs(const std::set<uint32_t>& blobs) const;
  Result<ReadPlan> ReadSafetensors(uint64_t offset, uint64_t size) const;
};
using TreeRef = std::shared_ptr<const Tree>;

struct Filesystem::Impl {
  FilesystemOptions options;
  // The current tree; Current() for a request's use.
  std::atomic<TreeRef> tree;
  TreeRef Current() const { return tree.load(std::memory_order_acquire); }
  Overlay overlay;
  TensorWrites tensor_writes;
  // Drops the kernel's cached pages and attributes of nodes (the FUSE
  // front end's; none elsewhere). Called without any lock held.
  std::function<void(const std::vector<uint64_t>&)> invalidate;
  // Drops the kernel's cached names (directory inode, name) of entries a
  // new tree no longer has.
  std::function<void(const std::vector<std::pair<uint64_t, std::string>>&)> invalidate_entries;

  // Builds the tree of the source as it is now (Open's work, without the
  // journal hook and the writes set-up).
  static Result<std::unique_ptr<Tree>> BuildTree(const FilesystemOptions& options);
  // After a commit that changed what the checkpoint holds (commit_mu
  // held): builds the tree again, gives every path that stays its inode,
  // publishes it, moves staged tensor writes over to it and invalidates
  // what the kernel cached of what changed. On failure the old tree stays
  // and what it shows of the changed files reads ESTALE.
  // `carry`: paths of the new tree ("tensors/k") to give these inodes
  // (names the overlay showed for them: a renamed tensor's).
  Status Reload(std::string_view why, const std::map<std::string, uint64_t>& carry = {});
  // Gives a built tree the write bits of a writable mount (the config, the
  // scratch directories, tensor files and replaceable stored files).
  void ApplyWritePerms(Tree& t) const;

  // Stored files written through the tree (tokenizer/, archive/): a node
  // once replaced is an overlay node (for the mount's life: a new tree
  // keeps its inode). Inodes here, read without a lock.
  mutable std::mutex replaced_mu;
  std::set<uint64_t> replaced;
  std::atomic<bool> any_replaced{false};
  bool IsReplaced(uint64_t ino) const {
    if (!any_replaced.load(std::memory_order_acquire)) return false;
    std::lock_guard<std::mutex> lock(replaced_mu);
    return replaced.count(ino) != 0;
  }
  // Makes stored file `ino` an overlay node holding its current bytes (none
  // with O_TRUNC), to be stored back like a new file, but at the close of
  // a descriptor that wrote (writes.cc). Ok and nothing done for nodes
  // that are not stored files (the caller's checks refuse them).
  Status StartReplace(uint64_t ino, int flags);

  // Logs a long commit's progress at every tenth: "saving WHAT: <how> N%".
  // `how` defaults to the committer's way of saving.
  std::function<void(uint64_t, uint64_t)> ProgressLogger(std::string what,
                                                         std::string how = "") const {
    auto last = std::make_shared<int>(-1);
    if (how.empty() && overlay.committer) how = overlay.committer->Describe();
    return [what = std::move(what), how = std::move(how), last](uint64_t done, uint64_t total) {
      int percent = total ? static_cast<int>(done * 100 / total) : 100;
      if (percent / 10 == *last / 10) return;
      *last = percent;
      spdlog::info("saving {}: {} {}% ({:.1f} of {:.1f} MiB)", what, how, percent,
                   static_cast<double>(done) / (1 << 20), static_cast<double>(total) / (1 << 20));
    };
  }

  // ---- writes.cc
  // For a writable Filesystem: sets up writes when the source can take
  // them, else logs why not and stays read-only.
  Status EnableWrites(Tree& t, const write::FileIdentity& identity);
  // Enables writes: config node `config_ino` (current text `text`), linked
  // as config.yaml in `root` and as `config_base` in `config_dir`.
  void SetUpWrites(Tree& t, std::unique_ptr<write::ConfigCommitter> committer, std::string text,
                   uint64_t root, uint64_t config_dir, const std::string& config_base,
                   uint64_t config_ino);
  // True for the nodes writes.cc answers for (the config, scratch files).
  // Scratch files have inodes no tree has (Overlay::next_ino).
  bool IsOverlayIno(const Tree& t, uint64_t ino) const {
    return overlay.writable &&
           (ino == overlay.config_ino || !t.nodes.Has(ino) || IsReplaced(ino));
  }
  Result<NodeAttr> OverlayAttr(const Tree& t, uint64_t ino) const;
  bool IsOverlayIno(uint64_t ino) const { return IsOverlayIno(*Current(), ino); }
  Result<NodeAttr> OverlayAttr(uint64_t ino) const { return OverlayAttr(*Current(), ino); }
  Result<NodeAttr> LookupScratch(uint64_t parent, std::string_view name) const;
  std::vector<std::pair<std::string, uint64_t>> ScratchChildren(uint64_t dir) const;
  Result<ReadPlan> ReadOverlay(uint64_t ino, uint64_t offset, uint64_t size, uint64_t fh) const;
  // Validates and commits `text`; `generation` is the edit generation it
  // came from (clears `dirty` if no write came in meanwhile), or 0.
  Status CommitConfig(const std::string& text, uint64_t generation, std::string_view why);
  // `generation` for a commit of the saved text with a staged time only.
  static constexpr uint64_t kTimeOnly = ~0ull;
  // Commits a staged config time alone (the saved text again), if one is.
  Status CommitStagedMtime(std::string_view why);
  // Stores the new files (all, or only inode `only`) that are not editors'
  // temp files and changed since their last store. On failure their content
  // is written under <cache_dir>/unsaved/ and the error names that folder.
  Status StoreNewFiles(uint64_t only, std::string_view why);

  // EEXIST when new file `name` of scratch directory `dir` would be stored
  // where a checkpoint file or another new file (not inode `ignore`) is or
  // will be. `overlay.mu` held.
  Status CheckStorePathLocked(uint64_t dir, std::string_view name, uint64_t ignore) const;

  // ---- writes.cc: structural writes (issue 11), the names
  void SetUpTensorDirs(Tree& t);
  // The inode shown as `name` in tensor directory `dir` (0: none).
  // `overlay.mu` held.
  uint64_t TensorDirChildLocked(const Tree& t, uint64_t dir, std::string_view name) const;
  Result<uint64_t> LookupTensorDir(uint64_t dir, std::string_view name) const;
  // What tensor directory `dir` shows, sorted by name.
  std::vector<std::pair<std::string, uint64_t>> TensorDirListing(uint64_t dir) const;
  std::vector<std::pair<std::string, uint64_t>> NpyListing() const;
  Result<uint64_t> LookupNpy(std::string_view name) const;
  // Takes `name` out of tensor directory `dir`. `overlay.mu` held.
  void RemoveTensorNameLocked(const Tree& t, uint64_t dir, const std::string& name);
  Status UnlinkTensor(uint64_t dir, std::string_view name);
  Status RenameTensor(uint64_t dir, std::string_view name, std::string_view new_name,
                      unsigned int flags);
  // A new tensor file's last close (or fsync): an .npy becomes the raw
  // tensor KEY; a raw file needs its dtype and shape. EINVAL (and, with
  // `remove_on_error`, the file removed) when it is no tensor. `overlay.mu` held.
  Status FinishNewTensorLocked(const std::shared_ptr<ScratchFile>& f, bool remove_on_error = true);
  // Whether the checkpoint can store tensor `key` of `shape` (new, reshaped,
  // or renamed from `old_key`), checked at the close, rename or setxattr
  // (structure.cc); EINVAL with the reason when not:
  // * per-rank: it cannot be split back to the rank files, or a rename
  //   would move it to other rank files or split it by another rule;
  // * zarr: the key cannot name an array folder (empty, '/', a leading '.');
  // * a distributed checkpoint (DCP, zarr), with the tensor directory `dir`
  //   it is created or renamed in: its keys are optimizer state by their
  //   "optimizer." prefix, so a key in optimizer/ without it (or one in
  //   tensors/ with it) would show in the other directory after the commit.
  Status CheckStoredKey(const Tree& t, const std::string& key, const std::vector<int64_t>& shape,
                        const std::string& old_key = "", uint64_t dir = 0) const;
  // user.nemofs.dtype / user.nemofs.shape of a new tensor file.
  Status SetTensorXattr(uint64_t ino, std::string_view name, std::string_view value);
  std::optional<std::string> NewTensorXattr(uint64_t ino, std::string_view name) const;
  std::optional<TensorWrites::Retype> RetypeOf(uint64_t ino) const {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    auto it = tensor_writes.retyped.find(ino);
    if (it == tensor_writes.retyped.end()) return std::nullopt;
    return it->second;
  }
  // model.safetensors opened for writing: staged like a replaced file.
  Status StartSafetensorsUpload(uint64_t ino, int flags);
  // Its last close: the changes it implies, staged and stored (EINVAL for
  // an invalid file: nothing changes). `overlay.mu` not held.
  Status ApplySafetensors(const std::shared_ptr<ScratchFile>& f);
  // ---- structure.cc: the structural commit
  // A DCP / torch_dist folder inside a .nemo archive: `edits` stored as a
  // new .distcp member and a new .metadata member in one commit.
  Status StoreDcpInArchive(const Tree& t, const std::vector<dist::DcpEdit>& edits,
                           const std::string& shown, uint64_t* written);
  // Stores the structural changes (new, deleted, renamed tensors) by
  // repacking the weight file, then reads the checkpoint again (Reload).
  Status StoreStructure(std::string_view why);

  // ---- tensor_writes.cc
  // A tensor file of a writable tree (tensors/, optimizer/, ranks/).
  bool IsTensorIno(const Tree& t, uint64_t ino) const {
    if (!overlay.writable) return false;
    const tree::Node* n = t.nodes.Get(ino);
    return n && n->tensor && !n->npy_header;  // npy/ files are read views
  }
  bool IsTensorIno(uint64_t ino) const { return IsTensorIno(*Current(), ino); }
  Result<OpenedFile> OpenTensor(uint64_t ino, int flags);
  Result<uint64_t> WriteTensor(uint64_t ino, uint64_t fh, uint64_t offset, std::string_view data);
  // The staged bytes, for a handle opened for writing; nullopt: read stored.
  std::optional<Result<ReadPlan>> ReadStagedTensor(uint64_t ino, uint64_t fh, uint64_t offset,
                                                   uint64_t size) const;
  Status FlushTensor(uint64_t ino, uint64_t fh, bool fsync);
  void ReleaseTensor(uint64_t ino, uint64_t fh);
  Result<NodeAttr> SetTensorAttr(uint64_t ino, uint64_t fh, const AttrChange& change);
  // The staged size and time of a tensor being written (else the node's).
  void StagedAttr(uint64_t ino, NodeAttr* attr) const;
  Status CommitTensor(uint64_t ino, std::string_view why);
  // Why tensor `t` cannot be written ("" if it can).
  static std::string WhyTensorNotWritable(const checkpoint::Tensor& t, const source::Source& src);
  // CheckpointInfo::writable.
  std::string DescribeWritable(bool has_config) const;
  // Gives tensor files, and stored files a write replaces (StartReplace),
  // the write bits their stored files grant.
  static void EnableStoredFileWrites(Tree& t);
  // A shared hold of patch_mu for a read plan of stored bytes (writable only).
  // Also keeps the tree `t` alive for the plan's life (its descriptors).
  void HoldForRead(const TreeRef& t, ReadPlan* plan) const;

  static Result<const tree::Node*> Node(const Tree& t, uint64_t ino) {
    const tree::Node* n = t.nodes.Get(ino);
    if (!n) return Err(ENOENT, "no inode {}", ino);
    return n;
  }
  static NodeAttr Attr(uint64_t ino, const tree::Node& n) {
    NodeAttr a;
    a.ino = ino;
    a.type = n.type;
    a.perm = n.perm;
    a.uid = n.uid;
    a.gid = n.gid;
    a.size = n.size;
    a.nlink = n.nlink;
    a.mtime_sec = n.mtime_sec;
    a.mtime_nsec = n.mtime_nsec;
    return a;
  }
};


}  // namespace nemofs
