// The pickle VM follows CPython's Lib/pickle.py `_Unpickler` opcode by opcode
// (and Modules/_pickle.c where the two differ, since that is what torch.load
// really runs), with every side effect replaced by an inert record:
//
// * find_class never imports: GLOBAL/STACK_GLOBAL/INST make a kGlobal.
// * REDUCE/NEWOBJ never call: they make a kCall/kObject, except for the few
//   builtins whose result later opcodes depend on (dicts that receive
//   SETITEMS, bytes written by protocol 2 as _codecs.encode, sets).
// * The stack is one vector plus a vector of mark positions, which is what
//   the C unpickler does too: opcodes only see the items above the innermost
//   mark ("the current frame"), so "stack underflow" is checked against it.
// * Values are created mutable and handed out as const pointers; the stack
//   and the memo keep the mutable pointers, so a SETITEMS on a memoised dict
//   is visible through every earlier reference, as it is in Python.
#include "torch/pickle.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <set>
#include <unordered_map>

#include "util/utf8.h"

namespace nemofs::torch {
namespace {

// Opcode bytes, named as in CPython's pickletools.
namespace op {
constexpr uint8_t kMark = '(';
constexpr uint8_t kStop = '.';
constexpr uint8_t kPop = '0';
constexpr uint8_t kPopMark = '1';
constexpr uint8_t kDup = '2';
constexpr uint8_t kFloat = 'F';
constexpr uint8_t kInt = 'I';
constexpr uint8_t kBinInt = 'J';
constexpr uint8_t kBinInt1 = 'K';
constexpr uint8_t kLong = 'L';
constexpr uint8_t kBinInt2 = 'M';
constexpr uint8_t kNone = 'N';
constexpr uint8_t kPersId = 'P';
constexpr uint8_t kBinPersId = 'Q';
constexpr uint8_t kReduce = 'R';
constexpr uint8_t kString = 'S';
constexpr uint8_t kBinString = 'T';
constexpr uint8_t kShortBinString = 'U';
constexpr uint8_t kUnicode = 'V';
constexpr uint8_t kBinUnicode = 'X';
constexpr uint8_t kAppend = 'a';
constexpr uint8_t kBuild = 'b';
constexpr uint8_t kGlobal = 'c';
constexpr uint8_t kDict = 'd';
constexpr uint8_t kEmptyDict = '}';
constexpr uint8_t kAppends = 'e';
constexpr uint8_t kGet = 'g';
constexpr uint8_t kBinGet = 'h';
constexpr uint8_t kInst = 'i';
constexpr uint8_t kLongBinGet = 'j';
constexpr uint8_t kList = 'l';
constexpr uint8_t kEmptyList = ']';
constexpr uint8_t kObj = 'o';
constexpr uint8_t kPut = 'p';
constexpr uint8_t kBinPut = 'q';
constexpr uint8_t kLongBinPut = 'r';
constexpr uint8_t kSetItem = 's';
constexpr uint8_t kTuple = 't';
constexpr uint8_t kEmptyTuple = ')';
constexpr uint8_t kSetItems = 'u';
constexpr uint8_t kBinFloat = 'G';
// Protocol 2.
constexpr uint8_t kProto = 0x80;
constexpr uint8_t kNewObj = 0x81;
constexpr uint8_t kExt1 = 0x82;
constexpr uint8_t kExt2 = 0x83;
constexpr uint8_t kExt4 = 0x84;
constexpr uint8_t kTuple1 = 0x85;
constexpr uint8_t kTuple2 = 0x86;
constexpr uint8_t kTuple3 = 0x87;
constexpr uint8_t kNewTrue = 0x88;
constexpr uint8_t kNewFalse = 0x89;
constexpr uint8_t kLong1 = 0x8a;
constexpr uint8_t kLong4 = 0x8b;
// Protocol 3.
constexpr uint8_t kBinBytes = 'B';
constexpr uint8_t kShortBinBytes = 'C';
// Protocol 4.
constexpr uint8_t kShortBinUnicode = 0x8c;
constexpr uint8_t kBinUnicode8 = 0x8d;
constexpr uint8_t kBinBytes8 = 0x8e;
constexpr uint8_t kEmptySet = 0x8f;
constexpr uint8_t kAddItems = 0x90;
constexpr uint8_t kFrozenSet = 0x91;
constexpr uint8_t kNewObjEx = 0x92;
constexpr uint8_t kStackGlobal = 0x93;
constexpr uint8_t kMemoize = 0x94;
constexpr uint8_t kFrame = 0x95;
// Protocol 5.
constexpr uint8_t kByteArray8 = 0x96;
constexpr uint8_t kNextBuffer = 0x97;
constexpr uint8_t kReadOnlyBuffer = 0x98;
}  // namespace op

constexpr int kHighestProtocol = 5;
// LONG4 payloads beyond this are refused: turning n bytes into decimal text
// is quadratic in n, so the cap bounds the work a hostile pickle can cause
// (64 KiB = 157,825 decimal digits, far beyond any real checkpoint).
constexpr uint64_t kMaxLongBytes = 64 << 10;
// ... and all big integers of one pickle together may cost no more than one
// such LONG4 (work ~ limbs^2; ~0.4 s at -O2).
constexpr uint64_t kMaxBigIntWork = (kMaxLongBytes / 4 + 1) * (kMaxLongBytes / 4 + 1);
// Python refuses to parse decimal integer text longer than this
// (sys.int_info.default_max_str_digits), for the same reason.
constexpr size_t kMaxDecimalDigits = 4300;
// Memo indices up to twice the number of entries (plus slack) live in a
// vector; sparser ones (a hostile LONG_BINPUT 0xffffffff) in a hash map.
constexpr uint64_t kDenseMemoSlack = 1024;
// ToDebugString stops appending after this many characters: shared
// sub-objects are printed at every reference, so a small DAG could
// otherwise expand exponentially.
constexpr size_t kMaxDebugChars = 4 << 20;
constexpr size_t kMaxDebugDepth = 2000;

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
    case Kind::kBigInt:
      return "int";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kList:
      return "list";
    case Kind::kTuple:
      return "tuple";
    case Kind::kSet:
      return "set";
    case Kind::kDict:
      return "dict";
    case Kind::kGlobal:
      return "global";
    case Kind::kCall:
      return "call result";
    case Kind::kObject:
      return "object";
    case Kind::kPersistentId:
      return "persistent id";
  }
  return "?";
}

uint64_t LoadLE(std::string_view b) {
  uint64_t v = 0;
  for (size_t i = b.size(); i-- > 0;) v = (v << 8) | static_cast<uint8_t>(b[i]);
  return v;
}

