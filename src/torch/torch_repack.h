// Structural edits of a torch.save file (issue 11): a tensor added, deleted,
// renamed or replaced by one of another shape/dtype, committed by writing a
// new torch.save zip (FORMATS.md §3):
// * data.pkl is re-emitted by WritePickle at the input's protocol from the
//   parsed graph with the edits applied (untouched parts come out as they
//   were, see pickle_writer.h);
// * every storage record still referenced is copied byte for byte under its
//   name (kernel copy when the source is a descriptor, CRC from the old
//   central directory); storages no longer referenced are dropped; new
//   tensors get records under fresh decimal keys, after the last old one;
// * every other record (version, byteorder, .data/serialization_id, ...)
//   is kept as it was, as is the archive name. The serialization_id is not
//   recomputed (nobody checks it, FORMATS §3.4), which the notes say.
// * a legacy (pre-1.6) file becomes a zip named "archive": data.pkl,
//   byteorder, data/<n> (its storages renumbered 0, 1, ... in file order,
//   persistent ids rewritten to the zip's 5-tuples), version "3\n".
// With no edits, a torch.save zip comes out byte-identical.
//
// A new tensor is pickled as torch.save pickles a fresh contiguous CPU
// tensor: torch._utils._rebuild_tensor_v2(('storage', torch.<Type>Storage,
// key, 'cpu', numel), 0, size, C-order stride, False, OrderedDict()); dtypes
// without a typed storage (float8, uint16/32/64, complex32) use
// _rebuild_tensor_v3 with torch.UntypedStorage (numel in bytes) and the
// dtype, as torch >= 2.1 does. Both load with torch.load(weights_only=True).
//
// Refused with EINVAL naming the file and the key, nothing written:
// an edit of a value that is not a dict, a key that is not there, a rename
// onto an existing key, a tensor byte count that does not match its shape,
// quantized dtypes, replacing a tensor whose storage another tensor that
// stays also uses (a view or a tied weight: the sharing would silently
// break; deleting such a tensor is fine, the storage stays), legacy files
// with storage views (view_metadata), compressed records.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"
#include "torch/dtype.h"
#include "torch/torch_file.h"
#include "torch/zip_writer.h"
#include "util/byte_reader.h"

namespace nemofs::torch {

struct NewTensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  // Its bytes in C order, numel * itemsize of them: `length` bytes at
  // `offset` of `fd` when fd >= 0, else `bytes` (which must outlive the call).
  int fd = -1;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::string_view bytes;
  std::optional<uint32_t> crc32;  // of the bytes, if known (saves reading them)
};

struct TorchEdit {
  enum class Op { kRemove, kRename, kSetTensor };
  Op op = Op::kRemove;
  const Value* dict = nullptr;  // a kDict of the parsed file's graph
  const Value* key = nullptr;   // kRemove, kRename: the entry's key (by identity)
  std::string name;             // kRename: the new key; kSetTensor: the key (str)
  NewTensor tensor;             // kSetTensor: replaces the entry's value or is appended

  static TorchEdit Remove(const Value* dict, const Value* key);
  static TorchEdit Rename(const Value* dict, const Value* key, std::string new_name);
  static TorchEdit SetTensor(const Value* dict, std::string name, NewTensor tensor);
};

// The old file's bytes: `reader` (offsets as in the TorchFile); if fd >= 0,
// the same bytes are fd[base, base + reader.size()), copied by the kernel.
struct TorchSource {
  const ByteReader& reader;
  int fd = -1;
  uint64_t base = 0;
};

struct RepackResult {
  uint64_t bytes = 0;  // written at out_offset
  // Every record in file order; offsets relative to out_offset.
  std::vector<ZipWrittenRecord> records;
  // Storage key -> offset of its first data byte, relative to out_offset.
  std::map<std::string, uint64_t> storage_data;
  // The storage key given to each kSetTensor edit, in edit order.
  std::vector<std::string> new_keys;
  std::vector<std::string> notes;  // e.g. "converted from the legacy format"
};

// Writes the edited file at `out_offset` of `out_fd` (which must not overlap
// the source). `name` is used in every message. On error some bytes may
// have been written at out_offset; nothing else is touched.
Result<RepackResult> RepackTorchFile(const TorchFile& file, const TorchSource& src,
                                     const std::vector<TorchEdit>& edits, int out_fd,
                                     uint64_t out_offset, const std::string& name);

}  // namespace nemofs::torch
