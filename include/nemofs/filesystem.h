// nemofs::Filesystem: a checkpoint opened as the unified tree (DESIGN.md §2).
//
// This is the whole contract between the core and its front ends (the FUSE
// adapter in mount/, and the `info`/`cat` commands): every FUSE operation is
// one call here. Nothing in this header knows about FUSE.
//
// Inode scheme: inode numbers are 1 + the index of the node in the node
// table built at Open; 1 is the root. A node reachable under two names
// (config.yaml and archive/model_config.yaml, tokenizer/x and the archive
// member it comes from) is one node with nlink 2, like a hard link. Numbers
// are stable for the life of the Filesystem: a commit that changes what
// the checkpoint holds (a weight file replaced) builds the node table again
// and gives every path that stays its inode; new paths get numbers never
// used before, and a path that is gone takes its number with it.
//
// Concurrency: every method may be called from any number of threads at
// once. A node table is immutable once built, so calls on nodes that are
// not Volatile (stored bytes: archive/, tensors/, ...) take no lock (each
// call holds the table it started with; a read plan holds it until it is
// executed). Calls
// that touch what can change (the config, new files, the directories that
// hold them) take the overlay's locks, const methods such as GetAttr and
// Read included.
//
// Lock order, outermost first; no thread takes a lock while holding one
// that comes later in this list:
//   1. Overlay::commit_mu — one commit or store at a time (config, new and
//      replaced files, a tensor); held across the commit's I/O on the source.
//   2. TensorWrites::patch_mu — exclusive while stored bytes are patched in
//      place (inside commit_mu); shared by every read of stored bytes of a
//      writable mount for the read plan's life (until the reply is sent).
//   3. Overlay::mu, TensorWrites::mu — staged edits, new files, open
//      handles (never both at once); held for the staged bytes' own work,
//      which includes I/O on their spill files (util/spill.h), never I/O on
//      the source (its in-memory listing may be looked up).
//   4. Leaf locks, held only for their own work and never while taking
//      another lock: Impl::stale_mu (blobs whose files read ESTALE),
//      ArchiveSource::extract_mutex_ (a member decompressed into the cache)
//      and patch_fds_mu_ (writable descriptors of extracted copies), a zstd
//      zarr chunk's decode mutex.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "nemofs/read_plan.h"
#include "nemofs/result.h"

namespace nemofs {

enum class NodeType { kDirectory, kFile, kSymlink };

struct NodeAttr {
  uint64_t ino = 0;
  NodeType type = NodeType::kFile;
  uint32_t perm = 0444;  // permission bits (write bits only where the tree can write)
  uint32_t uid = 0;      // owner and group, from the source (see Filesystem::Open)
  uint32_t gid = 0;
  uint64_t size = 0;
  uint32_t nlink = 1;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
};

struct DirEntry {
  std::string_view name;
  uint64_t ino = 0;
  NodeType type = NodeType::kFile;
};

// Default cap of the extraction cache (--cache-max): 50 GiB.
inline constexpr uint64_t kDefaultCacheMax = uint64_t{50} << 30;

// "20G", "500M", "1.5T", "4096", "0"; K/M/G/T are powers of 1024 (an
// optional "i" and "B" are accepted: "20GiB", "20GB"). EINVAL otherwise.
Result<uint64_t> ParseByteSize(std::string_view text);

// What Open does with a hot rollback journal beside/inside the source (an
// in-place write interrupted by a crash, write/journal.h).
enum class JournalPolicy {
  kRollBack,        // roll it back, under the source lock (taken for it)
  kRollBackLocked,  // roll it back; the caller holds the source lock (a writable mount)
  kRefuse,          // -o ro: EROFS saying what to run
  kLeave,           // another writable mount holds the lock: its write may be in progress
};

struct FilesystemOptions {
  std::string source;     // path of the checkpoint (file or directory)
  std::string cache_dir;  // extraction cache for compressed archives
  // Its cap in bytes: least recently used entries not in use are removed
  // past it (0 = no cap).
  uint64_t cache_max = kDefaultCacheMax;
  // Allow writes (config.yaml and scratch files beside it). Even when set,
  // a source that cannot be written (no write permission, read-only file
  // system) opens read-only; writable() tells.
  bool writable = false;
  JournalPolicy journal = JournalPolicy::kRollBack;
};

// What an open(2) of a node needs from the front end.
struct OpenedFile {
  uint64_t fh = 0;         // handle for Read/Write/Flush/Release; 0 = stateless
  bool direct_io = false;  // content can change: bypass the page cache
};

// Changes of SetAttr; unset fields are left alone.
struct AttrChange {
  bool set_size = false;
  uint64_t size = 0;
  bool set_mode = false;
  uint32_t mode = 0;
  bool set_mtime = false;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
};

struct TokenizerInfo {
  std::string name;       // under tokenizer/
  std::string member;     // path in the source
  std::string reference;  // what named it (config key or layout rule)
};

// What Open recognised; printed by `nemofs info`.
struct CheckpointInfo {
  std::string source;
  std::string source_kind;    // "tar (PAX)", "tar (gzip)", "directory", "file"
  std::string format;         // stable id: nemo, nemo-folder, nemo2, ...
  std::string description;    // human-readable
  uint64_t source_bytes = 0;  // sum of the source's file sizes as stored
  uint64_t files = 0;         // files in archive/
  uint64_t directories = 0;   // directories in archive/ (without its root)
  std::string config;         // source path of the config ("" if none)
  uint64_t config_bytes = 0;
  std::vector<TokenizerInfo> tokenizer;
  std::string weights;
  uint64_t tensors = 0;  // files in tensors/
  uint64_t tensor_bytes = 0;
  uint64_t optimizer_tensors = 0;  // files in optimizer/
  uint64_t optimizer_bytes = 0;
  uint64_t ranks = 0;  // directories in ranks/
  uint64_t rank_tensors = 0;
  std::map<std::string, std::string> unmerged;  // key -> why it is only in ranks/
  std::vector<std::string> weight_errors;       // weight files that could not be read
  // What model.safetensors leaves out, (name, why) in tree order: tensors/
  // keys whose dtype safetensors has no code for (complex128, qint8, ...),
  // model keys only in ranks/ (unmerged) or not shown at all (unreadable),
  // and "optimizer/" for the optimizer state. Also in the file's header as
  // __metadata__["nemofs.omitted"] (a JSON object as a string). Not warnings
  // (not problems of the checkpoint), but printed by `mount`, `info`, `ls`.
  std::vector<std::pair<std::string, std::string>> safetensors_omitted;
  std::vector<std::string> warnings;
  // Opened for writing but read-only: why ("" when writable or not asked).
  std::string read_only_reason;
};

// One tensor file of the tree, for `nemofs ls`.
struct TensorEntry {
  std::string path;  // "tensors/<escaped key>", "optimizer/...", "ranks/tp0_pp0/..."
  std::string key;
  std::string dtype;  // "bfloat16"
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
};

class Filesystem {
 public:
  static constexpr uint64_t kRootIno = 1;