std::string_view TrimSpace(std::string_view s) {
  auto space = [](char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
  };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

// Magnitude (little-endian 32-bit limbs, modified in place) as decimal text.
std::string LimbsToDecimal(std::vector<uint32_t>& limbs) {
  while (!limbs.empty() && limbs.back() == 0) limbs.pop_back();
  if (limbs.empty()) return "0";
  std::vector<uint32_t> chunks;  // base 10^9, least significant first
  chunks.reserve(limbs.size() * 32 / 29 + 1);
  while (!limbs.empty()) {
    uint64_t rem = 0;
    for (size_t i = limbs.size(); i-- > 0;) {
      uint64_t cur = (rem << 32) | limbs[i];
      limbs[i] = static_cast<uint32_t>(cur / 1000000000);
      rem = cur % 1000000000;
    }
    chunks.push_back(static_cast<uint32_t>(rem));
    while (!limbs.empty() && limbs.back() == 0) limbs.pop_back();
  }
  std::string out = fmt::format("{}", chunks.back());
  for (size_t i = chunks.size() - 1; i-- > 0;)
    fmt::format_to(std::back_inserter(out), "{:09}", chunks[i]);
  return out;
}

// LONG1/LONG4 payload: little-endian two's complement, any length.
void SetLongFromBytes(Value* v, std::string_view b) {
  auto byte = [&](size_t i) { return static_cast<uint8_t>(b[i]); };
  size_t n = b.size();
  if (n == 0) {
    v->kind = Kind::kInt;
    v->integer = 0;
    return;
  }
  bool negative = (byte(n - 1) & 0x80) != 0;
  // Drop redundant sign-extension bytes (Python writes none, hand-made pickles may).
  while (n > 1 && ((byte(n - 1) == 0x00 && !(byte(n - 2) & 0x80)) ||
                   (byte(n - 1) == 0xff && (byte(n - 2) & 0x80)))) {
    --n;
  }
  if (n <= 8) {
    uint64_t u = LoadLE(b.substr(0, n));
    if (negative && n < 8) u |= ~uint64_t{0} << (8 * n);
    v->kind = Kind::kInt;
    v->integer = static_cast<int64_t>(u);
    return;
  }
  std::vector<uint32_t> limbs((n + 3) / 4, 0);
  for (size_t i = 0; i < n; ++i) {
    uint32_t x = negative ? static_cast<uint8_t>(~byte(i)) : byte(i);
    limbs[i / 4] |= x << (8 * (i % 4));
  }
  if (negative) {  // magnitude = ~x + 1
    for (auto& limb : limbs) {
      if (++limb != 0) break;
    }
  }
  v->kind = Kind::kBigInt;
  v->str = negative ? "-" : "";
  v->str += LimbsToDecimal(limbs);
}

// Text of INT/LONG (`int(text, 0)` in Python): optional sign, decimal or a
// 0x/0o/0b prefix. False if malformed or too long.
bool SetIntFromText(Value* v, std::string_view s) {
  s = TrimSpace(s);
  bool negative = false;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    negative = s[0] == '-';
    s.remove_prefix(1);
  }
  unsigned base = 10;
  if (s.size() > 2 && s[0] == '0') {
    char p = static_cast<char>(s[1] | 0x20);
    base = p == 'x' ? 16 : p == 'o' ? 8 : p == 'b' ? 2 : 10;
    if (base != 10) s.remove_prefix(2);
  }
  if (s.empty() || s.size() > kMaxLongBytes) return false;
  if (base == 10) {
    if (s.size() > kMaxDecimalDigits) return false;
    for (char c : s) {
      if (c < '0' || c > '9') return false;
    }
    while (s.size() > 1 && s[0] == '0') s.remove_prefix(1);
    // 19 digits may or may not fit in int64; fewer always do.
    static constexpr std::string_view kMaxPos = "9223372036854775807";
    static constexpr std::string_view kMaxNeg = "9223372036854775808";
    if (s.size() < 19 || (s.size() == 19 && s <= (negative ? kMaxNeg : kMaxPos))) {
      uint64_t u = 0;
      for (char c : s) u = u * 10 + static_cast<uint64_t>(c - '0');
      v->kind = Kind::kInt;
      v->integer = negative ? static_cast<int64_t>(0 - u) : static_cast<int64_t>(u);
      return true;
    }
    v->kind = Kind::kBigInt;
    v->str = negative ? "-" : "";
    v->str += s;
    return true;
  }
  std::vector<uint32_t> limbs;
  unsigned shift = base == 16 ? 4 : base == 8 ? 3 : 1;
  for (char c : s) {
    unsigned d;
    if (c >= '0' && c <= '9') {
      d = static_cast<unsigned>(c - '0');
    } else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') {
      d = static_cast<unsigned>((c | 0x20) - 'a' + 10);
    } else {
      return false;
    }
    if (d >= base) return false;
    uint32_t carry = d;
    for (auto& limb : limbs) {
      uint64_t cur = (static_cast<uint64_t>(limb) << shift) | carry;
      limb = static_cast<uint32_t>(cur);
      carry = static_cast<uint32_t>(cur >> 32);
    }
    if (carry) limbs.push_back(carry);
  }
  while (!limbs.empty() && limbs.back() == 0) limbs.pop_back();
  uint64_t mag = 0;
  if (limbs.size() <= 2) {
    for (size_t i = limbs.size(); i-- > 0;) mag = (mag << 32) | limbs[i];
    uint64_t max = negative ? uint64_t{1} << 63 : (uint64_t{1} << 63) - 1;
    if (mag <= max) {
      v->kind = Kind::kInt;
      v->integer = negative ? static_cast<int64_t>(0 - mag) : static_cast<int64_t>(mag);
      return true;
    }
  }
  v->kind = Kind::kBigInt;
  v->str = negative ? "-" : "";
  v->str += LimbsToDecimal(limbs);
  return true;
}

