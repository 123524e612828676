// Element types PyTorch writes (FORMATS.md §3.6 storage table) and their
// names in torch, numpy-style byte order (always little-endian here) and
// safetensors.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace nemofs::torch {

enum class DType : uint8_t {
  kFloat64,
  kFloat32,
  kFloat16,
  kBFloat16,
  kInt64,
  kInt32,
  kInt16,
  kInt8,
  kUInt8,
  kBool,
  kComplex128,
  kComplex64,
  kComplex32,
  kFloat8E4M3FN,
  kFloat8E5M2,
  kFloat8E4M3FNUZ,
  kFloat8E5M2FNUZ,
  kFloat8E8M0FNU,
  kUInt16,
  kUInt32,
  kUInt64,
  kQInt8,
  kQUInt8,
  kQInt32,
  kQUInt4x2,
  kQUInt2x4,
};

struct DTypeInfo {
  DType dtype;
  std::string_view name;  // torch name: "bfloat16"
  uint32_t itemsize;
  std::string_view safetensors;  // "BF16"; empty when safetensors has no such type
  std::string_view storage;      // typed storage class: "BFloat16Storage"; empty if none
};

const DTypeInfo& Info(DType dtype);
// "BFloat16Storage" -> kBFloat16 (torch.<Name>Storage globals).
std::optional<DType> DTypeFromStorageClass(std::string_view storage_class);
// "bfloat16", "float", "half", "long" ... (torch.<name> dtype globals).
std::optional<DType> DTypeFromName(std::string_view name);

}  // namespace nemofs::torch
