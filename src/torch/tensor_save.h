// torch.save of one tensor, as PyTorch's DCP FileSystemWriter writes every
// tensor item of a `.distcp` file (torch/distributed/checkpoint/filesystem.py
// `_write_item`: `torch.save(tensor, stream)` at the item's offset; FORMATS.md
// §4.4.2): a zip named "archive" whose offsets and 64-byte alignment are
// relative to its own start, records data.pkl, .format_version ("1"),
// .storage_alignment ("64"), byteorder ("little"), data/0 (the bytes),
// version ("3\n") in the order torch 2.x writes them (it adds a
// .data/serialization_id, which no reader needs and which is left out).
//
// data.pkl (protocol 2) is what torch.save pickles for a fresh contiguous CPU
// tensor: torch._utils._rebuild_tensor_v2(('storage', torch.<Type>Storage,
// '0', 'cpu', numel), 0, size, C-order stride, False, OrderedDict()); dtypes
// without a typed storage use _rebuild_tensor_v3 with torch.UntypedStorage
// (numel in bytes) and the dtype, as torch >= 2.1 does (the same rules as
// torch/torch_repack.h). Loads with torch.load(weights_only=True).
#pragma once

#include <cstdint>
#include <string>

#include "nemofs/result.h"
#include "torch/torch_repack.h"

namespace nemofs::torch {

struct SavedTensor {
  uint64_t bytes = 0;        // the zip's size
  uint64_t data_offset = 0;  // first byte of the tensor data, relative to the zip start
};

// Writes the zip at `out_offset` of `out_fd`. EINVAL naming `what` when the
// byte count is not numel * itemsize, for a negative dimension, a quantized
// dtype or an overflowing size; nothing is written then.
Result<SavedTensor> SaveTensorZip(const NewTensor& t, int out_fd, uint64_t out_offset,
                                  const std::string& what);

// numel * itemsize of `t`, or EINVAL naming `what`.
Result<uint64_t> NewTensorBytes(const NewTensor& t, const std::string& what);

}  // namespace nemofs::torch
