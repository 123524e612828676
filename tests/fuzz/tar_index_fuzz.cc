// libFuzzer target for the tar header index and the source normalisation on
// top of it. Build: CC=clang CXX=clang++ cmake -DNEMOFS_FUZZ=ON; run:
// build-fuzz/tests/fuzz/tar_index_fuzz tests/data/ -max_total_time=60
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "source/source.h"
#include "source/tar_index.h"
#include "util/fd.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nemofs::UniqueFd fd(memfd_create("tar", MFD_CLOEXEC));
  if (!fd.valid()) return 0;
  if (size > 0 && ::write(fd.get(), data, size) != static_cast<ssize_t>(size)) return 0;
  auto index = nemofs::source::IndexTar(fd.get(), 0, size, "fuzz.tar");
  if (index.ok()) {
    for (const auto& m : index->members) {
      if (m.data_offset + m.size > size) __builtin_trap();  // never beyond the input
    }
  }
  return 0;
}
