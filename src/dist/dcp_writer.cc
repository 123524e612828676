#include "dist/dcp_writer.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <tuple>
#include <unordered_map>

#include "torch/pickle_writer.h"
#include "torch/tensor_save.h"
#include "torch/value_arena.h"
#include "util/atomic_replace.h"
#include "util/fd.h"
#include "util/io.h"
#include "write/fault.h"

namespace nemofs::dist {
namespace {

using torch::Kind;
using torch::Value;
using torch::ValueArena;
using torch::InvalidEdit;

constexpr uint8_t kNewObj = 0x81;
constexpr uint8_t kReduce = 'R';
constexpr std::string_view kDistcpSuffix = ".distcp";

// The state dict of a dataclass-like object (as dcp.cc reads it).
const Value* State(const Value* v) {
  if (!v) return nullptr;
  if (v->state && v->state->Is(Kind::kDict)) return v->state;
  if (v->state && v->state->Is(Kind::kTuple) && v->state->items.size() == 2 &&
      v->state->items[1]->Is(Kind::kDict)) {
    return v->state->items[1];
  }
  return nullptr;
}

const Value* Field(const Value* obj, std::string_view name) {
  const Value* st = State(obj);
  return st ? st->Get(name) : nullptr;
}

std::string ClassName(const Value* v) {
  if (!v || !v->callable || !v->callable->Is(Kind::kGlobal)) return "";
  return v->callable->name;
}

std::string FqnOf(const Value* index) {
  const Value* f = Field(index, "fqn");
  return f && f->Is(Kind::kString) ? f->str : std::string();
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

// Plain names of the folder's entries (best effort).
std::vector<std::pair<std::string, unsigned char>> ListFolder(int dir_fd) {
  std::vector<std::pair<std::string, unsigned char>> out;
  int fd = ::openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return out;
  std::unique_ptr<DIR, int (*)(DIR*)> d(::fdopendir(fd), &::closedir);
  if (!d) {
    ::close(fd);
    return out;
  }
  while (const dirent* e = ::readdir(d.get())) {
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    out.emplace_back(std::move(n), e->d_type);
  }
  return out;
}

bool IsRegularFile(int dir_fd, const std::string& name, uint64_t* size = nullptr) {
  struct stat st {};
  if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return false;
  if (!S_ISREG(st.st_mode)) return false;
  if (size) *size = static_cast<uint64_t>(st.st_size);
  return true;
}

// The pid a .metadata temp name ends with; 0 if it is not one.
long TempPid(std::string_view name) {
  if (!StartsWith(name, kDcpMetadataTempPrefix)) return 0;
  std::string_view digits = name.substr(std::string_view(kDcpMetadataTempPrefix).size());
  if (digits.empty() || digits.size() > 9 ||
      digits.find_first_not_of("0123456789") != std::string_view::npos) {
    return 0;
  }
  return std::stol(std::string(digits));
}

bool Alive(long pid) {
  return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

// Every .distcp file an item of the loaded .metadata points at.
std::set<std::string> ReferencedFiles(const LoadedDcp& loaded) {
  std::set<std::string> out;
  const Value* sd = Field(loaded.pickle.root, "storage_data");
  if (!sd || !sd->Is(Kind::kDict)) return out;
  for (const auto& [index, info] : sd->entries) {
    const Value* p = Field(info, "relative_path");
    if (p && p->Is(Kind::kString)) out.insert(p->str);
  }
  return out;
}

Status CheckUnchanged(int dir_fd, const std::string& name, const LoadedDcp& loaded) {
  struct stat st {};
  if (::fstatat(dir_fd, kDcpMetadataName, &st, AT_SYMLINK_NOFOLLOW) != 0) {
    int e = errno;
    return Err(e, "{}/{}: {}", name, kDcpMetadataName, std::strerror(e));
  }
  int64_t mtime = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  if (st.st_dev != loaded.dev || st.st_ino != loaded.ino || st.st_size != loaded.size ||
      mtime != loaded.mtime_ns) {
    return Err(ESTALE, "{}/{}: changed since it was read; reload before committing", name,
               kDcpMetadataName);
  }
  return Ok();
}

Status FsyncDir(int dir_fd, const std::string& name) {
  if (::fsync(dir_fd) != 0) {
    int e = errno;
    return Err(e, "{}: fsync of the folder failed: {}", name, std::strerror(e));
  }
  return Ok();
}

// A new `__nemofs_<n>_0.distcp` (first n that no file and no item uses),
// created 0600 and O_EXCL.
Result<std::pair<UniqueFd, std::string>> CreateDistcp(int dir_fd, const std::string& name,
                                                      const std::set<std::string>& referenced) {
  for (uint64_t n = 0; n < 1000000; ++n) {
    std::string file = fmt::format("{}{}_0{}", kDcpFilePrefix, n, kDistcpSuffix);
    if (referenced.count(file)) continue;
    UniqueFd fd(
        ::openat(dir_fd, file.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (fd.valid()) return std::make_pair(std::move(fd), file);
    if (errno != EEXIST) {
      int e = errno;
      return Err(e, "{}/{}: cannot create: {}", name, file, std::strerror(e));
    }
  }
  return Err(EEXIST, "{}: no free {}<n>_0{} name", name, kDcpFilePrefix, kDistcpSuffix);
}

// Gives the finished new .distcp the checkpoint's mode/owner, fsyncs it and the folder.
Status FinishDistcp(int dir_fd, int fd, const std::string& name, const std::string& file,
                    const LoadedDcp& loaded) {
  (void)!::fchown(fd, loaded.uid, loaded.gid);
  if (::fchmod(fd, loaded.mode & 07777) != 0 || ::fsync(fd) != 0) {
    int e = errno;
    return Err(e, "{}/{}: cannot finish: {}", name, file, std::strerror(e));
  }
  return FsyncDir(dir_fd, name);
}

// Commits `pickle` as the folder's .metadata (the commit point).
Status WriteMetadata(int dir_fd, const std::string& name, const LoadedDcp& loaded,
                     const std::string& pickle) {
  ReplaceOptions options;
  options.temp_path = kDcpMetadataTempPrefix + std::to_string(::getpid());
  options.mode = loaded.mode & 07777;
  options.owner = std::make_pair(loaded.uid, loaded.gid);
  options.durable = true;
  options.on_written = [] { write::MaybeCrash("dcp:metadata-written"); };
  options.on_renamed = [] { write::MaybeCrash("dcp:metadata-renamed"); };
  const std::string what = name + "/" + kDcpMetadataName;
  return ReplaceFileAt(dir_fd, name, kDcpMetadataName, options,
                       [&](int fd) { return PwriteFull(fd, pickle, 0, what); });
}

Status CopyRange(int src, uint64_t src_off, int dst, uint64_t dst_off, uint64_t len,
                 const std::string& what) {
  while (len > 0) {
    loff_t in = static_cast<loff_t>(src_off), out = static_cast<loff_t>(dst_off);
    ssize_t n = ::copy_file_range(src, &in, dst, &out, std::min<uint64_t>(len, 1u << 30), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      // No kernel copy here (EXDEV, ENOSYS, EINVAL on some file systems):
      // through a buffer.
      std::string buf(std::min<uint64_t>(len, 1u << 20), '\0');
      size_t chunk = std::min<uint64_t>(len, buf.size());
      NEMOFS_RETURN_IF_ERROR(PreadFull(src, buf.data(), chunk, src_off, what));
      NEMOFS_RETURN_IF_ERROR(PwriteFull(dst, std::string_view(buf.data(), chunk), dst_off, what));
      n = static_cast<ssize_t>(chunk);
    }
    src_off += static_cast<uint64_t>(n);
    dst_off += static_cast<uint64_t>(n);
    len -= static_cast<uint64_t>(n);
  }
  return Ok();
}

// Builds the edited graph: copies of the dicts that change, new objects made
// in the form of the file's own, all held in `arena_`.
class Editor {
 public:
  Editor(const LoadedDcp& loaded, const std::string& name) : loaded_(loaded), name_(name) {}

  Status Init();
  Status Apply(const DcpEdit& e);

  struct Pending {
    const torch::NewTensor* tensor;
    std::string fqn;
    Value* offset;
    Value* length;
    const Value* info;
  };
  // The new items still referenced after all edits, in edit order.
  std::vector<Pending*> LivePending();
  // The new file's name, for every new _StorageInfo.
  void SetNewFile(const std::string& file) { path_->str = file; }
  // Replacement map for WritePickle (the changed dicts).
  const std::unordered_map<const Value*, const Value*>& Finish();
  std::vector<std::string>& notes() { return notes_; }

 private:
  template <typename... Args>
  Error Fail(fmt::format_string<Args...> format, Args&&... args) const {
    return InvalidEdit(name_, format, std::forward<Args>(args)...);
  }
  // The file's global `module.name` (memoised there: written once, then
  // fetched), else one of that name under another module, else a new one.
  const Value* Global(std::string_view module, std::string_view name, bool any_module) {
    const Value* by_name = nullptr;
    for (const auto& v : loaded_.pickle.arena) {
      if (v->IsGlobal(module, name)) return v.get();
      if (any_module && !by_name && v->Is(Kind::kGlobal) && v->name == name) by_name = v.get();
    }
    if (by_name) return by_name;
    Value* g = arena_.New(Kind::kGlobal);
    g->str = module;
    g->name = name;
    return g;
  }
  // torch.Size((dims...)) as the file writes it.
  Value* Size(const std::vector<int64_t>& dims) {
    Value* inner = arena_.New(Kind::kTuple);
    for (int64_t d : dims) inner->items.push_back(arena_.Int(d));
    Value* call = arena_.New(Kind::kCall);
    call->opcode = kReduce;
    call->callable = size_global_;
    call->args = arena_.Tuple({inner});
    return call;
  }
  // A new instance like `tmpl` (its class reference, NEWOBJ arguments and
  // state form), or NEWOBJ of module.cls.
  Value* ObjectLike(const Value* tmpl, std::string_view module, std::string_view cls) {
    Value* o = arena_.New(Kind::kObject);
    if (tmpl) {
      *o = *tmpl;
      o->state = nullptr;
      return o;
    }
    o->opcode = kNewObj;
    o->callable = Global(module, cls, true);
    o->args = arena_.New(Kind::kTuple);
    return o;
  }
  // A state dict with `fields`, keyed (and ordered) like the template's
  // state dict when there is one: its key strings are reused, its other
  // fields kept; fields it lacks are appended.
  void SetState(Value* obj, const Value* tmpl,
                const std::vector<std::pair<std::string, const Value*>>& fields) {
    const Value* ts = State(tmpl);
    Value* d = arena_.New(Kind::kDict);
    std::set<std::string> done;
    if (ts) {
      for (const auto& [k, v] : ts->entries) {
        const Value* val = v;
        if (k->Is(Kind::kString)) {
          for (const auto& [n, fv] : fields) {
            if (n == k->str) val = fv;
          }
          done.insert(k->str);
        }
        d->entries.emplace_back(k, val);
      }
    }
    for (const auto& [n, fv] : fields) {
      if (!done.count(n)) d->entries.emplace_back(arena_.Str(n), fv);
    }
    if (tmpl && tmpl->state && tmpl->state->Is(Kind::kTuple) && tmpl->state->items.size() == 2) {
      obj->state = arena_.Tuple({tmpl->state->items[0], d});  // (None, {...}) form
    } else {
      obj->state = d;
    }
  }
  // A copy of `obj` whose state has field `name` = `value`.
  Value* WithField(const Value* obj, const std::string& name, const Value* value) {
    Value* o = arena_.New(obj->kind);
    *o = *obj;
    SetState(o, obj, {{name, value}});
    return o;
  }

  size_t FindKey(const std::string& fqn) const {
    for (size_t i = 0; i < sdm_.size(); ++i) {
      if (sdm_[i].first->Is(Kind::kString) && sdm_[i].first->str == fqn) return i;
    }
    return npos;
  }
  static size_t FindIn(const std::vector<std::pair<const Value*, const Value*>>& d,
                       const std::string& key) {
    for (size_t i = 0; i < d.size(); ++i) {
      if (d[i].first->Is(Kind::kString) && d[i].first->str == key) return i;
    }
    return npos;
  }
  void EraseStorage(const std::string& fqn) {
    std::erase_if(sd_, [&](const auto& kv) { return FqnOf(kv.first) == fqn; });
  }
  void EraseIn(std::vector<std::pair<const Value*, const Value*>>* d, const std::string& key) {
    if (size_t i = FindIn(*d, key); i != npos) d->erase(d->begin() + static_cast<long>(i));
  }
  Status RefuseFlattened(const std::string& fqn) const {
    if (flattened_.count(fqn)) {
      return Fail(
          "{} is a flattened distributed-optimizer tensor (mcore_data "
          "nd_reformulated_orig_global_shape): nemofs does not edit those",
          fqn);
    }
    return Ok();
  }
  Result<const Value*> MakeTensorMetadata(const torch::NewTensor& t);

  static constexpr size_t npos = static_cast<size_t>(-1);

  const LoadedDcp& loaded_;
  const std::string& name_;
  ValueArena arena_;
  std::unordered_map<const Value*, const Value*> replace_;
  std::vector<std::string> notes_;
  std::set<std::string> flattened_;

  const Value* sdm_orig_ = nullptr;
  const Value* sd_orig_ = nullptr;
  const Value* planner_orig_ = nullptr;
  const Value* mcore_orig_ = nullptr;
  std::vector<std::pair<const Value*, const Value*>> sdm_, sd_, planner_, mcore_;

  // Templates from the file (nullptr when it has none).
  const Value* tsm_t_ = nullptr;    // TensorStorageMetadata
  const Value* props_t_ = nullptr;  // its TensorProperties
  const Value* chunk_t_ = nullptr;  // its first ChunkStorageMetadata
  const Value* index_t_ = nullptr;  // a MetadataIndex with an offset
  const Value* info_t_ = nullptr;   // a _StorageInfo
  const Value* size_global_ = nullptr;
  const Value* layout_ = nullptr;
  const Value* mem_format_ = nullptr;

  Value* path_ = nullptr;  // relative_path of every new item
  std::deque<Pending> pending_;
};

Status Editor::Init() {
  const Value* root = loaded_.pickle.root;
  const Value* st = State(root);
  sdm_orig_ = st ? st->Get("state_dict_metadata") : nullptr;
  sd_orig_ = st ? st->Get("storage_data") : nullptr;
  if (!sdm_orig_ || !sdm_orig_->Is(Kind::kDict) || !sd_orig_ || !sd_orig_->Is(Kind::kDict)) {
    return Fail("{}: not a DCP Metadata object", kDcpMetadataName);
  }
  sdm_ = sdm_orig_->entries;
  sd_ = sd_orig_->entries;
  if (const Value* p = st->Get("planner_data"); p && p->Is(Kind::kDict)) {
    planner_orig_ = p;
    planner_ = p->entries;
  }
  if (const Value* m = st->Get("mcore_data"); m && m->Is(Kind::kDict)) {
    mcore_orig_ = m;
    mcore_ = m->entries;
  }
  for (const auto& t : loaded_.md.tensors) {
    if (!t.original_shape.empty()) flattened_.insert(t.key);
  }
  for (const auto& [k, meta] : sdm_) {
    if (ClassName(meta) != "TensorStorageMetadata") continue;
    const Value* props = Field(meta, "properties");
    const Value* size = Field(meta, "size");
    const Value* chunks = Field(meta, "chunks");
    if (!props || !size || !size->Is(Kind::kCall) || !chunks || !chunks->Is(Kind::kList) ||
        chunks->items.empty()) {
      continue;
    }
    tsm_t_ = meta;
    props_t_ = props;
    chunk_t_ = chunks->items[0];
    size_global_ = size->callable;
    if (props->state && props->state->Is(Kind::kTuple) && props->state->items.size() >= 4) {
      layout_ = props->state->items[1];
      mem_format_ = props->state->items[3];
    }
    break;
  }
  for (const auto& [index, info] : sd_) {
    const Value* off = Field(index, "offset");
    if (!index_t_ && off && !off->Is(Kind::kNone)) index_t_ = index;
    if (!info_t_ && Field(info, "relative_path")) info_t_ = info;
  }
  if (!size_global_) size_global_ = Global("torch", "Size", false);
  if (!layout_) {
    Value* call = arena_.New(Kind::kCall);
    call->opcode = kReduce;
    call->callable = Global("torch.serialization", "_get_layout", false);
    call->args = arena_.Tuple({arena_.Str("torch.strided")});
    layout_ = call;
  }
  if (!mem_format_) {
    Value* call = arena_.New(Kind::kCall);
    call->opcode = kReduce;
    call->callable = Global("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", false);
    call->args = arena_.Tuple({arena_.Int(0)});
    mem_format_ = call;
  }
  path_ = arena_.Str("");
  return Ok();
}

Result<const Value*> Editor::MakeTensorMetadata(const torch::NewTensor& t) {
  const std::string_view dtype_name = torch::Info(t.dtype).name;
  const Value* dtype = Global("torch", dtype_name, false);
  constexpr std::string_view kMeta = "torch.distributed.checkpoint.metadata";

  Value* props = ObjectLike(props_t_, kMeta, "TensorProperties");
  const Value* pstate = props_t_ ? props_t_->state : nullptr;
  if (pstate && pstate->Is(Kind::kTuple) && !pstate->items.empty()) {
    Value* tuple = arena_.Tuple(pstate->items);
    tuple->items[0] = dtype;
    props->state = tuple;
  } else if (State(props_t_)) {
    SetState(props, props_t_, {{"dtype", dtype}});
  } else {
    Value* no = arena_.New(Kind::kBool);
    props->state = arena_.Tuple({dtype, layout_, no, mem_format_, no});
  }

  std::vector<int64_t> zeros(t.shape.size(), 0);
  Value* chunk = ObjectLike(chunk_t_, kMeta, "ChunkStorageMetadata");
  SetState(chunk, chunk_t_, {{"offsets", Size(zeros)}, {"sizes", Size(t.shape)}});
  Value* chunks = arena_.New(Kind::kList);
  chunks->items.push_back(chunk);

  Value* tsm = ObjectLike(tsm_t_, kMeta, "TensorStorageMetadata");
  SetState(tsm, tsm_t_, {{"properties", props}, {"size", Size(t.shape)}, {"chunks", chunks}});
  return tsm;
}

Status Editor::Apply(const DcpEdit& e) {
  switch (e.op) {
    case DcpEdit::Op::kRemove: {
      NEMOFS_RETURN_IF_ERROR(RefuseFlattened(e.fqn));
      size_t i = FindKey(e.fqn);
      if (i == npos) return Fail("cannot remove {}: no such key in {}", e.fqn, kDcpMetadataName);
      sdm_.erase(sdm_.begin() + static_cast<long>(i));
      EraseStorage(e.fqn);
      EraseIn(&planner_, e.fqn);
      EraseIn(&mcore_, e.fqn);
      return Ok();
    }
    case DcpEdit::Op::kRename: {
      NEMOFS_RETURN_IF_ERROR(RefuseFlattened(e.fqn));
      size_t i = FindKey(e.fqn);
      if (i == npos) return Fail("cannot rename {}: no such key in {}", e.fqn, kDcpMetadataName);
      if (e.to.empty()) return Fail("cannot rename {} to an empty key", e.fqn);
      if (FindKey(e.to) != npos) {
        return Fail("cannot rename {} to {}: that key exists", e.fqn, e.to);
      }
      const Value* key = arena_.Str(e.to);
      sdm_[i].first = key;
      for (auto& [index, info] : sd_) {
        if (FqnOf(index) == e.fqn) index = WithField(index, "fqn", key);
      }
      if (size_t p = FindIn(planner_, e.fqn); p != npos) {
        const Value* old = planner_[p].second;
        bool trivial = old && old->Is(Kind::kTuple) && old->items.size() == 1 &&
                       old->items[0]->Is(Kind::kString) && old->items[0]->str == e.fqn;
        if (!trivial) {
          notes_.push_back(
              fmt::format("{}: planner_data of {} was a nested path; {} is mapped to the top level",
                          name_, e.fqn, e.to));
        }
        planner_[p] = {key, arena_.Tuple({key})};
      }
      if (size_t m = FindIn(mcore_, e.fqn); m != npos) mcore_[m].first = key;
      return Ok();
    }
    case DcpEdit::Op::kSetTensor: {
      NEMOFS_RETURN_IF_ERROR(RefuseFlattened(e.fqn));
      if (e.fqn.empty()) return Fail("a tensor needs a non-empty key");
      auto bytes = torch::NewTensorBytes(e.tensor, e.fqn);
      if (!bytes) return bytes.error().Context(name_);
      NEMOFS_ASSIGN_OR_RETURN(const Value* tsm, MakeTensorMetadata(e.tensor));
      const Value* key = nullptr;
      if (size_t i = FindKey(e.fqn); i != npos) {
        key = sdm_[i].first;
        sdm_[i].second = tsm;
        EraseStorage(e.fqn);
      } else {
        key = arena_.Str(e.fqn);
        sdm_.emplace_back(key, tsm);
      }
      std::vector<int64_t> zeros(e.tensor.shape.size(), 0);
      Value* index = ObjectLike(index_t_, "torch.distributed.checkpoint.metadata", "MetadataIndex");
      SetState(index, index_t_, {{"fqn", key}, {"offset", Size(zeros)}, {"index", arena_.Int(0)}});
      Value* info = ObjectLike(info_t_, "torch.distributed.checkpoint.filesystem", "_StorageInfo");
      Value* offset = arena_.Int(0);
      Value* length = arena_.Int(0);
      std::vector<std::pair<std::string, const Value*>> fields = {
          {"relative_path", path_}, {"offset", offset}, {"length", length}};
      if (Field(info_t_, "transform_descriptors")) {
        fields.emplace_back("transform_descriptors", arena_.New(Kind::kList));
      }
      SetState(info, info_t_, fields);
      sd_.emplace_back(index, info);
      pending_.push_back({&e.tensor, e.fqn, offset, length, info});
      if (planner_orig_ && FindIn(planner_, e.fqn) == npos) {
        planner_.emplace_back(key, arena_.Tuple({key}));
      }
      if (mcore_orig_ && FindIn(mcore_, e.fqn) == npos) {
        mcore_.emplace_back(key, arena_.New(Kind::kDict));
      }
      return Ok();
    }
  }
  return Fail("unknown edit");
}

std::vector<Editor::Pending*> Editor::LivePending() {
  std::set<const Value*> live;
  for (const auto& [index, info] : sd_) live.insert(info);
  std::vector<Pending*> out;
  for (auto& p : pending_) {
    if (live.count(p.info)) out.push_back(&p);
  }
  return out;
}

const std::unordered_map<const Value*, const Value*>& Editor::Finish() {
  auto swap_in = [&](const Value* orig,
                     const std::vector<std::pair<const Value*, const Value*>>& entries) {
    if (!orig || orig->entries == entries) return;
    Value* c = arena_.New(Kind::kDict);
    *c = *orig;
    c->entries = entries;
    replace_[orig] = c;
  };
  swap_in(sdm_orig_, sdm_);
  swap_in(sd_orig_, sd_);
  swap_in(planner_orig_, planner_);
  swap_in(mcore_orig_, mcore_);
  return replace_;
}

Status ParseLoaded(LoadedDcp* out, const std::string& what) {
  out->protocol = torch::PickleProtocol(out->bytes);
  NEMOFS_ASSIGN_OR_RETURN(out->pickle, torch::Unpickle(out->bytes, what));
  NEMOFS_ASSIGN_OR_RETURN(out->md, ParseDcpMetadata(out->pickle, what));
  return Ok();
}

}  // namespace

DcpEdit DcpEdit::Remove(std::string fqn) {
  DcpEdit e;
  e.op = Op::kRemove;
  e.fqn = std::move(fqn);
  return e;
}

DcpEdit DcpEdit::Rename(std::string fqn, std::string to) {
  DcpEdit e;
  e.op = Op::kRename;
  e.fqn = std::move(fqn);
  e.to = std::move(to);
  return e;
}

DcpEdit DcpEdit::SetTensor(std::string fqn, torch::NewTensor t) {
  DcpEdit e;
  e.op = Op::kSetTensor;
  e.fqn = std::move(fqn);
  e.tensor = std::move(t);
  return e;
}

Result<LoadedDcp> LoadDcpMetadata(int dir_fd, const std::string& name) {
  const std::string what = name + "/" + kDcpMetadataName;
  UniqueFd fd(::openat(dir_fd, kDcpMetadataName, O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) {
    int e = errno;
    return Err(e, "{}: {}", what, std::strerror(e));
  }
  NEMOFS_ASSIGN_OR_RETURN(struct stat st, FStat(fd.get(), what));
  if (!S_ISREG(st.st_mode)) return Err(EINVAL, "{}: not a regular file", what);
  if (static_cast<uint64_t>(st.st_size) > kMaxDcpMetadataBytes) {
    return Err(EFBIG, "{}: {} bytes is more than nemofs reads ({})", what, st.st_size,
               kMaxDcpMetadataBytes);
  }
  LoadedDcp out;
  out.bytes.resize(static_cast<size_t>(st.st_size));
  NEMOFS_RETURN_IF_ERROR(PreadFull(fd.get(), out.bytes.data(), out.bytes.size(), 0, what));
  out.dev = st.st_dev;
  out.ino = st.st_ino;
  out.size = st.st_size;
  out.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  out.mode = st.st_mode & 07777;
  out.uid = st.st_uid;
  out.gid = st.st_gid;
  NEMOFS_RETURN_IF_ERROR(ParseLoaded(&out, what));
  return out;
}

Result<LoadedDcp> ParseDcpMetadataBytes(std::string bytes, const std::string& what) {
  if (bytes.size() > kMaxDcpMetadataBytes) {
    return Err(EFBIG, "{}: {} bytes is more than nemofs reads ({})", what, bytes.size(),
               kMaxDcpMetadataBytes);
  }
  LoadedDcp out;
  out.bytes = std::move(bytes);
  out.size = static_cast<off_t>(out.bytes.size());
  NEMOFS_RETURN_IF_ERROR(ParseLoaded(&out, what));
  return out;
}

std::string FreeDistcpName(const LoadedDcp& loaded, const std::set<std::string>& files) {
  const std::set<std::string> referenced = ReferencedFiles(loaded);
  for (uint64_t n = 0;; ++n) {
    std::string file = fmt::format("{}{}_0{}", kDcpFilePrefix, n, kDistcpSuffix);
    if (!referenced.count(file) && !files.count(file)) return file;
  }
}

struct DcpCommitPlan::Impl {
  Impl(const LoadedDcp& loaded, const std::string& name) : loaded(loaded), editor(loaded, name) {}
  const LoadedDcp& loaded;
  Editor editor;
  std::vector<Editor::Pending*> items;
};

DcpCommitPlan::DcpCommitPlan() = default;
DcpCommitPlan::~DcpCommitPlan() = default;
bool DcpCommitPlan::has_items() const { return !impl_->items.empty(); }
void DcpCommitPlan::SetNewFile(const std::string& file) { impl_->editor.SetNewFile(file); }
std::vector<std::string>& DcpCommitPlan::notes() { return impl_->editor.notes(); }

Result<uint64_t> DcpCommitPlan::WriteItems(int fd, uint64_t offset, const std::string& shown) {
  uint64_t at = 0;
  for (Editor::Pending* p : impl_->items) {
    NEMOFS_ASSIGN_OR_RETURN(auto saved,
                            torch::SaveTensorZip(*p->tensor, fd, offset + at, shown + ": " + p->fqn));
    p->offset->integer = static_cast<int64_t>(at);
    p->length->integer = static_cast<int64_t>(saved.bytes);
    at += saved.bytes;
  }
  return at;
}

Result<std::string> DcpCommitPlan::Metadata(const std::string& shown) {
  torch::PickleWriteOptions options;
  options.replace = &impl_->editor.Finish();
  auto pickle = torch::WritePickle(impl_->loaded.pickle.root, impl_->loaded.protocol, options);
  if (!pickle) return pickle.error().Context(shown);
  return std::move(*pickle);
}

Result<std::unique_ptr<DcpCommitPlan>> PlanDcpEdits(const LoadedDcp& loaded,
                                                    const std::string& name,
                                                    const std::vector<DcpEdit>& edits) {
  if (!loaded.pickle.root) return Err(EINVAL, "{}: no parsed {}", name, kDcpMetadataName);
  if (loaded.protocol < 2 || loaded.protocol > 5) {
    return Err(EINVAL, "{}/{}: pickle protocol {} cannot be re-emitted (2 to 5 can)", name,
               kDcpMetadataName, loaded.protocol);
  }
  std::unique_ptr<DcpCommitPlan> plan(new DcpCommitPlan());
  plan->impl_ = std::make_unique<DcpCommitPlan::Impl>(loaded, name);
  NEMOFS_RETURN_IF_ERROR(plan->impl_->editor.Init());
  for (const auto& e : edits) NEMOFS_RETURN_IF_ERROR(plan->impl_->editor.Apply(e));
  plan->impl_->items = plan->impl_->editor.LivePending();
  return plan;
}

Result<DcpCommitResult> CommitDcpEdits(int dir_fd, const std::string& name, const LoadedDcp& loaded,
                                       const std::vector<DcpEdit>& edits) {
  NEMOFS_RETURN_IF_ERROR(CheckUnchanged(dir_fd, name, loaded));
  NEMOFS_ASSIGN_OR_RETURN(std::unique_ptr<DcpCommitPlan> plan, PlanDcpEdits(loaded, name, edits));

  DcpCommitResult result;
  // Written only when the commit fails: the new file is then unreferenced.
  std::string created;
  auto fail = [&](Error err) -> Error {
    if (!created.empty()) ::unlinkat(dir_fd, created.c_str(), 0);
    return err;
  };
  if (plan->has_items()) {
    NEMOFS_ASSIGN_OR_RETURN(auto made, CreateDistcp(dir_fd, name, ReferencedFiles(loaded)));
    auto& [fd, file] = made;
    created = file;
    plan->SetNewFile(file);
    auto at = plan->WriteItems(fd.get(), 0, name + "/" + file);
    if (!at) return fail(at.error());
    if (auto st = FinishDistcp(dir_fd, fd.get(), name, file, loaded); !st.ok()) {
      return fail(st.error());
    }
    result.distcp_file = file;
    result.bytes_written = *at;
  }
  write::MaybeCrash("dcp:distcp-written");

  auto pickle = plan->Metadata(name + "/" + kDcpMetadataName);
  if (!pickle) return fail(pickle.error());
  if (auto st = WriteMetadata(dir_fd, name, loaded, *pickle); !st.ok()) return fail(st.error());
  result.bytes_written += pickle->size();
  result.notes = std::move(plan->notes());
  return result;
}

std::vector<std::string> ListDcpOrphans(int dir_fd, const LoadedDcp& loaded) {
  const std::set<std::string> referenced = ReferencedFiles(loaded);
  std::vector<std::string> out;
  for (const auto& entry : ListFolder(dir_fd)) {
    const std::string& n = entry.first;
    if (StartsWith(n, kDcpFilePrefix) && EndsWith(n, kDistcpSuffix)) {
      if (!referenced.count(n) && IsRegularFile(dir_fd, n)) out.push_back(n);
      continue;
    }
    long pid = TempPid(n);
    if (pid > 0 && pid != ::getpid() && !Alive(pid) && IsRegularFile(dir_fd, n)) out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Result<uint64_t> RepackDcp(int dir_fd, const std::string& name, uint64_t min_dead_bytes) {
  NEMOFS_ASSIGN_OR_RETURN(LoadedDcp loaded, LoadDcpMetadata(dir_fd, name));
  if (loaded.protocol < 2 || loaded.protocol > 5) {
    return Err(EINVAL, "{}/{}: pickle protocol {} cannot be re-emitted (2 to 5 can)", name,
               kDcpMetadataName, loaded.protocol);
  }
  const std::vector<std::string> orphans = ListDcpOrphans(dir_fd, loaded);

  // Live items per file: (offset, length) -> the _StorageInfo values there.
  struct Item {
    uint64_t offset, length;
    bool operator<(const Item& o) const {
      return std::tie(offset, length) < std::tie(o.offset, o.length);
    }
  };
  std::map<std::string, std::map<Item, std::vector<const Value*>>> live;
  const Value* sd = Field(loaded.pickle.root, "storage_data");
  if (sd && sd->Is(Kind::kDict)) {
    for (const auto& [index, info] : sd->entries) {
      const Value* p = Field(info, "relative_path");
      const Value* o = Field(info, "offset");
      const Value* l = Field(info, "length");
      if (!p || !p->Is(Kind::kString) || !o || !o->Is(Kind::kInt) || !l || !l->Is(Kind::kInt) ||
          o->integer < 0 || l->integer < 0) {
        continue;
      }
      live[p->str][{static_cast<uint64_t>(o->integer), static_cast<uint64_t>(l->integer)}]
          .push_back(info);
    }
  }
  // Candidate files: every .distcp of the folder with enough dead bytes.
  std::set<std::string> files;
  for (const auto& entry : ListFolder(dir_fd)) {
    if (EndsWith(entry.first, kDistcpSuffix)) files.insert(entry.first);
  }
  std::vector<std::string> repack;
  std::map<std::string, uint64_t> sizes;
  for (const auto& f : files) {
    uint64_t size = 0;
    if (!IsRegularFile(dir_fd, f, &size)) continue;
    uint64_t covered = 0, end = 0;
    bool outside = false;
    for (const auto& [item, infos] : live[f]) {  // union of the live ranges
      uint64_t stop = item.offset + item.length;
      if (stop > size || stop < item.offset) outside = true;
      uint64_t from = std::max(item.offset, end);
      if (stop > from) covered += stop - from;
      end = std::max(end, stop);
    }
    if (outside) {
      spdlog::warn("{}/{}: an item lies past its end; not repacked", name, f);
      continue;
    }
    uint64_t dead = size - std::min(size, covered);
    if (dead > 0 && dead >= min_dead_bytes) {
      repack.push_back(f);
      sizes[f] = size;
    }
  }

  int64_t freed = 0;
  std::set<std::string> to_unlink(orphans.begin(), orphans.end());
  for (const auto& f : repack) to_unlink.insert(f);
  uint64_t live_bytes = 0;
  for (const auto& f : repack) {
    for (const auto& [item, infos] : live[f]) live_bytes += item.length;
  }
  if (live_bytes > 0) {
    NEMOFS_ASSIGN_OR_RETURN(auto made, CreateDistcp(dir_fd, name, ReferencedFiles(loaded)));
    auto& [fd, file] = made;
    const std::string created = file;  // (clang before 16 cannot capture a structured binding)
    auto fail = [&](Error err) -> Error {
      ::unlinkat(dir_fd, created.c_str(), 0);
      return err;
    };
    std::deque<Value> arena;
    std::unordered_map<const Value*, const Value*> replace;
    arena.emplace_back();
    Value* path = &arena.back();
    path->kind = Kind::kString;
    path->str = file;
    uint64_t at = 0;
    for (const auto& f : repack) {
      UniqueFd src(::openat(dir_fd, f.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
      if (!src.valid()) {
        int e = errno;
        return fail(Err(e, "{}/{}: {}", name, f, std::strerror(e)));
      }
      for (const auto& [item, infos] : live[f]) {
        if (auto st = CopyRange(src.get(), item.offset, fd.get(), at, item.length, name + "/" + f);
            !st.ok()) {
          return fail(st.error());
        }
        for (const Value* info : infos) {
          arena.emplace_back();
          Value* offset = &arena.back();
          offset->kind = Kind::kInt;
          offset->integer = static_cast<int64_t>(at);
          // A copy of the _StorageInfo with the new path and offset.
          arena.emplace_back(*info);
          Value* copy = &arena.back();
          arena.emplace_back();
          Value* st = &arena.back();
          const Value* old_state = State(info);
          *st = *old_state;
          for (auto& [k, v] : st->entries) {
            if (!k->Is(Kind::kString)) continue;
            if (k->str == "relative_path") v = path;
            if (k->str == "offset") v = offset;
          }
          if (info->state == old_state) {
            copy->state = st;
          } else {
            arena.emplace_back(*info->state);
            Value* tuple = &arena.back();
            tuple->items[1] = st;
            copy->state = tuple;
          }
          replace[info] = copy;
        }
        at += item.length;
      }
    }
    if (auto st = FinishDistcp(dir_fd, fd.get(), name, file, loaded); !st.ok()) {
      return fail(st.error());
    }
    write::MaybeCrash("dcp:distcp-written");
    torch::PickleWriteOptions options;
    options.replace = &replace;
    auto pickle = torch::WritePickle(loaded.pickle.root, loaded.protocol, options);
    if (!pickle) return fail(pickle.error().Context(name + "/" + kDcpMetadataName));
    if (auto st = WriteMetadata(dir_fd, name, loaded, *pickle); !st.ok()) return fail(st.error());
    spdlog::info("{}: repacked {} file(s) into {} ({} live bytes)", name, repack.size(), file, at);
    freed -= static_cast<int64_t>(at);
  }
  for (const auto& f : to_unlink) {
    uint64_t size = 0;
    if (!IsRegularFile(dir_fd, f, &size)) continue;
    if (::unlinkat(dir_fd, f.c_str(), 0) == 0) {
      freed += static_cast<int64_t>(size);
    } else {
      spdlog::warn("{}/{}: cannot remove: {}", name, f, std::strerror(errno));
    }
  }
  if (!to_unlink.empty()) (void)FsyncDir(dir_fd, name);
  return static_cast<uint64_t>(std::max<int64_t>(freed, 0));
}

}  // namespace nemofs::dist
