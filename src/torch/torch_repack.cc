#include "torch/torch_repack.h"

#include <algorithm>
#include <deque>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "torch/pickle_writer.h"
#include "torch/value_arena.h"
#include "torch/zip_reader.h"

namespace nemofs::torch {
namespace {

constexpr uint64_t kMaxPickleBytes = 1ull << 30;

bool MulOk(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }

std::string KeyText(const Value* k) {
  if (k && k->Is(Kind::kString)) return "'" + k->str + "'";
  return k ? ToDebugString(k, 2) : "<null>";
}

bool IsQuantized(DType d) {
  return d == DType::kQInt8 || d == DType::kQUInt8 || d == DType::kQInt32 ||
         d == DType::kQUInt4x2 || d == DType::kQUInt2x4;
}

// The storage key of a persistent id ('storage', type, key, location, numel...).
const Value* PidKey(const Value* tuple) {
  if (!tuple || !tuple->Is(Kind::kTuple) || tuple->items.size() < 5) return nullptr;
  if (!tuple->items[0]->Is(Kind::kString) || tuple->items[0]->str != "storage") return nullptr;
  return tuple->items[2]->Is(Kind::kString) ? tuple->items[2] : nullptr;
}

class Repacker {
 public:
  Repacker(const TorchFile& file, const TorchSource& src, const std::string& name)
      : file_(file), src_(src), name_(name) {}

  Result<RepackResult> Run(const std::vector<TorchEdit>& edits, int out_fd, uint64_t out_offset);

 private:
  template <typename... Args>
  Error Fail(fmt::format_string<Args...> format, Args&&... args) const {
    return InvalidEdit(name_, format, std::forward<Args>(args)...);
  }
  // An existing global of the file (written once and then fetched from the
  // memo, as torch.save would), else a new one.
  const Value* Global(std::string_view module, std::string_view name) {
    for (const auto& v : file_.pickle.arena) {
      if (v->IsGlobal(module, name)) return v.get();
    }
    Value* g = arena_.New(Kind::kGlobal);
    g->str = module;
    g->name = name;
    return g;
  }

  Result<Value*> Copy(const Value* dict) {
    if (auto it = copies_.find(dict); it != copies_.end()) return it->second;
    if (!dict || !dict->Is(Kind::kDict)) return Fail("the edited value is not a dict");
    Value* c = arena_.New(Kind::kDict);
    *c = *dict;
    copies_.emplace(dict, c);
    replace_[dict] = c;
    return c;
  }

  Status Apply(const TorchEdit& e);
  Result<const Value*> MakeTensor(const NewTensor& t, const std::string& where);
  std::string FreshKey() {
    for (;; ++next_key_) {
      std::string k = std::to_string(next_key_);
      if (!used_keys_.count(k)) {
        used_keys_.insert(k);
        return k;
      }
    }
  }
  const Value* Resolve(const Value* v) const {
    for (size_t hops = 0; v && hops < 4; ++hops) {
      auto it = replace_.find(v);
      if (it == replace_.end()) break;
      v = it->second;
    }
    return v;
  }
  // Storage keys of every persistent id reachable from the root.
  std::set<std::string> ReferencedKeys() const;

