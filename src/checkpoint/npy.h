// The .npy format (numpy's NEP 1, format versions 1.0-3.0): a tensor
// created as tensors/KEY.npy (issue 11) and the npy/ view of every tensor.
//
//   "\x93NUMPY" major minor, header length (uint16 LE for 1.x, uint32 LE
//   for 2.x/3.x), then a Python dict literal
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
//   padded with spaces and a newline so that the data starts at a multiple
//   of 64 (16 in old writers); the data follows in C or Fortran order.
//
// dtypes: the numpy type strings of the tree's dtypes ('<f8', '<f4', '<f2',
// '<i8' ... '|u1', '|b1', '<c8', '<c16', '<u2' ...), either byte order
// ('<', '>', '|', '='). bfloat16 has no numpy type: it is stored as '<u2'
// or '|V2' (2 raw bytes), with the real dtype given apart (the
// user.nemofs.dtype xattr); the npy/ view writes it as '<u2'.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"
#include "torch/dtype.h"

namespace nemofs::checkpoint {

struct NpyHeader {
  torch::DType dtype = torch::DType::kFloat32;
  bool raw2 = false;  // '|V2' or '<u2': two bytes per element, bfloat16 if the caller says so
  bool big_endian = false;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  uint64_t data_offset = 0;  // where the data begins
  uint64_t numel() const;
  uint64_t nbytes() const { return numel() * torch::Info(dtype).itemsize; }
};

// Parses the header at the start of `bytes` (at least its first 10 bytes,
// and all of it). EINVAL naming `what` and the problem; a `bytes` too short
// for the header it announces is EINVAL too.
Result<NpyHeader> ParseNpyHeader(std::string_view bytes, const std::string& what);
// Bytes needed to parse the header: 10, then 10 + its announced length.
uint64_t NpyHeaderNeed(std::string_view first_bytes);

// The header numpy writes (format 1.0 when it fits, else 2.0) for a
// C-order little-endian array: `dtype`'s type string ('<u2' for bfloat16).
// EINVAL for dtypes numpy has no type for (qint8, float8 ...).
Result<std::string> MakeNpyHeader(torch::DType dtype, const std::vector<int64_t>& shape);

// The data of an array as the tree stores tensors: C order, little-endian.
// `in` is the data part of the file (after the header); the result has
// the same size. Byte swaps and a Fortran-order transpose as needed; `in`
// of another size than the header's data comes back unchanged.
std::string ToCOrderLittleEndian(const NpyHeader& h, std::string_view in);
// Elements [first, first + count) of that result, computed from `in` (the
// whole data part, e.g. a mapped file) without the rest: a tensor of any
// size is converted window by window.
std::string ToCOrderLittleEndianRange(const NpyHeader& h, std::string_view in, uint64_t first,
                                      uint64_t count);
// Whether ToCOrderLittleEndian would change anything.
inline bool NeedsConversion(const NpyHeader& h) {
  return (h.big_endian && torch::Info(h.dtype).itemsize > 1) ||
         (h.fortran_order && h.shape.size() > 1);
}

// "[4096, 1024]", "4096,1024", "(4096, 1024)", "[]", "4096" -> dims; EINVAL
// otherwise (negative or absurd dims too).
Result<std::vector<int64_t>> ParseShapeText(std::string_view text);
// "[4096, 1024]" (what user.nemofs.shape reads).
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace nemofs::checkpoint
