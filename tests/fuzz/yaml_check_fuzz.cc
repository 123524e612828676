// libFuzzer target for the config validator (any bytes: never a crash, no
// stack overflow on deep nesting, and an error is always EINVAL).
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "write/yaml_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto st = nemofs::write::ValidateConfigYaml(
      std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.yaml");
  if (!st.ok() && st.error().code() != EINVAL) std::abort();
  return 0;
}
