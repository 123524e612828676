// Follows Modules/_pickle.c's Pickler function by function (save, save_long,
// save_tuple, batch_list(_exact), batch_dict(_exact), save_set, save_global,
// save_reduce, _Pickler_Write / _Pickler_OpcodeBoundary / _Pickler_CommitFrame
// / _Pickler_write_bytes); the comments name the CPython function each part
// mirrors where the byte layout depends on a detail of it.
#include "torch/pickle_writer.h"

#include <fmt/format.h>

#include <cstring>
#include <deque>

#include "util/utf8.h"

namespace nemofs::torch {
namespace {

namespace op {
constexpr char kMark = '(';
constexpr char kStop = '.';
constexpr char kPop = '0';
constexpr char kPopMark = '1';
constexpr char kBinInt = 'J';
constexpr char kBinInt1 = 'K';
constexpr char kBinInt2 = 'M';
constexpr char kNone = 'N';
constexpr char kPersId = 'P';
constexpr char kBinPersId = 'Q';
constexpr char kReduce = 'R';
constexpr char kBinUnicode = 'X';
constexpr char kAppend = 'a';
constexpr char kBuild = 'b';
constexpr char kGlobal = 'c';
constexpr char kEmptyDict = '}';
constexpr char kAppends = 'e';
constexpr char kBinGet = 'h';
constexpr char kInst = 'i';
constexpr char kLongBinGet = 'j';
constexpr char kEmptyList = ']';
constexpr char kObj = 'o';
constexpr char kBinPut = 'q';
constexpr char kLongBinPut = 'r';
constexpr char kSetItem = 's';
constexpr char kTuple = 't';
constexpr char kEmptyTuple = ')';
constexpr char kSetItems = 'u';
constexpr char kBinFloat = 'G';
constexpr char kProto = '\x80';
constexpr char kNewObj = '\x81';
constexpr char kTuple1 = '\x85';
constexpr char kNewTrue = '\x88';
constexpr char kNewFalse = '\x89';
constexpr char kLong1 = '\x8a';
constexpr char kLong4 = '\x8b';
constexpr char kBinBytes = 'B';
constexpr char kShortBinBytes = 'C';
constexpr char kShortBinUnicode = '\x8c';
constexpr char kBinUnicode8 = '\x8d';
constexpr char kBinBytes8 = '\x8e';
constexpr char kEmptySet = '\x8f';
constexpr char kAddItems = '\x90';
constexpr char kFrozenSet = '\x91';
constexpr char kNewObjEx = '\x92';
constexpr char kStackGlobal = '\x93';
constexpr char kMemoize = '\x94';
constexpr char kFrame = '\x95';
constexpr char kByteArray8 = '\x96';
}  // namespace op

constexpr uint8_t U(char c) { return static_cast<uint8_t>(c); }

constexpr size_t kBatchSize = 1000;            // _pickle.c BATCHSIZE
constexpr size_t kFrameSizeTarget = 64 << 10;  // FRAME_SIZE_TARGET
constexpr size_t kFrameSizeMin = 4;            // FRAME_SIZE_MIN
constexpr size_t kFrameHeaderSize = 9;

void PutLE(std::string* out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// The Python 2 module names protocol < 3 writes (pickle's fix_imports):
// only the two that pickle.h's VM maps back (__builtin__, copy_reg), so a
// written pickle always re-reads as the same graph; these are also the only
// renamed modules a checkpoint's globals come from.
std::string_view Python2Module(std::string_view module) {
  if (module == "builtins") return "__builtin__";
  if (module == "copyreg") return "copy_reg";
  return module;
}

// Two's complement little-endian bytes of an int, as save_long sizes them
// for LONG1/LONG4: (bit length of |x|) / 8 + 1 bytes, one fewer for a
// negative number whose top byte is only sign bits.
std::string LongBytes(bool negative, std::vector<uint32_t> mag) {
  while (!mag.empty() && mag.back() == 0) mag.pop_back();
  uint64_t nbits = 0;
  if (!mag.empty()) {
    nbits = 32 * (mag.size() - 1) + (32 - static_cast<uint64_t>(__builtin_clz(mag.back())));
  }
  uint64_t nbytes = (nbits >> 3) + 1;
  mag.resize((nbytes + 3) / 4 + 1, 0);
  if (negative) {  // ~mag + 1
    for (auto& limb : mag) limb = ~limb;
    for (auto& limb : mag) {
      if (++limb != 0) break;
    }
  }
  std::string out(nbytes, '\0');
  for (uint64_t i = 0; i < nbytes; ++i) {
    out[i] = static_cast<char>((mag[i / 4] >> (8 * (i % 4))) & 0xff);
  }
  if (negative && nbytes > 1 && static_cast<uint8_t>(out[nbytes - 1]) == 0xff &&
      (static_cast<uint8_t>(out[nbytes - 2]) & 0x80) != 0) {
    out.pop_back();
  }
  return out;
}

// Decimal text (kBigInt) -> sign and 32-bit limbs of the magnitude.
bool DecimalToLimbs(std::string_view s, bool* negative, std::vector<uint32_t>* mag) {
  *negative = !s.empty() && s[0] == '-';
  if (*negative || (!s.empty() && s[0] == '+')) s.remove_prefix(1);
  if (s.empty()) return false;
  mag->clear();
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    uint64_t carry = static_cast<uint64_t>(c - '0');
    for (auto& limb : *mag) {
      uint64_t cur = static_cast<uint64_t>(limb) * 10 + carry;
      limb = static_cast<uint32_t>(cur);
      carry = cur >> 32;
    }
    if (carry) mag->push_back(static_cast<uint32_t>(carry));
  }
  return true;
}

// The output buffer with _pickle.c's framing.
class Output {
 public:
  std::string& bytes() { return out_; }
  void EnableFraming() { framing_ = true; }

