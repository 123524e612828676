// Writes through the tree (DESIGN.md §4): the config edit and the scratch
// files editors create next to it. See include/nemofs/filesystem.h for the
// contract and write/config_commit.h for how a commit reaches the source.
#include <fcntl.h>
#include <linux/fs.h>  // RENAME_NOREPLACE, RENAME_EXCHANGE
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <set>

#include "checkpoint/npy.h"
#include "checkpoint/catalog.h"
#include <nlohmann/json.hpp>
#include "tree/filesystem_impl.h"
#include "write/yaml_check.h"

namespace nemofs {
namespace {

// Limits: a config up to 64 MiB (it is validated in memory), 10,000 new
// files; beyond, EFBIG / ENOSPC. New and replaced files have none but the
// spill folder's free space (util/spill.h).
constexpr uint64_t kMaxFileBytes = 64ull << 20;
constexpr size_t kMaxScratchFiles = 10000;
constexpr size_t kMaxName = 255;

struct timespec Now() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

bool WantsWrite(int flags) { return (flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC); }

bool AllOf(std::string_view s, bool (*pred)(char)) {
  return !s.empty() && std::all_of(s.begin(), s.end(), pred);
}
bool IsAlnum(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

size_t Digest(std::string_view data, uint32_t mode, int64_t sec, uint32_t nsec) {
  size_t h = std::hash<std::string_view>{}(data);
  for (uint64_t v : {uint64_t{mode}, static_cast<uint64_t>(sec), uint64_t{nsec}}) {
    h ^= std::hash<uint64_t>{}(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  }
  return h;
}

// Where new file `name` of scratch directory `dir` is stored. `o.mu` held
// or not needed (store_prefix is fixed at SetUpWrites).
std::string StorePath(const Overlay& o, uint64_t dir, std::string_view name) {
  auto it = o.store_prefix.find(dir);
  return (it == o.store_prefix.end() ? std::string() : it->second) + std::string(name);
}

// Takes scratch file `f` out of the namespace; its bytes go once no handle
// holds it. `o.mu` held.
void UnlinkScratchLocked(Overlay& o, const std::shared_ptr<ScratchFile>& f) {
  if (f->linked) o.scratch_names.erase(std::make_pair(f->parent, f->name));
  f->linked = false;
  if (f->handles == 0) o.scratch.erase(f->ino);
}

// The edit is the committed text again (after its commit, or abandoned).
// `o.mu` held, `o.edit` set.
void RebaseEditLocked(Overlay& o) {
  o.edit_base = o.committed;
  o.edit->Reset(o.committed->size());
}

// A write on config handle `h` failed: the handle's close commits nothing,
// and the edit it made so far is dropped (the checkpoint keeps the saved
// text). `o.mu` held.
void PoisonConfigHandleLocked(Overlay& o, OpenHandle* h, const Error& e) {
  h->failed = e;
  spdlog::warn(
      "config.yaml ({}): a write failed ({}); this handle's edit is dropped and its "
      "close saves nothing",
      o.config_name, e.message());
  RebaseEditLocked(o);
  o.dirty = false;
  ++o.generation;
}

// A new, empty scratch file `name` in `parent`. `o.mu` held.
std::shared_ptr<ScratchFile> NewScratchLocked(Overlay& o, uint64_t parent, std::string_view name,
                                              uint32_t mode) {
  auto f = std::make_shared<ScratchFile>(o.spill);
  f->ino = o.next_ino++;
  f->parent = parent;
  f->name = std::string(name);
  f->mode = mode & 07777;
  struct timespec now = Now();
  f->mtime_sec = now.tv_sec;
  f->mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
  o.scratch.emplace(f->ino, f);
  o.scratch_names.emplace(std::make_pair(parent, f->name), f->ino);
  return f;
}

}  // namespace

// Only temp files that can still exist when the mount goes away (the
// editor still open, or crashed) need a rule: a file an editor creates and
// deletes or renames at once (vim's 4913 probe, sed -i's sedXXXXXX) is gone
// before any fsync or unmount, so it costs nothing without one. Every rule
// is narrow, and a file it matches is named at unmount (UnstoredTempFiles).
std::string_view EditorTempKind(std::string_view n) {
  if (n.size() < 2) return {};
  // vim's swap file (also nano's lock file): ".NAME.swp", then .swo, .swn...
  // (".NAME.sw" + a letter).
  if (n.size() >= 5 && n[0] == '.' && n.substr(n.size() - 4, 3) == ".sw" && n.back() >= 'a' &&
      n.back() <= 'z') {
    return "an editor's swap file";
  }
  // emacs's auto-save file "#NAME#" and lock ".#NAME".
  if (n.size() >= 3 && n.front() == '#' && n.back() == '#') return "emacs's auto-save file";
  if (n.size() >= 3 && n.rfind(".#", 0) == 0) return "emacs's lock file";
  // GLib's (gedit's) ".goutputstream-XXXXXX".
  constexpr std::string_view kGio = ".goutputstream-";
  if (n.size() == kGio.size() + 6 && n.rfind(kGio, 0) == 0 &&
      AllOf(n.substr(kGio.size()), IsAlnum)) {
    return "GLib's (gedit's) temp file";
  }
  // A backup copy "NAME~" (emacs, vim's 'backup'), numbered "NAME.~1~" too.
  if (n.back() == '~') return "an editor's backup copy";
  if (source::IsCommitTempName(n)) return "a nemofs commit's temp file";
  return {};
}

bool IsEditorTempName(std::string_view n) { return !EditorTempKind(n).empty(); }

std::vector<std::string> Filesystem::UnstoredTempFiles() const {
  const Overlay& o = impl_->overlay;
  std::vector<std::string> out;
  if (!o.writable) return out;
  std::lock_guard<std::mutex> lock(o.mu);
  for (const auto& [ino, f] : o.scratch) {
    if (!f->linked) continue;
    std::string_view kind = EditorTempKind(f->name);
    std::string where = f->parent == kRootIno ? "" : "archive/" + StorePath(o, f->parent, "");
    if (kind.empty() && f->write_failed) {
      out.push_back(fmt::format("not stored: {}{} (a write to it failed: {})", where, f->name,
                                std::strerror(f->write_failed->code())));
      continue;
    }
    if (kind.empty()) continue;
    out.push_back(fmt::format("not stored: {}{} ({}; copy it out before unmounting if you need it)",
                              where, f->name, kind));
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status Filesystem::Impl::EnableWrites(Tree& t, const write::FileIdentity& identity) {
  const std::string& config_path = t.config_path;
  const uint64_t config_ino = t.config_ino;
  auto committer =
      write::ConfigCommitter::Create(*t.src, config_ino ? config_path : "", identity);
  if (!committer) {
    if (committer.error().code() != EROFS) return committer.error();
    t.info.read_only_reason = committer.error().message();
    spdlog::info("read-only: {}", committer.error().message());
    return Ok();
  }
  if (!config_ino) {
    // No config: tensor files are the only writable ones.
    overlay.writable = true;
    overlay.committer = std::move(*committer);
    overlay.next_ino = t.nodes.size() + 1;
    SetUpTensorDirs(t);
    ApplyWritePerms(t);
    spdlog::debug("tensor files are writable: a commit is an in-place patch");
    return Ok();
  }
  const source::Entry* entry = t.src->Find(config_path);
  if (!entry) return Err(EIO, "{}: config '{}' vanished", t.info.source, config_path);
  NEMOFS_ASSIGN_OR_RETURN(std::string text, t.src->ReadAll(*entry, kMaxFileBytes));
  SetUpWrites(t, std::move(*committer), std::move(text), t.root,
              t.nodes.Get(config_ino)->parent, config_path.substr(config_path.rfind('/') + 1),
              config_ino);
  spdlog::debug("config.yaml is writable: a save is an {}", overlay.committer->Describe());
  return Ok();
}

void Filesystem::Impl::SetUpWrites(Tree& t, std::unique_ptr<write::ConfigCommitter> committer,
                                   std::string text, uint64_t root, uint64_t config_dir,
                                   const std::string& config_base, uint64_t config_ino) {
  Overlay& o = overlay;
  o.writable = true;
  o.committer = std::move(committer);
  o.config_ino = config_ino;
  o.config_name = t.info.config;
  o.committed = std::make_shared<const std::string>(std::move(text));
  o.scratch_dirs = {root, config_dir};
  {
    auto slash = t.info.config.rfind('/');
    o.store_prefix[config_dir] =
        slash == std::string::npos ? "" : t.info.config.substr(0, slash + 1);
    o.store_prefix[root] = "";  // the root's new files go to the top level
  }
  o.config_names = {{root, "config.yaml"}, {config_dir, config_base}};
  o.next_ino = t.nodes.size() + 1;
  SetUpTensorDirs(t);
  ApplyWritePerms(t);
}

void Filesystem::Impl::ApplyWritePerms(Tree& t) const {
  // Write bits as the source grants them (tree/access.h).
  if (tree::Node* n = t.nodes.Get(overlay.config_ino); n && overlay.config_ino) {
    n->perm |= n->write_perm;
  }
  for (uint64_t dir : overlay.scratch_dirs) {
    if (tree::Node* n = t.nodes.Get(dir)) n->perm |= n->write_perm;
  }
  // Tensor directories: who may write the weight file may add and remove
  // tensors (its tensor files have its write bits), and write
  // model.safetensors back.
  uint32_t weights_write = 0;
  for (uint64_t dir : overlay.tensor_dirs) {
    tree::Node* n = t.nodes.Get(dir);
    if (!n) continue;
    uint32_t bits = n->children.empty() ? t.nodes.Get(t.root)->write_perm : 0;
    for (const auto& [name, child] : n->children) {
      if (const tree::Node* c = t.nodes.Get(child); c && c->tensor) {
        bits = c->write_perm;
        break;
      }
    }
    n->perm |= bits;
    weights_write |= bits;
  }
  if (weights_write) {
    for (const auto& [name, child] : t.nodes.Get(t.root)->children) {
      if (tree::Node* c = t.nodes.Get(child); c && c->safetensors) c->perm |= weights_write;
    }
  }
  EnableStoredFileWrites(t);
}

void Filesystem::Impl::EnableStoredFileWrites(Tree& t) {
  const bool files = t.src->storage() != source::Storage::kFile;
  for (size_t i = 0; i < t.nodes.size(); ++i) {
    tree::Node* n = &t.nodes.At(i);
    // Tensor files, and stored files that can be replaced (StartReplace).
    const bool stored = files && n->type == NodeType::kFile && n->blob != source::kNoBlob &&
                        !n->data && !n->safetensors;
    if ((n->tensor && !n->npy_header) || stored) n->perm |= n->write_perm;
  }
}

Result<NodeAttr> Filesystem::Impl::OverlayAttr(const Tree& t, uint64_t ino) const {
  const Overlay& o = overlay;
  std::lock_guard<std::mutex> lock(o.mu);
  if (ino == o.config_ino) {
    NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Node(t, ino));
    NodeAttr a = Attr(ino, *n);
    a.size = o.editing ? o.edit->size() : o.committed->size();
    if (o.mtime_set) {
      a.mtime_sec = o.mtime_sec;
      a.mtime_nsec = o.mtime_nsec;
    }
    return a;
  }
  auto it = o.scratch.find(ino);
  if (it == o.scratch.end()) return Err(ENOENT, "no inode {}", ino);
  const ScratchFile& f = *it->second;
  NodeAttr a;
  a.ino = ino;
  a.type = NodeType::kFile;
  a.perm = f.mode & 07777;
  // New files belong to the tree root's owner (only they may create them).
  a.uid = t.nodes.Get(t.root)->uid;
  a.gid = t.nodes.Get(t.root)->gid;
  a.size = f.data.size();
  a.nlink = f.linked ? 1 : 0;
  if (const tree::Node* n = t.nodes.Get(ino); !f.member.empty() && n) {
    // A stored file being replaced: its node's owner, mode, links.
    a.perm = n->perm;
    a.uid = n->uid;
    a.gid = n->gid;
    a.nlink = n->nlink;
  }
  a.mtime_sec = f.mtime_sec;
  a.mtime_nsec = f.mtime_nsec;
  return a;
}

Result<NodeAttr> Filesystem::Impl::LookupScratch(uint64_t parent, std::string_view name) const {
  uint64_t ino = 0;
  {
    std::lock_guard<std::mutex> lock(overlay.mu);
    auto it = overlay.scratch_names.find(std::make_pair(parent, std::string(name)));
    if (it == overlay.scratch_names.end()) {
      return Err(ENOENT, "no '{}' in inode {}", name, parent);
    }
    ino = it->second;
  }
  return OverlayAttr(ino);
}

std::vector<std::pair<std::string, uint64_t>> Filesystem::Impl::ScratchChildren(
    uint64_t dir) const {
  std::vector<std::pair<std::string, uint64_t>> out;
  std::lock_guard<std::mutex> lock(overlay.mu);
  for (auto it = overlay.scratch_names.lower_bound(std::make_pair(dir, std::string()));
       it != overlay.scratch_names.end() && it->first.first == dir; ++it) {
    out.emplace_back(it->first.second, it->second);
  }
  return out;
}

Result<ReadPlan> Filesystem::Impl::ReadOverlay(uint64_t ino, uint64_t offset, uint64_t size,
                                               uint64_t fh) const {
  const Overlay& o = overlay;
  std::shared_ptr<const std::string> text;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    auto h = o.handles.find(fh);
    if (ino == o.config_ino) {
      if (h != o.handles.end() && h->second.snapshot) {
        text = h->second.snapshot;
      } else if (h != o.handles.end() && h->second.writer && o.editing) {
        // Copy what is asked: the edit may change while the reply is sent.
        NEMOFS_ASSIGN_OR_RETURN(auto pieces, o.edit->Pieces(offset, size));
        std::string part;
        for (const auto& p : pieces) {
          switch (p.kind) {
            case tree::StagedEdit::Piece::kStaged:
              part += *p.bytes;
              break;
            case tree::StagedEdit::Piece::kBase:
              part += std::string_view(*o.edit_base).substr(p.offset, p.length);
              break;
            case tree::StagedEdit::Piece::kZero:
              part.append(p.length, '\0');
              break;
          }
        }
        text = std::make_shared<const std::string>(std::move(part));
        offset = 0;
      } else {
        text = o.committed;
      }
    } else {
      auto it = o.scratch.find(ino);
      if (it == o.scratch.end()) return Err(ENOENT, "no inode {}", ino);
      NEMOFS_ASSIGN_OR_RETURN(std::string part, it->second->data.Read(offset, size));
      text = std::make_shared<const std::string>(std::move(part));
      offset = 0;
    }
  }
  ReadPlan plan;
  if (offset >= text->size()) return plan;
  plan.AddMemory(text->data() + offset, std::min<uint64_t>(size, text->size() - offset));
  plan.keepalive.push_back(std::move(text));
  return plan;
}

Status Filesystem::Impl::CommitConfig(const std::string& text, uint64_t generation,
                                      std::string_view why) {
  Overlay& o = overlay;
  std::string what = "config.yaml (" + o.config_name + ")";
  const bool time_only = generation == kTimeOnly;
  if (!time_only) {  // the saved text again: as it is
    NEMOFS_RETURN_IF_ERROR(write::ValidateConfigYaml(text, what + " is not valid YAML, not saved"));
  }
  std::lock_guard<std::mutex> commit_lock(o.commit_mu);
  struct timespec now = Now();
  struct timespec mtime = now;
  bool staged = false;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    if (*o.committed == text && !o.mtime_staged) {
      if (generation != 0 && generation == o.generation) o.dirty = false;
      return Ok();  // nothing to write
    }
    if (o.mtime_staged) {
      staged = true;
      mtime.tv_sec = o.staged_mtime_sec;
      mtime.tv_nsec = o.staged_mtime_nsec;
    }
  }
  auto start = std::chrono::steady_clock::now();
  Status st = o.committer->Commit(text, mtime, ProgressLogger(std::string(what)));
  if (!st.ok()) return st;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    o.committed = std::make_shared<const std::string>(text);
    if (time_only) {
      // nothing of the edit changes
    } else if (o.editing && generation != 0 && generation == o.generation) {
      RebaseEditLocked(o);  // the edit is what was committed
      o.dirty = false;
    } else if (o.editing && generation == 0) {  // a rename over the config: it wins
      RebaseEditLocked(o);
      o.dirty = false;
    }
    // A time set again while this commit ran stays staged.
    if (staged && o.mtime_staged && o.staged_mtime_sec == mtime.tv_sec &&
        o.staged_mtime_nsec == static_cast<uint32_t>(mtime.tv_nsec)) {
      o.mtime_staged = false;
    }
    o.mtime_set = o.commit_mtime_set = true;
    o.mtime_sec = o.commit_mtime_sec = mtime.tv_sec;
    o.mtime_nsec = o.commit_mtime_nsec = static_cast<uint32_t>(mtime.tv_nsec);
  }
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                  .count();
  spdlog::info("saved {} ({} bytes, {}, {}{}) in {:.1f} ms", what, text.size(),
               o.committer->Describe(), why, staged ? ", with the time set on it" : "", ms);
  return Ok();
}

Status Filesystem::Impl::CommitStagedMtime(std::string_view why) {
  Overlay& o = overlay;
  if (!o.writable) return Ok();
  std::shared_ptr<const std::string> text;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    if (!o.mtime_staged) return Ok();
    text = o.committed;
  }
  return CommitConfig(*text, kTimeOnly, why);
}

