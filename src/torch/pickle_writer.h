// A pickle writer for the inert object graphs of pickle.h: it emits what
// CPython's C pickler (Modules/_pickle.c) emits for the same objects at the
// same protocol, so that unpickling a torch.save data.pkl and writing it back
// gives the same bytes (FORMATS.md §3.6).
//
// How the graph maps back to Python's objects:
// * Sharing is identity: a Value reached a second time is fetched from the
//   memo (BINGET / LONG_BINGET), as CPython does for an object it meets
//   twice. Everything CPython memoises is memoised in the same order
//   (str, bytes, non-empty tuples, lists, dicts, sets, globals, REDUCE /
//   NEWOBJ results), so memo indices agree.
// * None / bool / int / float are written by value, never memoised.
// * The VM's structural builtins are written back as they were made (their
//   REDUCE, see pickle.h "Re-emission"); Values without that record are
//   written as CPython writes such an object at `protocol` (e.g. bytes as
//   _codecs.encode(latin1 text, 'latin1') at protocol 2, BINBYTES from 3).
// * FRAME (protocol >= 4) as _pickle.c frames: a new frame when the current
//   one holds >= 64 KiB at the start of an object; str/bytes payloads of
//   >= 64 KiB outside frames; frames under 4 bytes lose their header.
//
// Not byte-identical (but equivalent: it unpickles to the same graph) for
// pickles CPython's pickler does not make: protocol-0/1 opcodes (STRING,
// INT, DICT, LIST, PUT ... become their binary forms), ints or floats
// fetched from the memo (written by value), a state set with a
// __setstate__ "state_setter" (its REDUCE/POP is not in the graph and is
// dropped), BINSTRING (written as str).
#pragma once

#include <string>
#include <string_view>
#include <unordered_map>

#include "nemofs/result.h"
#include "torch/pickle.h"

namespace nemofs::torch {

struct PickleWriteOptions {
  // Values to write in place of others wherever they are reached (an edited
  // copy of a dict, say); the replacement's own references are followed, and
  // replaced too. Keys and values must outlive the call.
  const std::unordered_map<const Value*, const Value*>* replace = nullptr;
  // Deepest nesting written; deeper: EINVAL. CPython's pickler stops at
  // its recursion limit (1000) too, so no pickle it wrote is deeper. The
  // writer recurses (3 frames a level): 1000 levels fit the stack of a
  // sanitizer build, where 3000 overflowed it.
#if defined(__SANITIZE_ADDRESS__)
  size_t max_depth = 200;  // ASan's frames are several times larger: 1000 overflowed in CI
#else
  size_t max_depth = 1000;
#endif
};

// Protocols 2 to 5 (torch.save writes 2 unless told otherwise). EINVAL for
// another protocol, a graph nested deeper than max_depth (or a cycle through
// a REDUCE's arguments, which CPython cannot write either), a GLOBAL name
// containing a newline at protocol < 4, or a null Value.
Result<std::string> WritePickle(const Value* root, int protocol,
                                const PickleWriteOptions& options = {});

// The protocol a pickle starts with (its PROTO opcode), 0 when it has none.
int PickleProtocol(std::string_view pickle);

}  // namespace nemofs::torch