  // _Pickler_Write.
  void Write(std::string_view s) {
    if (framing_ && frame_start_ < 0) {
      frame_start_ = static_cast<int64_t>(out_.size());
      out_.append(kFrameHeaderSize, '\xfe');
    }
    out_.append(s);
  }
  void Write(char c) { Write(std::string_view(&c, 1)); }

  // _Pickler_OpcodeBoundary: called at the start of every save().
  void OpcodeBoundary() {
    if (!framing_ || frame_start_ < 0) return;
    if (out_.size() - static_cast<size_t>(frame_start_) - kFrameHeaderSize >= kFrameSizeTarget) {
      CommitFrame();
    }
  }

  // _Pickler_CommitFrame.
  void CommitFrame() {
    if (!framing_ || frame_start_ < 0) return;
    auto start = static_cast<size_t>(frame_start_);
    size_t len = out_.size() - start - kFrameHeaderSize;
    if (len >= kFrameSizeMin) {
      std::string header(1, op::kFrame);
      PutLE(&header, len, 8);
      out_.replace(start, kFrameHeaderSize, header);
    } else {
      out_.erase(start, kFrameHeaderSize);
    }
    frame_start_ = -1;
  }

  // _Pickler_write_bytes: large payloads go outside any frame.
  void WriteBytes(std::string_view header, std::string_view data) {
    bool bypass = data.size() >= kFrameSizeTarget;
    bool framing = framing_;
    if (bypass) {
      CommitFrame();
      framing_ = false;
    }
    Write(header);
    Write(data);
    framing_ = framing;
  }

 private:
  std::string out_;
  bool framing_ = false;
  int64_t frame_start_ = -1;
};

class Pickler {
 public:
  Pickler(int protocol, const PickleWriteOptions& options) : proto_(protocol), options_(options) {}

