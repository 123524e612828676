#include "checkpoint/zarr.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "util/fd.h"
#include "util/io.h"

namespace nemofs::checkpoint {
namespace {

constexpr std::pair<const char*, torch::DType> kZarrDTypes[] = {
    {"<f8", torch::DType::kFloat64},   {"<f4", torch::DType::kFloat32},
    {"<f2", torch::DType::kFloat16},   {"bfloat16", torch::DType::kBFloat16},
    {"<i8", torch::DType::kInt64},     {"<i4", torch::DType::kInt32},
    {"<i2", torch::DType::kInt16},     {"|i1", torch::DType::kInt8},
    {"|u1", torch::DType::kUInt8},     {"|b1", torch::DType::kBool},
    {"<c8", torch::DType::kComplex64}, {"<c16", torch::DType::kComplex128},
    {"<u2", torch::DType::kUInt16},    {"<u4", torch::DType::kUInt32},
    {"<u8", torch::DType::kUInt64}};

Status WriteFileAt(int dir_fd, const std::string& name, std::string_view data,
                   const std::string& shown, std::optional<std::pair<uid_t, gid_t>> owner) {
  UniqueFd fd(::openat(dir_fd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                       0644));
  if (!fd.valid()) return Err(errno, "{}: {}", shown, std::strerror(errno));
  NEMOFS_RETURN_IF_ERROR(WriteFull(fd.get(), data.data(), data.size(), shown));
  if (owner) (void)!::fchown(fd.get(), owner->first, owner->second);
  if (::fsync(fd.get()) != 0) return Err(errno, "{}: fsync: {}", shown, std::strerror(errno));
  return Ok();
}

}  // namespace

std::optional<torch::DType> ZarrDType(const std::string& s) {
  for (const auto& [name, dt] : kZarrDTypes) {
    if (s == name) return dt;
  }
  return std::nullopt;
}

std::optional<std::string> ZarrDTypeName(torch::DType dt) {
  for (const auto& [name, d] : kZarrDTypes) {
    if (d == dt) return std::string(name);
  }
  return std::nullopt;
}

Result<std::vector<std::pair<std::string, std::string_view>>> ZarrArrayFiles(
    const std::string& shown, torch::DType dtype, const std::vector<int64_t>& shape,
    std::string_view bytes, std::string* zarray) {
  const auto name = ZarrDTypeName(dtype);
  if (!name) {
    return Err(EINVAL, "{}: zarr has no dtype for {} (a zarr checkpoint takes float, int, "
               "uint, bool and complex64/128 tensors)",
               shown, torch::Info(dtype).name);
  }
  uint64_t numel = 1;
  std::vector<int64_t> chunks;
  for (int64_t d : shape) {
    if (d < 0) return Err(EINVAL, "{}: negative dimension {}", shown, d);
    numel *= static_cast<uint64_t>(d);
    chunks.push_back(std::max<int64_t>(d, 1));
  }
  if (bytes.size() != numel * torch::Info(dtype).itemsize) {
    return Err(EINVAL, "{}: {} bytes for {} elements of {}", shown, bytes.size(), numel,
               torch::Info(dtype).name);
  }
  nlohmann::ordered_json z;
  z["chunks"] = chunks;
  z["compressor"] = nullptr;
  z["dimension_separator"] = ".";
  z["dtype"] = *name;
  z["fill_value"] = nullptr;
  z["filters"] = nullptr;
  z["order"] = "C";
  z["shape"] = shape;
  z["zarr_format"] = 2;
  *zarray = z.dump(4) + "\n";
  std::vector<std::pair<std::string, std::string_view>> out;
  if (numel > 0) {
    std::string chunk = shape.empty() ? "0" : "";
    for (size_t d = 0; d < shape.size(); ++d) chunk += d ? ".0" : "0";
    out.emplace_back(chunk, bytes);
  }
  out.emplace_back(".zarray", *zarray);
  return out;
}

Status WriteZarrArray(int dir_fd, const std::string& shown, torch::DType dtype,
                      const std::vector<int64_t>& shape, std::string_view bytes,
                      std::optional<std::pair<uid_t, gid_t>> owner) {
  std::string zarray;
  NEMOFS_ASSIGN_OR_RETURN(auto files, ZarrArrayFiles(shown, dtype, shape, bytes, &zarray));
  for (const auto& [name, data] : files) {
    NEMOFS_RETURN_IF_ERROR(WriteFileAt(dir_fd, name, data, shown + "/" + name, owner));
  }
  if (owner) (void)!::fchown(dir_fd, owner->first, owner->second);
  if (::fsync(dir_fd) != 0) return Err(errno, "{}: fsync: {}", shown, std::strerror(errno));
  return Ok();
}

}  // namespace nemofs::checkpoint
