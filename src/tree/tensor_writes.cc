// Tensor files written through the tree (issue 10, DESIGN.md §4): staged
// per inode as sparse extents, committed at fsync, close or the last
// release as an in-place patch of the stored bytes under a rollback
// journal, with the CRC-32 of every enclosing zip record updated from the
// old and new bytes alone.
#include <fcntl.h>
#include <time.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <deque>
#include <cstring>
#include <tuple>

#include "checkpoint/tensor.h"
#include "tree/filesystem_impl.h"
#include "util/io.h"
#include "write/crc_patch.h"

namespace nemofs {
namespace {

constexpr uint64_t kZeroChunk = 1 << 20;

const std::shared_ptr<const std::string>& Zeros() {
  static const auto zeros = std::make_shared<const std::string>(kZeroChunk, '\0');
  return zeros;
}

struct timespec NowTs() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

// How far a tensor file may grow while staged: a wrong-size rewrite is
// EINVAL at its commit, not EFBIG on the way, unless it is absurd.
uint64_t MaxStaged(uint64_t nbytes) { return 2 * nbytes + (64u << 20); }

uint32_t Le32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return uint32_t{u[0]} | uint32_t{u[1]} << 8 | uint32_t{u[2]} << 16 | uint32_t{u[3]} << 24;
}
std::string Le32Bytes(uint32_t v) {
  std::string b(4, '\0');
  for (int i = 0; i < 4; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return b;
}

}  // namespace

std::string Filesystem::Impl::WhyTensorNotWritable(const checkpoint::Tensor& t,
                                                   const source::Source& src) {
  for (const auto& c : t.chunks) {
    if (!c.fill.empty()) {
      return "a chunk of it was never written (zarr fill value: no chunk file to rewrite)";
    }
    if (c.lazy) {
      // A compressed chunk file is replaced whole (its size changes):
      // only a folder's own files can be.
      if (c.lazy->blob() == source::kNoBlob) return "a compressed chunk of it has no file";
      if (src.storage() != source::Storage::kFolder) {
        return "a compressed zarr chunk inside an archive cannot be re-encoded in place";
      }
      continue;
    }
    if (c.blob == source::kNoBlob) return c.missing.empty() ? "its bytes are missing" : c.missing;
    auto place = src.PlaceOf(c.blob);
    if (!place) return place.error().message();
  }
  return "";
}


std::string Filesystem::Impl::DescribeWritable(bool has_config) const {
  const TreeRef tree = Current();
  const CheckpointInfo& info = tree->info;
  const checkpoint::Catalog& catalog = tree->catalog;
  const source::Source* src = tree->src.get();
  if (std::string why = write::WhyReadOnly(info.source, false); !why.empty()) {
    return "nothing (" + why + ")";
  }
  std::vector<std::string> what;
  if (has_config) what.push_back("config.yaml");
  uint64_t tensors = 0, ok = 0;
  std::string why_not;
  for (const auto* list : {&catalog.tensors, &catalog.optimizer}) {
    for (const auto& t : *list) {
      ++tensors;
      std::string why = WhyTensorNotWritable(t, *src);
      if (why.empty()) {
        ++ok;
      } else if (why_not.empty()) {
        why_not = fmt::format(" ({}: {})", t.key, why);
      }
    }
  }
  if (tensors) what.push_back(fmt::format("{} of {} tensor files{}", ok, tensors, why_not));
  if (src->storage() != source::Storage::kFile) what.push_back("tokenizer/ and archive/ files");
  if (has_config && src->storage() != source::Storage::kFile) what.push_back("new files");
  std::string list;
  for (const auto& w : what) list += (list.empty() ? "" : ", ") + w;
  if (list.empty()) return "nothing";
  switch (src->storage()) {
    case source::Storage::kPlainTar:
      return list + "; tensors patched in place under a rollback journal, files appended as new "
                    "members (O(change))";
    case source::Storage::kCompressedTar:
      return list + "; every save rewrites the whole archive (O(archive))";
    case source::Storage::kFolder:
      return list + "; tensors patched in place under a rollback journal, files replaced "
                    "(O(change))";
    case source::Storage::kFile:
      return list + "; patched in place under a rollback journal (O(change))";
  }
  return list;
}

uint64_t TensorWrites::Retype::nbytes() const {
  uint64_t n = torch::Info(dtype).itemsize;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

void Filesystem::Impl::HoldForRead(const TreeRef& t, ReadPlan* plan) const {
  plan->keepalive.push_back(t);
  if (!overlay.writable) return;
  auto hold = std::make_shared<std::shared_lock<std::shared_mutex>>(tensor_writes.patch_mu);
  plan->keepalive.push_back(std::move(hold));
}

Result<OpenedFile> Filesystem::Impl::OpenTensor(uint64_t ino, int flags) {
  const TreeRef tree = Current();
  const CheckpointInfo& info = tree->info;
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Node(*tree, ino));
  const bool write = (flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC);
  if (!write) return OpenedFile{};
  if (!(n->perm & 0222)) {
    return Err(EROFS, "tensor {} is read-only: {}", n->tensor->key,
               info.read_only_reason.empty() ? "its files have no write permission"
                                             : info.read_only_reason);
  }
  NEMOFS_RETURN_IF_ERROR(tree->CheckStale(*n, "tensor " + n->tensor->key));
  if (std::string why = WhyTensorNotWritable(*n->tensor, *tree->src); !why.empty()) {
    return Err(EROFS, "tensor {} cannot be written in place: {}", n->tensor->key, why);
  }
  TensorWrites& w = tensor_writes;
  std::lock_guard<std::mutex> lock(w.mu);
  auto& staged = w.staged[ino];
  if (!staged) {
    staged = std::make_shared<StagedTensor>(overlay.spill, tree, n->tensor);
    staged->mtime_sec = n->mtime_sec;
    staged->mtime_nsec = n->mtime_nsec;
    w.staged_count.store(w.staged.size());
  }
  TensorHandle h;
  h.ino = ino;
  if (flags & O_TRUNC) {
    NEMOFS_RETURN_IF_ERROR(staged->edit.Truncate(0));
    staged->dirty = true;
    ++staged->generation;
    h.wrote = true;
  }
  ++staged->handles;
  uint64_t fh = w.next_fh++;
  w.handles.emplace(fh, h);
  // A write-only descriptor (dd, cp, pwrite) bypasses the page cache: with
  // it, its writes would land in the pages other readers share, staged
  // bytes seen before the commit (and a page read while a write copies
  // into it, torn). A read-write one keeps it: a shared mapping
  // (numpy.memmap r+) needs the cache, and libfuse 3.14 has no
  // direct_io-with-mmap.
  return OpenedFile{fh, (flags & O_ACCMODE) == O_WRONLY};
}

Result<uint64_t> Filesystem::Impl::WriteTensor(uint64_t ino, uint64_t fh, uint64_t offset,
                                               std::string_view data) {
  TensorWrites& w = tensor_writes;
  std::lock_guard<std::mutex> lock(w.mu);
  auto h = w.handles.find(fh);
  if (h == w.handles.end() || h->second.ino != ino) {
    return Err(EBADF, "handle {} was not opened for writing on inode {}", fh, ino);
  }
  if (h->second.failed) return *h->second.failed;
  StagedTensor& s = *w.staged.at(ino);
  uint64_t nbytes = s.tensor->nbytes();
  if (auto r = w.retyped.find(ino); r != w.retyped.end()) nbytes = std::max(nbytes, r->second.nbytes());
  if (offset + data.size() > MaxStaged(nbytes) || offset + data.size() < offset) {
    Error e(EFBIG, fmt::format("tensor {} has {} bytes; a write up to byte {} cannot be staged "
                               "(changing a tensor's size is not supported)",
                               s.tensor->key, nbytes, offset + data.size()));
    h->second.failed = e;
    return e;
  }
  if (data.empty()) return 0;
  if (Status st = s.edit.Write(offset, data); !st.ok()) {
    Error e(st.error().code(), fmt::format("tensor {}: the write cannot be staged: {}",
                                           s.tensor->key, st.error().message()));
    h->second.failed = e;
    return e;
  }
  s.dirty = true;
  ++s.generation;
  struct timespec now = NowTs();
  s.mtime_sec = now.tv_sec;
  s.mtime_nsec = static_cast<uint32_t>(now.tv_nsec);
  h->second.wrote = true;
  return data.size();
}

std::optional<Result<ReadPlan>> Filesystem::Impl::ReadStagedTensor(uint64_t ino, uint64_t fh,
                                                                   uint64_t offset,
                                                                   uint64_t size) const {
  if (tensor_writes.staged_count.load() == 0) return std::nullopt;
  std::shared_ptr<StagedTensor> s;
  std::vector<tree::StagedEdit::Piece> pieces;  // staged bytes copied
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    if (!tensor_writes.handles.count(fh)) return std::nullopt;  // a reader: the stored bytes
    auto it = tensor_writes.staged.find(ino);
    if (it == tensor_writes.staged.end()) return std::nullopt;
    s = it->second;
    auto got = s->edit.Pieces(offset, size);
    if (!got) return Result<ReadPlan>(got.error());
    pieces = std::move(*got);
  }
  ReadPlan plan;
  for (const auto& piece : pieces) {
    switch (piece.kind) {
      case tree::StagedEdit::Piece::kStaged:
        plan.AddMemory(piece.bytes->data(), piece.length);
        plan.keepalive.push_back(piece.bytes);
        break;
      case tree::StagedEdit::Piece::kBase: {
        auto part =
            checkpoint::PlanTensorRead(*s->tensor, *s->tree->src, piece.offset, piece.length);
        if (!part) return Result<ReadPlan>(part.error());
        plan.Append(*part);
        break;
      }
      case tree::StagedEdit::Piece::kZero:
        for (uint64_t done = 0; done < piece.length;) {
          uint64_t n = std::min<uint64_t>(piece.length - done, kZeroChunk);
          plan.AddMemory(Zeros()->data(), n);
          done += n;
        }
        plan.keepalive.push_back(Zeros());
        break;
    }
  }
  HoldForRead(s->tree, &plan);
  return plan;
}

