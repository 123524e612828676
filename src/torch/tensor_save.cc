#include "torch/tensor_save.h"

#include <algorithm>
#include <deque>

#include "torch/pickle_writer.h"
#include "torch/zip_writer.h"

namespace nemofs::torch {
namespace {

bool IsQuantized(DType d) {
  return d == DType::kQInt8 || d == DType::kQUInt8 || d == DType::kQInt32 ||
         d == DType::kQUInt4x2 || d == DType::kQUInt2x4;
}

}  // namespace

Result<uint64_t> NewTensorBytes(const NewTensor& t, const std::string& what) {
  const DTypeInfo& info = Info(t.dtype);
  if (IsQuantized(t.dtype)) {
    return Err(EINVAL, "{}: quantized tensors ({}) cannot be written", what, info.name);
  }
  uint64_t numel = 1;
  for (int64_t d : t.shape) {
    if (d < 0 || __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel)) {
      return Err(EINVAL, "{}: invalid shape", what);
    }
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, info.itemsize, &nbytes) ||
      nbytes > static_cast<uint64_t>(INT64_MAX)) {
    return Err(EINVAL, "{}: the tensor is too large", what);
  }
  uint64_t have = t.fd >= 0 ? t.length : t.bytes.size();
  if (have != nbytes) {
    return Err(EINVAL, "{}: {} bytes given for a {} tensor of {} elements ({} bytes)", what, have,
               info.name, numel, nbytes);
  }
  return nbytes;
}

Result<SavedTensor> SaveTensorZip(const NewTensor& t, int out_fd, uint64_t out_offset,
                                  const std::string& what) {
  NEMOFS_ASSIGN_OR_RETURN(uint64_t nbytes, NewTensorBytes(t, what));
  const DTypeInfo& info = Info(t.dtype);
  const uint64_t numel = info.itemsize ? nbytes / info.itemsize : 0;
  std::deque<Value> arena;
  auto make = [&](Kind k) {
    arena.emplace_back();
    arena.back().kind = k;
    return &arena.back();
  };
  auto str = [&](std::string s) {
    Value* v = make(Kind::kString);
    v->str = std::move(s);
    return v;
  };
  auto num = [&](int64_t i) {
    Value* v = make(Kind::kInt);
    v->integer = i;
    return v;
  };
  auto global = [&](std::string module, std::string name) {
    Value* g = make(Kind::kGlobal);
    g->str = std::move(module);
    g->name = std::move(name);
    return g;
  };
  const bool typed = !info.storage.empty();
  Value* pid_tuple = make(Kind::kTuple);
  pid_tuple->items = {str("storage"),
                      global("torch", std::string(typed ? info.storage : "UntypedStorage")),
                      str("0"), str("cpu"), num(static_cast<int64_t>(typed ? numel : nbytes))};
  Value* pid = make(Kind::kPersistentId);
  pid->args = pid_tuple;
  Value* size = make(Kind::kTuple);
  Value* stride = make(Kind::kTuple);
  std::vector<int64_t> strides(t.shape.size(), 1);
  for (size_t i = t.shape.size(); i-- > 1;) {
    strides[i - 1] = strides[i] * std::max<int64_t>(t.shape[i], 1);
  }
  for (size_t i = 0; i < t.shape.size(); ++i) {
    size->items.push_back(num(t.shape[i]));
    stride->items.push_back(num(strides[i]));
  }
  Value* hooks = make(Kind::kDict);  // OrderedDict(): GLOBAL, EMPTY_TUPLE, REDUCE
  hooks->opcode = 'R';
  hooks->callable = global("collections", "OrderedDict");
  hooks->args = make(Kind::kTuple);
  Value* args = make(Kind::kTuple);
  args->items = {pid, num(0), size, stride, make(Kind::kBool), hooks};
  if (!typed) args->items.push_back(global("torch", std::string(info.name)));
  Value* call = make(Kind::kCall);
  call->opcode = 'R';
  call->callable = global("torch._utils", typed ? "_rebuild_tensor_v2" : "_rebuild_tensor_v3");
  call->args = args;
  NEMOFS_ASSIGN_OR_RETURN(std::string pickle, WritePickle(call, 2));

  ZipWriter w(out_fd, out_offset, what);
  NEMOFS_RETURN_IF_ERROR(w.Add("archive/data.pkl", pickle));
  NEMOFS_RETURN_IF_ERROR(w.Add("archive/.format_version", "1"));
  NEMOFS_RETURN_IF_ERROR(w.Add("archive/.storage_alignment", "64"));
  NEMOFS_RETURN_IF_ERROR(w.Add("archive/byteorder", "little"));
  if (t.fd >= 0) {
    NEMOFS_RETURN_IF_ERROR(w.AddCopy("archive/data/0", t.length, t.fd, t.offset, t.crc32));
  } else {
    NEMOFS_RETURN_IF_ERROR(w.Add("archive/data/0", t.bytes));
  }
  NEMOFS_RETURN_IF_ERROR(w.Add("archive/version", "3\n"));
  SavedTensor out;
  for (const auto& r : w.records()) {
    if (r.name == "archive/data/0") out.data_offset = r.data;
  }
  NEMOFS_ASSIGN_OR_RETURN(out.bytes, w.Finish());
  return out;
}

}  // namespace nemofs::torch