Status Filesystem::Impl::CheckStorePathLocked(uint64_t dir, std::string_view name,
                                              uint64_t ignore) const {
  const Overlay& o = overlay;
  if (IsEditorTempName(name)) return Ok();
  const std::string path = StorePath(o, dir, name);
  const TreeRef t = Current();
  const source::Source* src = t->src.get();
  if (src->Find(path)) {
    return Err(EEXIST,
               "'{}' would be stored as '{}', which the checkpoint has already (see archive/)",
               name, path);
  }
  if (src->Taken(path)) {  // e.g. a folder's symlink that is not shown
    return Err(EEXIST,
               "'{}' would be stored as '{}', which the source has already but does not show "
               "(see the mount's warnings)",
               name, path);
  }
  for (uint64_t other : o.scratch_dirs) {
    const std::string& prefix = o.store_prefix.at(other);
    if (path.size() <= prefix.size() || path.compare(0, prefix.size(), prefix) != 0) continue;
    std::string rest = path.substr(prefix.size());
    if (rest.find('/') != std::string::npos) continue;
    auto it = o.scratch_names.find(std::make_pair(other, rest));
    if (it != o.scratch_names.end() && it->second != ignore && !(other == dir && rest == name)) {
      return Err(EEXIST, "'{}' would be stored as '{}', where another new file goes", name, path);
    }
  }
  return Ok();
}

