// Fault injection for crash tests (issue: edit config.yaml in place). When the
// environment variable NEMOFS_FAULT names a step, the process _exit(77)s
// there, as a crash (kill -9, power loss) at that instant would stop it.
// Compiled in every build: one getenv per commit step, nothing else.
#pragma once

#include <string_view>

namespace nemofs::write {

inline constexpr int kFaultExitCode = 77;

// _exit(kFaultExitCode) if NEMOFS_FAULT == step.
void MaybeCrash(std::string_view step);

}  // namespace nemofs::write