  // Opens and indexes the source; reads headers and metadata only.
  static Result<std::unique_ptr<Filesystem>> Open(const FilesystemOptions& options);
  ~Filesystem();

  Result<NodeAttr> GetAttr(uint64_t ino) const;
  // ENOENT if `parent` has no child `name`; ENOTDIR if parent is no directory.
  Result<NodeAttr> Lookup(uint64_t parent, std::string_view name) const;
  // Calls `fn(entry, next_offset)` for the children of `ino` from `offset`
  // on (0 = first child; "." and ".." are the caller's), until it returns false.
  Status ReadDir(uint64_t ino, uint64_t offset,
                 const std::function<bool(const DirEntry&, uint64_t)>& fn) const;
  // Checks that `ino` may be opened with open(2) `flags`: EISDIR for
  // directories, EROFS for write access (or O_TRUNC) to anything but the
  // config and scratch files of a writable Filesystem.
  Status CheckOpen(uint64_t ino, int flags) const;
  // Plans a read of [offset, offset+size), clamped to the file's size.
  // `fh` (from OpenFile) matters for the config: a handle opened for
  // reading reads the text committed when it was opened, one opened for
  // writing reads its uncommitted edit.
  Result<ReadPlan> Read(uint64_t ino, uint64_t offset, uint64_t size, uint64_t fh = 0) const;

