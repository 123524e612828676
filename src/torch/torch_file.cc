#include "torch/torch_file.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>

#include "torch/zip_reader.h"
#include "util/io.h"

namespace nemofs::torch {
namespace {

constexpr char kLegacyMagic[] = "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";

// Globals that would run code if torch.load(weights_only=False) met them.
bool Dangerous(std::string_view module, std::string_view name) {
  static constexpr std::string_view kModules[] = {
      "os",    "posix",  "nt",        "subprocess",      "sys",     "shutil",  "socket",
      "runpy", "pty",    "importlib", "webbrowser",      "code",    "marshal", "ctypes",
      "types", "pickle", "commands",  "multiprocessing", "asyncio", "platform"};
  static constexpr std::string_view kBuiltins[] = {
      "eval",    "exec",    "compile", "open",       "__import__", "getattr",  "setattr",
      "delattr", "globals", "locals",  "breakpoint", "input",      "execfile", "apply"};
  auto top = module.substr(0, module.find('.'));
  for (auto m : kModules) {
    if (top == m) return true;
  }
  if (module == "builtins") {
    for (auto b : kBuiltins) {
      if (name == b) return true;
    }
  }
  return false;
}

struct StorageRecord {
  uint64_t start = 0;  // relative to the file range
  uint64_t bytes = 0;
  ZipRecordPos record;
};

// Reads an int tuple (sizes / strides); false if not a tuple of ints.
bool IntTuple(const Value* v, std::vector<int64_t>* out) {
  if (!v || (!v->Is(Kind::kTuple) && !v->Is(Kind::kList))) return false;
  out->clear();
  for (const Value* x : v->items) {
    if (!x->Is(Kind::kInt)) return false;
    out->push_back(x->integer);
  }
  return true;
}

const Value* Arg(const Value* call, size_t i) {
  if (!call->args || !call->args->Is(Kind::kTuple) || call->args->items.size() <= i) return nullptr;
  return call->args->items[i];
}

// The persistent id of a storage: ('storage', <StorageClass global>, key,
// location, numel[, view_metadata]). Returns false if malformed.
struct StoragePid {
  std::optional<DType> dtype;  // none for UntypedStorage
  std::string key;
  int64_t numel = 0;            // elements of dtype, bytes for UntypedStorage
  const Value* view = nullptr;  // legacy view_metadata
};
bool ParsePid(const Value* pid_value, StoragePid* out, std::string* why) {
  if (!pid_value || !pid_value->Is(Kind::kPersistentId) || !pid_value->args) {
    *why = "storage argument is not a persistent id";
    return false;
  }
  const Value* t = pid_value->args;
  if (!t->Is(Kind::kTuple) || t->items.size() < 5 || !t->items[0]->Is(Kind::kString) ||
      t->items[0]->str != "storage") {
    *why = "persistent id is not a ('storage', type, key, location, numel) tuple";
    return false;
  }
  const Value* type = t->items[1];
  const Value* key = t->items[2];
  const Value* numel = t->items[4];
  if (!type->Is(Kind::kGlobal) || !key->Is(Kind::kString) || !numel->Is(Kind::kInt)) {
    *why = "persistent id has the wrong field types";
    return false;
  }
  if (type->name != "UntypedStorage") {
    out->dtype = DTypeFromStorageClass(type->name);
    if (!out->dtype) {
      *why = fmt::format("unknown storage type {}.{}", type->str, type->name);
      return false;
    }
  }
  if (numel->integer < 0) {
    *why = fmt::format("storage numel {} is negative", numel->integer);
    return false;
  }
  out->key = key->str;
  out->numel = numel->integer;
  if (t->items.size() >= 6 && !t->items[5]->Is(Kind::kNone)) out->view = t->items[5];
  return true;
}

bool MulOk(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool AddOk(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

// Checks a view against its storage; fills `t` or explains why not.
bool CheckView(StoredTensor* t, std::string* why) {
  const uint64_t item = Info(t->dtype).itemsize;
  if (t->shape.size() != t->strides.size()) {
    *why = fmt::format("size has {} dims but stride has {}", t->shape.size(), t->strides.size());
    return false;
  }
  if (t->storage_offset < 0) {
    *why = fmt::format("negative storage offset {}", t->storage_offset);
    return false;
  }
  uint64_t numel = 1;
  uint64_t last = static_cast<uint64_t>(t->storage_offset);  // highest element index touched
  for (size_t d = 0; d < t->shape.size(); ++d) {
    if (t->shape[d] < 0 || t->strides[d] < 0) {
      *why = fmt::format("negative size or stride in dim {} (size {}, stride {})", d, t->shape[d],
                         t->strides[d]);
      return false;
    }
    if (!MulOk(numel, static_cast<uint64_t>(t->shape[d]), &numel)) {
      *why = "element count overflows";
      return false;
    }
  }
  if (numel == 0) return true;
  for (size_t d = 0; d < t->shape.size(); ++d) {
    uint64_t span = 0;
    if (!MulOk(static_cast<uint64_t>(t->shape[d] - 1), static_cast<uint64_t>(t->strides[d]),
               &span) ||
        !AddOk(last, span, &last)) {
      *why = "strides overflow";
      return false;
    }
  }
  uint64_t end_bytes = 0;
  if (!MulOk(last + 1, item, &end_bytes) || end_bytes > t->storage_bytes) {
    *why = fmt::format(
        "bytes run past the storage: elements up to {} of {} bytes each, storage '{}' has {} bytes",
        last, item, t->storage_key, t->storage_bytes);
    return false;
  }
  return true;
}

// Resolves every tensor-rebuilding call of `file.pickle`.
void ResolveTensors(TorchFile* file, const std::string& name,
                    const std::function<Result<StorageRecord>(const StoragePid&)>& storage) {
  std::vector<std::pair<const Value*, const Value*>> wrappers;  // wrapper -> wrapped value
  for (const auto& owned : file->pickle.arena) {
    const Value* v = owned.get();
    if (!v->Is(Kind::kCall) || !v->callable || !v->callable->Is(Kind::kGlobal)) continue;
    const std::string& mod = v->callable->str;
    const std::string& fn = v->callable->name;
    if (Dangerous(mod, fn)) {
      file->warnings.push_back(
          fmt::format("{}: the pickle calls {}.{} (nemofs never executes pickles; torch.load with "
                      "weights_only=False would)",
                      name, mod, fn));
      continue;
    }
    bool v2 = v->IsCallOf("torch._utils", "_rebuild_tensor_v2") ||
              v->IsCallOf("torch._utils", "_rebuild_tensor");
    bool v3 = v->IsCallOf("torch._utils", "_rebuild_tensor_v3");
    if (v->IsCallOf("torch._utils", "_rebuild_parameter") ||
        v->IsCallOf("torch._utils", "_rebuild_parameter_with_state")) {
      if (const Value* inner = Arg(v, 0)) wrappers.emplace_back(v, inner);
      continue;
    }
    if (v->IsCallOf("torch._tensor", "_rebuild_from_type_v2") ||
        v->IsCallOf("torch.tensor", "_rebuild_from_type_v2")) {
      const Value* args = Arg(v, 2);
      if (args && args->Is(Kind::kTuple) && !args->items.empty()) {
        wrappers.emplace_back(v, args->items[0]);
      }
      continue;
    }
    if (!v2 && !v3) continue;

    std::string why;
    StoragePid pid;
    StoredTensor t;
    std::vector<int64_t> size, stride;
    const Value* off = Arg(v, 1);
    if (!ParsePid(Arg(v, 0), &pid, &why)) {
    } else if (!off || !off->Is(Kind::kInt) || !IntTuple(Arg(v, 2), &size) ||
               !IntTuple(Arg(v, 3), &stride)) {
      why = "storage offset, size or stride is not an int / int tuple";
    } else {
      std::optional<DType> dtype = pid.dtype;
      if (v3) {
        const Value* d = Arg(v, 6);
        dtype = d && d->Is(Kind::kGlobal) ? DTypeFromName(d->name) : std::nullopt;
        if (!dtype) why = "_rebuild_tensor_v3 without a known dtype";
      } else if (!dtype) {
        dtype = DType::kUInt8;  // an UntypedStorage read as bytes
      }
      if (why.empty()) {
        t.dtype = *dtype;
        t.shape = size;
        t.strides = stride;
        t.storage_offset = off->integer;
        t.storage_key = pid.key;
        auto rec = storage(pid);
        if (!rec) {
          why = rec.error().message();
        } else {
          t.storage_start = rec->start;
          t.storage_bytes = rec->bytes;
          t.record = rec->record;
          CheckView(&t, &why);
        }
      }
    }
    if (why.empty()) {
      file->tensors.emplace(v, std::move(t));
    } else {
      file->bad_tensors.emplace(v, why);
    }
  }
  // Parameters and subclasses wrap a rebuilt tensor (possibly wrappers of wrappers).
  for (int pass = 0; pass < 4; ++pass) {
    for (const auto& [outer, inner] : wrappers) {
      if (file->tensors.count(outer) || file->bad_tensors.count(outer)) continue;
      if (auto it = file->tensors.find(inner); it != file->tensors.end()) {
        file->tensors.emplace(outer, it->second);
      } else if (auto bad = file->bad_tensors.find(inner); bad != file->bad_tensors.end()) {
        file->bad_tensors.emplace(outer, bad->second);
      }
    }
  }
}

Result<TorchFile> LoadZip(const ByteReader& reader, const std::string& name,
                          const TorchLimits& limits) {
  NEMOFS_ASSIGN_OR_RETURN(ZipArchive zip, ZipArchive::Open(reader, name));
  const ZipEntry* pkl = zip.FindRecord("data.pkl");
  if (!pkl) return Err(EINVAL, "{}: no {}/data.pkl record", name, zip.prefix());
  NEMOFS_ASSIGN_OR_RETURN(std::string bytes, zip.Read(*pkl, limits.max_pickle_bytes));
  if (bytes.empty()) return Err(EINVAL, "{}: {}/data.pkl is empty", name, zip.prefix());
  TorchFile file;
  file.format = "zip";
  NEMOFS_ASSIGN_OR_RETURN(file.pickle, Unpickle(bytes, name + ":data.pkl", limits.pickle));
  ResolveTensors(&file, name, [&](const StoragePid& pid) -> Result<StorageRecord> {
    const ZipEntry* rec = zip.FindRecord("data/" + pid.key);
    if (!rec) return Err(EINVAL, "storage record {}/data/{} is missing", zip.prefix(), pid.key);
    if (rec->method != 0 || rec->size != rec->compressed_size) {
      return Err(EINVAL, "storage record data/{} is compressed", pid.key);
    }
    uint64_t want = static_cast<uint64_t>(pid.numel);
    if (pid.dtype && !MulOk(want, Info(*pid.dtype).itemsize, &want)) {
      return Err(EINVAL, "storage data/{} size overflows", pid.key);
    }
    if (rec->size < want) {
      return Err(EINVAL, "storage record data/{} has {} bytes, its persistent id says {}", pid.key,
                 rec->size, want);
    }
    ZipRecordPos pos{true, rec->local_header_offset, rec->cd_offset, rec->data_offset, rec->size,
                     rec->flags};
    return StorageRecord{rec->data_offset, rec->size, pos};
  });
  return file;
}

Result<TorchFile> LoadLegacy(const ByteReader& reader, const std::string& name,
                             const TorchLimits& limits) {
  const uint64_t length = reader.size();
  // The pickles come first and are small next to the storages after them:
  // read a growing prefix until all five pickles parse.
  TorchFile file;
  file.format = "legacy";
  Unpickled parts[5];
  size_t pos = 0;
  for (uint64_t window = std::min<uint64_t>(length, 4 << 20);;
       window = std::min<uint64_t>({length, window * 4, limits.max_pickle_bytes})) {
    std::string head(window, '\0');
    NEMOFS_RETURN_IF_ERROR(reader.Read(0, head.data(), window, name));
    std::string_view rest(head);
    pos = 0;
    Status parsed = Ok();
    for (int i = 0; i < 5 && parsed.ok(); ++i) {
      auto part = Unpickle(rest.substr(pos), fmt::format("{}: legacy pickle {}", name, i + 1),
                           limits.pickle);
      if (!part) {
        parsed = part.error();
      } else {
        parts[i] = std::move(part).value();
        pos += parts[i].consumed;
      }
    }
    if (parsed.ok()) break;
    bool truncated = parsed.error().message().find("unexpected end") != std::string::npos;
    if (!truncated || window >= length || window >= limits.max_pickle_bytes) return parsed.error();
  }
  if (!parts[0].root->Is(Kind::kBigInt) && !parts[0].root->Is(Kind::kInt)) {
    return Err(EINVAL, "{}: legacy magic number missing", name);
  }
  const Value* keys = parts[4].root;
  if (!keys->Is(Kind::kList)) return Err(EINVAL, "{}: legacy storage key list missing", name);
  file.pickle = std::move(parts[3]);

  // Element size of every storage, from the persistent ids.
  std::map<std::string, uint32_t> itemsize;
  for (const auto& owned : file.pickle.arena) {
    StoragePid pid;
    std::string why;
    if (owned->Is(Kind::kPersistentId) && ParsePid(owned.get(), &pid, &why)) {
      itemsize[pid.key] = pid.dtype ? Info(*pid.dtype).itemsize : 1;
    }
  }
  std::map<std::string, StorageRecord> records;
  uint64_t at = pos;
  for (const Value* k : keys->items) {
    if (!k->Is(Kind::kString)) return Err(EINVAL, "{}: legacy storage key is not a string", name);
    auto it = itemsize.find(k->str);
    if (it == itemsize.end()) {
      return Err(EINVAL, "{}: legacy storage '{}' is never referenced, its size is unknown", name,
                 k->str);
    }
    unsigned char count_le[8];
    if (at > length || length - at < 8) {
      return Err(EINVAL, "{}: legacy storage '{}' header lies past the end of the file", name,
                 k->str);
    }
    NEMOFS_RETURN_IF_ERROR(reader.Read(at, count_le, 8, name));
    uint64_t count = 0;
    for (int b = 7; b >= 0; --b) count = (count << 8) | count_le[b];
    uint64_t bytes = 0;
    if (!MulOk(count, it->second, &bytes) || at + 8 > length || bytes > length - at - 8) {
      return Err(EINVAL, "{}: legacy storage '{}' ({} elements) runs past the end of the file",
                 name, k->str, count);
    }
    records[k->str] = StorageRecord{at + 8, bytes};
    at += 8 + bytes;
  }
  ResolveTensors(&file, name, [&](const StoragePid& pid) -> Result<StorageRecord> {
    auto it = records.find(pid.key);
    if (it == records.end()) return Err(EINVAL, "legacy storage '{}' is missing", pid.key);
    StorageRecord r = it->second;
    if (pid.view) {  // (view_key, offset, size) in elements of the root storage
      const Value* v = pid.view;
      if (!v->Is(Kind::kTuple) || v->items.size() != 3 || !v->items[1]->Is(Kind::kInt) ||
          !v->items[2]->Is(Kind::kInt) || v->items[1]->integer < 0 || v->items[2]->integer < 0) {
        return Err(EINVAL, "legacy storage view of '{}' is malformed", pid.key);
      }
      uint32_t item = pid.dtype ? Info(*pid.dtype).itemsize : 1;
      uint64_t off = static_cast<uint64_t>(v->items[1]->integer) * item;
      uint64_t len = static_cast<uint64_t>(v->items[2]->integer) * item;
      if (off > r.bytes || len > r.bytes - off) {
        return Err(EINVAL, "legacy storage view of '{}' lies outside it", pid.key);
      }
      r = StorageRecord{r.start + off, len};
    }
    return r;
  });
  return file;
}

}  // namespace

uint64_t StoredTensor::numel() const {
  uint64_t n = 1;
  for (int64_t s : shape) n *= static_cast<uint64_t>(s);
  return n;
}

bool StoredTensor::contiguous() const {
  int64_t expected = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] == 0) return true;
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

Result<TorchFile> LoadTorchFile(int fd, uint64_t base, uint64_t length, const std::string& name,
                                const TorchLimits& limits) {
  FdReader reader(fd, base, length);
  return LoadTorchFile(reader, name, limits);
}

Result<TorchFile> LoadTorchFile(const ByteReader& reader, const std::string& name,
                                const TorchLimits& limits) {
  const uint64_t length = reader.size();
  char head[16] = {};
  uint64_t n = std::min<uint64_t>(length, sizeof head);
  NEMOFS_RETURN_IF_ERROR(reader.Read(0, head, n, name));
  if (IsZipMagic(std::string_view(head, n))) return LoadZip(reader, name, limits);
  if (n >= 14 && std::memcmp(head, kLegacyMagic, 14) == 0) {
    return LoadLegacy(reader, name, limits);
  }
  if (length == 0) return Err(EINVAL, "{}: empty file", name);
  return Err(EINVAL, "{}: not a torch.save file (neither zip nor legacy pickle magic)", name);
}

}  // namespace nemofs::torch