  Result<std::string> Dump(const Value* root) {
    std::string head{op::kProto, static_cast<char>(proto_)};
    out_.Write(head);
    if (proto_ >= 4) out_.EnableFraming();
    NEMOFS_RETURN_IF_ERROR(Save(root));
    out_.Write(op::kStop);
    out_.CommitFrame();
    return std::move(out_.bytes());
  }

 private:
  template <typename... Args>
  Error Fail(fmt::format_string<Args...> format, Args&&... args) const {
    return Err(EINVAL, "pickle writer: {}", fmt::format(format, std::forward<Args>(args)...));
  }

  const Value* Resolve(const Value* v) const {
    if (options_.replace && v) {
      // A replacement may itself be replaced (bounded: a map cannot chain forever
      // without a cycle, which is refused).
      for (size_t hops = 0; hops <= options_.replace->size(); ++hops) {
        auto it = options_.replace->find(v);
        if (it == options_.replace->end() || it->second == v) return v;
        v = it->second;
      }
      return nullptr;
    }
    return v;
  }

  Value* Synth(Kind k) {
    synth_.emplace_back();
    synth_.back().kind = k;
    return &synth_.back();
  }
  const Value* SynthGlobal(std::string_view module, std::string_view name) {
    std::string key = fmt::format("{}\n{}", module, name);
    auto it = synth_globals_.find(key);
    if (it != synth_globals_.end()) return it->second;
    Value* g = Synth(Kind::kGlobal);
    g->str = module;
    g->name = name;
    synth_globals_.emplace(std::move(key), g);
    return g;
  }
  const Value* SynthString(std::string_view s) {
    Value* v = Synth(Kind::kString);
    v->str = s;
    return v;
  }
  const Value* SynthTuple(std::vector<const Value*> items) {
    Value* v = Synth(Kind::kTuple);
    v->items = std::move(items);
    return v;
  }

  // ---- memo (memoize / memo_get) ----
  void Memoize(const Value* v) {
    auto index = static_cast<uint32_t>(memo_.size());
    memo_.emplace(v, index);
    if (proto_ >= 4) {
      out_.Write(op::kMemoize);
    } else if (index < 256) {
      out_.Write(std::string{op::kBinPut, static_cast<char>(index)});
    } else {
      std::string s(1, op::kLongBinPut);
      PutLE(&s, index, 4);
      out_.Write(s);
    }
  }
  bool InMemo(const Value* v) const { return memo_.count(v) != 0; }
  void MemoGet(const Value* v) {
    uint32_t index = memo_.at(v);
    if (index < 256) {
      out_.Write(std::string{op::kBinGet, static_cast<char>(index)});
    } else {
      std::string s(1, op::kLongBinGet);
      PutLE(&s, index, 4);
      out_.Write(s);
    }
  }

  Status Save(const Value* v);
  Status SaveBody(const Value* v);

  void SaveLong(int64_t x) {
    if (x >= 0 && x <= 0xff) {
      out_.Write(std::string{op::kBinInt1, static_cast<char>(x)});
    } else if (x >= 0 && x <= 0xffff) {
      std::string s(1, op::kBinInt2);
      PutLE(&s, static_cast<uint64_t>(x), 2);
      out_.Write(s);
    } else if (x >= INT32_MIN && x <= INT32_MAX) {
      std::string s(1, op::kBinInt);
      PutLE(&s, static_cast<uint64_t>(x), 4);
      out_.Write(s);
    } else {
      uint64_t mag = x < 0 ? 0 - static_cast<uint64_t>(x) : static_cast<uint64_t>(x);
      WriteLongBytes(
          LongBytes(x < 0, {static_cast<uint32_t>(mag), static_cast<uint32_t>(mag >> 32)}));
    }
  }
  void WriteLongBytes(const std::string& b) {
    std::string s;
    if (b.size() < 256) {
      s = {op::kLong1, static_cast<char>(b.size())};
    } else {
      s = std::string(1, op::kLong4);
      PutLE(&s, b.size(), 4);
    }
    s += b;
    out_.Write(s);
  }