void Filesystem::Impl::StagedAttr(uint64_t ino, NodeAttr* attr) const {
  if (tensor_writes.staged_count.load() == 0) return;
  std::lock_guard<std::mutex> lock(tensor_writes.mu);
  auto it = tensor_writes.staged.find(ino);
  if (it == tensor_writes.staged.end()) return;
  attr->size = it->second->edit.size();
  if (it->second->dirty) {
    attr->mtime_sec = it->second->mtime_sec;
    attr->mtime_nsec = it->second->mtime_nsec;
  }
}

Result<NodeAttr> Filesystem::Impl::SetTensorAttr(uint64_t ino, uint64_t fh,
                                                 const AttrChange& change) {
  const TreeRef tree = Current();
  NEMOFS_ASSIGN_OR_RETURN(const tree::Node* n, Node(*tree, ino));
  if (change.set_mode) {
    return Err(EPERM, "tensor {}: the mode of a tensor file cannot be changed", n->tensor->key);
  }
  if (change.set_size) {
    bool commit_now = false;
    {
      std::lock_guard<std::mutex> lock(tensor_writes.mu);
      auto it = tensor_writes.staged.find(ino);
      const auto retype = tensor_writes.retyped.find(ino);
      if (it == tensor_writes.staged.end() && retype != tensor_writes.retyped.end()) {
        // A retyped tensor truncated by path: staged (until the structural
        // commit) like a descriptor's writes.
        auto staged = std::make_shared<StagedTensor>(overlay.spill, tree, n->tensor);
        staged->mtime_sec = n->mtime_sec;
        staged->mtime_nsec = n->mtime_nsec;
        it = tensor_writes.staged.emplace(ino, std::move(staged)).first;
        tensor_writes.staged_count.store(tensor_writes.staged.size());
      }
      if (it == tensor_writes.staged.end()) {
        // truncate(2) by path with no descriptor open: to the same size it
        // changes nothing; any other size cannot be committed.
        if (change.size != n->tensor->nbytes()) {
          return Err(EINVAL, "tensor {} has {} bytes; it cannot be truncated to {} (changing a "
                             "tensor's size is not supported)",
                     n->tensor->key, n->tensor->nbytes(), change.size);
        }
      } else {
        StagedTensor& s = *it->second;
        const uint64_t limit =
            retype == tensor_writes.retyped.end()
                ? MaxStaged(s.tensor->nbytes())
                : MaxStaged(std::max(s.tensor->nbytes(), retype->second.nbytes()));
        if (change.size > limit) {
          return Err(EFBIG, "tensor {} has {} bytes; {} cannot be staged", s.tensor->key,
                     s.tensor->nbytes(), change.size);
        }
        NEMOFS_RETURN_IF_ERROR(s.edit.Truncate(change.size));
        s.dirty = true;
        ++s.generation;
        if (auto h = tensor_writes.handles.find(fh); h != tensor_writes.handles.end()) {
          h->second.wrote = true;
        }
        commit_now = s.handles == 0 && retype == tensor_writes.retyped.end();
      }
    }
    if (commit_now) NEMOFS_RETURN_IF_ERROR(CommitTensor(ino, "on truncate"));
  }
  NodeAttr a = Attr(ino, *n);
  StagedAttr(ino, &a);
  return a;
}