Status Filesystem::Impl::StoreNewFiles(uint64_t only, std::string_view why) {
  Overlay& o = overlay;
  if (!o.writable) return Ok();
  std::lock_guard<std::mutex> commit_lock(o.commit_mu);
  // What to store: each file's bytes as of now (a snapshot: writes may go
  // on meanwhile), then, outside the lock, those that changed back (or
  // were only touched alike) are left out.
  struct Pick {
    std::shared_ptr<ScratchFile> f;
    uint64_t version = 0;
    size_t stored_digest = 0;
    SpillBytes::View bytes;
    write::ConfigCommitter::NewFile file;
  };
  std::vector<Pick> picks;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    for (const auto& [ino, f] : o.scratch) {
      if (!f->linked || f->tensor || f->safetensors || (only && ino != only) ||
          (f->member.empty() && IsEditorTempName(f->name))) {
        continue;
      }
      if (f->write_failed) {  // not what was meant: never stored (unmount names it)
        if (only) {
          return Err(f->write_failed->code(), "'{}' is not stored: a write to it failed ({})",
                     f->name, f->write_failed->message());
        }
        continue;
      }
      if (f->version == f->stored_version) continue;
      auto snap = f->data.Snapshot();
      if (!snap) {
        return Err(snap.error().code(), "'{}' is not stored: {}", f->name,
                   snap.error().message());
      }
      Pick p;
      p.f = f;
      p.version = f->version;
      p.stored_digest = f->stored ? f->stored_digest : 0;
      p.bytes = std::move(*snap);
      p.file = {f->member.empty() ? StorePath(o, f->parent, f->name) : f->member, p.bytes.bytes,
                f->mode & 07777, f->mtime_sec, f->mtime_nsec, f->stored || !f->member.empty()};
      picks.push_back(std::move(p));
    }
  }
  std::vector<write::ConfigCommitter::NewFile> files;
  std::vector<std::pair<std::shared_ptr<ScratchFile>, uint64_t>> which;  // file, version stored
  std::vector<size_t> digests;
  std::vector<std::pair<std::shared_ptr<ScratchFile>, uint64_t>> unchanged;
  for (const Pick& p : picks) {
    const size_t d = Digest(p.file.data, p.file.mode, p.file.mtime_sec, p.file.mtime_nsec);
    if (p.f->stored && d == p.stored_digest) {  // changed back, or only touched alike
      unchanged.emplace_back(p.f, p.version);
      continue;
    }
    files.push_back(p.file);
    which.emplace_back(p.f, p.version);
    digests.push_back(d);
  }
  if (!unchanged.empty()) {
    std::lock_guard<std::mutex> lock(o.mu);
    for (auto& [f, version] : unchanged) f->stored_version = std::max(f->stored_version, version);
  }
  if (files.empty()) return Ok();
  std::string names;
  for (const auto& f : files) names += (names.empty() ? "" : ", ") + f.path;
  auto start = std::chrono::steady_clock::now();
  // A folder's weight file about to be replaced: its descriptor opened now
  // (if no read opened it yet) keeps the old file's bytes readable for this
  // tree until the next one is there, where a read opening it by name
  // after the rename would get the new file's bytes at the old offsets.
  const TreeRef t = Current();
  if (t->src->storage() == source::Storage::kFolder) {
    for (const auto& [f, version] : which) {
      const tree::Node* n = t->nodes.Get(f->ino);
      if (f->member.empty() || !n || n->blob == source::kNoBlob ||
          !t->weight_paths.count(f->member)) {
        continue;
      }
      if (auto opened = t->src->Locate(n->blob); !opened.ok()) {
        spdlog::debug("{}: {}", f->member, opened.error().message());
      }
    }
  }
  Status st = o.committer->StoreFiles(files, ProgressLogger(names));
  if (!st.ok()) {
    // Never lose them: a copy under the cache directory, named in the error.
    struct timespec now = Now();
    std::string dir = fmt::format("{}/unsaved/{}-{}", o.cache_dir.empty() ? "/tmp" : o.cache_dir,
                                  now.tv_sec, ::getpid());
    std::error_code ec;
    bool kept = true;
    for (const auto& f : files) {
      std::filesystem::path p = std::filesystem::path(dir) / f.path;
      std::filesystem::create_directories(p.parent_path(), ec);
      std::ofstream out(p, std::ios::binary | std::ios::trunc);
      out.write(f.data.data(), static_cast<std::streamsize>(f.data.size()));
      out.close();
      if (!out) kept = false;
    }
    std::string where = kept ? fmt::format("their content is kept in {}", dir)
                             : fmt::format(
                                   "copying them to {} failed too: they are only in the "
                                   "mount's memory",
                                   dir);
    spdlog::error("could not store new files {} in {} ({}): {}; {}", names, options.source, why,
                  st.error().message(), where);
    return Err(st.error().code(), "could not store {} in the checkpoint: {}; {}", names,
               st.error().message(), where);
  }
  {
    std::lock_guard<std::mutex> lock(o.mu);
    for (size_t i = 0; i < which.size(); ++i) {
      auto& [f, version] = which[i];
      f->stored = true;
      f->stored_version = version;
      f->stored_digest = digests[i];
    }
  }
  // A replaced stored file: its own node shows the new bytes (it is an
  // overlay node); what else read its old bytes (the tensors of a weight
  // file, index.json, model.safetensors) comes from a new tree, built from
  // the checkpoint as it is now.
  // Until then the old tree reads the old bytes, which are still there: a
  // plain tar's superseded member, a compressed one's extracted copy, a
  // folder file's descriptor opened above.
  std::vector<uint64_t> replaced_nodes;
  std::string weights;
  std::vector<uint32_t> weight_blobs;
  for (const auto& [f, version] : which) {
    if (f->member.empty()) continue;
    replaced_nodes.push_back(f->ino);
    const tree::Node* n = t->nodes.Get(f->ino);
    if (!n || !t->weight_paths.count(f->member)) continue;
    weights += (weights.empty() ? "" : ", ") + f->member;
    if (n->blob != source::kNoBlob) weight_blobs.push_back(n->blob);
  }
  if (!weights.empty()) {
    if (Status reloaded = Reload("replaced " + weights); !reloaded.ok()) {
      // Its old tensors are not what the checkpoint holds: they fail.
      for (uint32_t blob : weight_blobs) {
        t->MarkStale(blob, fmt::format("{} was replaced through the mount and this mount could "
                                       "not read it again ({}); remount to see its tensors",
                                       weights, reloaded.error().message()));
      }
      spdlog::error("{} replaced, but the tensors it holds now cannot be shown: {}; the old ones "
                    "read ESTALE until a remount",
                    weights, reloaded.error().message());
    }
  }
  if (invalidate && !replaced_nodes.empty()) invalidate(replaced_nodes);
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  const size_t replaced_count = static_cast<size_t>(std::count_if(
      which.begin(), which.end(), [](const auto& w) { return !w.first->member.empty(); }));
  const size_t new_count = files.size() - replaced_count;
  std::string counts = new_count ? fmt::format("stored {} new file{}", new_count,
                                               new_count == 1 ? "" : "s")
                                 : "";
  if (replaced_count) {
    counts += fmt::format("{}replaced {} stored file{}", counts.empty() ? "" : " and ",
                          replaced_count, replaced_count == 1 ? "" : "s");
  }
  spdlog::info("{} in {} ({}, {}): {} in {:.1f} ms", counts, options.source, o.committer->Describe(),
               why, names, ms);
  return Ok();
}

Status Filesystem::Fsync(uint64_t ino, uint64_t fh) {
  Overlay& o = impl_->overlay;
  if (impl_->IsTensorIno(ino)) {
    NEMOFS_RETURN_IF_ERROR(impl_->FlushTensor(ino, fh, true));
    return impl_->StoreStructure("on fsync");
  }
  std::shared_ptr<ScratchFile> tensor;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    auto it = o.scratch.find(ino);
    if (it != o.scratch.end() && it->second->tensor) tensor = it->second;
    if (tensor && !tensor->dtype) NEMOFS_RETURN_IF_ERROR(impl_->FinishNewTensorLocked(tensor, false));
  }
  if (tensor) return impl_->StoreStructure("on fsync");
  NEMOFS_RETURN_IF_ERROR(Flush(ino, fh));  // the config's commit, or a poisoned handle's error
  if (!impl_->IsOverlayIno(ino) || ino == o.config_ino) return Ok();
  return impl_->StoreNewFiles(ino, "on fsync");
}

Status Filesystem::StoreNewFiles() {
  Overlay& o = impl_->overlay;
  if (!o.writable) return Ok();
  for (const std::string& line : UnstoredTempFiles()) spdlog::warn("{}", line);
  Status timed = impl_->CommitStagedMtime("time only, at unmount");
  Status stored = impl_->StoreNewFiles(0, "at unmount");
  Status structure = impl_->StoreStructure("at unmount");
  if (!timed.ok()) return timed;
  return stored.ok() ? structure : stored;
}

bool Filesystem::writable() const { return impl_->overlay.writable; }

bool Filesystem::Volatile(uint64_t ino) const {
  const Overlay& o = impl_->overlay;
  return o.writable && (ino == o.config_ino || !impl_->Current()->nodes.Has(ino) ||
                        o.scratch_dirs.count(ino) > 0 || o.tensor_dirs.count(ino) > 0 ||
                        (o.npy_dir && ino == o.npy_dir) ||
                        impl_->IsReplaced(ino));
}