  void SaveFloat(double d) {
    uint64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    std::string s(1, op::kBinFloat);
    for (int i = 7; i >= 0; --i) s.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
    out_.Write(s);
  }

  // write_unicode_binary + memoize.
  Status SaveUnicode(const Value* v) {
    const std::string& s = v->str;
    return SaveSized(v, s.size() <= 0xff && proto_ >= 4, op::kShortBinUnicode, op::kBinUnicode,
                     op::kBinUnicode8, "a str");
  }

  // The opcode + length + payload of a str or bytes (the 1-, 4- or 8-byte
  // length form, as CPython picks it), then its memo entry.
  Status SaveSized(const Value* v, bool short_form, char op1, char op4, char op8,
                   const char* what) {
    const std::string& s = v->str;
    std::string header;
    if (short_form) {
      header = {op1, static_cast<char>(s.size())};
    } else if (s.size() <= 0xffffffffull) {
      header = std::string(1, op4);
      PutLE(&header, s.size(), 4);
    } else if (proto_ >= 4) {
      header = std::string(1, op8);
      PutLE(&header, s.size(), 8);
    } else {
      return Fail("{} of {} bytes needs protocol 4", what, s.size());
    }
    out_.WriteBytes(header, s);
    Memoize(v);
    return Ok();
  }

  // save_bytes (and save_bytearray for a BYTEARRAY8 value).
  Status SaveBytes(const Value* v) {
    if (v->opcode == U(op::kReduce) && v->callable && v->args) return SaveReduce(v);
    const std::string& s = v->str;
    if (v->opcode == 0x96 && proto_ >= 5) {
      std::string header(1, op::kByteArray8);
      PutLE(&header, s.size(), 8);
      out_.WriteBytes(header, s);
      Memoize(v);
      return Ok();
    }
    if (proto_ < 3) {
      // Protocol 2 has no bytes opcode: CPython writes the copy protocol's
      // _codecs.encode(latin-1 text, 'latin1'), or bytes() when empty.
      Value* call = Synth(Kind::kCall);
      call->opcode = U(op::kReduce);
      if (s.empty()) {
        call->callable = SynthGlobal("builtins", "bytes");
        call->args = Synth(Kind::kTuple);
      } else {
        std::string text;
        text.reserve(s.size() * 2);
        for (char c : s) {
          auto b = static_cast<uint8_t>(c);
          if (b < 0x80) {
            text.push_back(c);
          } else {
            text.push_back(static_cast<char>(0xc0 | (b >> 6)));
            text.push_back(static_cast<char>(0x80 | (b & 0x3f)));
          }
        }
        if (!latin1_) latin1_ = SynthString("latin1");
        call->callable = SynthGlobal("_codecs", "encode");
        call->args = SynthTuple({SynthString(text), latin1_});
      }
      NEMOFS_RETURN_IF_ERROR(Save(call->callable));
      NEMOFS_RETURN_IF_ERROR(Save(call->args));
      out_.Write(op::kReduce);
      Memoize(v);
      return Ok();
    }
    return SaveSized(v, s.size() <= 0xff, op::kShortBinBytes, op::kBinBytes, op::kBinBytes8,
                     "bytes");
  }

  // save_tuple.
  Status SaveTuple(const Value* v) {
    const auto& items = v->items;
    if (items.empty()) {
      out_.Write(op::kEmptyTuple);
      return Ok();
    }
    if (items.size() <= 3) {
      for (const Value* x : items) NEMOFS_RETURN_IF_ERROR(Save(x));
      if (InMemo(v)) {  // recursive: made while saving its items
        out_.Write(std::string(items.size(), op::kPop));
        MemoGet(v);
        return Ok();
      }
      out_.Write(static_cast<char>(U(op::kTuple1) + items.size() - 1));
      Memoize(v);
      return Ok();
    }
    out_.Write(op::kMark);
    for (const Value* x : items) NEMOFS_RETURN_IF_ERROR(Save(x));
    if (InMemo(v)) {
      out_.Write(op::kPopMark);
      MemoGet(v);
      return Ok();
    }
    out_.Write(op::kTuple);
    Memoize(v);
    return Ok();
  }

