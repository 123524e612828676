// libFuzzer target for the .npy header parser (any bytes: never a crash;
// the conversion of a parsed header's data stays within it).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "checkpoint/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  auto h = nemofs::checkpoint::ParseNpyHeader(in, "fuzz.npy");
  if (h.ok() && h->data_offset <= in.size() && h->nbytes() <= (1u << 20)) {
    (void)nemofs::checkpoint::ToCOrderLittleEndian(*h, in.substr(h->data_offset));
    (void)nemofs::checkpoint::MakeNpyHeader(h->dtype, h->shape);
  }
  (void)nemofs::checkpoint::ParseShapeText(in.substr(0, 200));
  return 0;
}
