#include "checkpoint/npy.h"

#include <algorithm>
#include <cctype>

#include <cstring>

namespace nemofs::checkpoint {
namespace {

using torch::DType;

struct NpyType {
  char kind;  // 'f', 'i', 'u', 'b', 'c', 'V'
  uint32_t size;
  DType dtype;
};
constexpr NpyType kTypes[] = {
    {'f', 8, DType::kFloat64}, {'f', 4, DType::kFloat32},     {'f', 2, DType::kFloat16},
    {'i', 8, DType::kInt64},   {'i', 4, DType::kInt32},       {'i', 2, DType::kInt16},
    {'i', 1, DType::kInt8},    {'u', 1, DType::kUInt8},       {'u', 2, DType::kUInt16},
    {'u', 4, DType::kUInt32},  {'u', 8, DType::kUInt64},      {'b', 1, DType::kBool},
    {'c', 16, DType::kComplex128}, {'c', 8, DType::kComplex64},
};

// The dict literal's value of `key`: the text up to the next top-level
// ',' or '}' (tuples kept whole).
std::optional<std::string_view> DictValue(std::string_view dict, std::string_view key) {
  for (char q : {'\'', '"'}) {
    std::string k = std::string(1, q) + std::string(key) + q;
    size_t at = dict.find(k);
    if (at == std::string_view::npos) continue;
    size_t colon = dict.find(':', at + k.size());
    if (colon == std::string_view::npos) return std::nullopt;
    size_t i = colon + 1;
    while (i < dict.size() && dict[i] == ' ') ++i;
    size_t end = i;
    int depth = 0;
    char quote = 0;
    for (; end < dict.size(); ++end) {
      char c = dict[end];
      if (quote) {
        if (c == quote) quote = 0;
        continue;
      }
      if (c == '\'' || c == '"') quote = c;
      if (c == '(' || c == '[') ++depth;
      if (c == ')' || c == ']') --depth;
      if (depth == 0 && (c == ',' || c == '}')) break;
    }
    std::string_view v = dict.substr(i, end - i);
    while (!v.empty() && v.back() == ' ') v.remove_suffix(1);
    return v;
  }
  return std::nullopt;
}

}  // namespace

uint64_t NpyHeader::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

uint64_t NpyHeaderNeed(std::string_view b) {
  if (b.size() < 10) return 10;
  const auto* u = reinterpret_cast<const unsigned char*>(b.data());
  if (u[6] == 1) return 10 + (uint64_t{u[8]} | uint64_t{u[9]} << 8);
  if (b.size() < 12) return 12;
  return 12 + (uint64_t{u[8]} | uint64_t{u[9]} << 8 | uint64_t{u[10]} << 16 |
               uint64_t{u[11]} << 24);
}

Result<std::vector<int64_t>> ParseShapeText(std::string_view text) {
  std::string_view t = text;
  auto trim = [](std::string_view& s) {
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  };
  trim(t);
  if (!t.empty() && ((t.front() == '[' && t.back() == ']') || (t.front() == '(' && t.back() == ')'))) {
    t = t.substr(1, t.size() - 2);
  }
  std::vector<int64_t> dims;
  uint64_t numel = 1;
  while (true) {
    trim(t);
    if (t.empty()) break;
    size_t comma = t.find(',');
    std::string_view part = t.substr(0, comma);
    trim(part);
    if (part.empty() || part.size() > 18 ||
        !std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return Err(EINVAL, "shape '{}': '{}' is not a dimension (a non-negative integer)", text,
                 part);
    }
    int64_t d = std::stoll(std::string(part));
    dims.push_back(d);
    if (d && numel > (uint64_t{1} << 62) / static_cast<uint64_t>(d)) {
      return Err(EINVAL, "shape '{}' has more than 2^62 elements", text);
    }
    numel *= static_cast<uint64_t>(d);
    if (comma == std::string_view::npos) break;
    t = t.substr(comma + 1);
  }
  if (dims.size() > 64) return Err(EINVAL, "shape '{}' has more than 64 dimensions", text);
  return dims;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

Result<NpyHeader> ParseNpyHeader(std::string_view b, const std::string& what) {
  if (b.size() < 10 || b.substr(0, 6) != "\x93NUMPY") {
    return Err(EINVAL, "{}: not a .npy file (no \\x93NUMPY magic)", what);
  }
  const int major = static_cast<unsigned char>(b[6]);
  if (major < 1 || major > 3) return Err(EINVAL, "{}: .npy format version {} is unknown", what, major);
  const uint64_t need = NpyHeaderNeed(b);
  if (b.size() < need) {
    return Err(EINVAL, "{}: the .npy header is cut short ({} of {} bytes)", what, b.size(), need);
  }
  const uint64_t start = major == 1 ? 10 : 12;
  std::string_view dict = b.substr(start, need - start);
  NpyHeader h;
  h.data_offset = need;
  auto descr = DictValue(dict, "descr");
  auto fortran = DictValue(dict, "fortran_order");
  auto shape = DictValue(dict, "shape");
  if (!descr || !fortran || !shape) {
    return Err(EINVAL, "{}: the .npy header lacks 'descr', 'fortran_order' or 'shape': {}", what,
               dict);
  }
  std::string_view d = *descr;
  if (d.size() < 4 || (d.front() != '\'' && d.front() != '"') || d.back() != d.front()) {
    return Err(EINVAL, "{}: .npy descr {} is not a simple type (structured arrays are not "
               "tensors)", what, d);
  }
  d = d.substr(1, d.size() - 2);
  const char order = d[0];
  if (order != '<' && order != '>' && order != '|' && order != '=') {
    return Err(EINVAL, "{}: .npy descr '{}' has no byte order", what, d);
  }
  h.big_endian = order == '>';
  const char kind = d[1];
  uint32_t size = 0;
  for (char c : d.substr(2)) {
    if (c < '0' || c > '9' || size > 1000) return Err(EINVAL, "{}: .npy descr '{}' is unknown", what, d);
    size = size * 10 + static_cast<uint32_t>(c - '0');
  }
  bool found = false;
  if (kind == 'V' && size == 2) {
    h.dtype = DType::kUInt16;
    h.raw2 = true;
    found = true;
  }
  for (const auto& t : kTypes) {
    if (!found && t.kind == kind && t.size == size) {
      h.dtype = t.dtype;
      h.raw2 = t.dtype == DType::kUInt16;
      found = true;
    }
  }
  if (!found) {
    return Err(EINVAL, "{}: .npy dtype '{}' has no tensor dtype here", what, d);
  }
  if (*fortran == "True") {
    h.fortran_order = true;
  } else if (*fortran != "False") {
    return Err(EINVAL, "{}: .npy fortran_order is {}", what, *fortran);
  }
  std::string_view s = *shape;
  if (s.size() < 2 || s.front() != '(' || s.back() != ')') {
    return Err(EINVAL, "{}: .npy shape {} is not a tuple", what, s);
  }
  NEMOFS_ASSIGN_OR_RETURN(h.shape, ParseShapeText(s));
  return h;
}

Result<std::string> MakeNpyHeader(torch::DType dtype, const std::vector<int64_t>& shape) {
  std::string descr;
  if (dtype == DType::kBFloat16) {
    descr = "<u2";
  } else {
    for (const auto& t : kTypes) {
      if (t.dtype == dtype) descr = fmt::format("{}{}{}", t.size == 1 ? '|' : '<', t.kind, t.size);
    }
  }
  if (descr.empty()) {
    return Err(EINVAL, "numpy has no type for {}", torch::Info(dtype).name);
  }
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1) dims.resize(dims.size() - 2);
  if (shape.size() == 1) dims.resize(dims.size() - 1);  // "(5,)"
  std::string dict =
      fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': ({}), }}", descr, dims);
  // Padded with spaces to a multiple of 64 including the newline.
  uint64_t base = 10;
  if (dict.size() + 1 + base > 65535 + base) base = 12;
  uint64_t total = base + dict.size() + 1;
  total = (total + 63) / 64 * 64;
  dict.append(total - base - dict.size() - 1, ' ');
  dict.push_back('\n');
  std::string out = "\x93NUMPY";
  const uint64_t len = dict.size();
  if (base == 10) {
    out += '\x01';
    out += '\x00';
    out += static_cast<char>(len & 0xff);
    out += static_cast<char>(len >> 8);
  } else {
    out += '\x02';
    out += '\x00';
    for (int i = 0; i < 4; ++i) out += static_cast<char>((len >> (8 * i)) & 0xff);
  }
  return out + dict;
}

std::string ToCOrderLittleEndianRange(const NpyHeader& h, std::string_view in, uint64_t first,
                                      uint64_t count) {
  const uint32_t item = torch::Info(h.dtype).itemsize;
  const uint64_t total = h.numel();
  if (in.size() != h.nbytes() || first > total) return {};
  count = std::min(count, total - first);
  std::string out;
  if (!(h.fortran_order && h.shape.size() > 1)) {
    out.assign(in.substr(first * item, count * item));
  } else {
    // Fortran order is the C order of the reversed shape: element
    // [i0..in] is at Fortran offset sum(ik * prod(shape[0..k-1])).
    const size_t n = h.shape.size();
    std::vector<uint64_t> fstride(n, 1);
    for (size_t k = 1; k < n; ++k) fstride[k] = fstride[k - 1] * static_cast<uint64_t>(h.shape[k - 1]);
    std::vector<int64_t> idx(n, 0);
    uint64_t f = 0, rest = first;  // the C index of `first`, and its Fortran offset
    for (size_t k = n; k-- > 0;) {
      idx[k] = static_cast<int64_t>(rest % static_cast<uint64_t>(h.shape[k]));
      rest /= static_cast<uint64_t>(h.shape[k]);
      f += static_cast<uint64_t>(idx[k]) * fstride[k];
    }
    out.resize(count * item);
    for (uint64_t e = 0; e < count; ++e) {
      std::memcpy(&out[e * item], &in[f * item], item);
      for (size_t k = n; k-- > 0;) {  // C order: the last index fastest
        if (++idx[k] < h.shape[k]) {
          f += fstride[k];
          break;
        }
        f -= fstride[k] * static_cast<uint64_t>(h.shape[k] - 1);
        idx[k] = 0;
      }
    }
  }
  if (h.big_endian && item > 1) {
    const bool complex = h.dtype == DType::kComplex64 || h.dtype == DType::kComplex128;
    const uint32_t unit = complex ? item / 2 : item;
    for (size_t i = 0; i + unit <= out.size(); i += unit) std::reverse(&out[i], &out[i + unit]);
  }
  return out;
}

std::string ToCOrderLittleEndian(const NpyHeader& h, std::string_view in) {
  if (in.size() != h.nbytes()) return std::string(in);  // not this header's data: callers check
  return ToCOrderLittleEndianRange(h, in, 0, h.numel());
}

}  // namespace nemofs::checkpoint