  // batch_list_exact (a list) / batch_list (listitems of a __reduce__).
  Status BatchList(const std::vector<const Value*>& items, bool exact) {
    size_t n = items.size();
    if (n == 0) return Ok();
    if (exact && n == 1) {
      NEMOFS_RETURN_IF_ERROR(Save(items[0]));
      out_.Write(op::kAppend);
      return Ok();
    }
    for (size_t i = 0; i < n;) {
      if (!exact && n - i == 1) {
        NEMOFS_RETURN_IF_ERROR(Save(items[i]));
        out_.Write(op::kAppend);
        break;
      }
      out_.Write(op::kMark);
      size_t end = std::min(n, i + kBatchSize);
      for (; i < end; ++i) NEMOFS_RETURN_IF_ERROR(Save(items[i]));
      out_.Write(op::kAppends);
    }
    return Ok();
  }

  using Entries = std::vector<std::pair<const Value*, const Value*>>;
  // batch_dict_exact (a dict: its loop runs again after a full batch, so a
  // multiple of 1000 entries ends with an empty MARK SETITEMS) / batch_dict
  // (dictitems of a __reduce__: a last lone entry is a SETITEM).
  Status BatchDict(const Entries& entries, size_t from, bool exact) {
    size_t n = entries.size();
    if (from >= n) return Ok();
    if (exact) {
      if (n == 1) {
        NEMOFS_RETURN_IF_ERROR(Save(entries[0].first));
        NEMOFS_RETURN_IF_ERROR(Save(entries[0].second));
        out_.Write(op::kSetItem);
        return Ok();
      }
      size_t i = from, batch;
      do {
        out_.Write(op::kMark);
        batch = 0;
        for (; i < n && batch < kBatchSize; ++i, ++batch) {
          NEMOFS_RETURN_IF_ERROR(Save(entries[i].first));
          NEMOFS_RETURN_IF_ERROR(Save(entries[i].second));
        }
        out_.Write(op::kSetItems);
      } while (batch == kBatchSize);
      return Ok();
    }
    for (size_t i = from; i < n;) {
      if (n - i == 1) {
        NEMOFS_RETURN_IF_ERROR(Save(entries[i].first));
        NEMOFS_RETURN_IF_ERROR(Save(entries[i].second));
        out_.Write(op::kSetItem);
        break;
      }
      out_.Write(op::kMark);
      size_t end = std::min(n, i + kBatchSize);
      for (; i < end; ++i) {
        NEMOFS_RETURN_IF_ERROR(Save(entries[i].first));
        NEMOFS_RETURN_IF_ERROR(Save(entries[i].second));
      }
      out_.Write(op::kSetItems);
    }
    return Ok();
  }

  // save_set / save_frozenset at protocol >= 4.
  Status SaveSetNative(const Value* v, bool frozen) {
    const auto& items = v->items;
    if (frozen) {
      out_.Write(op::kMark);
      for (const Value* x : items) NEMOFS_RETURN_IF_ERROR(Save(x));
      if (InMemo(v)) {
        out_.Write(op::kPopMark);
        MemoGet(v);
        return Ok();
      }
      out_.Write(op::kFrozenSet);
      Memoize(v);
      return Ok();
    }
    out_.Write(op::kEmptySet);
    Memoize(v);
    if (items.empty()) return Ok();
    size_t i = 0, batch;
    do {  // like batch_dict_exact: a full batch is followed by another MARK ... ADDITEMS
      out_.Write(op::kMark);
      batch = 0;
      for (; i < items.size() && batch < kBatchSize; ++i, ++batch) {
        NEMOFS_RETURN_IF_ERROR(Save(items[i]));
      }
      out_.Write(op::kAddItems);
    } while (batch == kBatchSize);
    return Ok();
  }

