#include "write/fault.h"

#include <unistd.h>

#include <cstdlib>

namespace nemofs::write {

void MaybeCrash(std::string_view step) {
  const char* want = std::getenv("NEMOFS_FAULT");
  if (want && step == want) ::_exit(kFaultExitCode);
}

}  // namespace nemofs::write
