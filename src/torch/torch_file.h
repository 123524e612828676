// torch.save files (FORMATS.md §3): the zip format (PyTorch >= 1.6) and the
// legacy pre-1.6 stream of pickles (§3.8), read from any byte range.
//
// LoadTorchFile unpickles the object (safely, see pickle.h) and resolves
// every tensor the pickle rebuilds (torch._utils._rebuild_tensor_v2/_v3,
// _rebuild_parameter*, torch._tensor._rebuild_from_type_v2) to its storage
// bytes: the record data/<key> of the zip, or the raw blob after the legacy
// stream. Nothing is read beyond data.pkl and the zip directory: tensors are
// located, never loaded.
//
// A tensor whose description is invalid (storage missing, bytes running past
// its storage, negative or overflowing sizes and strides) does not fail the
// file: it is listed in `bad_tensors` with a message naming it, and every
// other tensor stays usable.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "nemofs/result.h"
#include "torch/dtype.h"
#include "torch/pickle.h"
#include "torch/zip_reader.h"
#include "util/byte_reader.h"

namespace nemofs::torch {

struct StoredTensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  int64_t storage_offset = 0;    // in elements
  std::string storage_key;
  uint64_t storage_start = 0;  // byte offset of storage element 0, relative to the file range
  uint64_t storage_bytes = 0;
  ZipRecordPos record;  // the storage's zip record (relative to the file range), for writes

  uint64_t numel() const;
  uint64_t nbytes() const { return numel() * Info(dtype).itemsize; }
  bool contiguous() const;  // C-contiguous (size-1 and empty dims ignored)
  // Byte offset of element [0,...,0] relative to the file range.
  uint64_t data_start() const {
    return storage_start + static_cast<uint64_t>(storage_offset) * Info(dtype).itemsize;
  }
};

struct TorchFile {
  Unpickled pickle;
  std::string format;  // "zip" or "legacy"
  // Keyed by the pickle Value that evaluates to the tensor (the rebuild call,
  // and the Parameter/subclass wrapper around it).
  std::unordered_map<const Value*, StoredTensor> tensors;
  std::unordered_map<const Value*, std::string> bad_tensors;  // value -> why it is unusable
  std::vector<std::string> warnings;  // e.g. globals that would execute code under torch.load
};

struct TorchLimits {
  uint64_t max_pickle_bytes = 1ull << 30;
  Limits pickle;
};

// `name` is used in every message, e.g. "/x/a.nemo:model_weights.ckpt".
Result<TorchFile> LoadTorchFile(const ByteReader& reader, const std::string& name,
                                const TorchLimits& limits = {});
// Convenience for a descriptor range.
Result<TorchFile> LoadTorchFile(int fd, uint64_t base, uint64_t length, const std::string& name,
                                const TorchLimits& limits = {});

}  // namespace nemofs::torch