// FLOAT text (`float(text)`): decimal or inf/nan, surrounding space allowed.
bool ParseFloatText(std::string_view s, double* out) {
  s = TrimSpace(s);
  if (!s.empty() && s[0] == '+') s.remove_prefix(1);
  if (s.empty()) return false;
  auto r = std::from_chars(s.data(), s.data() + s.size(), *out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

void AppendUtf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {  // lone surrogates too, as Python's "surrogatepass"
    out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

// Python's encoding-name normalisation, for the encodings protocol 2 uses.
enum class Encoding { kLatin1, kUtf8, kAscii, kOther };
Encoding ClassifyEncoding(std::string_view name) {
  std::string n;
  for (char c : name) {
    c = (c >= 'A' && c <= 'Z') ? static_cast<char>(c | 0x20) : c;
    n.push_back(c == '-' || c == ' ' ? '_' : c);
  }
  if (n == "latin1" || n == "latin_1" || n == "iso8859_1" || n == "iso_8859_1" || n == "l1" ||
      n == "latin" || n == "cp819" || n == "8859") {
    return Encoding::kLatin1;
  }
  if (n == "utf8" || n == "utf_8" || n == "u8") return Encoding::kUtf8;
  if (n == "ascii" || n == "us_ascii" || n == "646") return Encoding::kAscii;
  return Encoding::kOther;
}

// str.encode(encoding). Returns the offending code point (or -1 for broken
// UTF-8) in *bad when a character does not fit the encoding.
bool EncodeText(std::string_view s, Encoding enc, std::string* out, int64_t* bad) {
  if (enc == Encoding::kUtf8) {
    *out = s;
    return true;
  }
  uint32_t limit = enc == Encoding::kLatin1 ? 0xff : 0x7f;
  out->clear();
  out->reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    uint32_t cp;
    if (!NextCodePoint(s, &i, &cp)) {
      *bad = -1;
      return false;
    }
    if (cp > limit) {
      *bad = cp;
      return false;
    }
    out->push_back(static_cast<char>(cp));
  }
  return true;
}

bool IsPair(const Value* v) {
  return (v->kind == Kind::kTuple || v->kind == Kind::kList) && v->items.size() == 2;
}

class Machine {
 public:
  Machine(std::string_view data, const std::string& what, const Limits& limits, Unpickled* out)
      : data_(data), what_(what), limits_(limits), out_(out) {
    out_->arena.reserve(std::min({data.size() / 8 + 16, size_t{1} << 16, limits.max_values}));
    stack_.reserve(64);
  }

  Status Run();

 private:
  template <typename... Args>
  Error Fail(fmt::format_string<Args...> format, Args&&... args) const {
    return Err(EINVAL, "{}: pickle opcode 0x{:02x} at offset {}: {}", what_, op_, op_pos_,
               fmt::format(format, std::forward<Args>(args)...));
  }
  Error Underflow() const { return Fail("stack underflow"); }
  Error NoMark() const { return Fail("no MARK on the stack"); }

  // ---- input ----
  Result<std::string_view> Take(uint64_t n) {
    if (n > data_.size() - pos_) {
      return Fail("unexpected end of data: {} bytes needed at offset {}, {} left", n, pos_,
                  data_.size() - pos_);
    }
    std::string_view s = data_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  Result<uint64_t> TakeLE(size_t n) {
    NEMOFS_ASSIGN_OR_RETURN(std::string_view b, Take(n));
    return LoadLE(b);
  }
  // A protocol-0 argument: the bytes up to '\n' (consumed, not returned).
  Result<std::string_view> Line() {
    size_t nl = data_.find('\n', pos_);
    if (nl == std::string_view::npos) {
      return Fail("unexpected end of data: no end of line after offset {}", pos_);
    }
    std::string_view s = data_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    return s;
  }
  Result<uint64_t> LineIndex() {
    NEMOFS_ASSIGN_OR_RETURN(std::string_view s, Line());
    s = TrimSpace(s);
    uint64_t v = 0;
    auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (s.empty() || r.ec != std::errc() || r.ptr != s.data() + s.size()) {
      return Fail("invalid memo index '{}'", s.substr(0, 40));
    }
    return v;
  }

  // ---- values ----
  Value* New(Kind k) {
    out_->arena.push_back(std::make_unique<Value>());
    Value* v = out_->arena.back().get();
    v->kind = k;
    v->opcode = op_;
    return v;
  }
  // Big integers (over 8 bytes) cost quadratic time to turn into decimal.
  Status ChargeBigInt(uint64_t n) {
    if (n <= 8) return Ok();
    uint64_t limbs = n / 4 + 1;
    bigint_work_ += limbs * limbs;
    if (bigint_work_ > kMaxBigIntWork) {
      return Fail("big integers exceed the conversion budget of this pickle");
    }
    return Ok();
  }
  Status Charge(uint64_t n) {
    bytes_ += n;
    if (bytes_ > limits_.max_bytes) {
      return Fail("str/bytes payloads exceed {} bytes in total", limits_.max_bytes);
    }
    return Ok();
  }
  Result<Value*> NewText(Kind k, std::string_view s) {
    NEMOFS_RETURN_IF_ERROR(Charge(s.size()));
    Value* v = New(k);
    v->str = s;
    return v;
  }
  Result<Value*> NewGlobal(std::string_view module, std::string_view name);
  Result<Value*> Reduce(Value* callable, Value* args);
  Result<Value*> ReduceDict(Value* args, bool defaultdict);
  Result<Value*> ReduceSet(Value* args);
  Result<Value*> ReduceBytes(Value* args, bool codecs);

  // ---- stack ----
  size_t Base() const { return marks_.empty() ? 0 : marks_.back(); }
  Status Push(Value* v) {
    if (stack_.size() + marks_.size() >= limits_.max_stack) {
      return Fail("stack exceeds {} entries", limits_.max_stack);
    }
    stack_.push_back(v);
    return Ok();
  }
  Value* Pop() {
    if (stack_.size() <= Base()) return nullptr;
    Value* v = stack_.back();
    stack_.pop_back();
    return v;
  }
  Value* Top() const { return stack_.size() > Base() ? stack_.back() : nullptr; }
  // Items since the innermost MARK are stack_[*start, end); the caller
  // truncates the stack to *start when done with them.
  bool PopMark(size_t* start) {
    if (marks_.empty()) return false;
    *start = marks_.back();
    marks_.pop_back();
    return true;
  }
  // The tuple/list/set made of the items since the innermost MARK.
  Status PushMarked(Kind k) {
    size_t start;
    if (!PopMark(&start)) return NoMark();
    Value* v = New(k);
    v->items.assign(stack_.begin() + static_cast<ptrdiff_t>(start), stack_.end());
    stack_.resize(start);
    return Push(v);
  }
  Status PushTupleOf(size_t n) {
    if (stack_.size() - Base() < n) return Underflow();
    Value* v = New(Kind::kTuple);
    v->items.assign(stack_.end() - static_cast<ptrdiff_t>(n), stack_.end());
    stack_.resize(stack_.size() - n);
    return Push(v);
  }
  Status Append(Value* target, Value* const* begin, Value* const* end);
  Status SetItems(Value* target, Value* const* begin, Value* const* end);

  // ---- memo ----
  Status MemoPut(uint64_t index, Value* v);
  Result<Value*> MemoGet(uint64_t index) const {
    if (index < memo_.size() && memo_[index]) return memo_[index];
    if (!sparse_memo_.empty()) {
      auto it = sparse_memo_.find(index);
      if (it != sparse_memo_.end()) return it->second;
    }
    return Fail("memo index {} is not set", index);
  }

  Status Step();

  std::string_view data_;
  const std::string& what_;
  const Limits& limits_;
  Unpickled* out_;

  size_t pos_ = 0;
  size_t op_pos_ = 0;
  uint8_t op_ = 0;
  int proto_ = 0;
  bool stopped_ = false;
  uint64_t bytes_ = 0;
  uint64_t bigint_work_ = 0;
  // Elements copied from one container into another (dict(d), set(list)):
  // counted as values, so repeating such a copy cannot grow memory faster
  // than the input.
  size_t copies_ = 0;
  std::vector<Value*> stack_;
  std::vector<size_t> marks_;
  std::vector<Value*> memo_;
  std::unordered_map<uint64_t, Value*> sparse_memo_;
  size_t memo_count_ = 0;
  std::set<std::pair<std::string, std::string>, std::less<>> seen_globals_;
};

Result<Value*> Machine::NewGlobal(std::string_view module, std::string_view name) {
  // Python 3 maps Python 2 module names when loading protocol < 3
  // (_compat_pickle.IMPORT_MAPPING); these two are the ones checkpoints use.
  bool renamed = false;
  if (proto_ < 3) {
    if (module == "__builtin__") {
      module = "builtins";
      renamed = true;
    } else if (module == "copy_reg") {
      module = "copyreg";
      renamed = true;
    }
  }
  NEMOFS_RETURN_IF_ERROR(Charge(module.size() + name.size()));
  Value* v = New(Kind::kGlobal);
  v->boolean = renamed;
  v->str = module;
  v->name = name;
  auto key = std::make_pair(v->str, v->name);
  if (seen_globals_.insert(key).second) out_->globals.push_back(std::move(key));
  return v;
}

Result<Value*> Machine::Reduce(Value* callable, Value* args) {
  if (callable->kind == Kind::kGlobal && args->kind == Kind::kTuple) {
    const std::string& m = callable->str;
    const std::string& n = callable->name;
    Value* made = nullptr;
    if ((m == "collections" && n == "OrderedDict") || (m == "builtins" && n == "dict")) {
      NEMOFS_ASSIGN_OR_RETURN(made, ReduceDict(args, false));
    } else if (m == "collections" && n == "defaultdict") {
      NEMOFS_ASSIGN_OR_RETURN(made, ReduceDict(args, true));
    } else if (m == "_codecs" && n == "encode") {
      NEMOFS_ASSIGN_OR_RETURN(made, ReduceBytes(args, true));
    } else if (m == "builtins" && (n == "set" || n == "frozenset")) {
      NEMOFS_ASSIGN_OR_RETURN(made, ReduceSet(args));
    } else if (m == "builtins" && (n == "bytes" || n == "bytearray")) {
      NEMOFS_ASSIGN_OR_RETURN(made, ReduceBytes(args, false));
    }
    if (made) {
      made->callable = callable;
      made->args = args;
      return made;
    }
  }
  Value* v = New(Kind::kCall);
  v->callable = callable;
  v->args = args;
  return v;
}

// dict(), OrderedDict(pairs) (Python 2 wrote [[k, v], ...]), dict(mapping),
// defaultdict(factory[, pairs]). Arguments of any other shape leave the call
// inert (nullptr): an opaque iterable cannot be expanded without running it.
Result<Value*> Machine::ReduceDict(Value* args, bool defaultdict) {
  const auto& a = args->items;
  size_t first = defaultdict ? 1 : 0;
  if (a.size() > first + 1) return nullptr;
  Value* d = nullptr;
  if (a.size() <= first) {
    d = New(Kind::kDict);
    return d;
  }
  const Value* src = a[first];
  if (src->kind == Kind::kDict) {
    d = New(Kind::kDict);
    d->entries = src->entries;
    copies_ += d->entries.size();
    return d;
  }
  if (src->kind != Kind::kList && src->kind != Kind::kTuple) return nullptr;
  if (!std::all_of(src->items.begin(), src->items.end(), IsPair)) return nullptr;
  d = New(Kind::kDict);
  copies_ += src->items.size();
  d->entries.reserve(src->items.size());
  for (const Value* pair : src->items) d->entries.emplace_back(pair->items[0], pair->items[1]);
  return d;
}

Result<Value*> Machine::ReduceSet(Value* args) {
  const auto& a = args->items;
  if (a.size() > 1) return nullptr;
  if (a.empty()) return New(Kind::kSet);
  const Value* src = a[0];
  if (src->kind == Kind::kList || src->kind == Kind::kTuple || src->kind == Kind::kSet) {
    Value* s = New(Kind::kSet);
    s->items = src->items;
    copies_ += s->items.size();
    return s;
  }
  if (src->kind == Kind::kDict) {
    Value* s = New(Kind::kSet);
    copies_ += src->entries.size();
    s->items.reserve(src->entries.size());
    for (const auto& [k, v] : src->entries) s->items.push_back(k);
    return s;
  }
  return nullptr;
}

// _codecs.encode(str[, encoding]) and bytes/bytearray(), (bytes),
// (str, encoding), ([ints]).
Result<Value*> Machine::ReduceBytes(Value* args, bool codecs) {
  const auto& a = args->items;
  if (a.empty()) {
    if (codecs) return nullptr;
    return NewText(Kind::kBytes, "");
  }
  if (a.size() > 3) return nullptr;
  const Value* src = a[0];
  if (!codecs && a.size() == 1) {
    if (src->kind == Kind::kBytes) return NewText(Kind::kBytes, src->str);
    if (src->kind != Kind::kList && src->kind != Kind::kTuple) return nullptr;
    std::string out;
    for (const Value* x : src->items) {
      if (x->kind != Kind::kInt || x->integer < 0 || x->integer > 255) return nullptr;
      out.push_back(static_cast<char>(x->integer));
    }
    return NewText(Kind::kBytes, out);
  }
  if (src->kind != Kind::kString) return nullptr;
  Encoding enc = Encoding::kUtf8;  // str.encode's default
  if (a.size() >= 2) {
    if (a[1]->kind != Kind::kString) return nullptr;
    enc = ClassifyEncoding(a[1]->str);
    if (enc == Encoding::kOther) return nullptr;
  } else if (!codecs) {
    return nullptr;  // bytes(str) without an encoding is a TypeError in Python
  }
  if (a.size() == 3 && (a[2]->kind != Kind::kString || a[2]->str != "strict")) return nullptr;
  std::string out;
  int64_t bad = 0;
  if (!EncodeText(src->str, enc, &out, &bad)) {
    if (bad < 0) return Fail("cannot encode a str that is not valid UTF-8");
    return Fail("cannot encode U+{:04X} as {}", bad,
                enc == Encoding::kLatin1 ? "latin-1" : "ascii");
  }
  return NewText(Kind::kBytes, out);
}

Status Machine::Append(Value* target, Value* const* begin, Value* const* end) {
  if (target->kind != Kind::kList && target->kind != Kind::kCall && target->kind != Kind::kObject) {
    return Fail("cannot append to {} (not a list)", KindName(target->kind));
  }
  target->items.insert(target->items.end(), begin, end);
  return Ok();
}

Status Machine::SetItems(Value* target, Value* const* begin, Value* const* end) {
  if (target->kind != Kind::kDict && target->kind != Kind::kCall && target->kind != Kind::kObject) {
    return Fail("cannot set items on {} (not a dict)", KindName(target->kind));
  }
  if ((end - begin) % 2 != 0) return Fail("odd number of items for SETITEMS");
  for (auto p = begin; p != end; p += 2) target->entries.emplace_back(p[0], p[1]);
  return Ok();
}

Status Machine::MemoPut(uint64_t index, Value* v) {
  bool fresh;
  if (index < memo_.size()) {
    fresh = !memo_[index] && (sparse_memo_.empty() || !sparse_memo_.count(index));
    memo_[index] = v;
  } else if (!sparse_memo_.empty() && sparse_memo_.count(index)) {
    fresh = false;
    sparse_memo_[index] = v;
  } else if (index < 2 * static_cast<uint64_t>(memo_count_) + kDenseMemoSlack) {
    fresh = true;
    memo_.resize(index + 1, nullptr);
    memo_[index] = v;
  } else {
    fresh = true;
    sparse_memo_[index] = v;
  }
  if (fresh && ++memo_count_ > limits_.max_memo) {
    return Fail("memo exceeds {} entries", limits_.max_memo);
  }
  return Ok();
}

// Decodes the quoted argument of STRING like codecs.escape_decode.
bool EscapeDecode(std::string_view s, std::string* out) {
  out->clear();
  out->reserve(s.size());
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    c = static_cast<char>(c | 0x20);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c != '\\') {
      out->push_back(c);
      continue;
    }
    if (++i == s.size()) return false;  // trailing backslash
    c = s[i];
    switch (c) {
      case '\n':
        break;
      case '\\':
      case '\'':
      case '"':
        out->push_back(c);
        break;
      case 'a':
        out->push_back('\a');
        break;
      case 'b':
        out->push_back('\b');
        break;
      case 'f':
        out->push_back('\f');
        break;
      case 'n':
        out->push_back('\n');
        break;
      case 'r':
        out->push_back('\r');
        break;
      case 't':
        out->push_back('\t');
        break;
      case 'v':
        out->push_back('\v');
        break;
      case 'x': {
        if (s.size() - i < 3 || hex(s[i + 1]) < 0 || hex(s[i + 2]) < 0) return false;
        out->push_back(static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2])));
        i += 2;
        break;
      }
      default:
        if (c >= '0' && c <= '7') {
          unsigned v = static_cast<unsigned>(c - '0');
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k) {
            v = v * 8 + static_cast<unsigned>(s[++i] - '0');
          }
          out->push_back(static_cast<char>(v & 0xff));
        } else {
          out->push_back('\\');
          out->push_back(c);
        }
    }
  }
  return true;
}

