// A safe pickle virtual machine: protocols 0-5, every opcode, nothing ever
// executed (FORMATS.md §3.6, §4.4.1; STYLE.md rule 4).
//
// The VM turns a pickle into an inert object graph. GLOBAL/STACK_GLOBAL
// produce symbols (module, name) that are never imported; REDUCE and NEWOBJ
// produce call/object records that are never called. Only a few globals get
// structural meaning because later opcodes depend on it:
//   collections.OrderedDict, builtins.dict, collections.defaultdict  -> kDict
//   _codecs.encode(str, 'latin1')                                     -> kBytes
//   builtins.set / frozenset, builtins.bytearray / bytes              -> kSet / kBytes
// Everything else (torch._utils._rebuild_tensor_v2, torch.Size, OmegaConf,
// argparse.Namespace, DCP metadata classes, os.system ...) stays a kCall or
// kObject for the caller to interpret. Every global the pickle names is
// recorded in Unpickled::globals, so callers can report dangerous ones.
//
// Re-emission (pickle_writer.h) needs a little more than the object graph,
// so the VM also keeps:
// * `opcode`: the opcode that created each Value (NEWOBJ / NEWOBJ_EX / INST /
//   OBJ for kObject, FROZENSET, BYTEARRAY8, PERSID, GLOBAL / STACK_GLOBAL,
//   REDUCE for the structural builtins above);
// * for a kDict / kSet / kBytes made by REDUCE of one of those builtins, the
//   call itself in `callable` and `args` (OrderedDict() vs {}, defaultdict's
//   factory, _codecs.encode's text);
// * for a kGlobal: from STACK_GLOBAL, the two str Values it was built from in
//   `items`; from GLOBAL / INST, `boolean` = true when the module name was
//   renamed from Python 2's (__builtin__, copy_reg).
//
// Limits (all checked; exceeding one is an EINVAL error naming the offset):
// stack depth, memo size, total bytes of strings/bytes, number of values.
//
// Ownership: every Value lives in Unpickled::arena; Values point at each
// other with raw const pointers (pickles may build cycles through the memo).
// Immutable after Unpickle returns; safe to read from many threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "nemofs/result.h"

namespace nemofs::torch {

enum class Kind {
  kNone,
  kBool,
  kInt,     // fits in int64
  kBigInt,  // LONG1/LONG4/LONG text beyond int64: decimal text in `str`
  kFloat,
  kString,  // text (UTF-8 as stored)
  kBytes,   // raw bytes
  kList,
  kTuple,
  kSet,           // set or frozenset, elements in `items`
  kDict,          // insertion order kept in `entries`
  kGlobal,        // a symbol: `module` + `name` (e.g. "torch._utils", "_rebuild_tensor_v2")
  kCall,          // REDUCE: `callable` applied to `args` (a kTuple); never executed
  kObject,        // NEWOBJ / NEWOBJ_EX / INST / OBJ: instance of `callable` built from `args`
  kPersistentId,  // BINPERSID / PERSID: the id value in `args` (a tuple, or a string for PERSID)
};

struct Value {
  Kind kind = Kind::kNone;
  bool boolean = false;              // kBool; kGlobal: module renamed from Python 2 (see above)
  uint8_t opcode = 0;               // the opcode that created it (see above)
  int64_t integer = 0;
  double real = 0;
  std::string str;                  // kString, kBytes, kBigInt (decimal), kGlobal: module
  std::string name;                 // kGlobal: name
  std::vector<const Value*> items;  // kList, kTuple, kSet; extra APPENDs on kCall/kObject
  std::vector<std::pair<const Value*, const Value*>> entries;  // kDict; SETITEMs on kCall/kObject
  const Value* callable = nullptr;  // kCall, kObject: the kGlobal (or other value) called;
                                    // kDict/kSet/kBytes made by REDUCE: the builtin called
  const Value* args = nullptr;      // kCall, kObject, REDUCE-made kDict/kSet/kBytes: argument
                                    // tuple; kPersistentId: the id
  const Value* kwargs = nullptr;    // kObject from NEWOBJ_EX
  const Value* state = nullptr;     // BUILD state (last BUILD wins), on any kind

  bool Is(Kind k) const { return kind == k; }
  // kGlobal with this module and name (after the protocol-2 renames
  // __builtin__ -> builtins, copy_reg -> copyreg).
  bool IsGlobal(std::string_view module, std::string_view name) const;
  // kCall/kObject whose callable IsGlobal(module, name).
  bool IsCallOf(std::string_view module, std::string_view name) const;
  // Dict lookup by string key; nullptr if absent or not a dict.
  const Value* Get(std::string_view key) const;
};

struct Limits {
  size_t max_stack = 1 << 20;       // values on the stack + mark stack depth
  size_t max_memo = 1 << 22;        // memo entries
  uint64_t max_bytes = 1ull << 30;  // total bytes of all str/bytes payloads
  size_t max_values = 1 << 24;      // Values created
  size_t max_depth = 2000;          // nesting depth of MARKs (and of ToDebugString)
};

struct Unpickled {
  std::vector<std::unique_ptr<Value>> arena;
  const Value* root = nullptr;
  std::vector<std::pair<std::string, std::string>>
      globals;          // every (module, name) named, deduplicated
  size_t consumed = 0;  // bytes of input used up to and including STOP
};

// Unpickles one pickle from `data` (which may hold more bytes after STOP;
// `consumed` tells where the pickle ended, for the legacy torch stream of
// several pickles). `what` names the source in errors, e.g.
// "x.nemo:model_weights.ckpt:data.pkl". Errors are EINVAL:
//   "<what>: pickle opcode 0x93 at offset 1234: stack underflow"
Result<Unpickled> Unpickle(std::string_view data, const std::string& what,
                           const Limits& limits = {});

// A short, deterministic, human-readable rendering for tests and logs,
// e.g. "{'a': (1, 2.5), 'b': torch._utils._rebuild_tensor_v2(...)}".
// Depth-limited; cycles print as "...".
std::string ToDebugString(const Value* v, size_t max_depth = 50);

}  // namespace nemofs::torch
