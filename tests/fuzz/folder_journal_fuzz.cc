// libFuzzer target for the folder-commit journal parser (write/folder_txn.h):
// a `.nemofs-commit` in a source folder is untrusted input (every open
// applies it). Build: CC=clang CXX=clang++ cmake -DNEMOFS_FUZZ=ON; run:
// build-fuzz/tests/fuzz/folder_journal_fuzz -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <string>

#include "write/folder_txn.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto st = nemofs::write::CheckFolderCommitJournal(text, "fuzz/.nemofs-commit");
  if (!st.ok() && st.error().code() != EIO) __builtin_trap();  // refusals are EIO, never else
  return 0;
}