Status Filesystem::Impl::StartReplace(uint64_t ino, int flags) {
  const TreeRef t = Current();
  const source::Source* src = t->src.get();
  const tree::Node* n = t->nodes.Get(ino);
  if (overlay.writable && n && n->safetensors && !overlay.tensor_dirs.empty()) {
    return StartSafetensorsUpload(ino, flags);
  }
  if (!overlay.writable || !n || n->type != NodeType::kFile || n->tensor || n->safetensors ||
      n->data || n->blob == source::kNoBlob) {
    return Ok();
  }
  const auto& entries = src->entries();
  if (n->entry >= entries.size() || entries[n->entry].blob != n->blob) return Ok();
  const source::Entry& e = entries[n->entry];
  if (src->storage() == source::Storage::kFile) {
    return Err(EROFS, "{} is the checkpoint's one file; write its tensors through tensors/",
               e.path);
  }
  if (!(n->write_perm & 0222)) {
    return Err(EROFS, "{} cannot be replaced: {}", e.path,
               t->info.read_only_reason.empty() ? "it has no write permission"
                                                : t->info.read_only_reason);
  }
  NEMOFS_RETURN_IF_ERROR(t->CheckStale(*n, e.path));
  Overlay& o = overlay;
  auto f = std::make_shared<ScratchFile>(o.spill);
  if (!(flags & O_TRUNC)) {
    // Its bytes as they are, staged (a spill file past a few MiB: the
    // kernel copies file to file), to be changed and stored back whole.
    NEMOFS_ASSIGN_OR_RETURN(ReadPlan plan, t->src->Plan(e.blob, 0, e.size));
    uint64_t at = 0;
    for (const ReadPiece& piece : plan.pieces) {
      if (piece.fd >= 0) {
        NEMOFS_RETURN_IF_ERROR(f->data.CopyFrom(piece.fd, piece.offset, piece.length, at, e.path));
      } else {
        NEMOFS_RETURN_IF_ERROR(f->data.Write(at, std::string_view(piece.data, piece.length)));
      }
      at += piece.length;
    }
    if (at != e.size) return Err(EIO, "{}: read {} of its {} bytes", e.path, at, e.size);
  }
  NEMOFS_ASSIGN_OR_RETURN(SpillBytes::View current, f->data.Snapshot());
  const size_t digest = Digest(current.bytes, e.mode & 07777, n->mtime_sec, n->mtime_nsec);
  current = {};
  {
    std::lock_guard<std::mutex> lock(o.mu);
    if (IsReplaced(ino)) return Ok();  // another open won the race
    f->ino = ino;
    f->parent = n->parent;
    f->name = e.path.substr(e.path.rfind('/') + 1);
    f->member = e.path;
    f->mode = e.mode & 07777;
    f->mtime_sec = n->mtime_sec;
    f->mtime_nsec = n->mtime_nsec;
    f->stored_version = f->version;  // as stored: nothing to store until it changes
    f->stored_digest = digest;
    o.scratch.emplace(ino, f);
    std::lock_guard<std::mutex> flag(replaced_mu);
    replaced.insert(ino);
    any_replaced.store(true, std::memory_order_release);
  }
  spdlog::info("{}: opened for writing; stored again at the close of a descriptor that wrote "
               "({})",
               e.path, o.committer->Describe());
  return Ok();
}

Result<OpenedFile> Filesystem::OpenFile(uint64_t ino, int flags) {
  if (impl_->IsTensorIno(ino)) return impl_->OpenTensor(ino, flags);
  if (!impl_->IsOverlayIno(ino) && (WantsWrite(flags) || (flags & O_TRUNC))) {
    NEMOFS_RETURN_IF_ERROR(impl_->StartReplace(ino, flags));
  }
  if (!impl_->IsOverlayIno(ino)) {
    NEMOFS_RETURN_IF_ERROR(CheckOpen(ino, flags));
    return OpenedFile{};
  }
  Overlay& o = impl_->overlay;
  std::lock_guard<std::mutex> lock(o.mu);
  OpenHandle h;
  h.ino = ino;
  h.writer = WantsWrite(flags);
  if (ino == o.config_ino) {
    if (h.writer) {
      if (!o.editing) {
        o.edit = std::make_unique<tree::StagedEdit>(o.spill, o.committed->size());
        o.edit_base = o.committed;
        o.editing = true;
        o.dirty = false;
      }
      if (flags & O_TRUNC) {
        NEMOFS_RETURN_IF_ERROR(o.edit->Truncate(0));
        o.dirty = true;
        ++o.generation;
        h.wrote = true;
      }
      ++o.writers;
    } else {
      h.snapshot = o.committed;
    }
  } else {
    auto it = o.scratch.find(ino);
    if (it == o.scratch.end()) return Err(ENOENT, "no inode {}", ino);
    h.scratch = it->second;
    if (h.writer && (flags & O_TRUNC)) {
      (void)h.scratch->data.Resize(0);  // cannot fail: back to an empty buffer
      h.scratch->write_failed.reset();  // rewritten from scratch
      ++h.scratch->version;
    }
    ++h.scratch->handles;
  }
  uint64_t fh = o.next_fh++;
  o.handles.emplace(fh, std::move(h));
  return OpenedFile{fh, true};
}

Result<std::pair<NodeAttr, OpenedFile>> Filesystem::Create(uint64_t parent, std::string_view name,
                                                           uint32_t mode, int flags) {
  Overlay& o = impl_->overlay;
  if (!o.writable) return Err(EROFS, "the tree is read-only");
  // A new KEY.npy of npy/ is a new tensor of tensors/ (it shows there).
  if (o.npy_dir && parent == o.npy_dir) parent = o.npy_tensors;
  const bool tensor_dir = o.tensor_dirs.count(parent) > 0;
  if (!o.scratch_dirs.count(parent) && !tensor_dir) {
    return Err(EPERM,
               "cannot create '{}': new files can be created only in the mount's root and in "
               "config.yaml's archive/ directory (where they are stored in the checkpoint), "
               "and new tensors in tensors/ (and optimizer/) of a checkpoint with one weight "
               "file; not in this directory in this version",
               name);
  }
  if (name.size() > kMaxName) return Err(ENAMETOOLONG, "name too long");
  if (auto existing = Lookup(parent, name); existing.ok()) {
    if ((flags & O_EXCL) || !impl_->IsOverlayIno(existing->ino)) {
      return Err(EEXIST, "'{}' exists", name);
    }
    NEMOFS_ASSIGN_OR_RETURN(OpenedFile f, OpenFile(existing->ino, flags));
    NEMOFS_ASSIGN_OR_RETURN(NodeAttr a, GetAttr(existing->ino));
    return std::make_pair(a, f);
  }
  uint64_t ino;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    if (!tensor_dir) NEMOFS_RETURN_IF_ERROR(impl_->CheckStorePathLocked(parent, name, 0));
    if (o.scratch.size() >= kMaxScratchFiles) {
      return Err(ENOSPC, "{} new files exist already (the limit)", o.scratch.size());
    }
    auto f = NewScratchLocked(o, parent, name, mode);
    f->tensor = tensor_dir;
    ino = f->ino;
  }
  if (tensor_dir) {
    spdlog::debug("new tensor file '{}' created: a tensor at its last close (.npy header, or "
                  "user.nemofs.dtype/shape), stored at fsync or unmount",
                  name);
    NEMOFS_ASSIGN_OR_RETURN(OpenedFile f, OpenFile(ino, flags));
    NEMOFS_ASSIGN_OR_RETURN(NodeAttr a, GetAttr(ino));
    return std::make_pair(a, f);
  }
  spdlog::debug("new file '{}' created ({})", name,
                IsEditorTempName(name) ? "an editor's temp file: in memory only"
                                       : "stored in the checkpoint at fsync or unmount");
  NEMOFS_ASSIGN_OR_RETURN(OpenedFile f, OpenFile(ino, flags));
  NEMOFS_ASSIGN_OR_RETURN(NodeAttr a, GetAttr(ino));
  return std::make_pair(a, f);
}

// The process (thread group) of thread `tid`, from /proc; `tid` itself when
// that cannot be read, 0 for 0 (unknown).
static int ThreadGroupOf(int tid) {
  if (tid <= 0) return 0;
  std::ifstream in(fmt::format("/proc/{}/status", tid));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Tgid:", 0) == 0) {
      try {
        return std::stoi(line.substr(5));
      } catch (...) {
        break;
      }
    }
  }
  return tid;
}

// Is inode `ino` one of a writable handle's? Called with `mu` held.
static Result<OpenHandle*> WriterHandle(Overlay& o, uint64_t ino, uint64_t fh) {
  auto h = o.handles.find(fh);
  if (h == o.handles.end() || h->second.ino != ino) {
    return Err(EBADF, "handle {} is not open on inode {}", fh, ino);
  }
  if (!h->second.writer) return Err(EBADF, "handle {} was not opened for writing", fh);
  return &h->second;
}

Result<uint64_t> Filesystem::Write(uint64_t ino, uint64_t fh, uint64_t offset,
                                   std::string_view data, int pid) {
  Overlay& o = impl_->overlay;
  if (impl_->IsTensorIno(ino)) return impl_->WriteTensor(ino, fh, offset, data);
  if (!impl_->IsOverlayIno(ino)) return Err(EROFS, "inode {} is read-only", ino);
  const int tgid = ino == o.config_ino ? ThreadGroupOf(pid) : 0;
  std::lock_guard<std::mutex> lock(o.mu);
  NEMOFS_ASSIGN_OR_RETURN(OpenHandle * h, WriterHandle(o, ino, fh));
  if (h->failed) return *h->failed;  // poisoned: nothing more goes into this edit
  struct timespec now = Now();
  if (h->scratch) {
    ScratchFile& f = *h->scratch;
    if (Status st = f.data.Write(offset, data); !st.ok()) {
      h->failed = st.error();
      f.write_failed = st.error();
      return st.error();
    }
    h->wrote = true;
    ++f.version;
    f.mtime_sec = now.tv_sec;
    f.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
  } else {
    uint64_t end = offset + data.size();
    Status st = end > kMaxFileBytes || end < offset
                    ? Err(EFBIG, "a config may hold at most {} MiB", kMaxFileBytes >> 20)
                    : o.edit->Write(offset, data);
    if (!st.ok()) {
      PoisonConfigHandleLocked(o, h, st.error());
      return st.error();
    }
    h->wrote = true;
    if (tgid) h->writer_tgids.insert(tgid);
    o.dirty = true;
    ++o.generation;
    o.mtime_set = true;
    o.mtime_sec = now.tv_sec;
    o.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
    o.mtime_staged = false;  // the text changed after the time was set: the save's time wins
  }
  return data.size();
}

