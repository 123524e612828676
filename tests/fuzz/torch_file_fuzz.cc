// libFuzzer target for torch.save files (zip directory, legacy stream,
// tensor location): any bytes give a TorchFile or an error, never a crash.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "torch/torch_file.h"
#include "util/fd.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nemofs::UniqueFd fd(memfd_create("pt", MFD_CLOEXEC));
  if (!fd.valid()) return 0;
  if (size > 0 && ::write(fd.get(), data, size) != static_cast<ssize_t>(size)) return 0;
  nemofs::torch::TorchLimits limits;
  limits.max_pickle_bytes = 1 << 24;
  auto f = nemofs::torch::LoadTorchFile(fd.get(), 0, size, "fuzz.pt", limits);
  if (f.ok()) {
    for (const auto& [v, t] : f->tensors) {
      if (t.nbytes() > 0 && t.storage_start + t.storage_bytes > size) __builtin_trap();
    }
  }
  return 0;
}