  // ---- Writes (DESIGN.md §4). The only writable checkpoint file is the
  // config (config.yaml and its archive/ name, one node). New files may be
  // created next to either name: they live in memory until they are
  // stored in the checkpoint (Fsync, StoreNewFiles; README "Writes"), as
  // a member at the checkpoint's top level (from the root) or beside the
  // config (from its archive/ directory). Editors' temp files that can
  // outlive the editor's run (IsEditorTempName: swap, auto-save, backup)
  // are never stored; unmount names them (UnstoredTempFiles). A config edit is committed, after
  // YAML validation (EINVAL when invalid, nothing written), when a writing handle is flushed
  // (close) or fsynced, when a scratch file is renamed over the config, or on truncate(2) by path.
  // Every method is thread-safe.
  bool writable() const;
  // Opens `ino` with open(2) `flags` (CheckOpen's rules). O_TRUNC on the
  // config starts an empty edit; nothing is committed before close/fsync.
  Result<OpenedFile> OpenFile(uint64_t ino, int flags);
  // Creates (or opens, without O_EXCL) a scratch file `name` in `parent`.
  Result<std::pair<NodeAttr, OpenedFile>> Create(uint64_t parent, std::string_view name,
                                                 uint32_t mode, int flags);
  // Writes into the config's edit or a scratch file; EBADF for a handle
  // not opened for writing, EFBIG past the size limit. `pid`: the writing
  // thread (FUSE's), 0 when unknown; its process is remembered for Flush.
  Result<uint64_t> Write(uint64_t ino, uint64_t fh, uint64_t offset, std::string_view data,
                         int pid = 0);
  // Commits the config edit of a writing handle, if it changed anything.
  // `pid`: the closing thread, 0 when unknown. A close by a process that
  // did not write through the handle (a child's copy of the descriptor,
  // closed at its exec) stores at most a staged time, never the edit.
  Status Flush(uint64_t ino, uint64_t fh, int pid = 0);
  // fsync(2): commits the config edit (as Flush), or stores a new file in
  // the checkpoint now (nothing for an editor's temp file).
  Status Fsync(uint64_t ino, uint64_t fh);
  // Stores every new file not stored yet (or changed since), in one commit:
  // what unmount calls. On failure the files stay in memory and are also
  // written under <cache_dir>/unsaved/; the error names that folder.
  Status StoreNewFiles();
  // The new files StoreNewFiles leaves out because an editor's temp-file
  // rule (IsEditorTempName) matches them, one line each for the user:
  // "not stored: <path in the mount> (<what it is>; copy it out ...)".
  std::vector<std::string> UnstoredTempFiles() const;
  // Forgets a handle; an edit that was never committed is dropped.
  void Release(uint64_t ino, uint64_t fh);
  Result<NodeAttr> SetAttr(uint64_t ino, uint64_t fh, const AttrChange& change);
  Status Unlink(uint64_t parent, std::string_view name);
  // RENAME_NOREPLACE is honoured; RENAME_EXCHANGE is EINVAL.
  Status Rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                std::string_view new_name, unsigned int flags);
  // Sets what drops the front end's cached pages and attributes of nodes
  // whose bytes a commit changed (or whose staged bytes were dropped):
  // tensor files, the archive/ files they are stored in, model.safetensors.
  // Called after the commit, without any lock held, from the committing
  // thread: it must not wait for another request of the file system.
  void SetInvalidator(std::function<void(const std::vector<uint64_t>&)> fn);
  // Sets what drops the front end's cached names (directory inode, name)
  // that a commit removed from the tree (a weight file replaced by one
  // without those tensors). Same calling rules as SetInvalidator.
  void SetEntryInvalidator(
      std::function<void(const std::vector<std::pair<uint64_t, std::string>>&)> fn);
  // True when the node's attributes or content can change (the config,
  // scratch files, directories holding scratch files): front ends must not
  // cache them. Everything else is immutable for the Filesystem's life.
  bool Volatile(uint64_t ino) const;
  Result<std::string> ReadLink(uint64_t ino) const;
  // Extended attributes (user.nemofs.*): ENODATA when absent.
  Result<std::string> GetXattr(uint64_t ino, std::string_view name) const;
  Result<std::vector<std::string>> ListXattr(uint64_t ino) const;
  // setxattr(2): user.nemofs.dtype / user.nemofs.shape of a new tensor
  // file (issue 11); ENOTSUP for anything else.
  Status SetXattr(uint64_t ino, std::string_view name, std::string_view value);
  // Resolves a path of the tree ("config.yaml", "archive/x/y"; no symlinks followed).
  Result<uint64_t> Resolve(std::string_view path) const;

  // What the checkpoint holds now (a commit that replaces weight files
  // makes a new tree: Tree, tree/filesystem_impl.h).
  CheckpointInfo info() const;
  // What a writable mount of the source can write, and how a commit goes
  // ("config.yaml, 12 of 12 tensor files, new files; ..."), for `info`.
  // O(tensors x chunks): asked for, not computed at every open.
  std::string DescribeWritable() const;
  // Checks everything that can be checked (O(size)): every warning of Open,
  // every byte of every tensor file readable, and the CRC-32 of every record
  // of every torch.save zip stored as a file or archive member. Returns the
  // problems found, one line each naming the file (empty = clean).
  // `progress(done_bytes, total_bytes)` is called as it goes.
  std::vector<std::string> Verify(
      const std::function<void(uint64_t, uint64_t)>& progress = nullptr) const;
  // Files interrupted commits left beside or inside the source (a folder
  // commit's temp file, a compressed archive's rewrite), one line each:
  // not problems of the checkpoint (readers ignore them), but dead space
  // that `nemofs repack` removes.
  std::vector<std::string> Orphans() const;
  // Every tensor file of the tree: tensors/, then optimizer/, then ranks/.
  std::vector<TensorEntry> ListTensors() const;
  uint64_t node_count() const;

 private:
  struct Impl;
  explicit Filesystem(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Names of editors' temp files that can outlive the editor's run (it is
// still open, or crashed), never stored in the checkpoint: vim swap files
// (".x.swp", ".x.swo", ... any ".x.sw" + a lowercase letter; nano's lock
// file too), emacs auto-save "#x#" and lock ".#x", GLib's
// ".goutputstream-XXXXXX", backups "x~", and nemofs's own ".*.nemofs-tmp.*".
// Temp files an editor deletes or renames at once (vim's 4913, sed -i's
// sedXXXXXX) need no rule: gone before any store.
bool IsEditorTempName(std::string_view name);

// "nemofs 0.1.0 (libarchive 3.6.2 ..., yaml-cpp ..., spdlog ..., zstd ...)": the
// versions of the core's linked libraries, for --version.
std::string CoreLibraryVersions();

}  // namespace nemofs