// Decodes the argument of UNICODE (raw-unicode-escape): bytes are latin-1
// code points except \uXXXX and \UXXXXXXXX after an odd number of backslashes.
bool RawUnicodeEscapeDecode(std::string_view s, std::string* out) {
  out->clear();
  out->reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (s[i] != '\\') {
      AppendUtf8(out, static_cast<uint8_t>(s[i++]));
      continue;
    }
    size_t run = 0;
    while (i < s.size() && s[i] == '\\') {
      out->push_back('\\');
      ++run;
      ++i;
    }
    if (run % 2 == 0 || i == s.size() || (s[i] != 'u' && s[i] != 'U')) continue;
    out->pop_back();
    size_t digits = s[i] == 'u' ? 4 : 8;
    ++i;
    if (s.size() - i < digits) return false;
    uint32_t cp = 0;
    for (size_t k = 0; k < digits; ++k, ++i) {
      char c = s[i];
      uint32_t d;
      if (c >= '0' && c <= '9') {
        d = static_cast<uint32_t>(c - '0');
      } else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') {
        d = static_cast<uint32_t>((c | 0x20) - 'a' + 10);
      } else {
        return false;
      }
      cp = cp * 16 + d;
    }
    if (cp > 0x10ffff) return false;
    AppendUtf8(out, cp);
  }
  return true;
}