Status Filesystem::Impl::FlushTensor(uint64_t ino, uint64_t fh, bool fsync) {
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    auto h = tensor_writes.handles.find(fh);
    if (h == tensor_writes.handles.end()) return Ok();  // a reader
    if (h->second.failed) {
      return Err(h->second.failed->code(), "tensor not saved: a write on this descriptor failed "
                 "({})", h->second.failed->message());
    }
    if (!fsync && !h->second.wrote) return Ok();
  }
  return CommitTensor(ino, fsync ? "on fsync" : "on close");
}

void Filesystem::Impl::ReleaseTensor(uint64_t ino, uint64_t fh) {
  bool last = false;
  std::string key;
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    auto h = tensor_writes.handles.find(fh);
    if (h == tensor_writes.handles.end()) return;
    tensor_writes.handles.erase(h);
    auto it = tensor_writes.staged.find(ino);
    if (it == tensor_writes.staged.end()) return;
    last = --it->second->handles == 0;
    key = it->second->tensor->key;
  }
  if (!last) return;
  // Writes through a shared mapping can come after the last close: what
  // is still staged is committed now (the error only logged: nobody is
  // left to tell), then the staging is dropped.
  Status st = CommitTensor(ino, "at the last release");
  if (!st.ok()) {
    spdlog::error("tensor {}: the staged write is dropped: {}", key, st.error().message());
  }
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    auto it = tensor_writes.staged.find(ino);
    if (it != tensor_writes.staged.end() && it->second->handles == 0 &&
        !tensor_writes.retyped.count(ino)) {  // a retyped one waits for the structural commit
      tensor_writes.staged.erase(it);
      tensor_writes.staged_count.store(tensor_writes.staged.size());
    }
  }
  if (invalidate) invalidate({ino});  // the kernel's pages of the staged bytes
}

