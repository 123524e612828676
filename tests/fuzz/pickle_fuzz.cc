// libFuzzer target for the safe pickle VM (any bytes: never a crash, never
// an unbounded allocation; ToDebugString must terminate on any graph).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "torch/pickle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nemofs::torch::Limits limits;
  limits.max_bytes = 1 << 24;
  limits.max_values = 1 << 20;
  limits.max_memo = 1 << 16;
  auto r = nemofs::torch::Unpickle(std::string_view(reinterpret_cast<const char*>(data), size),
                                   "fuzz.pkl", limits);
  if (r.ok()) (void)nemofs::torch::ToDebugString(r->root, 20);
  return 0;
}
