// libFuzzer target for the compressed-stream checker (gzip members, xz, zstd,
// bzip2). Build: CC=clang CXX=clang++ cmake -DNEMOFS_FUZZ=ON; run:
// build-fuzz/tests/fuzz/stream_check_fuzz tests/data/ -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "source/stream_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  std::string msg = nemofs::source::CheckStreamBytes(bytes, "fuzz");
  // A problem always names the stream it is about.
  if (!msg.empty() && msg.rfind("fuzz: ", 0) != 0) __builtin_trap();
  return 0;
}