  // The pairs / items a REDUCE-made dict or set got from its arguments, or
  // false when the value no longer matches them (then it is written anew).
  static bool ReducedPrefix(const Value* v, size_t* from) {
    const Value* args = v->args;
    if (!args || !args->Is(Kind::kTuple) || !v->callable) return false;
    bool dd = v->callable->IsGlobal("collections", "defaultdict");
    size_t first = dd ? 1 : 0;
    *from = 0;
    if (args->items.size() <= first) return true;
    const Value* src = args->items[first];
    if (v->Is(Kind::kDict)) {
      if (src->Is(Kind::kDict)) {
        if (src->entries.size() > v->entries.size()) return false;
        for (size_t i = 0; i < src->entries.size(); ++i) {
          if (src->entries[i] != v->entries[i]) return false;
        }
        *from = src->entries.size();
        return true;
      }
      if (src->items.size() > v->entries.size()) return false;
      for (size_t i = 0; i < src->items.size(); ++i) {
        const Value* pair = src->items[i];
        if (pair->items.size() != 2 || pair->items[0] != v->entries[i].first ||
            pair->items[1] != v->entries[i].second) {
          return false;
        }
      }
      *from = src->items.size();
      return true;
    }
    // A set: all of its items came from the argument.
    std::vector<const Value*> made;
    if (src->Is(Kind::kDict)) {
      for (const auto& kv : src->entries) made.push_back(kv.first);
    } else {
      made = src->items;
    }
    return made == v->items;
  }

  // save_reduce for kCall / kObject and REDUCE-made dicts, sets, bytes.
  Status SaveReduce(const Value* v) {
    if (!v->callable || !v->args) return Fail("a call without callable or arguments");
    bool object = v->Is(Kind::kObject);
    if (object && (v->opcode == U(op::kInst) || v->opcode == U(op::kObj))) {
      // Protocol 0/1 instances (CPython never writes these from 2 on): OBJ
      // calls the class like INST did.
      out_.Write(op::kMark);
      NEMOFS_RETURN_IF_ERROR(Save(v->callable));
      if (v->args->Is(Kind::kTuple)) {
        for (const Value* x : v->args->items) NEMOFS_RETURN_IF_ERROR(Save(x));
      }
      out_.Write(op::kObj);
    } else {
      NEMOFS_RETURN_IF_ERROR(Save(v->callable));
      NEMOFS_RETURN_IF_ERROR(Save(v->args));
      if (object && v->kwargs) {
        NEMOFS_RETURN_IF_ERROR(Save(v->kwargs));
        out_.Write(op::kNewObjEx);
      } else {
        out_.Write(object ? op::kNewObj : op::kReduce);
      }
    }
    if (InMemo(v)) {  // recursive
      out_.Write(op::kPop);
      MemoGet(v);
      return Ok();
    }
    Memoize(v);
    if (v->Is(Kind::kDict)) {
      size_t from = 0;
      ReducedPrefix(v, &from);
      NEMOFS_RETURN_IF_ERROR(BatchDict(v->entries, from, false));
    } else if (v->Is(Kind::kCall) || v->Is(Kind::kObject)) {
      NEMOFS_RETURN_IF_ERROR(BatchList(v->items, false));
      NEMOFS_RETURN_IF_ERROR(BatchDict(v->entries, 0, false));
    }
    return Ok();
  }