Status Machine::Run() {
  while (!stopped_) {
    if (pos_ >= data_.size()) {
      return Err(EINVAL, "{}: pickle at offset {}: unexpected end of data before STOP", what_,
                 pos_);
    }
    op_pos_ = pos_;
    op_ = static_cast<uint8_t>(data_[pos_++]);
    NEMOFS_RETURN_IF_ERROR(Step());
    // Every opcode makes at most two Values, so checking afterwards is exact
    // enough and keeps New() infallible.
    if (out_->arena.size() + copies_ > limits_.max_values) {
      return Fail("more than {} values", limits_.max_values);
    }
  }
  return Ok();
}

Status Machine::Step() {
  switch (op_) {
    case op::kMark:
      if (marks_.size() >= limits_.max_depth) {
        return Fail("MARKs nested deeper than {}", limits_.max_depth);
      }
      if (stack_.size() + marks_.size() >= limits_.max_stack) {
        return Fail("stack exceeds {} entries", limits_.max_stack);
      }
      marks_.push_back(stack_.size());
      return Ok();

    case op::kStop: {
      Value* v = Pop();
      if (!v) return Underflow();
      out_->root = v;
      out_->consumed = pos_;
      stopped_ = true;
      return Ok();
    }

    case op::kPop:
      // An empty frame makes POP drop the MARK instead (pickle.py load_pop).
      if (stack_.size() > Base()) {
        stack_.pop_back();
      } else if (!marks_.empty()) {
        marks_.pop_back();
      } else {
        return Underflow();
      }
      return Ok();

    case op::kPopMark: {
      size_t start;
      if (!PopMark(&start)) return NoMark();
      stack_.resize(start);
      return Ok();
    }

    case op::kDup: {
      Value* v = Top();
      if (!v) return Underflow();
      return Push(v);
    }

    case op::kFloat: {
      NEMOFS_ASSIGN_OR_RETURN(std::string_view s, Line());
      Value* v = New(Kind::kFloat);
      if (!ParseFloatText(s, &v->real)) return Fail("invalid FLOAT '{}'", s.substr(0, 40));
      return Push(v);
    }

    case op::kInt:
    case op::kLong: {
      NEMOFS_ASSIGN_OR_RETURN(std::string_view s, Line());
      Value* v = New(Kind::kInt);
      if (op_ == op::kInt && (s == "00" || s == "01")) {  // protocol 0's False/True
        v->kind = Kind::kBool;
        v->boolean = s == "01";
        return Push(v);
      }
      if (op_ == op::kLong && !s.empty() && s.back() == 'L') s.remove_suffix(1);
      NEMOFS_RETURN_IF_ERROR(Charge(s.size()));
      NEMOFS_RETURN_IF_ERROR(ChargeBigInt(s.size() / 2));
      if (!SetIntFromText(v, s)) return Fail("invalid integer '{}'", s.substr(0, 40));
      return Push(v);
    }

    case op::kBinInt:
    case op::kBinInt1:
    case op::kBinInt2: {
      size_t n = op_ == op::kBinInt ? 4 : op_ == op::kBinInt2 ? 2 : 1;
      NEMOFS_ASSIGN_OR_RETURN(uint64_t u, TakeLE(n));
      Value* v = New(Kind::kInt);
      v->integer = op_ == op::kBinInt ? static_cast<int32_t>(static_cast<uint32_t>(u))
                                      : static_cast<int64_t>(u);
      return Push(v);
    }

    case op::kLong1:
    case op::kLong4: {
      uint64_t n;
      if (op_ == op::kLong1) {
        NEMOFS_ASSIGN_OR_RETURN(n, TakeLE(1));
      } else {
        NEMOFS_ASSIGN_OR_RETURN(uint64_t u, TakeLE(4));
        int32_t len = static_cast<int32_t>(static_cast<uint32_t>(u));
        if (len < 0) return Fail("negative LONG4 length {}", len);
        if (static_cast<uint64_t>(len) > kMaxLongBytes) {
          return Fail("LONG4 of {} bytes exceeds the limit of {}", len, kMaxLongBytes);
        }
        n = static_cast<uint64_t>(len);
      }
      NEMOFS_ASSIGN_OR_RETURN(std::string_view b, Take(n));
      NEMOFS_RETURN_IF_ERROR(Charge(n));
      Value* v = New(Kind::kInt);
      NEMOFS_RETURN_IF_ERROR(ChargeBigInt(n));
      SetLongFromBytes(v, b);
      return Push(v);
    }

    case op::kNone:
      return Push(New(Kind::kNone));

    case op::kNewTrue:
    case op::kNewFalse: {
      Value* v = New(Kind::kBool);
      v->boolean = op_ == op::kNewTrue;
      return Push(v);
    }

    case op::kBinFloat: {
      NEMOFS_ASSIGN_OR_RETURN(std::string_view b, Take(8));
      uint64_t bits = 0;
      for (char c : b) bits = (bits << 8) | static_cast<uint8_t>(c);  // big-endian
      Value* v = New(Kind::kFloat);
      std::memcpy(&v->real, &bits, sizeof bits);
      return Push(v);
    }

    case op::kString: {
      NEMOFS_ASSIGN_OR_RETURN(std::string_view s, Line());
      if (s.size() < 2 || s.front() != s.back() || (s.front() != '\'' && s.front() != '"')) {
        return Fail("the STRING argument must be quoted");
      }
      NEMOFS_RETURN_IF_ERROR(Charge(s.size()));
      Value* v = New(Kind::kString);
      if (!EscapeDecode(s.substr(1, s.size() - 2), &v->str)) {
        return Fail("invalid escape in STRING argument");
      }
      return Push(v);
    }

    case op::kUnicode: {
      NEMOFS_ASSIGN_OR_RETURN(std::string_view s, Line());
      NEMOFS_RETURN_IF_ERROR(Charge(s.size() * 2));  // latin-1 bytes may double in UTF-8
      Value* v = New(Kind::kString);
      if (!RawUnicodeEscapeDecode(s, &v->str)) {
        return Fail("invalid \\u escape in UNICODE argument");
      }
      return Push(v);
    }

    // Length-prefixed str (BINSTRING/SHORT_BINSTRING are Python 2 str, which
    // torch.load decodes as UTF-8) and bytes.
    case op::kBinString:
    case op::kShortBinString:
    case op::kBinUnicode:
    case op::kShortBinUnicode:
    case op::kBinUnicode8:
    case op::kBinBytes:
    case op::kShortBinBytes:
    case op::kBinBytes8:
    case op::kByteArray8: {
      size_t width = 4;
      if (op_ == op::kShortBinString || op_ == op::kShortBinUnicode || op_ == op::kShortBinBytes) {
        width = 1;
      } else if (op_ == op::kBinUnicode8 || op_ == op::kBinBytes8 || op_ == op::kByteArray8) {
        width = 8;
      }
      NEMOFS_ASSIGN_OR_RETURN(uint64_t n, TakeLE(width));
      if (op_ == op::kBinString && static_cast<int32_t>(static_cast<uint32_t>(n)) < 0) {
        return Fail("negative BINSTRING length");
      }
      NEMOFS_ASSIGN_OR_RETURN(std::string_view s, Take(n));
      bool bytes = op_ == op::kBinBytes || op_ == op::kShortBinBytes || op_ == op::kBinBytes8 ||
                   op_ == op::kByteArray8;
      NEMOFS_ASSIGN_OR_RETURN(Value * v, NewText(bytes ? Kind::kBytes : Kind::kString, s));
      return Push(v);
    }

    case op::kPersId: {
      NEMOFS_ASSIGN_OR_RETURN(std::string_view s, Line());
      NEMOFS_ASSIGN_OR_RETURN(Value * id, NewText(Kind::kString, s));
      Value* v = New(Kind::kPersistentId);
      v->args = id;
      return Push(v);
    }

    case op::kBinPersId: {
      Value* id = Pop();
      if (!id) return Underflow();
      Value* v = New(Kind::kPersistentId);
      v->args = id;
      return Push(v);
    }

    case op::kReduce: {
      Value* args = Pop();
      Value* callable = Pop();
      if (!callable) return Underflow();
      NEMOFS_ASSIGN_OR_RETURN(Value * v, Reduce(callable, args));
      return Push(v);
    }

    case op::kNewObj:
    case op::kNewObjEx: {
      Value* kwargs = op_ == op::kNewObjEx ? Pop() : nullptr;
      Value* args = Pop();
      Value* cls = Pop();
      if (!cls) return Underflow();
      Value* v = New(Kind::kObject);
      v->callable = cls;
      v->args = args;
      v->kwargs = kwargs;
      return Push(v);
    }

    case op::kGlobal:
    case op::kInst: {
      NEMOFS_ASSIGN_OR_RETURN(std::string_view module, Line());
      NEMOFS_ASSIGN_OR_RETURN(std::string_view name, Line());
      NEMOFS_ASSIGN_OR_RETURN(Value * g, NewGlobal(module, name));
      if (op_ == op::kGlobal) return Push(g);
      size_t start;
      if (!PopMark(&start)) return NoMark();
      Value* args = New(Kind::kTuple);
      args->items.assign(stack_.begin() + static_cast<ptrdiff_t>(start), stack_.end());
      stack_.resize(start);
      Value* v = New(Kind::kObject);
      v->callable = g;
      v->args = args;
      return Push(v);
    }

    case op::kStackGlobal: {
      Value* name = Pop();
      Value* module = Pop();
      if (!module) return Underflow();
      if (module->kind != Kind::kString || name->kind != Kind::kString) {
        return Fail("STACK_GLOBAL needs two str, got {} and {}", KindName(module->kind),
                    KindName(name->kind));
      }
      NEMOFS_ASSIGN_OR_RETURN(Value * g, NewGlobal(module->str, name->str));
      g->items = {module, name};
      return Push(g);
    }

    case op::kObj: {
      size_t start;
      if (!PopMark(&start)) return NoMark();
      if (stack_.size() == start) return Underflow();
      Value* args = New(Kind::kTuple);
      args->items.assign(stack_.begin() + static_cast<ptrdiff_t>(start) + 1, stack_.end());
      Value* v = New(Kind::kObject);
      v->callable = stack_[start];
      v->args = args;
      stack_.resize(start);
      return Push(v);
    }

    case op::kExt1:
    case op::kExt2:
    case op::kExt4:
      return Fail("the extension registry (EXT1/EXT2/EXT4) is not supported");

    case op::kNextBuffer:
    case op::kReadOnlyBuffer:
      return Fail("out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are not supported");

    case op::kEmptyList:
      return Push(New(Kind::kList));
    case op::kEmptyTuple:
      return Push(New(Kind::kTuple));
    case op::kEmptyDict:
      return Push(New(Kind::kDict));
    case op::kEmptySet:
      return Push(New(Kind::kSet));
    case op::kList:
      return PushMarked(Kind::kList);
    case op::kTuple:
      return PushMarked(Kind::kTuple);
    case op::kFrozenSet:
      return PushMarked(Kind::kSet);
    case op::kTuple1:
      return PushTupleOf(1);
    case op::kTuple2:
      return PushTupleOf(2);
    case op::kTuple3:
      return PushTupleOf(3);

    case op::kDict: {
      size_t start;
      if (!PopMark(&start)) return NoMark();
      Value* d = New(Kind::kDict);
      NEMOFS_RETURN_IF_ERROR(SetItems(d, stack_.data() + start, stack_.data() + stack_.size()));
      stack_.resize(start);
      return Push(d);
    }

    case op::kAppend: {
      Value* item = Pop();
      Value* target = Top();
      if (!target) return Underflow();
      return Append(target, &item, &item + 1);
    }

    case op::kSetItem: {
      Value* kv[2];
      kv[1] = Pop();
      kv[0] = Pop();
      Value* target = Top();
      if (!target) return Underflow();
      return SetItems(target, kv, kv + 2);
    }

    case op::kAppends:
    case op::kSetItems:
    case op::kAddItems: {
      size_t start;
      if (!PopMark(&start)) return NoMark();
      if (start <= Base()) return Underflow();
      Value* target = stack_[start - 1];
      Value* const* begin = stack_.data() + start;
      Value* const* end = stack_.data() + stack_.size();
      Status s = Ok();
      if (op_ == op::kSetItems) {
        s = SetItems(target, begin, end);
      } else if (op_ == op::kAppends) {
        s = Append(target, begin, end);
      } else if (target->kind == Kind::kSet || target->kind == Kind::kCall ||
                 target->kind == Kind::kObject) {
        target->items.insert(target->items.end(), begin, end);
      } else {
        s = Fail("cannot add items to {} (not a set)", KindName(target->kind));
      }
      stack_.resize(start);
      return s;
    }

    case op::kBuild: {
      Value* state = Pop();
      Value* target = Top();
      if (!target) return Underflow();
      target->state = state;
      return Ok();
    }

    case op::kGet:
    case op::kBinGet:
    case op::kLongBinGet: {
      uint64_t index;
      if (op_ == op::kGet) {
        NEMOFS_ASSIGN_OR_RETURN(index, LineIndex());
      } else {
        NEMOFS_ASSIGN_OR_RETURN(index, TakeLE(op_ == op::kBinGet ? 1 : 4));
      }
      NEMOFS_ASSIGN_OR_RETURN(Value * v, MemoGet(index));
      return Push(v);
    }

    case op::kPut:
    case op::kBinPut:
    case op::kLongBinPut:
    case op::kMemoize: {
      uint64_t index = memo_count_;
      if (op_ == op::kPut) {
        NEMOFS_ASSIGN_OR_RETURN(index, LineIndex());
      } else if (op_ != op::kMemoize) {
        NEMOFS_ASSIGN_OR_RETURN(index, TakeLE(op_ == op::kBinPut ? 1 : 4));
      }
      Value* v = Top();
      if (!v) return Underflow();
      return MemoPut(index, v);
    }

    case op::kProto: {
      NEMOFS_ASSIGN_OR_RETURN(uint64_t p, TakeLE(1));
      if (p > kHighestProtocol) return Fail("unsupported pickle protocol {}", p);
      proto_ = static_cast<int>(p);
      return Ok();
    }

    case op::kFrame: {
      // Frames only batch reads for file objects; the data is all here. As in
      // _pickle.c, the frame must fit in what is left.
      NEMOFS_ASSIGN_OR_RETURN(uint64_t n, TakeLE(8));
      if (n > data_.size() - pos_) {
        return Fail("unexpected end of data: FRAME of {} bytes at offset {}, {} left", n, pos_,
                    data_.size() - pos_);
      }
      return Ok();
    }

    default:
      return Fail("unknown opcode");
  }
}

