#include "dist/dcp.h"

#include <map>
#include <tuple>

namespace nemofs::dist {
namespace {

using torch::Kind;
using torch::Value;

// The state dict of a dataclass-like object (NEWOBJ + BUILD dict).
const Value* State(const Value* v) {
  if (!v) return nullptr;
  if (v->state && v->state->Is(Kind::kDict)) return v->state;
  if (v->state && v->state->Is(Kind::kTuple) && v->state->items.size() == 2 &&
      v->state->items[1]->Is(Kind::kDict)) {
    return v->state->items[1];  // (None, slots) from __slots__ dataclasses
  }
  return nullptr;
}

const Value* Field(const Value* obj, std::string_view name) {
  const Value* st = State(obj);
  return st ? st->Get(name) : nullptr;
}

// torch.Size((a, b)) or a plain tuple/list of ints.
bool IntList(const Value* v, std::vector<int64_t>* out) {
  if (!v) return false;
  if (v->Is(Kind::kCall) || v->Is(Kind::kObject)) {
    if (!v->args || v->args->items.empty()) return false;
    return IntList(v->args->items[0], out);
  }
  if (!v->Is(Kind::kTuple) && !v->Is(Kind::kList)) return false;
  out->clear();
  for (const Value* x : v->items) {
    if (!x->Is(Kind::kInt)) return false;
    out->push_back(x->integer);
  }
  return true;
}

std::string ClassName(const Value* v) {
  if (!v || !v->callable || !v->callable->Is(Kind::kGlobal)) return "";
  return v->callable->name;
}

bool ParseStorage(const Value* info, StorageInfo* out) {
  const Value* path = Field(info, "relative_path");
  const Value* off = Field(info, "offset");
  const Value* len = Field(info, "length");
  if (!path || !path->Is(Kind::kString) || !off || !off->Is(Kind::kInt) || !len ||
      !len->Is(Kind::kInt) || off->integer < 0 || len->integer < 0) {
    return false;
  }
  out->relative_path = path->str;
  out->offset = static_cast<uint64_t>(off->integer);
  out->length = static_cast<uint64_t>(len->integer);
  const Value* td = Field(info, "transform_descriptors");
  out->transformed = td && (td->Is(Kind::kList) || td->Is(Kind::kTuple)) && !td->items.empty();
  return true;
}

}  // namespace

Result<DcpMetadata> ParseDcpMetadata(const torch::Unpickled& pickle, const std::string& what) {
  const Value* root = pickle.root;
  const Value* sdm = Field(root, "state_dict_metadata");
  const Value* sd = Field(root, "storage_data");
  if (!sdm || !sdm->Is(Kind::kDict) || !sd || !sd->Is(Kind::kDict)) {
    return Err(EINVAL, "{}: not a DCP Metadata object (no state_dict_metadata / storage_data)",
               what);
  }
  // (fqn, offsets or empty) -> storage
  std::map<std::pair<std::string, std::vector<int64_t>>, StorageInfo> storage;
  for (const auto& [index, info] : sd->entries) {
    const Value* fqn = Field(index, "fqn");
    if (!fqn || !fqn->Is(Kind::kString)) {
      return Err(EINVAL, "{}: storage_data key without an fqn", what);
    }
    std::vector<int64_t> offsets;
    const Value* off = Field(index, "offset");
    if (off && !off->Is(Kind::kNone) && !IntList(off, &offsets)) {
      return Err(EINVAL, "{}: storage_data entry of {} has a malformed offset", what, fqn->str);
    }
    StorageInfo si;
    if (!ParseStorage(info, &si)) {
      return Err(EINVAL, "{}: storage_data entry of {} is not a (relative_path, offset, length)",
                 what, fqn->str);
    }
    storage[{fqn->str, offsets}] = si;
  }
  // mcore_data: {key: {'nd_reformulated_orig_global_shape': (...)}}
  const Value* mcore = Field(root, "mcore_data");

  DcpMetadata md;
  for (const auto& [k, meta] : sdm->entries) {
    if (!k->Is(Kind::kString))
      return Err(EINVAL, "{}: state_dict_metadata key is not a string", what);
    const std::string& key = k->str;
    std::string cls = ClassName(meta);
    if (cls == "BytesStorageMetadata") {
      DcpBytes b;
      b.key = key;
      auto it = storage.find({key, {}});
      if (it != storage.end()) b.storage = it->second;
      md.bytes.push_back(std::move(b));
      continue;
    }
    DcpTensor t;
    t.key = key;
    const Value* props = Field(meta, "properties");
    const Value* dtype = nullptr;
    if (props && props->state && props->state->Is(Kind::kTuple) && !props->state->items.empty()) {
      dtype = props->state->items[0];  // (dtype, layout, requires_grad, memory_format, pin_memory)
    } else if (props) {
      dtype = Field(props, "dtype");
    }
    if (dtype && dtype->Is(Kind::kGlobal)) {
      t.dtype_name = dtype->name;
      t.dtype = torch::DTypeFromName(dtype->name);
    }
    if (!IntList(Field(meta, "size"), &t.shape)) {
      return Err(EINVAL, "{}: tensor {} has no size", what, key);
    }
    const Value* chunks = Field(meta, "chunks");
    if (!chunks || !chunks->Is(Kind::kList))
      return Err(EINVAL, "{}: tensor {} has no chunks", what, key);
    for (const Value* c : chunks->items) {
      DcpChunk dc;
      if (!IntList(Field(c, "offsets"), &dc.offsets) || !IntList(Field(c, "sizes"), &dc.sizes)) {
        return Err(EINVAL, "{}: tensor {} has a malformed chunk", what, key);
      }
      auto it = storage.find({key, dc.offsets});
      if (it != storage.end()) dc.storage = it->second;
      t.chunks.push_back(std::move(dc));
    }
    if (mcore && mcore->Is(Kind::kDict)) {
      const Value* entry = mcore->Get(key);
      const Value* orig = entry && entry->Is(Kind::kDict)
                              ? entry->Get("nd_reformulated_orig_global_shape")
                              : nullptr;
      if (orig) IntList(orig, &t.original_shape);
    }
    md.tensors.push_back(std::move(t));
  }
  return md;
}

}  // namespace nemofs::dist