Status Filesystem::Impl::CommitTensor(uint64_t ino, std::string_view why) {
  std::lock_guard<std::mutex> commit(overlay.commit_mu);
  tree::StagedEdit::Changes changes;  // views of the staged bytes: a write meanwhile copies
  uint64_t size = 0, generation = 0;
  // The tree the staged tensor is of: the current one (a reload, under
  // commit_mu too, moves staged tensors over).
  TreeRef tree;
  const checkpoint::Tensor* tensor = nullptr;
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    auto it = tensor_writes.staged.find(ino);
    if (it == tensor_writes.staged.end() || !it->second->dirty) return Ok();
    // Another dtype or shape: stored by the structural commit (its size is
    // checked there).
    if (tensor_writes.retyped.count(ino)) return Ok();
    StagedTensor& s = *it->second;
    tree = s.tree;
    tensor = s.tensor;
    size = s.edit.size();
    if (size == tensor->nbytes()) {
      NEMOFS_ASSIGN_OR_RETURN(changes, s.edit.Snapshot());
    }
    generation = s.generation;
  }
  const checkpoint::Tensor& t = *tensor;
  const uint64_t nbytes = t.nbytes();
  source::Source* src = tree->src.get();
  const CheckpointInfo& info = tree->info;
  const std::string shown = fmt::format("tensor {}", t.key);
  if (size != nbytes) {
    std::string shape;
    for (int64_t d : t.shape) shape += (shape.empty() ? "" : "x") + std::to_string(d);
    return Err(EINVAL,
               "tensor {}: the file has {} bytes, the tensor {} ({} [{}]); nothing written "
               "(changing a tensor's size or shape is not supported)",
               t.key, size, nbytes, torch::Info(t.dtype).name, shape);
  }
  const auto& ranges = changes.ranges;

  // Tensor bytes -> stored bytes (the read plan's map, scattered).
  std::vector<checkpoint::BlobWrite> writes;
  for (const auto& [at, bytes] : ranges) {
    NEMOFS_ASSIGN_OR_RETURN(auto part, checkpoint::PlanTensorWrite(t, at, bytes));
    for (auto& w : part) writes.push_back(std::move(w));
  }
  // The old bytes of every stored write, read before anything is written
  // (the journal and the CRC arithmetic take them): file to file into a
  // spill buffer past a few MiB, not the heap.
  SpillBytes old_buffer(overlay.spill);
  std::vector<uint64_t> old_at(writes.size(), 0);
  for (size_t k = 0; k < writes.size(); ++k) {
    const auto& w = writes[k];
    if (w.lazy) continue;
    NEMOFS_ASSIGN_OR_RETURN(source::FileRange range, src->Locate(w.blob));
    if (w.offset + w.bytes.size() > range.length) {
      return Err(EIO, "{}: a write past the end of its stored file", shown);
    }
    old_at[k] = old_buffer.size();
    NEMOFS_RETURN_IF_ERROR(old_buffer.CopyFrom(range.fd, range.offset + w.offset, w.bytes.size(),
                                               old_at[k], info.source));
  }
  NEMOFS_ASSIGN_OR_RETURN(SpillBytes::View olds, old_buffer.Snapshot());
  std::deque<std::string> owned;  // bytes made here that patches point into
  std::vector<write::ConfigCommitter::Patch> data, meta;
  std::vector<uint32_t> data_blobs;  // the blob of each data patch
  std::set<uint32_t> blobs;
  // A compressed chunk's writes, for its decoded copy once committed.
  std::vector<const checkpoint::BlobWrite*> decoded;
  std::set<uint32_t> reencoded;  // blobs of chunk files replaced whole
  // CRCs of the records written: (file, member, central directory entry)
  // -> current value, blob and fields, patched write by write.
  struct CrcField {
    uint32_t value = 0;
    uint32_t blob = 0;
    std::string member;
    std::vector<uint64_t> fields;  // where it is stored (non-zero ones only)
  };
  std::map<std::tuple<std::string, uint64_t, uint64_t>, CrcField> crcs;
  uint64_t changed = 0;
  for (size_t i = 0; i < writes.size();) {
    auto& w = writes[i];
    NEMOFS_ASSIGN_OR_RETURN(source::StoredPlace place, src->PlaceOf(w.blob));
    if (w.lazy) {
      // A compressed chunk: decoded, changed, encoded again; the file is
      // replaced whole (to_end: its size changes) under the journal.
      size_t j = i;
      while (j < writes.size() && writes[j].blob == w.blob) ++j;
      if (src->storage() != source::Storage::kFolder) {
        return Err(EROFS, "{}: a compressed zarr chunk inside an archive cannot be re-encoded",
                   shown);
      }
      NEMOFS_ASSIGN_OR_RETURN(source::FileRange dec, w.lazy->Get(*src));
      std::string plain(dec.length, '\0');
      NEMOFS_RETURN_IF_ERROR(PreadFull(dec.fd, plain.data(), plain.size(), dec.offset, shown));
      std::string next = plain;
      for (size_t k = i; k < j; ++k) {
        const auto& wk = writes[k];
        if (wk.offset + wk.bytes.size() > next.size()) {
          return Err(EIO, "{}: a write past the end of a decoded chunk", shown);
        }
        std::memcpy(next.data() + wk.offset, wk.bytes.data(), wk.bytes.size());
        if (plain.compare(wk.offset, wk.bytes.size(), wk.bytes) != 0) {
          changed += wk.bytes.size();
          decoded.push_back(&wk);
        }
      }
      if (next != plain) {
        NEMOFS_ASSIGN_OR_RETURN(std::string encoded, w.lazy->Encode(next));
        write::ConfigCommitter::Patch p;
        p.file = place.file;
        p.offset = place.offset;
        p.bytes = owned.emplace_back(std::move(encoded));
        p.to_end = true;
        data.push_back(std::move(p));
        data_blobs.push_back(w.blob);
        blobs.insert(w.blob);
        reencoded.insert(w.blob);
      }
      i = j;
      continue;
    }
    const std::string_view old = olds.bytes.substr(old_at[i], w.bytes.size());
    ++i;
    if (old == w.bytes) continue;  // nothing to patch
    NEMOFS_ASSIGN_OR_RETURN(source::FileRange range, src->Locate(w.blob));
    // The zip record the bytes lie in (a chunk of this tensor in that blob).
    const torch::ZipRecordPos* rec = nullptr;
    for (const auto& c : t.chunks) {
      if (c.blob == w.blob && c.record.present && c.record.data <= w.offset &&
          w.offset + w.bytes.size() <= c.record.data + c.record.size) {
        rec = &c.record;
        break;
      }
    }
    if (rec) {
      // The fields holding the record's CRC-32 (FORMATS.md §3.4): the
      // central directory's, the data descriptor's, and the local
      // header's when no descriptor follows. A 0 (not computed) stays 0.
      std::vector<uint64_t> fields{rec->central + 16};
      if (rec->flags & 0x8) {
        char sig[4];
        NEMOFS_RETURN_IF_ERROR(PreadFull(range.fd, sig, 4,
                                         range.offset + rec->data + rec->size, info.source));
        fields.push_back(rec->data + rec->size + (Le32(sig) == 0x08074b50 ? 4 : 0));
      } else {
        fields.push_back(rec->local_header + 14);
      }
      // One CRC per record, patched once per write and stored into each
      // of its fields (the central directory's value is the record's).
      auto key = std::make_tuple(place.file, place.member_index, place.offset + rec->central);
      auto it = crcs.find(key);
      if (it == crcs.end()) {
        CrcField field;
        field.blob = w.blob;
        field.member = place.member;
        for (uint64_t f : fields) {
          char b[4];
          NEMOFS_RETURN_IF_ERROR(PreadFull(range.fd, b, 4, range.offset + f, info.source));
          if (Le32(b) == 0) continue;  // not computed by the writer: stays 0
          if (field.fields.empty()) field.value = Le32(b);
          field.fields.push_back(place.offset + f);
        }
        it = crcs.emplace(key, std::move(field)).first;
      }
      if (!it->second.fields.empty()) {
        it->second.value =
            write::Crc32Patch(it->second.value, rec->size, w.offset - rec->data, old, w.bytes);
      }
    }
    changed += w.bytes.size();
    blobs.insert(w.blob);
    // The old bytes go along: the journal needs them, no second read.
    write::ConfigCommitter::Patch p;
    p.file = place.file;
    p.offset = place.offset + w.offset;
    p.bytes = w.bytes;
    p.old = old;
    p.member = place.member;
    p.member_index = place.member_index;
    data.push_back(std::move(p));
    data_blobs.push_back(w.blob);
  }
  std::vector<uint32_t> meta_blobs;
  for (const auto& [key, field] : crcs) {
    for (uint64_t f : field.fields) {
      write::ConfigCommitter::Patch p;
      p.file = std::get<0>(key);
      p.member_index = std::get<1>(key);
      p.offset = f;
      p.bytes = owned.emplace_back(Le32Bytes(field.value));
      p.member = field.member;
      meta.push_back(std::move(p));
      meta_blobs.push_back(field.blob);
    }
  }
  const bool rewrite = src->storage() == source::Storage::kCompressedTar;
  spdlog::info("{}: {} bytes changed in {} region(s), {} CRC field(s) {}{}", shown, changed,
               data.size(), meta.size(), why,
               rewrite ? fmt::format(" (a rewrite of the {} archive)", src->Kind()) : "");
  Status st = Ok();
  if (!data.empty()) {
    // Readers wait while stored bytes change under them. A rewrite of a
    // compressed archive changes none they read (they read its extracted
    // members): they wait only while those get the new bytes.
    std::unique_lock<std::shared_mutex> hold(tensor_writes.patch_mu, std::defer_lock);
    if (!rewrite) hold.lock();
    st = overlay.committer->PatchInPlace(
        data, meta, ProgressLogger(shown, rewrite ? "" : "in-place patch under the journal"));
    if (rewrite) hold.lock();
    if (st.ok()) {
      // What reads come from besides the stored files: the member extracted
      // from a compressed archive, the decoded copy of a zarr chunk. Should
      // that fail, the checkpoint holds the new bytes but this mount would
      // show the old ones: those files read ESTALE until a remount.
      auto refresh = [&](uint32_t blob, Status done) {
        if (done.ok()) return;
        spdlog::error("{}: committed, but this mount cannot show it: {}", shown,
                      done.error().message());
        tree->MarkStale(blob, "a write was committed but this mount cannot show it (" +
                            done.error().message() + "); remount");
      };
      if (rewrite) {
        for (size_t k = 0; k < data.size(); ++k) {
          refresh(data_blobs[k], src->PatchExtracted(data_blobs[k], data[k].offset, data[k].bytes));
        }
        for (size_t k = 0; k < meta.size(); ++k) {
          refresh(meta_blobs[k], src->PatchExtracted(meta_blobs[k], meta[k].offset, meta[k].bytes));
        }
      }
      for (const auto* wk : decoded) refresh(wk->blob, wk->lazy->PatchDecoded(wk->offset, wk->bytes));
      // The chunk files' own archive/ view: its size is the old one.
      for (uint32_t b : reencoded) {
        tree->MarkStale(b,
                  "its chunk file was re-encoded by a tensor write (another size); remount to "
                  "see it as stored",
                  true);
      }
    }
  }
  if (!st.ok()) {
    return Err(st.error().code(), "{} not saved: {}", shown, st.error().message());
  }
  {
    std::lock_guard<std::mutex> lock(tensor_writes.mu);
    auto it = tensor_writes.staged.find(ino);
    if (it != tensor_writes.staged.end() && it->second->generation == generation) {
      StagedTensor& s = *it->second;
      s.edit.Reset(s.edit.size());
      s.dirty = false;
    }
  }
  if (invalidate && !blobs.empty()) invalidate(tree->NodesOfBlobs(blobs));
  return Ok();
}

}  // namespace nemofs