// ---- ToDebugString ----------------------------------------------------------

// Python's float repr: shortest round-trip digits, fixed notation when the
// decimal exponent is in [-4, 16), else d.ddde+XX.
void AppendFloat(std::string* out, double d) {
  if (std::isnan(d)) {
    *out += "nan";
    return;
  }
  if (std::isinf(d)) {
    *out += d > 0 ? "inf" : "-inf";
    return;
  }
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(r.ptr - buf));
  if (!sci.empty() && sci[0] == '-') {
    out->push_back('-');
    sci.remove_prefix(1);
  }
  size_t e = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e)) {
    if (c != '.') digits.push_back(c);
  }
  int exp = 0;
  std::string_view es = sci.substr(e + 1);
  if (!es.empty() && es[0] == '+') es.remove_prefix(1);
  std::from_chars(es.data(), es.data() + es.size(), exp);
  int decpt = exp + 1;
  int n = static_cast<int>(digits.size());
  if (decpt <= -4 || decpt > 16) {
    out->push_back(digits[0]);
    if (n > 1) {
      out->push_back('.');
      out->append(digits, 1);
    }
    fmt::format_to(std::back_inserter(*out), "e{}{:02}", exp < 0 ? '-' : '+', std::abs(exp));
  } else if (decpt <= 0) {
    *out += "0.";
    out->append(static_cast<size_t>(-decpt), '0');
    *out += digits;
  } else if (decpt >= n) {
    *out += digits;
    out->append(static_cast<size_t>(decpt - n), '0');
    *out += ".0";
  } else {
    out->append(digits, 0, static_cast<size_t>(decpt));
    out->push_back('.');
    out->append(digits, static_cast<size_t>(decpt));
  }
}

