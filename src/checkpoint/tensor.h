// A tensor of the tree (DESIGN.md §2, §5): a global shape and dtype, and the
// chunks of a source that hold its bytes. The file tensors/<key> is the
// global tensor in C order; reading a range of it becomes a read plan over
// the chunks' blobs.
//
// Chunks partition the global tensor into boxes (offsets + sizes per dim).
// A chunk's elements are either C-contiguous in its blob from `byte_offset`
// on, or laid out with explicit element `strides` (a saved view: transpose,
// slice, expand). One stored tensor is one chunk covering everything; TP
// shards, PP stages and dist-checkpoint chunks are several.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nemofs/read_plan.h"
#include "nemofs/result.h"
#include "source/source.h"
#include "torch/dtype.h"

namespace nemofs::checkpoint {

// Bytes that need work before they can be read: a compressed zarr chunk,
// decompressed into the cache on first read (see zarr_catalog.cc).
class LazyChunk {
 public:
  virtual ~LazyChunk() = default;
  // The decoded chunk as (fd, offset, length); thread-safe, decodes once.
  virtual Result<source::FileRange> Get(source::Source& src) = 0;
};

struct Chunk {
  std::vector<int64_t> offsets;  // position in the global tensor
  std::vector<int64_t> sizes;
  uint32_t blob = source::kNoBlob;  // kNoBlob: bytes unavailable (see `missing`)
  uint64_t byte_offset = 0;         // of the chunk's element [0,...,0] within the blob
  std::vector<int64_t> strides;     // element strides in the blob; empty = C-contiguous
  std::string missing;              // why the bytes are unavailable, for kNoBlob
  std::shared_ptr<LazyChunk> lazy;  // set: bytes come from lazy->Get, not from `blob`
  std::string fill;                 // non-empty: every element is these bytes (zarr fill_value)
};

struct Tensor {
  std::string key;
  torch::DType dtype = torch::DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<Chunk> chunks;

  uint64_t numel() const;
  uint64_t nbytes() const { return numel() * torch::Info(dtype).itemsize; }
};

// Checks that the chunks tile the shape exactly (inside it, no overlap, no
// hole); EINVAL naming the tensor otherwise.
Status ValidateChunks(const Tensor& tensor);

// Plans a read of bytes [offset, offset+length) of the tensor's C-order
// bytes (clamped to nbytes). Many tiny runs over a bounded span (transposed
// views, inner-dim chunk splits) are gathered in memory instead of becoming
// thousands of pieces. EIO naming the missing file if a needed chunk has no
// bytes.
Result<ReadPlan> PlanTensorRead(const Tensor& tensor, source::Source& src, uint64_t offset,
                                uint64_t length);

}  // namespace nemofs::checkpoint
