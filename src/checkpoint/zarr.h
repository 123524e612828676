// zarr v2 arrays of the Megatron-Core zarr backend (FORMATS.md §4.5): the
// dtype names both ways, and writing one tensor as a new array.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "nemofs/result.h"
#include "torch/dtype.h"

namespace nemofs::checkpoint {

// A '.zarray' dtype: a little-endian numpy typestr, or Megatron's literal
// "bfloat16". nullopt for any other.
std::optional<torch::DType> ZarrDType(const std::string& s);
// The '.zarray' dtype nemofs writes for `dt`; nullopt for dtypes zarr has
// no name for (float8, complex32, quantized).
std::optional<std::string> ZarrDTypeName(torch::DType dt);

// Writes tensor `bytes` (C order, `dtype`, `shape`) as a zarr v2 array into
// the open, empty folder `dir_fd` (`shown` in messages): its '.zarray'
// (one chunk of the whole shape, no compressor, no filters, order C,
// fill_value null, dimension_separator ".") and that chunk file ("0.0..",
// "0" for a scalar, none for an empty tensor), each fsynced; the folder
// and its files given `owner` when set (best effort: only root can). EINVAL
// for a dtype zarr cannot name or a byte count that is not numel * itemsize.
Status WriteZarrArray(int dir_fd, const std::string& shown, torch::DType dtype,
                      const std::vector<int64_t>& shape, std::string_view bytes,
                      std::optional<std::pair<uid_t, gid_t>> owner = std::nullopt);

// The same array as files (for an archive): (name in the array folder,
// bytes); the '.zarray' text is kept in `*zarray`, `bytes` referenced.
Result<std::vector<std::pair<std::string, std::string_view>>> ZarrArrayFiles(
    const std::string& shown, torch::DType dtype, const std::vector<int64_t>& shape,
    std::string_view bytes, std::string* zarray);

}  // namespace nemofs::checkpoint