Status Filesystem::Flush(uint64_t ino, uint64_t fh, int pid) {
  Overlay& o = impl_->overlay;
  if (impl_->IsTensorIno(ino)) return impl_->FlushTensor(ino, fh, false);
  if (!impl_->IsOverlayIno(ino)) return Ok();
  const int tgid = ino == o.config_ino ? ThreadGroupOf(pid) : 0;
  if (ino != o.config_ino) {
    std::shared_ptr<ScratchFile> upload;
    {
      std::lock_guard<std::mutex> lock(o.mu);
      auto h = o.handles.find(fh);
      if (h != o.handles.end() && h->second.failed) {
        return Err(h->second.failed->code(), "a write on this descriptor failed ({})",
                   h->second.failed->message());
      }
      // A replaced stored file is saved like the config: at the close of
      // a descriptor that may have written (nothing if it did not change).
      // (Not after an O_TRUNC alone: a shell's `>` closes a dup of the
      // descriptor before writing; an emptied file is stored at unmount.)
      if (h != o.handles.end() && h->second.wrote && h->second.scratch &&
          h->second.scratch->tensor && h->second.scratch->handles == 1) {
        return impl_->FinishNewTensorLocked(h->second.scratch);
      }
      if (h != o.handles.end() && h->second.wrote && h->second.scratch &&
          h->second.scratch->safetensors && h->second.scratch->handles == 1) {
        upload = h->second.scratch;
      }
      if (!upload && (h == o.handles.end() || !h->second.wrote || !h->second.scratch ||
                      h->second.scratch->member.empty())) {
        return Ok();
      }
    }
    if (upload) return impl_->ApplySafetensors(upload);
    return impl_->StoreNewFiles(ino, "on close");
  }
  std::string text;
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    auto h = o.handles.find(fh);
    if (h != o.handles.end() && h->second.failed) {
      return Err(h->second.failed->code(),
                 "config.yaml ({}) not saved: a write on this descriptor "
                 "failed ({})",
                 o.config_name, h->second.failed->message());
    }
    const bool other_process = h != o.handles.end() && tgid && !h->second.writer_tgids.empty() &&
                               !h->second.writer_tgids.count(tgid);
    if (h == o.handles.end() || !h->second.writer || !h->second.wrote || other_process ||
        !o.editing || !o.dirty) {
      // No edit of this handle's to save (touch's open, a reader): perhaps a
      // time set on it, stored with the committed text, never another
      // handle's half-written edit.
      generation = Impl::kTimeOnly;
    } else {
      NEMOFS_ASSIGN_OR_RETURN(text, o.edit->Materialize(*o.edit_base));
      generation = o.generation;
    }
  }
  if (generation == Impl::kTimeOnly) return impl_->CommitStagedMtime("time only, on close/fsync");
  return impl_->CommitConfig(text, generation, "on close/fsync");
}

void Filesystem::Release(uint64_t ino, uint64_t fh) {
  if (impl_->IsTensorIno(ino)) return impl_->ReleaseTensor(ino, fh);
  Overlay& o = impl_->overlay;
  if (!impl_->IsOverlayIno(ino)) return;
  std::lock_guard<std::mutex> lock(o.mu);
  auto h = o.handles.find(fh);
  if (h == o.handles.end()) return;
  if (h->second.scratch) {
    ScratchFile& f = *h->second.scratch;
    if (--f.handles == 0 && !f.linked) o.scratch.erase(f.ino);
  } else if (h->second.writer && --o.writers == 0) {
    if (o.dirty) {
      spdlog::warn("config.yaml ({}): the last writer closed it with an edit that was not saved; "
                   "the edit is dropped, the checkpoint keeps the saved text",
                   o.config_name);
    }
    o.editing = false;
    o.dirty = false;
    o.mtime_set = o.commit_mtime_set;
    o.mtime_sec = o.commit_mtime_sec;
    o.mtime_nsec = o.commit_mtime_nsec;
    o.edit.reset();
    o.edit_base.reset();
  }
  o.handles.erase(h);
}

Result<NodeAttr> Filesystem::SetAttr(uint64_t ino, uint64_t fh, const AttrChange& change) {
  if (impl_->IsTensorIno(ino)) return impl_->SetTensorAttr(ino, fh, change);
  Overlay& o = impl_->overlay;
  if (!impl_->IsOverlayIno(ino)) {
    NEMOFS_ASSIGN_OR_RETURN(NodeAttr a, GetAttr(ino));
    if (a.type == NodeType::kDirectory && !change.set_size && !change.set_mode) {
      return Err(EROFS, "the tree's directories are read-only");
    }
    return Err(EROFS, "inode {} is read-only{}", ino,
               o.writable ? " (config.yaml, tensor files, stored files of tokenizer/ and archive/, "
                            "and new files can be written)"
                          : "");
  }
  std::string commit_text;
  bool commit_now = false;
  uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    struct timespec now = Now();
    if (ino == o.config_ino) {
      if (change.set_mode &&
          (change.mode & 07777) != impl_->Current()->nodes.Get(ino)->perm) {
        return Err(EPERM, "the mode of config.yaml cannot be changed");
      }
      if (change.set_size) {
        auto h = fh ? WriterHandle(o, ino, fh) : Result<OpenHandle*>(nullptr);
        if (change.size > kMaxFileBytes) {
          Error e(EFBIG, fmt::format("a config may hold at most {} MiB", kMaxFileBytes >> 20));
          if (h.ok() && *h) PoisonConfigHandleLocked(o, *h, e);
          return e;
        }
        if (h.ok() && *h) {  // ftruncate on a writing handle: part of its edit
          (*h)->wrote = true;
          NEMOFS_RETURN_IF_ERROR(o.edit->Truncate(change.size));
          o.dirty = true;
          ++o.generation;
          o.mtime_set = true;
          o.mtime_sec = now.tv_sec;
          o.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
        } else {  // truncate(2) by path: a complete edit of its own
          if (o.editing) {
            NEMOFS_ASSIGN_OR_RETURN(commit_text, o.edit->Materialize(*o.edit_base));
          } else {
            commit_text = *o.committed;
          }
          commit_text.resize(change.size, '\0');
          commit_now = true;
        }
        o.mtime_staged = false;  // a change of the text: its save's time wins
      }
      if (change.set_mtime) {
        // touch -d: shown from now on, and written into the source by the
        // next commit (the next save, or the time alone at the next close
        // or fsync of a config handle, or at unmount).
        o.mtime_set = o.commit_mtime_set = true;
        o.mtime_sec = o.commit_mtime_sec = change.mtime_sec;
        o.mtime_nsec = o.commit_mtime_nsec = change.mtime_nsec;
        o.mtime_staged = true;
        o.staged_mtime_sec = change.mtime_sec;
        o.staged_mtime_nsec = change.mtime_nsec;
      }
      generation = 0;
    } else {
      auto it = o.scratch.find(ino);
      if (it == o.scratch.end()) return Err(ENOENT, "no inode {}", ino);
      ScratchFile& f = *it->second;
      if (change.set_size) {
        NEMOFS_RETURN_IF_ERROR(f.data.Resize(change.size));
        if (change.size == 0) f.write_failed.reset();  // rewritten from scratch
        f.mtime_sec = now.tv_sec;
        f.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
      }
      if (change.set_mode) f.mode = change.mode & 07777;
      if (change.set_mtime) {
        f.mtime_sec = change.mtime_sec;
        f.mtime_nsec = change.mtime_nsec;
      }
      if (change.set_size || change.set_mode || change.set_mtime) ++f.version;
    }
  }
  if (commit_now) {
    NEMOFS_RETURN_IF_ERROR(impl_->CommitConfig(commit_text, generation, "truncate"));
  }
  return GetAttr(ino);
}

Status Filesystem::Unlink(uint64_t parent, std::string_view name) {
  Overlay& o = impl_->overlay;
  if (!o.writable) return Err(EROFS, "the tree is read-only");
  if (o.tensor_dirs.count(parent)) return impl_->UnlinkTensor(parent, name);
  if (o.npy_dir && parent == o.npy_dir) {  // npy/KEY.npy is tensors/KEY
    if (name.size() <= 4 || name.substr(name.size() - 4) != ".npy") {
      return Err(ENOENT, "no '{}' in npy/", name);
    }
    return impl_->UnlinkTensor(o.npy_tensors, name.substr(0, name.size() - 4));
  }
  std::lock_guard<std::mutex> lock(o.mu);
  auto it = o.scratch_names.find(std::make_pair(parent, std::string(name)));
  if (it == o.scratch_names.end()) {
    return Err(EPERM, "'{}' is part of the checkpoint and cannot be deleted", name);
  }
  const auto& f = o.scratch.at(it->second);
  if (f->stored) {
    return Err(EPERM, "'{}' is stored in the checkpoint now and cannot be deleted", name);
  }
  UnlinkScratchLocked(o, f);
  return Ok();
}