  Status SaveDict(const Value* v) {
    size_t from = 0;
    if (v->opcode == U(op::kReduce) && v->callable && ReducedPrefix(v, &from)) return SaveReduce(v);
    if (v->opcode == U(op::kReduce) && v->callable && v->callable->Is(Kind::kGlobal)) {
      // Entries changed since the REDUCE: the same class, built empty, then filled.
      bool dd = v->callable->IsGlobal("collections", "defaultdict");
      Value* copy = Synth(Kind::kDict);
      *copy = *v;
      std::vector<const Value*> args;
      if (dd && v->args && !v->args->items.empty()) args.push_back(v->args->items[0]);
      copy->args = SynthTuple(std::move(args));
      return SaveReduceAs(v, copy);
    }
    out_.Write(op::kEmptyDict);
    Memoize(v);
    return BatchDict(v->entries, 0, true);
  }

  // Writes `as` (a rebuilt equivalent of `v`), memoised under `v`.
  Status SaveReduceAs(const Value* v, const Value* as) {
    NEMOFS_RETURN_IF_ERROR(Save(as->callable));
    NEMOFS_RETURN_IF_ERROR(Save(as->args));
    out_.Write(op::kReduce);
    if (InMemo(v)) {
      out_.Write(op::kPop);
      MemoGet(v);
      return Ok();
    }
    Memoize(v);
    return BatchDict(as->entries, 0, false);
  }

  Status SaveSet(const Value* v) {
    size_t from = 0;
    if (v->opcode == U(op::kReduce) && v->callable && ReducedPrefix(v, &from)) return SaveReduce(v);
    bool frozen = v->opcode == U(op::kFrozenSet) ||
                  (v->callable && v->callable->IsGlobal("builtins", "frozenset"));
    if (proto_ >= 4) return SaveSetNative(v, frozen);
    // save_set / frozenset's __reduce__ below protocol 4: cls([items]).
    Value* list = Synth(Kind::kList);
    list->items = v->items;
    NEMOFS_RETURN_IF_ERROR(Save(SynthGlobal("builtins", frozen ? "frozenset" : "set")));
    NEMOFS_RETURN_IF_ERROR(Save(SynthTuple({list})));
    out_.Write(op::kReduce);
    if (InMemo(v)) {
      out_.Write(op::kPop);
      MemoGet(v);
      return Ok();
    }
    Memoize(v);
    return Ok();
  }

  // save_global.
  Status SaveGlobal(const Value* v) {
    if (proto_ >= 4) {
      if (v->opcode == U(op::kStackGlobal) && v->items.size() == 2) {
        NEMOFS_RETURN_IF_ERROR(Save(v->items[0]));
        NEMOFS_RETURN_IF_ERROR(Save(v->items[1]));
      } else {
        NEMOFS_RETURN_IF_ERROR(Save(SynthString(v->str)));
        NEMOFS_RETURN_IF_ERROR(Save(SynthString(v->name)));
      }
      out_.Write(op::kStackGlobal);
    } else {
      std::string_view module = v->str, name = v->name;
      bool from_text = v->opcode == U(op::kGlobal) || v->opcode == U(op::kInst);
      if ((from_text && v->boolean) || (!from_text && proto_ < 3)) {
        module = Python2Module(module);  // as read / as fix_imports writes it
      }
      if (module.find('\n') != std::string_view::npos ||
          name.find('\n') != std::string_view::npos) {
        return Fail("global {}.{} has a newline in its name, which GLOBAL cannot hold",
                    module.substr(0, 60), name.substr(0, 60));
      }
      std::string s(1, op::kGlobal);
      s += module;
      s += '\n';
      s += name;
      s += '\n';
      out_.Write(s);
    }
    Memoize(v);
    return Ok();
  }

  Status SavePersistentId(const Value* v) {
    if (!v->args) return Fail("a persistent id without its value");
    if (v->opcode == U(op::kPersId) && v->args->Is(Kind::kString) &&
        v->args->str.find('\n') == std::string::npos) {
      out_.Write(std::string(1, op::kPersId) + v->args->str + "\n");
      return Ok();
    }
    NEMOFS_RETURN_IF_ERROR(Save(v->args));
    out_.Write(op::kBinPersId);
    return Ok();
  }

