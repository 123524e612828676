// OmegaConf's interpolation grammar (omegaconf/grammar/OmegaConfGrammar*.g4,
// 2.2): OmegaConf.load refuses a config whose string values contain "${"
// but do not parse as `configValue`.
#pragma once

#include <string>
#include <string_view>

namespace nemofs::write {

// True when `value` (a string holding "${") parses; else false and *why.
// Nesting deeper than 64 interpolations or containers is refused.
bool CheckInterpolation(std::string_view value, std::string* why);

}  // namespace nemofs::write