Status Filesystem::Rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                          std::string_view new_name, unsigned int flags) {
  Overlay& o = impl_->overlay;
  if (!o.writable) return Err(EROFS, "the tree is read-only");
  if (flags & RENAME_EXCHANGE) return Err(EINVAL, "RENAME_EXCHANGE is not supported");
  if (flags & ~static_cast<unsigned>(RENAME_NOREPLACE)) return Err(EINVAL, "unknown rename flags");
  if (new_name.size() > kMaxName) return Err(ENAMETOOLONG, "name too long");
  auto is_config = [&](uint64_t dir, std::string_view n) {
    return o.config_names.count(std::make_pair(dir, std::string(n))) > 0;
  };
  const bool to_config = is_config(new_parent, new_name);
  const bool from_config = is_config(parent, name);
  if (o.npy_dir && parent == o.npy_dir && new_parent == o.npy_dir) {
    auto base = [](std::string_view n) -> std::optional<std::string_view> {
      if (n.size() <= 4 || n.substr(n.size() - 4) != ".npy") return std::nullopt;
      return n.substr(0, n.size() - 4);
    };
    auto from = base(name), to = base(new_name);
    if (!from || !to) return Err(EINVAL, "files of npy/ are named KEY.npy");
    return impl_->RenameTensor(o.npy_tensors, *from, *to, flags);
  }
  if (o.tensor_dirs.count(parent) || o.tensor_dirs.count(new_parent)) {
    if (parent != new_parent) {
      // mv falls back to a copy (a new tensor there) and an unlink.
      return Err(EXDEV, "tensor files are renamed within their directory only");
    }
    return impl_->RenameTensor(parent, name, new_name, flags);
  }
  if (!o.scratch_dirs.count(new_parent)) {
    return Err(EPERM, "cannot rename into this directory: it is part of the checkpoint");
  }
  if (auto target = Lookup(new_parent, new_name);
      target.ok() && !impl_->IsOverlayIno(target->ino)) {
    return Err(EPERM, "'{}' is part of the checkpoint and cannot be replaced", new_name);
  }
  if (from_config) {
    if (to_config) return Ok();  // two names of one file: nothing to do (rename(2))
    // Renaming the config away (`sed -i.bak`, some editors' backup step):
    // the config cannot leave the checkpoint, so the new name gets a scratch
    // copy of the committed text and config.yaml stays.
    std::lock_guard<std::mutex> lock(o.mu);
    auto key = std::make_pair(new_parent, std::string(new_name));
    auto existing = o.scratch_names.find(key);
    if (existing != o.scratch_names.end() && (flags & RENAME_NOREPLACE)) {
      return Err(EEXIST, "'{}' exists", new_name);
    }
    std::shared_ptr<ScratchFile> replaced;
    if (existing != o.scratch_names.end()) {
      replaced = o.scratch.at(existing->second);
    } else {
      NEMOFS_RETURN_IF_ERROR(impl_->CheckStorePathLocked(new_parent, new_name, 0));
    }
    if (replaced) UnlinkScratchLocked(o, replaced);
    auto f = NewScratchLocked(o, new_parent, new_name,
                              impl_->Current()->nodes.Get(o.config_ino)->perm);
    if (replaced && replaced->stored) f->stored = true;  // a new content for a stored file
    return f->data.Assign(*o.committed);
  }

  std::shared_ptr<ScratchFile> src;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    auto it = o.scratch_names.find(std::make_pair(parent, std::string(name)));
    if (it != o.scratch_names.end()) src = o.scratch.at(it->second);
  }
  if (!src) {
    if (Lookup(parent, name).ok()) {
      return Err(EPERM, "'{}' is part of the checkpoint and cannot be renamed", name);
    }
    return Err(ENOENT, "no '{}'", name);
  }
  {
    std::lock_guard<std::mutex> lock(o.mu);
    if (src->stored) {
      return Err(EPERM, "'{}' is stored in the checkpoint now and cannot be renamed", name);
    }
  }
  if (to_config) {
    // The commit: the scratch file's content becomes the config.
    if (flags & RENAME_NOREPLACE) return Err(EEXIST, "'{}' exists", new_name);
    std::string text;
    {
      std::lock_guard<std::mutex> lock(o.mu);
      if (src->data.size() > kMaxFileBytes) {
        return Err(EFBIG, "'{}' has {} bytes; a config may hold at most {} MiB", name,
                   src->data.size(), kMaxFileBytes >> 20);
      }
      NEMOFS_ASSIGN_OR_RETURN(text, src->data.Read(0, src->data.size()));
      o.mtime_staged = false;  // a new text: its save's time wins
    }
    NEMOFS_RETURN_IF_ERROR(impl_->CommitConfig(text, 0, "renamed over it"));
    std::lock_guard<std::mutex> lock(o.mu);
    UnlinkScratchLocked(o, src);
    return Ok();
  }
  std::lock_guard<std::mutex> lock(o.mu);
  auto key = std::make_pair(new_parent, std::string(new_name));
  auto existing = o.scratch_names.find(key);
  if (existing != o.scratch_names.end()) {
    if (existing->second == src->ino) return Ok();
    if (flags & RENAME_NOREPLACE) return Err(EEXIST, "'{}' exists", new_name);
    auto replaced = o.scratch.at(existing->second);
    if (replaced->stored) {  // new content for a stored file: stored again
      src->stored = true;
      src->stored_version = 0;
    }
    UnlinkScratchLocked(o, replaced);
  } else {
    NEMOFS_RETURN_IF_ERROR(impl_->CheckStorePathLocked(new_parent, new_name, src->ino));
  }
  o.scratch_names.erase(std::make_pair(src->parent, src->name));
  src->parent = new_parent;
  src->name = std::string(new_name);
  o.scratch_names.emplace(key, src->ino);
  return Ok();
}

// ---- Structural writes of tensors/ and optimizer/ (issue 11): the names.

void Filesystem::Impl::SetUpTensorDirs(Tree& t) {
  if (!t.structural()) return;
  const tree::Node* root = t.nodes.Get(t.root);
  for (const auto& [name, ino] : root->children) {
    if (name == "tensors" || name == "optimizer") overlay.tensor_dirs.insert(ino);
    if (name == "tensors") overlay.npy_tensors = ino;
    if (name == "npy") overlay.npy_dir = ino;
  }
  if (!overlay.npy_tensors) overlay.npy_dir = 0;
}