  int proto_;
  const PickleWriteOptions& options_;
  Output out_;
  std::unordered_map<const Value*, uint32_t> memo_;
  std::deque<Value> synth_;
  std::unordered_map<std::string, const Value*> synth_globals_;
  const Value* latin1_ = nullptr;
  size_t depth_ = 0;
};

Status Pickler::Save(const Value* v) {
  v = Resolve(v);
  if (!v) return Fail("a null value (or a cycle of replacements)");
  out_.OpcodeBoundary();
  if (depth_ >= options_.max_depth) {
    return Fail("values nested deeper than {} (or a cycle through a call's arguments)",
                options_.max_depth);
  }
  ++depth_;
  Status s = SaveBody(v);
  --depth_;
  return s;
}

Status Pickler::SaveBody(const Value* v) {
  // Atoms are never memoised (save: "these aren't memoized, so don't check the memo").
  switch (v->kind) {
    case Kind::kNone:
      out_.Write(op::kNone);
      break;
    case Kind::kBool:
      out_.Write(v->boolean ? op::kNewTrue : op::kNewFalse);
      break;
    case Kind::kInt:
      SaveLong(v->integer);
      break;
    case Kind::kBigInt: {
      bool negative;
      std::vector<uint32_t> mag;
      if (!DecimalToLimbs(v->str, &negative, &mag)) {
        return Fail("int '{}' is not decimal", v->str.substr(0, 40));
      }
      WriteLongBytes(LongBytes(negative, std::move(mag)));
      break;
    }
    case Kind::kFloat:
      SaveFloat(v->real);
      break;
    case Kind::kPersistentId:
      // save_pers comes before the memo in save(); persistent ids are not memoised.
      NEMOFS_RETURN_IF_ERROR(SavePersistentId(v));
      break;
    default:
      if (InMemo(v)) {
        MemoGet(v);
        return Ok();
      }
      switch (v->kind) {
        case Kind::kString:
          NEMOFS_RETURN_IF_ERROR(SaveUnicode(v));
          break;
        case Kind::kBytes:
          NEMOFS_RETURN_IF_ERROR(SaveBytes(v));
          break;
        case Kind::kTuple:
          NEMOFS_RETURN_IF_ERROR(SaveTuple(v));
          break;
        case Kind::kList:
          out_.Write(op::kEmptyList);
          Memoize(v);
          NEMOFS_RETURN_IF_ERROR(BatchList(v->items, true));
          break;
        case Kind::kDict:
          NEMOFS_RETURN_IF_ERROR(SaveDict(v));
          break;
        case Kind::kSet:
          NEMOFS_RETURN_IF_ERROR(SaveSet(v));
          break;
        case Kind::kGlobal:
          NEMOFS_RETURN_IF_ERROR(SaveGlobal(v));
          break;
        case Kind::kCall:
        case Kind::kObject:
          NEMOFS_RETURN_IF_ERROR(SaveReduce(v));
          break;
        default:
          return Fail("unknown value kind {}", static_cast<int>(v->kind));
      }
  }
  // save_reduce's BUILD (after list and dict items); any other kind with a
  // state got it from a BUILD on it too.
  if (v->state) {
    NEMOFS_RETURN_IF_ERROR(Save(v->state));
    out_.Write(op::kBuild);
  }
  return Ok();
}

}  // namespace

Result<std::string> WritePickle(const Value* root, int protocol,
                                const PickleWriteOptions& options) {
  if (protocol < 2 || protocol > 5) {
    return Err(EINVAL, "pickle writer: protocol {} is not supported (2 to 5 are)", protocol);
  }
  Pickler pickler(protocol, options);
  return pickler.Dump(root);
}

int PickleProtocol(std::string_view pickle) {
  if (pickle.size() >= 2 && static_cast<uint8_t>(pickle[0]) == 0x80) {
    return static_cast<uint8_t>(pickle[1]);
  }
  return 0;
}

}  // namespace nemofs::torch