// Python's repr of str (text=true) or bytes: single quotes unless the value
// holds ' and no ", backslash escapes for controls. Non-ASCII text is kept
// (except C1 controls); broken UTF-8 shows as \x escapes.
void AppendQuoted(std::string* out, std::string_view s, bool text) {
  char quote = '\'';
  if (s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos) {
    quote = '"';
  }
  if (!text) out->push_back('b');
  out->push_back(quote);
  for (size_t i = 0; i < s.size();) {
    uint8_t c = static_cast<uint8_t>(s[i]);
    if (c == static_cast<uint8_t>(quote) || c == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(c));
    } else if (c == '\t') {
      *out += "\\t";
    } else if (c == '\n') {
      *out += "\\n";
    } else if (c == '\r') {
      *out += "\\r";
    } else if (c < 0x20 || c == 0x7f) {
      fmt::format_to(std::back_inserter(*out), "\\x{:02x}", c);
    } else if (c < 0x80) {
      out->push_back(static_cast<char>(c));
    } else if (!text) {
      fmt::format_to(std::back_inserter(*out), "\\x{:02x}", c);
    } else {
      size_t j = i;
      uint32_t cp;
      if (!NextCodePoint(s, &j, &cp)) {
        fmt::format_to(std::back_inserter(*out), "\\x{:02x}", c);
        j = i + 1;
      } else if (cp <= 0xa0 || cp == 0xad) {  // C1 controls, NBSP, soft hyphen
        fmt::format_to(std::back_inserter(*out), "\\x{:02x}", cp);
      } else if ((cp >= 0xd800 && cp < 0xe000) || cp == 0x2028 || cp == 0x2029) {
        fmt::format_to(std::back_inserter(*out), "\\u{:04x}", cp);
      } else {
        out->append(s.substr(i, j - i));
      }
      i = j;
      continue;
    }
    ++i;
  }
  out->push_back(quote);
}