std::vector<std::pair<std::string, uint64_t>> Filesystem::Impl::NpyListing() const {
  const TreeRef t = Current();
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const auto& [name, ino] : TensorDirListing(overlay.npy_tensors)) {
    const tree::Node* n = t->nodes.Get(ino);
    if (n && n->npy_twin && !IsReplaced(ino)) out.emplace_back(name + ".npy", n->npy_twin);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Result<uint64_t> Filesystem::Impl::LookupNpy(std::string_view name) const {
  if (name.size() > 4 && name.substr(name.size() - 4) == ".npy") {
    auto ino = LookupTensorDir(overlay.npy_tensors, name.substr(0, name.size() - 4));
    if (ino.ok()) {
      const tree::Node* n = Current()->nodes.Get(*ino);
      if (n && n->npy_twin) return n->npy_twin;
    }
  }
  return Err(ENOENT, "no '{}' in npy/", name);
}

uint64_t Filesystem::Impl::TensorDirChildLocked(const Tree& t, uint64_t dir,
                                                std::string_view name) const {
  const Overlay& o = overlay;
  const auto key = std::make_pair(dir, std::string(name));
  if (auto r = o.renamed.find(key); r != o.renamed.end()) return r->second;
  if (auto s = o.scratch_names.find(key); s != o.scratch_names.end()) return s->second;
  if (o.removed.count(key)) return 0;
  const tree::Node* d = t.nodes.Get(dir);
  if (!d) return 0;
  auto it = std::lower_bound(
      d->children.begin(), d->children.end(), name,
      [](const std::pair<std::string, uint64_t>& c, std::string_view n) { return c.first < n; });
  return it != d->children.end() && it->first == name ? it->second : 0;
}

Result<uint64_t> Filesystem::Impl::LookupTensorDir(uint64_t dir, std::string_view name) const {
  const TreeRef t = Current();
  std::lock_guard<std::mutex> lock(overlay.mu);
  uint64_t ino = TensorDirChildLocked(*t, dir, name);
  if (!ino) return Err(ENOENT, "no '{}' in inode {}", name, dir);
  return ino;
}

std::vector<std::pair<std::string, uint64_t>> Filesystem::Impl::TensorDirListing(
    uint64_t dir) const {
  const TreeRef t = Current();
  std::vector<std::pair<std::string, uint64_t>> out;
  const tree::Node* d = t->nodes.Get(dir);
  std::lock_guard<std::mutex> lock(overlay.mu);
  const Overlay& o = overlay;
  if (d) {
    for (const auto& [name, ino] : d->children) {
      const auto key = std::make_pair(dir, name);
      if (o.removed.count(key) || o.renamed.count(key) || o.scratch_names.count(key)) continue;
      out.emplace_back(name, ino);
    }
  }
  for (auto it = o.renamed.lower_bound(std::make_pair(dir, std::string()));
       it != o.renamed.end() && it->first.first == dir; ++it) {
    out.emplace_back(it->first.second, it->second);
  }
  for (auto it = o.scratch_names.lower_bound(std::make_pair(dir, std::string()));
       it != o.scratch_names.end() && it->first.first == dir; ++it) {
    out.emplace_back(it->first.second, it->second);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void Filesystem::Impl::RemoveTensorNameLocked(const Tree& t, uint64_t dir,
                                              const std::string& name) {
  Overlay& o = overlay;
  const auto key = std::make_pair(dir, name);
  if (auto s = o.scratch_names.find(key); s != o.scratch_names.end()) {
    auto f = o.scratch.at(s->second);
    UnlinkScratchLocked(o, f);
    // A new tensor stored already is the tree's now (behind the file).
    if (f->stored) o.removed.insert(key);
  }
  if (o.renamed.erase(key)) return;
  const tree::Node* d = t.nodes.Get(dir);
  if (d && std::any_of(d->children.begin(), d->children.end(),
                       [&](const auto& c) { return c.first == name; })) {
    o.removed.insert(key);
  }
}

Status Filesystem::Impl::UnlinkTensor(uint64_t dir, std::string_view name) {
  const TreeRef t = Current();
  std::lock_guard<std::mutex> lock(overlay.mu);
  if (!TensorDirChildLocked(*t, dir, name)) return Err(ENOENT, "no tensor file '{}'", name);
  RemoveTensorNameLocked(*t, dir, std::string(name));
  spdlog::info("tensor file '{}' deleted: the tensor leaves the checkpoint at the next fsync or "
               "unmount",
               name);
  return Ok();
}

Status Filesystem::Impl::RenameTensor(uint64_t dir, std::string_view name,
                                      std::string_view new_name, unsigned int flags) {
  const TreeRef t = Current();
  Overlay& o = overlay;
  std::lock_guard<std::mutex> lock(o.mu);
  const uint64_t from = TensorDirChildLocked(*t, dir, name);
  if (!from) return Err(ENOENT, "no tensor file '{}'", name);
  const uint64_t to = TensorDirChildLocked(*t, dir, new_name);
  if (to == from) return Ok();
  if (to && (flags & RENAME_NOREPLACE)) return Err(EEXIST, "'{}' exists", new_name);
  if (const tree::Node* n = t->nodes.Get(from); n && n->tensor) {
    if (Status st = CheckStoredKey(*t, checkpoint::UnescapeKey(new_name), n->tensor->shape,
                                   n->tensor->key, dir);
        !st.ok()) {
      spdlog::error("rename of tensor file '{}' refused: {}", name, st.error().message());
      return st;
    }
  }
  const std::string src(name), dst(new_name);
  if (to) RemoveTensorNameLocked(*t, dir, dst);
  const auto src_key = std::make_pair(dir, src);
  const auto dst_key = std::make_pair(dir, dst);
  if (auto s = o.scratch_names.find(src_key); s != o.scratch_names.end()) {
    auto f = o.scratch.at(s->second);
    o.scratch_names.erase(s);
    if (f->stored) o.removed.insert(src_key);  // the stored copy goes (renamed away)
    f->name = dst;
    ++f->version;
    o.scratch_names.emplace(dst_key, f->ino);
  } else {
    o.renamed.erase(src_key);
    const tree::Node* d = t->nodes.Get(dir);
    if (d && std::any_of(d->children.begin(), d->children.end(),
                         [&](const auto& c) { return c.first == src && c.second == from; })) {
      o.removed.insert(src_key);
    }
    // Back to its own name: nothing left to change.
    if (d && std::any_of(d->children.begin(), d->children.end(),
                         [&](const auto& c) { return c.first == dst && c.second == from; })) {
      o.removed.erase(dst_key);
    } else {
      o.renamed[dst_key] = from;
    }
  }
  spdlog::info("tensor file '{}' renamed '{}': the key follows at the next fsync or unmount", src,
               dst);
  return Ok();
}

Status Filesystem::Impl::FinishNewTensorLocked(const std::shared_ptr<ScratchFile>& f,
                                               bool remove_on_error) {
  Overlay& o = overlay;
  auto fail = [&](Error e) -> Status {
    spdlog::error("new tensor file '{}' refused: {}{}", f->name, e.message(),
                  remove_on_error ? "; the file is removed, nothing is stored" : "");
    if (remove_on_error) UnlinkScratchLocked(o, f);
    return e;
  };
  const bool npy = f->name.size() > 4 && f->name.compare(f->name.size() - 4, 4, ".npy") == 0;
  if (npy) {
    auto head = f->data.Read(0, std::min<uint64_t>(f->data.size(), 10));
    if (!head) return fail(head.error());
    const uint64_t need = checkpoint::NpyHeaderNeed(*head);
    auto header = f->data.Read(0, std::min<uint64_t>(f->data.size(), need));
    if (!header) return fail(header.error());
    auto h = checkpoint::ParseNpyHeader(*header, "tensors/" + f->name);
    if (!h) return fail(Error(EINVAL, h.error().message()));
    if (h->raw2 && f->dtype && torch::Info(*f->dtype).itemsize == 2) {
      h->dtype = *f->dtype;  // bfloat16 (or float16) named by the xattr
    } else if (h->raw2 && h->dtype == torch::DType::kUInt16 && !f->dtype &&
               f->data.size() >= h->data_offset) {
      // '<u2' without an xattr: uint16 as numpy says.
    }
    if (f->data.size() != h->data_offset + h->nbytes()) {
      return fail(Error(EINVAL, fmt::format("tensors/{}: the .npy header says {} data bytes "
                                            "({} {}), the file has {}",
                                            f->name, h->nbytes(), torch::Info(h->dtype).name,
                                            h->numel(), f->data.size() - std::min(f->data.size(), h->data_offset))));
    }
    if (Status st = CheckStoredKey(*Current(), checkpoint::UnescapeKey(f->name.substr(0, f->name.size() - 4)),
                                   h->shape, "", f->parent);
        !st.ok()) {
      return fail(Error(EINVAL, st.error().message()));
    }
    // The data, C order little-endian, into a new buffer window by window
    // (from a mapped snapshot: a tensor of any size, no copy of it in the heap).
    SpillBytes raw(o.spill);
    {
      auto snap = f->data.Snapshot();
      if (!snap) return fail(snap.error());
      const std::string_view in = snap->bytes.substr(h->data_offset);
      const uint32_t item = torch::Info(h->dtype).itemsize;
      const uint64_t window = std::max<uint64_t>(1, (8u << 20) / item);
      for (uint64_t e = 0; e < h->numel(); e += window) {
        const std::string part = checkpoint::ToCOrderLittleEndianRange(*h, in, e, window);
        if (Status st = raw.Write(e * item, part); !st.ok()) return fail(st.error());
      }
    }
    // The file becomes the raw tensor KEY (replacing what had that name).
    const std::string key_name = f->name.substr(0, f->name.size() - 4);
    const TreeRef t = Current();
    if (TensorDirChildLocked(*t, f->parent, key_name)) RemoveTensorNameLocked(*t, f->parent, key_name);
    f->data.Swap(raw);
    o.scratch_names.erase(std::make_pair(f->parent, f->name));
    f->name = key_name;
    o.scratch_names.emplace(std::make_pair(f->parent, f->name), f->ino);
    f->dtype = h->dtype;
    f->shape = h->shape;
    ++f->version;
    spdlog::info("new tensor {}: {} {} from its .npy header{}", key_name,
                 torch::Info(h->dtype).name, checkpoint::ShapeString(h->shape),
                 checkpoint::NeedsConversion(*h) ? " (converted to C order, little-endian)" : "");
    return Ok();
  }
  if (!f->dtype || !f->shape) {
    return fail(Error(EINVAL, fmt::format("tensors/{}: a raw tensor file needs user.nemofs.dtype "
                                          "and user.nemofs.shape set before its last close (or "
                                          "write it as {}.npy)",
                                          f->name, f->name)));
  }
  uint64_t numel = 1;
  for (int64_t d : *f->shape) numel *= static_cast<uint64_t>(d);
  const uint64_t want = numel * torch::Info(*f->dtype).itemsize;
  if (f->data.size() != want) {
    return fail(Error(EINVAL, fmt::format("tensors/{}: {} {} is {} bytes, the file has {}", f->name,
                                          torch::Info(*f->dtype).name,
                                          checkpoint::ShapeString(*f->shape), want,
                                          f->data.size())));
  }
  if (Status st = CheckStoredKey(*Current(), checkpoint::UnescapeKey(f->name), *f->shape, "",
                                 f->parent);
      !st.ok()) {
    return fail(Error(EINVAL, st.error().message()));
  }
  return Ok();
}

std::optional<std::string> Filesystem::Impl::NewTensorXattr(uint64_t ino,
                                                          std::string_view name) const {
  std::lock_guard<std::mutex> lock(overlay.mu);
  auto it = overlay.scratch.find(ino);
  if (it == overlay.scratch.end() || !it->second->tensor) return std::nullopt;
  const ScratchFile& f = *it->second;
  if (name == "user.nemofs.dtype" && f.dtype) return std::string(torch::Info(*f.dtype).name);
  if (name == "user.nemofs.shape" && f.shape) {
    std::string out = "[";
    for (size_t i = 0; i < f.shape->size(); ++i) out += (i ? "," : "") + std::to_string((*f.shape)[i]);
    return out + "]";
  }
  if (name == "user.nemofs.key") return checkpoint::UnescapeKey(f.name);
  return std::nullopt;
}

Status Filesystem::Impl::SetTensorXattr(uint64_t ino, std::string_view name,
                                        std::string_view value) {
  Overlay& o = overlay;
  if (name != "user.nemofs.dtype" && name != "user.nemofs.shape") {
    return Err(ENOTSUP, "attribute {} cannot be set (user.nemofs.dtype and user.nemofs.shape can)",
               name);
  }
  const TreeRef t = Current();
  if (const tree::Node* n = t->nodes.Get(ino); n && n->tensor) {
    // A tree tensor of a tensor directory: retyped (or reshaped), stored by
    // the next structural commit with its staged (or stored) bytes.
    if (!o.tensor_dirs.count(n->parent)) {
      return Err(EPERM, "tensor {}: its dtype and shape cannot be changed in this checkpoint "
                 "(a single torch.save weight file or a per-rank .nemo, in this version)", n->tensor->key);
    }
    if (!(n->perm & 0222)) return Err(EROFS, "tensor {} is read-only", n->tensor->key);
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    auto [r, fresh] = tensor_writes.retyped.try_emplace(
        ino, TensorWrites::Retype{n->tensor->dtype, n->tensor->shape});
    if (name == "user.nemofs.dtype") {
      auto d = torch::DTypeFromName(value);
      if (!d) {
        if (fresh) tensor_writes.retyped.erase(r);
        return Err(EINVAL, "user.nemofs.dtype '{}' is not a dtype (bfloat16, float32, ...)", value);
      }
      r->second.dtype = *d;
    } else {
      auto shape = checkpoint::ParseShapeText(value);
      if (!shape) {
        if (fresh) tensor_writes.retyped.erase(r);
        return shape.error();
      }
      if (Status st = CheckStoredKey(*t, n->tensor->key, *shape); !st.ok()) {
        if (fresh) tensor_writes.retyped.erase(r);
        spdlog::error("tensor {}: shape {} refused: {}", n->tensor->key, value, st.error().message());
        return st;
      }
      r->second.shape = std::move(*shape);
    }
    spdlog::info("tensor {}: to become {} {} ({} bytes) at the next fsync or unmount; write or "
                 "truncate the file to that size",
                 n->tensor->key, torch::Info(r->second.dtype).name,
                 checkpoint::ShapeString(r->second.shape), r->second.nbytes());
    return Ok();
  }
  std::lock_guard<std::mutex> lock(o.mu);
  auto it = o.scratch.find(ino);
  if (it == o.scratch.end() || !it->second->tensor) {
    return Err(ENOTSUP, "attribute {} can be set only on a tensor file", name);
  }
  ScratchFile& f = *it->second;
  if (name == "user.nemofs.dtype") {
    auto d = torch::DTypeFromName(value);
    if (!d) return Err(EINVAL, "user.nemofs.dtype '{}' is not a dtype (bfloat16, float32, ...)", value);
    f.dtype = *d;
  } else if (name == "user.nemofs.shape") {
    NEMOFS_ASSIGN_OR_RETURN(auto shape, checkpoint::ParseShapeText(value));
    f.shape = std::move(shape);
  } else {
    return Err(ENOTSUP, "attribute {} cannot be set (user.nemofs.dtype and user.nemofs.shape can)",
               name);
  }
  ++f.version;
  return Ok();
}

// ---- model.safetensors written back (issue 11 §4)

Status Filesystem::Impl::StartSafetensorsUpload(uint64_t ino, int flags) {
  const TreeRef t = Current();
  const tree::Node* n = t->nodes.Get(ino);
  Overlay& o = overlay;
  auto f = std::make_shared<ScratchFile>(o.spill);
  if (!(flags & O_TRUNC)) {
    // Its bytes as they are (an in-place edit of a few of them): copied,
    // as a replaced file's are.
    constexpr uint64_t kStep = 8 << 20;
    std::string buf;
    for (uint64_t at = 0; at < n->size; at += kStep) {
      const uint64_t len = std::min(kStep, n->size - at);
      NEMOFS_ASSIGN_OR_RETURN(ReadPlan plan, t->ReadSafetensors(at, len));
      buf.resize(len);
      NEMOFS_RETURN_IF_ERROR(ExecuteReadPlan(plan, buf.data()));
      NEMOFS_RETURN_IF_ERROR(f->data.Write(at, buf));
    }
  }
  std::lock_guard<std::mutex> lock(o.mu);
  if (IsReplaced(ino)) return Ok();  // another open won the race
  f->ino = ino;
  f->parent = t->root;
  f->name = "model.safetensors";
  f->safetensors = true;
  f->mode = 0644;
  f->mtime_sec = n->mtime_sec;
  f->mtime_nsec = n->mtime_nsec;
  f->stored_version = f->version;
  o.scratch.emplace(ino, f);
  std::lock_guard<std::mutex> flag(replaced_mu);
  replaced.insert(ino);
  any_replaced.store(true, std::memory_order_release);
  return Ok();
}

Status Filesystem::Impl::ApplySafetensors(const std::shared_ptr<ScratchFile>& f) {
  Overlay& o = overlay;
  const std::string what = "model.safetensors";
  // The upload is done with, whatever happens: the synthesized file shows
  // again (after the commit, the new tensors).
  auto drop = [&] {
    std::lock_guard<std::mutex> lock(o.mu);
    o.scratch.erase(f->ino);
    std::lock_guard<std::mutex> flag(replaced_mu);
    replaced.erase(f->ino);
  };
  SpillBytes::View view;
  {
    std::lock_guard<std::mutex> lock(o.mu);
    auto snap = f->data.Snapshot();
    if (!snap) return snap.error();
    view = std::move(*snap);
  }
  const std::string_view file = view.bytes;
  struct Entry {
    std::string key;
    torch::DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;  // in `file`
  };
  std::vector<Entry> entries;
  auto bad = [&](std::string why) -> Status {
    spdlog::error("{} not applied: {}; nothing changed", what, why);
    drop();
    return Err(EINVAL, "{}: {}", what, why);
  };
  if (file.size() < 8) return bad(fmt::format("{} bytes: no header length", file.size()));
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= uint64_t{static_cast<unsigned char>(file[i])} << (8 * i);
  if (hlen > file.size() - 8) {
    return bad(fmt::format("its header length {} runs past its {} bytes", hlen, file.size()));
  }
  const uint64_t data0 = 8 + hlen;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(file.substr(8, hlen));
  } catch (const std::exception& e) {
    return bad(fmt::format("its header is not JSON: {}", e.what()));
  }
  if (!header.is_object()) return bad("its header is not a JSON object");
  for (const auto& [key, v] : header.items()) {
    if (key == "__metadata__") continue;
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets") || !v["dtype"].is_string() || !v["shape"].is_array() ||
        !v["data_offsets"].is_array() || v["data_offsets"].size() != 2) {
      return bad(fmt::format("tensor '{}': no dtype, shape and data_offsets [begin, end]", key));
    }
    Entry e;
    e.key = key;
    std::optional<torch::DType> dtype;
    for (int d = 0; d <= static_cast<int>(torch::DType::kQUInt2x4); ++d) {
      const auto& info = torch::Info(static_cast<torch::DType>(d));
      if (!info.safetensors.empty() && info.safetensors == v["dtype"].get<std::string>()) {
        dtype = info.dtype;
      }
    }
    if (!dtype) return bad(fmt::format("tensor '{}': dtype '{}' is unknown", key, v["dtype"].dump()));
    e.dtype = *dtype;
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 40)) {
        return bad(fmt::format("tensor '{}': shape {} is not a list of sizes", key, v["shape"].dump()));
      }
      e.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
      numel *= d.get<uint64_t>();
      if (numel > (uint64_t{1} << 50)) return bad(fmt::format("tensor '{}' is too large", key));
    }
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return bad(fmt::format("tensor '{}': data_offsets {} are not offsets", key, off.dump()));
    }
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.end < e.begin || e.end > file.size() - data0) {
      return bad(fmt::format("tensor '{}': data_offsets {} lie outside its {} data bytes", key,
                             off.dump(), file.size() - data0));
    }
    if (e.end - e.begin != numel * torch::Info(e.dtype).itemsize) {
      return bad(fmt::format("tensor '{}': {} {} is {} bytes, its data_offsets give {}", key,
                             torch::Info(e.dtype).name, v["shape"].dump(),
                             numel * torch::Info(e.dtype).itemsize, e.end - e.begin));
    }
    e.begin += data0;
    e.end += data0;
    entries.push_back(std::move(e));
  }
  {
    std::vector<const Entry*> order;
    for (const auto& e : entries) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    // As safetensors itself requires: the tensors cover the data exactly,
    // no overlap and no hole (nor bytes after the last one).
    uint64_t at = data0;
    for (const Entry* e : order) {
      if (e->begin != at) {
        return bad(e->begin < at ? fmt::format("tensor '{}' overlaps the one before it", e->key)
                                 : fmt::format("{} bytes before tensor '{}' belong to no tensor",
                                               e->begin - at, e->key));
      }
      at = e->end;
    }
    if (at != file.size()) {
      return bad(fmt::format("{} bytes after the last tensor belong to no tensor",
                             file.size() - at));
    }
  }
  // What tensors/ shows now, and what the upload changes of it.
  const TreeRef t = Current();
  uint64_t dir = 0;
  for (const auto& [name, ino] : t->nodes.Get(t->root)->children) {
    if (name == "tensors" && o.tensor_dirs.count(ino)) dir = ino;
  }
  if (!dir) return bad("this checkpoint's tensors/ cannot change");
  std::map<std::string, const Entry*> by_key;
  for (const auto& e : entries) by_key.emplace(e.key, &e);
  std::vector<std::string> remove;        // names
  std::vector<const Entry*> put;          // new or changed
  std::set<std::string> seen;
  std::string chunk;
  for (const auto& [name, ino] : TensorDirListing(dir)) {
    const std::string key = checkpoint::UnescapeKey(name);
    std::optional<torch::DType> dtype;
    std::vector<int64_t> shape;
    const checkpoint::Tensor* tree_tensor = nullptr;
    std::shared_ptr<ScratchFile> scratch;
    if (const tree::Node* n = t->nodes.Get(ino); n && n->tensor && !IsReplaced(ino)) {
      tree_tensor = n->tensor;
      dtype = n->tensor->dtype;
      shape = n->tensor->shape;
    } else {
      std::lock_guard<std::mutex> lock(o.mu);
      auto it = o.scratch.find(ino);
      if (it == o.scratch.end() || !it->second->tensor || !it->second->dtype) continue;
      scratch = it->second;
      dtype = scratch->dtype;
      shape = *scratch->shape;
    }
    if (torch::Info(*dtype).safetensors.empty()) continue;  // not in model.safetensors: kept
    auto it = by_key.find(key);
    if (it == by_key.end()) {
      remove.push_back(name);
      continue;
    }
    seen.insert(key);
    const Entry& e = *it->second;
    bool same = e.dtype == *dtype && e.shape == shape;
    for (uint64_t at = 0; same && at < e.end - e.begin; at += 8 << 20) {
      const uint64_t len = std::min<uint64_t>(8 << 20, e.end - e.begin - at);
      if (tree_tensor) {
        NEMOFS_ASSIGN_OR_RETURN(ReadPlan plan,
                                checkpoint::PlanTensorRead(*tree_tensor, *t->src, at, len));
        chunk.resize(len);
        NEMOFS_RETURN_IF_ERROR(ExecuteReadPlan(plan, chunk.data()));
      } else {
        std::lock_guard<std::mutex> lock(o.mu);
        NEMOFS_ASSIGN_OR_RETURN(chunk, scratch->data.Read(at, len));
      }
      same = chunk == file.substr(e.begin + at, len);
    }
    if (!same) put.push_back(&e);
  }
  for (const auto& e : entries) {
    if (!seen.count(e.key)) put.push_back(&e);
  }
  {
    std::lock_guard<std::mutex> lock(o.mu);
    for (const auto& name : remove) RemoveTensorNameLocked(*t, dir, name);
    for (const Entry* e : put) {
      const std::string name = checkpoint::EscapeKey(e->key);
      if (TensorDirChildLocked(*t, dir, name)) RemoveTensorNameLocked(*t, dir, name);
      auto nf = NewScratchLocked(o, dir, name, 0644);
      nf->tensor = true;
      nf->dtype = e->dtype;
      nf->shape = e->shape;
      if (Status st = nf->data.Write(0, file.substr(e->begin, e->end - e->begin)); !st.ok()) {
        UnlinkScratchLocked(o, nf);
        drop();
        return st;
      }
      ++nf->version;
    }
  }
  drop();
  view = {};
  spdlog::info("{} written: {} tensor(s) removed, {} new or changed", what, remove.size(),
               put.size());
  if (remove.empty() && put.empty()) return Ok();
  return StoreStructure("model.safetensors written");
}

}  // namespace nemofs
