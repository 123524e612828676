// libFuzzer target for the pickle writer: whatever graph the VM makes of any
// bytes, writing it back (at each protocol) never crashes, and what is
// written unpickles to the same graph (ToDebugString) or is refused with an
// error (too deep, a newline in a GLOBAL below protocol 4, a str too long).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "torch/pickle.h"
#include "torch/pickle_writer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  nemofs::torch::Limits limits;
  limits.max_bytes = 1 << 24;
  limits.max_values = 1 << 18;
  limits.max_memo = 1 << 16;
  int protocol = 2 + data[0] % 4;
  std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  // A module named __builtin__ / copy_reg read after a PROTO >= 3 stays
  // unrenamed, and cannot be told apart once written below protocol 3.
  bool renames = text.find("__builtin__") != text.npos || text.find("copy_reg") != text.npos;
  auto in = nemofs::torch::Unpickle(
      std::string_view(reinterpret_cast<const char*>(data + 1), size - 1), "fuzz.pkl", limits);
  if (!in.ok()) return 0;
  nemofs::torch::PickleWriteOptions options;
  options.max_depth = 500;
  auto out = nemofs::torch::WritePickle(in->root, protocol, options);
  if (!out.ok()) return 0;
  limits.max_values = 1 << 22;
  auto back = nemofs::torch::Unpickle(*out, "rewritten.pkl", limits);
  if (!back.ok()) std::abort();  // the writer made a pickle the VM rejects
  if (!renames &&
      nemofs::torch::ToDebugString(back->root, 20) != nemofs::torch::ToDebugString(in->root, 20)) {
    std::abort();
  }
  return 0;
}