class Printer {
 public:
  explicit Printer(size_t max_depth) : max_depth_(std::min(max_depth, kMaxDebugDepth)) {}

  std::string Take() {
    if (truncated_) out_ += "...";
    return std::move(out_);
  }

  void Print(const Value* v, size_t depth) {
    if (out_.size() >= kMaxDebugChars) {
      truncated_ = true;
      return;
    }
    if (!v) {
      out_ += "<null>";
      return;
    }
    if (depth > max_depth_ || std::find(path_.begin(), path_.end(), v) != path_.end()) {
      out_ += "...";
      return;
    }
    path_.push_back(v);
    PrintBody(v, depth);
    if (v->state) {
      out_ += " state=";
      Print(v->state, depth + 1);
    }
    path_.pop_back();
  }

 private:
  void PrintItems(const std::vector<const Value*>& items, size_t depth) {
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out_ += ", ";
      Print(items[i], depth);
    }
  }
  void PrintEntries(const Value* v, size_t depth) {
    out_ += '{';
    for (size_t i = 0; i < v->entries.size(); ++i) {
      if (i) out_ += ", ";
      Print(v->entries[i].first, depth);
      out_ += ": ";
      Print(v->entries[i].second, depth);
    }
    out_ += '}';
  }
  void PrintArgs(const Value* args, size_t depth) {
    if (!args) return;
    if (args->kind == Kind::kTuple && !args->state) {
      PrintItems(args->items, depth);
    } else {
      out_ += '*';
      Print(args, depth);
    }
  }

  void PrintBody(const Value* v, size_t depth) {
    switch (v->kind) {
      case Kind::kNone:
        out_ += "None";
        return;
      case Kind::kBool:
        out_ += v->boolean ? "True" : "False";
        return;
      case Kind::kInt:
        fmt::format_to(std::back_inserter(out_), "{}", v->integer);
        return;
      case Kind::kBigInt:
        out_ += v->str;
        return;
      case Kind::kFloat:
        AppendFloat(&out_, v->real);
        return;
      case Kind::kString:
        AppendQuoted(&out_, v->str, true);
        return;
      case Kind::kBytes:
        AppendQuoted(&out_, v->str, false);
        return;
      case Kind::kList:
        out_ += '[';
        PrintItems(v->items, depth + 1);
        out_ += ']';
        return;
      case Kind::kTuple:
        out_ += '(';
        PrintItems(v->items, depth + 1);
        if (v->items.size() == 1) out_ += ',';
        out_ += ')';
        return;
      case Kind::kSet:
        if (v->items.empty()) {
          out_ += "set()";
          return;
        }
        out_ += '{';
        PrintItems(v->items, depth + 1);
        out_ += '}';
        return;
      case Kind::kDict:
        PrintEntries(v, depth + 1);
        return;
      case Kind::kGlobal:
        out_ += v->str;
        out_ += '.';
        out_ += v->name;
        return;
      case Kind::kPersistentId:
        out_ += "pid(";
        Print(v->args, depth + 1);
        out_ += ')';
        return;
      case Kind::kCall:
      case Kind::kObject:
        Print(v->callable, depth + 1);
        out_ += v->kind == Kind::kObject ? ".__new__(" : "(";
        PrintArgs(v->args, depth + 1);
        if (v->kwargs && !(v->kwargs->kind == Kind::kDict && v->kwargs->entries.empty())) {
          if (v->args && !(v->args->kind == Kind::kTuple && v->args->items.empty())) out_ += ", ";
          out_ += "**";
          Print(v->kwargs, depth + 1);
        }
        out_ += ')';
        if (!v->items.empty()) {
          out_ += " items=[";
          PrintItems(v->items, depth + 1);
          out_ += ']';
        }
        if (!v->entries.empty()) {
          out_ += " entries=";
          PrintEntries(v, depth + 1);
        }
        return;
    }
  }

  size_t max_depth_;
  bool truncated_ = false;
  std::string out_;
  std::vector<const Value*> path_;
};

}  // namespace

bool Value::IsGlobal(std::string_view module, std::string_view name) const {
  return kind == Kind::kGlobal && str == module && this->name == name;
}

bool Value::IsCallOf(std::string_view module, std::string_view name) const {
  return (kind == Kind::kCall || kind == Kind::kObject) && callable &&
         callable->IsGlobal(module, name);
}

const Value* Value::Get(std::string_view key) const {
  if (kind != Kind::kDict) return nullptr;
  // Python dicts keep the last value stored under a key; pickles written by
  // Python never repeat one, hand-made ones may.
  for (auto it = entries.rbegin(); it != entries.rend(); ++it) {
    if (it->first->kind == Kind::kString && it->first->str == key) return it->second;
  }
  return nullptr;
}

Result<Unpickled> Unpickle(std::string_view data, const std::string& what, const Limits& limits) {
  Unpickled out;
  Machine machine(data, what, limits, &out);
  NEMOFS_RETURN_IF_ERROR(machine.Run());
  return out;
}

std::string ToDebugString(const Value* v, size_t max_depth) {
  Printer printer(max_depth);
  printer.Print(v, 0);
  return printer.Take();
}

}  // namespace nemofs::torch
