// Validation of a new config text before it is committed (DESIGN.md §4: "on
// close/rename the new text is validated as YAML; invalid -> EINVAL, the log
// says which line is wrong").
#pragma once

#include <string>
#include <string_view>

#include "nemofs/result.h"

namespace nemofs::write {

// OK when `text` is what NeMo can load as a model config: UTF-8 without
// control characters YAML forbids, parseable by yaml-cpp, a mapping at the
// top level, no key twice in one mapping (OmegaConf refuses those). Else
// EINVAL with "<what>: line L, column C: <problem>" (1-based).
Status ValidateConfigYaml(std::string_view text, const std::string& what);

}  // namespace nemofs::write
