#include "torch/dtype.h"

#include <array>

namespace nemofs::torch {
namespace {

constexpr std::array<DTypeInfo, 26> kTable = {{
    {DType::kFloat64, "float64", 8, "F64", "DoubleStorage"},
    {DType::kFloat32, "float32", 4, "F32", "FloatStorage"},
    {DType::kFloat16, "float16", 2, "F16", "HalfStorage"},
    {DType::kBFloat16, "bfloat16", 2, "BF16", "BFloat16Storage"},
    {DType::kInt64, "int64", 8, "I64", "LongStorage"},
    {DType::kInt32, "int32", 4, "I32", "IntStorage"},
    {DType::kInt16, "int16", 2, "I16", "ShortStorage"},
    {DType::kInt8, "int8", 1, "I8", "CharStorage"},
    {DType::kUInt8, "uint8", 1, "U8", "ByteStorage"},
    {DType::kBool, "bool", 1, "BOOL", "BoolStorage"},
    {DType::kComplex128, "complex128", 16, "", "ComplexDoubleStorage"},
    {DType::kComplex64, "complex64", 8, "C64", "ComplexFloatStorage"},
    {DType::kComplex32, "complex32", 4, "", ""},
    {DType::kFloat8E4M3FN, "float8_e4m3fn", 1, "F8_E4M3", ""},
    {DType::kFloat8E5M2, "float8_e5m2", 1, "F8_E5M2", ""},
    {DType::kFloat8E4M3FNUZ, "float8_e4m3fnuz", 1, "", ""},
    {DType::kFloat8E5M2FNUZ, "float8_e5m2fnuz", 1, "", ""},
    {DType::kFloat8E8M0FNU, "float8_e8m0fnu", 1, "F8_E8M0", ""},
    {DType::kUInt16, "uint16", 2, "U16", ""},
    {DType::kUInt32, "uint32", 4, "U32", ""},
    {DType::kUInt64, "uint64", 8, "U64", ""},
    {DType::kQInt8, "qint8", 1, "", "QInt8Storage"},
    {DType::kQUInt8, "quint8", 1, "", "QUInt8Storage"},
    {DType::kQInt32, "qint32", 4, "", "QInt32Storage"},
    {DType::kQUInt4x2, "quint4x2", 1, "", "QUInt4x2Storage"},
    {DType::kQUInt2x4, "quint2x4", 1, "", "QUInt2x4Storage"},
}};

}  // namespace

const DTypeInfo& Info(DType dtype) { return kTable[static_cast<size_t>(dtype)]; }

std::optional<DType> DTypeFromStorageClass(std::string_view storage_class) {
  for (const auto& i : kTable) {
    if (!i.storage.empty() && i.storage == storage_class) return i.dtype;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromName(std::string_view name) {
  struct Alias {
    std::string_view alias;
    DType dtype;
  };
  static constexpr Alias kAliases[] = {
      {"double", DType::kFloat64},     {"float", DType::kFloat32},    {"half", DType::kFloat16},
      {"long", DType::kInt64},         {"int", DType::kInt32},        {"short", DType::kInt16},
      {"cdouble", DType::kComplex128}, {"cfloat", DType::kComplex64}, {"chalf", DType::kComplex32},
  };
  for (const auto& a : kAliases) {
    if (a.alias == name) return a.dtype;
  }
  for (const auto& i : kTable) {
    if (i.name == name) return i.dtype;
  }
  return std::nullopt;
}

}  // namespace nemofs::torch