  const TorchFile& file_;
  const TorchSource& src_;
  const std::string& name_;
  ValueArena arena_;
  std::unordered_map<const Value*, Value*> copies_;
  std::unordered_map<const Value*, const Value*> replace_;
  std::set<std::string> used_keys_;
  uint64_t next_key_ = 0;
  struct Added {
    std::string key;
    const NewTensor* tensor;
  };
  std::vector<Added> added_;
  std::vector<std::pair<const Value*, std::string>> replaced_;  // old tensor value, where
  const Value* storage_str_ = nullptr;
  const Value* cpu_str_ = nullptr;
};

Result<const Value*> Repacker::MakeTensor(const NewTensor& t, const std::string& where) {
  const DTypeInfo& info = Info(t.dtype);
  if (IsQuantized(t.dtype)) {
    return Fail("{}: quantized tensors ({}) cannot be written", where, info.name);
  }
  uint64_t numel = 1;
  for (int64_t d : t.shape) {
    if (d < 0 || !MulOk(numel, static_cast<uint64_t>(d), &numel)) {
      return Fail("{}: invalid shape", where);
    }
  }
  uint64_t nbytes = 0;
  if (!MulOk(numel, info.itemsize, &nbytes) || numel > static_cast<uint64_t>(INT64_MAX) ||
      nbytes > static_cast<uint64_t>(INT64_MAX)) {
    return Fail("{}: the tensor is too large", where);
  }
  uint64_t have = t.fd >= 0 ? t.length : t.bytes.size();
  if (have != nbytes) {
    return Fail("{}: {} bytes given for a {} tensor of {} elements ({} bytes)", where, have,
                info.name, numel, nbytes);
  }
  std::string key = FreshKey();
  bool typed = !info.storage.empty();
  if (!storage_str_) storage_str_ = arena_.Str("storage");
  if (!cpu_str_) cpu_str_ = arena_.Str("cpu");
  Value* pid_tuple = arena_.New(Kind::kTuple);
  pid_tuple->items = {storage_str_,
                      Global("torch", typed ? info.storage : std::string_view("UntypedStorage")),
                      arena_.Str(key), cpu_str_, arena_.Int(static_cast<int64_t>(typed ? numel : nbytes))};
  Value* pid = arena_.New(Kind::kPersistentId);
  pid->args = pid_tuple;
  Value* size = arena_.New(Kind::kTuple);
  Value* stride = arena_.New(Kind::kTuple);
  std::vector<int64_t> strides(t.shape.size(), 1);
  for (size_t i = t.shape.size(); i-- > 1;) {
    strides[i - 1] = strides[i] * std::max<int64_t>(t.shape[i], 1);
  }
  for (size_t i = 0; i < t.shape.size(); ++i) {
    size->items.push_back(arena_.Int(t.shape[i]));
    stride->items.push_back(arena_.Int(strides[i]));
  }
  Value* hooks = arena_.New(Kind::kDict);  // OrderedDict(): GLOBAL, EMPTY_TUPLE, REDUCE
  hooks->opcode = 'R';
  hooks->callable = Global("collections", "OrderedDict");
  hooks->args = arena_.New(Kind::kTuple);
  Value* no_grad = arena_.New(Kind::kBool);
  Value* args = arena_.New(Kind::kTuple);
  args->items = {pid, arena_.Int(0), size, stride, no_grad, hooks};
  if (!typed) args->items.push_back(Global("torch", info.name));
  Value* call = arena_.New(Kind::kCall);
  call->opcode = 'R';
  call->callable = Global("torch._utils", typed ? "_rebuild_tensor_v2" : "_rebuild_tensor_v3");
  call->args = args;
  added_.push_back({key, &t});
  return call;
}

Status Repacker::Apply(const TorchEdit& e) {
  NEMOFS_ASSIGN_OR_RETURN(Value * d, Copy(e.dict));
  auto find = [&](const Value* key) {
    return std::find_if(d->entries.begin(), d->entries.end(),
                        [&](const auto& kv) { return kv.first == key; });
  };
  auto find_name = [&](const std::string& n) {
    auto it = d->entries.end();
    for (auto i = d->entries.begin(); i != d->entries.end(); ++i) {
      if (i->first->Is(Kind::kString) && i->first->str == n) it = i;
    }
    return it;
  };
  switch (e.op) {
    case TorchEdit::Op::kRemove: {
      auto it = find(e.key);
      if (it == d->entries.end()) return Fail("key {} is not in the dict", KeyText(e.key));
      d->entries.erase(it);
      return Ok();
    }
    case TorchEdit::Op::kRename: {
      auto it = find(e.key);
      if (it == d->entries.end()) return Fail("key {} is not in the dict", KeyText(e.key));
      if (find_name(e.name) != d->entries.end()) {
        return Fail("cannot rename {} to '{}': that key exists", KeyText(e.key), e.name);
      }
      it->first = arena_.Str(e.name);
      return Ok();
    }
    case TorchEdit::Op::kSetTensor: {
      NEMOFS_ASSIGN_OR_RETURN(const Value* t, MakeTensor(e.tensor, "'" + e.name + "'"));
      auto it = find_name(e.name);
      if (it == d->entries.end()) {
        d->entries.emplace_back(arena_.Str(e.name), t);
      } else {
        replaced_.emplace_back(it->second, e.name);
        it->second = t;
      }
      return Ok();
    }
  }
  return Fail("unknown edit");
}

std::set<std::string> Repacker::ReferencedKeys() const {
  std::set<std::string> keys;
  std::unordered_set<const Value*> seen;
  std::vector<const Value*> stack{Resolve(file_.pickle.root)};
  while (!stack.empty()) {
    const Value* v = stack.back();
    stack.pop_back();
    if (!v || !seen.insert(v).second) continue;
    if (v->Is(Kind::kPersistentId)) {
      if (const Value* k = PidKey(Resolve(v->args))) keys.insert(k->str);
    }
    auto push = [&](const Value* x) {
      if (x) stack.push_back(Resolve(x));
    };
    for (const Value* x : v->items) push(x);
    for (const auto& [k, x] : v->entries) {
      push(k);
      push(x);
    }
    push(v->callable);
    push(v->args);
    push(v->kwargs);
    push(v->state);
  }
  return keys;
}

Result<RepackResult> Repacker::Run(const std::vector<TorchEdit>& edits, int out_fd,
                                   uint64_t out_offset) {
  RepackResult result;
  const bool legacy = file_.format == "legacy";
  std::optional<ZipArchive> zip;
  std::string prefix = "archive";
  int protocol = 2;
  // Storage key -> its bytes in the source (legacy: from the located tensors).
  struct OldStorage {
    uint64_t start = 0;
    uint64_t bytes = 0;
  };
  std::map<std::string, OldStorage> legacy_storages;
  std::map<std::string, std::string> legacy_keys;  // old key -> new key

  if (!legacy) {
    NEMOFS_ASSIGN_OR_RETURN(ZipArchive z, ZipArchive::Open(src_.reader, name_));
    zip.emplace(std::move(z));
    prefix = zip->prefix();
    const ZipEntry* pkl = zip->FindRecord("data.pkl");
    if (!pkl) return Fail("no {}/data.pkl record", prefix);
    NEMOFS_ASSIGN_OR_RETURN(std::string bytes, zip->Read(*pkl, kMaxPickleBytes));
    protocol = PickleProtocol(bytes);
    for (const auto& e : zip->entries()) {
      std::string data_prefix = prefix + "/data/";
      if (e.name.rfind(data_prefix, 0) == 0) used_keys_.insert(e.name.substr(data_prefix.size()));
    }
  } else {
    char head[2] = {};
    NEMOFS_RETURN_IF_ERROR(src_.reader.Read(0, head, 2, name_));
    protocol = PickleProtocol(std::string_view(head, 2));
    std::vector<std::pair<uint64_t, std::string>> order;
    for (const auto& [v, t] : file_.tensors) {
      if (legacy_storages.emplace(t.storage_key, OldStorage{t.storage_start, t.storage_bytes})
              .second) {
        order.emplace_back(t.storage_start, t.storage_key);
      }
    }
    std::sort(order.begin(), order.end());
    for (const auto& [start, key] : order) {
      legacy_keys[key] = std::to_string(legacy_keys.size());
      used_keys_.insert(legacy_keys[key]);
    }
    // Persistent ids become the zip's 5-tuples with the new keys.
    for (const auto& owned : file_.pickle.arena) {
      const Value* v = owned.get();
      if (!v->Is(Kind::kPersistentId) || replace_.count(v->args)) continue;
      const Value* t = v->args;
      const Value* key = PidKey(t);
      if (!key) continue;
      if (t->items.size() >= 6 && !t->items[5]->Is(Kind::kNone)) {
        return Fail("legacy storage '{}' is a view (view_metadata), which cannot be re-emitted",
                    key->str);
      }
      auto nk = legacy_keys.find(key->str);
      if (nk == legacy_keys.end()) {
        return Fail("legacy storage '{}' is used by no readable tensor", key->str);
      }
      Value* fresh = arena_.New(Kind::kTuple);
      fresh->items.assign(t->items.begin(), t->items.begin() + 5);
      fresh->items[2] = arena_.Str(nk->second);
      replace_[t] = fresh;
    }
  }
  if (protocol < 2 || protocol > 5) {
    return Fail("the pickle's protocol {} cannot be re-emitted (2 to 5 can)", protocol);
  }
  for (const auto& owned : file_.pickle.arena) {  // reuse torch.save's 'storage' and 'cpu'
    if (!owned->Is(Kind::kPersistentId) || !PidKey(owned->args)) continue;
    storage_str_ = owned->args->items[0];
    if (owned->args->items[3]->Is(Kind::kString) && owned->args->items[3]->str == "cpu") {
      cpu_str_ = owned->args->items[3];
    }
    break;
  }

  for (const auto& e : edits) NEMOFS_RETURN_IF_ERROR(Apply(e));
  const std::set<std::string> referenced = ReferencedKeys();
  for (const auto& [old_value, where] : replaced_) {
    auto it = file_.tensors.find(old_value);
    if (it == file_.tensors.end()) continue;
    std::string key = it->second.storage_key;
    if (legacy) key = legacy_keys[key];
    if (referenced.count(key)) {
      return Fail(
          "cannot replace tensor '{}': its storage '{}' is shared with another tensor "
          "that stays (a view or a tied weight)",
          where, it->second.storage_key);
    }
  }

  PickleWriteOptions options;
  options.replace = &replace_;
  NEMOFS_ASSIGN_OR_RETURN(std::string pickle, WritePickle(file_.pickle.root, protocol, options));

  ZipWriter w(out_fd, out_offset, name_ + " (new)");
  auto copy = [&](const std::string& rec_name, uint64_t start, uint64_t size,
                  std::optional<uint32_t> crc) {
    if (src_.fd >= 0) return w.AddCopy(rec_name, size, src_.fd, src_.base + start, crc);
    return w.AddCopy(rec_name, size, src_.reader, start, crc);
  };
  auto add_new = [&]() -> Status {
    for (const auto& a : added_) {
      const NewTensor& t = *a.tensor;
      std::string rec_name = prefix + "/data/" + a.key;
      if (t.fd >= 0) {
        NEMOFS_RETURN_IF_ERROR(w.AddCopy(rec_name, t.length, t.fd, t.offset, t.crc32));
      } else {
        NEMOFS_RETURN_IF_ERROR(w.Add(rec_name, t.bytes));
      }
      result.new_keys.push_back(a.key);
    }
    return Ok();
  };

  if (legacy) {
    result.notes.push_back(fmt::format(
        "{}: converted from the legacy (pre-1.6) torch.save format to a zip named 'archive'",
        name_));
    NEMOFS_RETURN_IF_ERROR(w.Add(prefix + "/data.pkl", pickle));
    NEMOFS_RETURN_IF_ERROR(w.Add(prefix + "/byteorder", "little"));
    std::vector<std::pair<std::string, std::string>> by_new;  // new key, old key
    for (const auto& [old_key, new_key] : legacy_keys) by_new.emplace_back(new_key, old_key);
    std::sort(by_new.begin(), by_new.end(), [](const auto& a, const auto& b) {
      return std::stoull(a.first) < std::stoull(b.first);
    });
    for (const auto& [new_key, old_key] : by_new) {
      if (!referenced.count(new_key)) continue;
      const OldStorage& s = legacy_storages[old_key];
      NEMOFS_RETURN_IF_ERROR(copy(prefix + "/data/" + new_key, s.start, s.bytes, std::nullopt));
    }
    NEMOFS_RETURN_IF_ERROR(add_new());
    NEMOFS_RETURN_IF_ERROR(w.Add(prefix + "/version", "3\n"));
  } else {
    std::vector<const ZipEntry*> entries;
    for (const auto& e : zip->entries()) entries.push_back(&e);
    std::sort(entries.begin(), entries.end(), [](const ZipEntry* a, const ZipEntry* b) {
      return a->local_header_offset < b->local_header_offset;
    });
    const std::string data_prefix = prefix + "/data/";
    size_t last_data = entries.size();
    for (size_t i = 0; i < entries.size(); ++i) {
      if (entries[i]->name.rfind(data_prefix, 0) == 0) last_data = i;
    }
    size_t dropped = 0;
    for (size_t i = 0; i < entries.size(); ++i) {
      const ZipEntry& e = *entries[i];
      bool is_pkl = e.name == prefix + "/data.pkl";
      if (is_pkl) {
        NEMOFS_RETURN_IF_ERROR(w.Add(e.name, pickle));
      } else if (e.method != 0 || e.size != e.compressed_size) {
        return Fail("record {} is compressed; only stored records can be copied", e.name);
      } else if (e.name.rfind(data_prefix, 0) == 0 &&
                 !referenced.count(e.name.substr(data_prefix.size()))) {
        ++dropped;
      } else {
        NEMOFS_RETURN_IF_ERROR(copy(e.name, e.data_offset, e.size, e.crc32));
      }
      if (i == last_data || (last_data == entries.size() && is_pkl)) {
        NEMOFS_RETURN_IF_ERROR(add_new());
      }
    }
    if (dropped) {
      result.notes.push_back(fmt::format(
          "{}: {} storage record(s) no longer referenced were dropped", name_, dropped));
    }
    if (zip->FindRecord(".data/serialization_id") && (!edits.empty())) {
      result.notes.push_back(
          fmt::format("{}: .data/serialization_id kept as it was (not recomputed)", name_));
    }
  }
  NEMOFS_ASSIGN_OR_RETURN(result.bytes, w.Finish());
  result.records = w.records();
  const std::string data_prefix = prefix + "/data/";
  for (const auto& r : result.records) {
    if (r.name.rfind(data_prefix, 0) == 0) {
      result.storage_data[r.name.substr(data_prefix.size())] = r.data;
    }
  }
  return result;
}

}  // namespace

TorchEdit TorchEdit::Remove(const Value* dict, const Value* key) {
  TorchEdit e;
  e.op = Op::kRemove;
  e.dict = dict;
  e.key = key;
  return e;
}

TorchEdit TorchEdit::Rename(const Value* dict, const Value* key, std::string new_name) {
  TorchEdit e;
  e.op = Op::kRename;
  e.dict = dict;
  e.key = key;
  e.name = std::move(new_name);
  return e;
}

TorchEdit TorchEdit::SetTensor(const Value* dict, std::string name, NewTensor tensor) {
  TorchEdit e;
  e.op = Op::kSetTensor;
  e.dict = dict;
  e.name = std::move(name);
  e.tensor = std::move(tensor);
  return e;
}

Result<RepackResult> RepackTorchFile(const TorchFile& file, const TorchSource& src,
                                     const std::vector<TorchEdit>& edits, int out_fd,
                                     uint64_t out_offset, const std::string& name) {
  if (!file.pickle.root) return Err(EINVAL, "{}: no parsed pickle", name);
  Repacker r(file, src, name);
  return r.Run(edits, out_fd, out_offset);
}

}  // namespace nemofs::torch
