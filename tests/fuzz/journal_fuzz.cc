// libFuzzer target for the rollback journal parser (write/journal.h): a
// journal beside a source is untrusted input. Build: CC=clang CXX=clang++
// cmake -DNEMOFS_FUZZ=ON; run: build-fuzz/tests/fuzz/journal_fuzz -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "write/journal.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto parsed = nemofs::write::ParseJournal(bytes, "fuzz.nemofs-journal");
  if (parsed.ok()) {
    uint64_t total = 0;
    for (const auto& r : parsed->regions) total += r.bytes.size() + r.file.size();
    if (total > size) __builtin_trap();  // never more than the input holds
  }
  return 0;
}
