// PyTorch Distributed Checkpoint metadata as Megatron-Core writes it
// (FORMATS.md §4.4): `.metadata` (a pickled Metadata / MCoreMetadata) and the
// items of the `.distcp` files it points at.
//
// Parsed from the inert pickle graph (torch/pickle.h), so any module path
// works: Metadata, TensorStorageMetadata, ChunkStorageMetadata,
// BytesStorageMetadata, TensorProperties (state as a 5-tuple or a dict),
// MetadataIndex, _StorageInfo (with or without transform_descriptors),
// StorageMeta, Megatron's mcore_data (attribute or MCoreMetadata field).
// Unknown extra fields are ignored.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "nemofs/result.h"
#include "torch/dtype.h"
#include "torch/pickle.h"

namespace nemofs::dist {

struct StorageInfo {
  std::string relative_path;  // "__0_1.distcp"
  uint64_t offset = 0;
  uint64_t length = 0;
  bool transformed = false;  // non-empty transform_descriptors (compression): unsupported
};

struct DcpChunk {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;
  std::optional<StorageInfo> storage;  // none if storage_data has no entry for it
};

struct DcpTensor {
  std::string key;
  std::optional<torch::DType> dtype;
  std::string dtype_name;  // as pickled, for messages
  std::vector<int64_t> shape;
  std::vector<DcpChunk> chunks;
  // Megatron flattened distributed-optimizer tensor: the shape it stands for.
  std::vector<int64_t> original_shape;
};

struct DcpBytes {
  std::string key;
  std::optional<StorageInfo> storage;
};

struct DcpMetadata {
  std::vector<DcpTensor> tensors;  // in .metadata order
  std::vector<DcpBytes> bytes;
};

// `what` names the file in errors ("/x/weights/.metadata").
Result<DcpMetadata> ParseDcpMetadata(const torch::Unpickled& pickle, const std::string& what);

}  // namespace nemofs::dist
