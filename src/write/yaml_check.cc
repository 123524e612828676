#include "write/yaml_check.h"

#include <yaml-cpp/yaml.h>

#include <set>

#include "util/utf8.h"

namespace nemofs::write {
namespace {

// Line and column (1-based) of byte `at`.
std::pair<size_t, size_t> Where(std::string_view text, size_t at) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i < at && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      col = 1;
    } else if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) {
      ++col;
    }
  }
  return {line, col};
}

Status Fail(std::string_view text, size_t at, const std::string& what, const std::string& why) {
  auto [line, col] = Where(text, at);
  return Err(EINVAL, "{}: line {}, column {}: {}", what, line, col, why);
}

Status CheckKeys(const YAML::Node& node, const std::string& what) {
  if (node.IsMap()) {
    std::set<std::string> seen;
    for (const auto& kv : node) {
      if (kv.first.IsScalar() && !seen.insert(kv.first.Scalar()).second) {
        return Err(EINVAL, "{}: line {}, column {}: key '{}' appears twice in one mapping", what,
                   kv.first.Mark().line + 1, kv.first.Mark().column + 1, kv.first.Scalar());
      }
      NEMOFS_RETURN_IF_ERROR(CheckKeys(kv.second, what));
    }
  } else if (node.IsSequence()) {
    for (const auto& item : node) NEMOFS_RETURN_IF_ERROR(CheckKeys(item, what));
  }
  return Ok();
}

}  // namespace

Status ValidateConfigYaml(std::string_view text, const std::string& what) {
  for (size_t i = 0; i < text.size();) {
    auto c = static_cast<unsigned char>(text[i]);
    if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7F) {
      return Fail(text, i, what, fmt::format("control character 0x{:02x} is not allowed in YAML", c));
    }
    uint32_t cp = 0;
    size_t at = i;
    if (!NextCodePoint(text, &i, &cp) || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return Fail(text, at, what, "not valid UTF-8");
    }
  }
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    return Err(EINVAL, "{}: line {}, column {}: {}", what, e.mark.line + 1, e.mark.column + 1,
               e.msg);
  }
  if (!root.IsMap()) {
    const char* kind = root.IsNull()        ? "nothing"
                       : root.IsScalar()    ? "a plain value"
                       : root.IsSequence()  ? "a list"
                                            : "something else";
    return Err(EINVAL, "{}: line 1, column 1: a config must be a mapping (key: value lines), "
               "this is {}", what, kind);
  }
  try {
    return CheckKeys(root, what);
  } catch (const YAML::Exception& e) {
    return Err(EINVAL, "{}: {}", what, e.what());
  }
}

}  // namespace nemofs::write
