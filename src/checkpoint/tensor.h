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
#include <functional>
#include <string_view>
#include <memory>
#include <string>
#include <vector>

#include "nemofs/read_plan.h"
#include "nemofs/result.h"
#include "source/source.h"
#include "torch/dtype.h"
#include "torch/zip_reader.h"

namespace nemofs::checkpoint {

// Bytes that need work before they can be read: a compressed zarr chunk,
// decompressed into the cache on first read (see zarr_catalog.cc).
class LazyChunk {
 public:
  virtual ~LazyChunk() = default;
  // The decoded chunk as (fd, offset, length); thread-safe, decodes once.
  virtual Result<source::FileRange> Get(source::Source& src) = 0;
  // For writes, which replace the stored chunk file whole: the blob that
  // holds it, and the stored form of decoded bytes `plain`.
  virtual uint32_t blob() const = 0;
  virtual Result<std::string> Encode(std::string_view plain) const = 0;
  // After such a write: the decoded copy (Get's) gets `bytes` at `offset`.
  virtual Status PatchDecoded(uint64_t offset, std::string_view bytes) = 0;
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
  // The torch.save zip record holding the bytes (offsets within the blob),
  // whose CRC-32 a write updates; not present for raw bytes (zarr, legacy).
  torch::ZipRecordPos record;
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

// The range map reads and writes share: `length` bytes of the tensor's
// C-order bytes from `tensor_offset` lie in chunk `chunk` at byte
// `chunk_offset` of its bytes (of the blob, byte_offset included; of the
// decoded bytes for a lazy chunk; for a fill chunk the pattern position is
// tensor_offset % itemsize).
struct StoredRun {
  size_t chunk = 0;
  uint64_t tensor_offset = 0;
  uint64_t chunk_offset = 0;
  uint64_t length = 0;
};
// Calls `fn` for every run of [offset, offset+length) (clamped to nbytes)
// in tensor order, stopping at its first error; EIO if an element is in no
// chunk. Work is proportional to the number of runs.
Status MapTensorRange(const Tensor& tensor, uint64_t offset, uint64_t length,
                      const std::function<Status(const StoredRun&)>& fn);

// The stored bytes that give tensor bytes [offset, offset+data.size()) the
// value `data` (the range map, scattered): sorted by (blob, offset), runs
// that touch or overlap merged. EROFS naming the tensor for chunks that
// cannot be written (never written: a zarr fill value; missing); EINVAL
// for a write past the end, for two values given to one stored byte, and
// for a partial write of an expanded view (stride 0: it would change the
// other copies of the values it writes).
// A lazy (compressed) chunk's write is of its decoded bytes: `lazy` set,
// `blob` its stored file's (LazyChunk::blob), `offset` within the decoded
// bytes.
// `bytes` is a view of the caller's `data` where it is one run of it (a
// contiguous tensor), else of `own` (pieces of a view gathered).
struct BlobWrite {
  uint32_t blob = source::kNoBlob;
  uint64_t offset = 0;  // within the blob
  std::string_view bytes;
  LazyChunk* lazy = nullptr;
  std::shared_ptr<std::string> own;
  // Appends `more` (contiguous in the blob after `bytes`); `of_input`: it
  // is a view of the same input as `bytes` (not of another write's `own`).
  void Append(std::string_view more, bool of_input) {
    if (more.empty()) return;
    if (!own && of_input && bytes.data() + bytes.size() == more.data()) {  // the next run
      bytes = std::string_view(bytes.data(), bytes.size() + more.size());
      return;
    }
    if (!own) own = std::make_shared<std::string>(bytes);
    own->append(more);
    bytes = *own;
  }
};
Result<std::vector<BlobWrite>> PlanTensorWrite(const Tensor& tensor, uint64_t offset,
                                               std::string_view data);

}  // namespace nemofs::checkpoint
