// The config validator: accepts a text exactly when OmegaConf.load (PyYAML's
// SafeLoader with OmegaConf's changes, YAML 1.1) loads it and its top level
// is a non-empty mapping. The grammar is libyaml's (the C implementation of
// the parser PyYAML ports), run as a token scan and an event parse; on top,
// the places where PyYAML's pure-Python scanner is stricter than libyaml
// (tabs), the composer's and constructors' rules (one document, anchors,
// merge keys, tags, key types, duplicate keys) and OmegaConf's (no null
// keys, no sets or dates, interpolation syntax of `${...}` strings).
// Everything is iterative: memory and time are linear in the text.
#include "write/yaml_check.h"

#include <yaml.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "util/utf8.h"
#include "write/interpolation_check.h"

namespace nemofs::write {
namespace {

constexpr size_t kMaxConfigText = 64u << 20;  // the config size limit (tree/writes.cc)

// Collections nested deeper than this are refused. OmegaConf has no fixed
// limit: it builds the config recursively (about 12 Python frames per level)
// and fails with RecursionError at Python's recursion limit (1000), that is
// at 80-110 levels when called from a shallow stack (the exact level depends
// on the shapes and on the caller's stack depth), fewer from deep inside a
// NeMo restore. 64 levels always load.
constexpr size_t kMaxNesting = 64;

constexpr const char* kStr = "tag:yaml.org,2002:str";
constexpr const char* kYamlTag = "tag:yaml.org,2002:";

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

Status FailAt(const yaml_mark_t& m, const std::string& what, const std::string& why) {
  return Err(EINVAL, "{}: line {}, column {}: {}", what, m.line + 1, m.column + 1, why);
}

// PyYAML's reader (yaml/reader.py NON_PRINTABLE) on top of UTF-8: tab, LF,
// CR, 0x20-0x7E, NEL, 0xA0-0xD7FF, 0xE000-0xFFFD, 0x10000-0x10FFFF.
Status CheckCharacters(std::string_view text, const std::string& what) {
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
    if ((cp >= 0x80 && cp < 0xA0 && cp != 0x85) || cp == 0xFFFE || cp == 0xFFFF) {
      return Fail(text, at, what, fmt::format("character U+{:04X} is not allowed in YAML", cp));
    }
  }
  return Ok();
}

// libyaml's marks count characters (a leading BOM not counted); this maps
// them to byte offsets, moving forward only.
class CharCursor {
 public:
  explicit CharCursor(std::string_view text) : text_(text) {
    if (text.substr(0, 3) == "\xEF\xBB\xBF") byte_ = 3;
  }
  size_t Byte(size_t char_index) {
    while (chars_ < char_index && byte_ < text_.size()) {
      ++byte_;
      while (byte_ < text_.size() && (static_cast<unsigned char>(text_[byte_]) & 0xC0) == 0x80) ++byte_;
      ++chars_;
    }
    return byte_;
  }

 private:
  std::string_view text_;
  size_t byte_ = 0, chars_ = 0;
};

bool IsBreak(std::string_view t, size_t i) {
  return t[i] == '\n' || t[i] == '\r' || t.substr(i, 2) == "\xC2\x85" ||
         t.substr(i, 3) == "\xE2\x80\xA8" || t.substr(i, 3) == "\xE2\x80\xA9";
}

std::string ScannerProblem(const yaml_parser_t& p) {
  std::string why = p.problem ? p.problem : "invalid YAML";
  if (p.context) {
    why = fmt::format("{} {} (line {}, column {})", p.context, why, p.context_mark.line + 1,
                      p.context_mark.column + 1);
  }
  return why;
}

// yaml-cpp's wording for the commonest mistake, kept for users' scripts.
std::string Friendly(const yaml_parser_t& p) {
  std::string why = ScannerProblem(p);
  std::string_view ctx = p.context ? p.context : "";
  if (ctx == "while parsing a flow sequence" ||
      ctx == "while parsing a flow node") {
    return "end of sequence flow not found: " + why;
  }
  if (p.context && std::string_view(p.context) == "while parsing a flow mapping") {
    return "end of map flow not found: " + why;
  }
  return why;
}

Status ParserError(const yaml_parser_t& p, const std::string& what) {
  return FailAt(p.problem_mark, what, Friendly(p));
}

// What libyaml must be shown so that its grammar is PyYAML's where the two
// differ outside the token scan:
// - directives at the start of the stream: PyYAML takes any `%YAML 1.x`
//   (libyaml only 1.1 and 1.2) and skips a reserved directive (`%FOO ...`)
//   up to the end of its line (libyaml refuses it). A valid 1.x version is
//   rewritten to `1.1` (same length), a reserved directive to a comment.
// - a BOM (U+FEFF) is skipped only at the very start by PyYAML; elsewhere it
//   is an ordinary character (libyaml skips one at the start of any line). Each
//   one after the start becomes a character absent from the text (scalar
//   values keep their distinctness, so duplicate keys are still found).
// - a surrogate escape (`\uD800`-`\uDFFF`, `\U0000D800`-...) in a double-quoted
//   scalar: PyYAML makes it a lone surrogate (OmegaConf loads it, JSON tools
//   write emoji that way), libyaml refuses it. Each becomes the escape of a
//   private-use character (D8xx -> E0xx ... DFxx -> E7xx), when the text holds
//   none of that range, so distinct values stay distinct.
// Lengths in characters are kept, so marks are unchanged.
struct Normalized {
  std::string text;
  bool reserved_directive = false;  // then '---' must follow (PyYAML)
  std::string bom_stand_in;         // what replaced U+FEFF (empty: none)
};

bool IsNameChar(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' ||
         c == '_';
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// When t[i] starts `\u` + 4 or `\U` + 8 hex digits with a value in
// [lo, lo + 0x800): the offset of the last four digits ("D800" in \uD800);
// else npos.
size_t EscapeInRange(const std::string& t, size_t i, uint32_t lo) {
  if (t[i] != '\\' || i + 1 >= t.size()) return std::string::npos;
  size_t n = t[i + 1] == 'u' ? 4 : t[i + 1] == 'U' ? 8 : 0;
  if (n == 0 || i + 2 + n > t.size()) return std::string::npos;
  uint32_t v = 0;
  for (size_t k = 0; k < n; ++k) {
    int h = HexValue(t[i + 2 + k]);
    if (h < 0) return std::string::npos;
    v = v * 16 + static_cast<uint32_t>(h);
  }
  if (v < lo || v >= lo + 0x800) return std::string::npos;
  return i + 2 + n - 4;
}

// Maps every surrogate escape to the escape of a private-use character of
// the first block of 0x800 (U+E000, U+E800, U+F000) the text uses neither
// as a character nor as an escape. Returns the block's end (where other
// stand-ins may start), 0xE000 when nothing was mapped.
uint32_t MapSurrogateEscapes(std::string* text) {
  std::string& t = *text;
  auto escapes_in = [&](uint32_t lo) {
    for (size_t i = t.find('\\'); i != std::string::npos; i = t.find('\\', i + 1)) {
      if (EscapeInRange(t, i, lo) != std::string::npos) return true;
    }
    return false;
  };
  if (!escapes_in(0xD800)) return 0xE000;
  for (uint32_t block : {0xE000u, 0xE800u, 0xF000u}) {
    if (escapes_in(block)) continue;
    // The block in UTF-8: lead byte, then a second byte in [lo, lo + 0x1F].
    const auto lead = static_cast<unsigned char>(0xE0 | (block >> 12));
    const auto second = static_cast<unsigned char>(0x80 | ((block >> 6) & 0x3F));
    bool used = false;
    for (size_t i = 0; i + 1 < t.size() && !used; ++i) {
      auto b = static_cast<unsigned char>(t[i + 1]);
      used = static_cast<unsigned char>(t[i]) == lead && b >= second && b <= second + 0x1F;
    }
    if (used) continue;
    for (size_t i = t.find('\\'); i != std::string::npos; i = t.find('\\', i + 1)) {
      size_t d = EscapeInRange(t, i, 0xD800);
      if (d == std::string::npos) continue;
      uint32_t v = 0;
      for (size_t k = 0; k < 4; ++k) v = v * 16 + static_cast<uint32_t>(HexValue(t[d + k]));
      std::string hex = fmt::format("{:04x}", block + (v - 0xD800));
      t.replace(d, 4, hex);
    }
    return block + 0x800;
  }
  return 0xE000;  // every block is in use: libyaml refuses the escape
}

Result<Normalized> Normalize(std::string_view in, const std::string& what) {
  Normalized out;
  out.text.assign(in);
  std::string& t = out.text;
  size_t start = t.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;
  // Directive prologue: blank, comment and '%' lines before anything else.
  for (size_t pos = start; pos < t.size();) {
    size_t eol = t.find_first_of("\r\n", pos);
    if (eol == std::string::npos) eol = t.size();
    std::string_view line(t.data() + pos, eol - pos);
    size_t next = eol < t.size() ? eol + 1 : eol;
    size_t sp = line.find_first_not_of(' ');
    if (sp == std::string_view::npos || line[sp] == '#') {
      pos = next;
      continue;
    }
    if (line[0] != '%') break;
    size_t n = 1;
    while (n < line.size() && IsNameChar(line[n])) ++n;
    if (n == 1 || (n < line.size() && line[n] != ' ')) break;  // libyaml refuses it too
    std::string_view name = line.substr(1, n - 1);
    if (name == "TAG") {
      pos = next;
      continue;
    }
    if (name != "YAML") {
      t[pos] = '#';
      out.reserved_directive = true;
      pos = next;
      continue;
    }
    // PyYAML: ' '* digits '.' digits, then ' ' or the end of the line, then
    // ' '* and an optional comment.
    size_t i = n;
    while (i < line.size() && line[i] == ' ') ++i;
    size_t from = i, major_end, to;
    auto digits = [&](size_t* k) {
      size_t b = *k;
      while (*k < line.size() && line[*k] >= '0' && line[*k] <= '9') ++*k;
      return *k > b;
    };
    bool ok = digits(&i);
    major_end = i;
    ok = ok && i < line.size() && line[i] == '.';
    if (ok) ++i;
    ok = ok && digits(&i);
    to = i;
    ok = ok && (i == line.size() || line[i] == ' ');
    while (ok && i < line.size() && line[i] == ' ') ++i;
    ok = ok && (i == line.size() || line[i] == '#');
    if (!ok) {
      return Fail(in, pos + i, what, "while scanning a directive: expected a YAML version "
                                     "(digits '.' digits), then a comment or a line break")
          .error();
    }
    std::string_view major = line.substr(from, major_end - from);
    if (major.find_first_not_of('0') == std::string_view::npos ||
        major.substr(major.find_first_not_of('0')) != "1") {
      return Fail(in, pos, what, "found incompatible YAML document (version 1.* is required)")
          .error();
    }
    t.replace(pos + from, to - from, "1.1" + std::string(to - from - 3, ' '));
    pos = next;
  }
  const uint32_t stand_ins_from = MapSurrogateEscapes(&t);
  if (t.find("\xEF\xBB\xBF", start) != std::string::npos) {
    // A replacement: the first private-use character the text lacks.
    std::vector<bool> present(0x110000);
    for (size_t i = 0; i < in.size();) {
      uint32_t cp = 0;
      if (!NextCodePoint(in, &i, &cp)) ++i;
      else if (cp < present.size()) present[cp] = true;
    }
    uint32_t pick = 0;
    for (uint32_t c = stand_ins_from; c <= 0xF8FF && !pick; ++c) {
      if (!present[c]) pick = c;
    }
    for (uint32_t c = 0xF0000; c <= 0xFFFFD && !pick; ++c) if (!present[c]) pick = c;
    for (uint32_t c = 0x100000; c <= 0x10FFFD && !pick; ++c) if (!present[c]) pick = c;
    if (!pick) return Fail(in, 0, what, "too many distinct characters").error();
    std::string rep;
    if (pick <= 0xFFFF) {
      rep = {static_cast<char>(0xE0 | (pick >> 12)), static_cast<char>(0x80 | ((pick >> 6) & 0x3F)),
             static_cast<char>(0x80 | (pick & 0x3F))};
    } else {
      rep = {static_cast<char>(0xF0 | (pick >> 18)), static_cast<char>(0x80 | ((pick >> 12) & 0x3F)),
             static_cast<char>(0x80 | ((pick >> 6) & 0x3F)), static_cast<char>(0x80 | (pick & 0x3F))};
    }
    std::string r;
    r.reserve(t.size() + t.size() / 3);
    r.append(t, 0, start);
    for (size_t i = start; i < t.size();) {
      if (t.compare(i, 3, "\xEF\xBB\xBF") == 0) {
        r += rep;
        i += 3;
      } else {
        r += t[i++];
      }
    }
    t = std::move(r);
    out.bom_stand_in = rep;
  }
  return out;
}

// Pass 1: tokens. PyYAML's scanner skips only spaces between tokens (a tab
// there, or in a plain scalar, or on a block scalar's header line before
// its comment, "cannot start any token"); libyaml allows tabs as separation.
Status CheckTabs(std::string_view text, const std::string& what) {
  if (text.find('\t') == std::string_view::npos) return Ok();
  yaml_parser_t p;
  if (!yaml_parser_initialize(&p)) return Err(ENOMEM, "{}: out of memory", what);
  std::unique_ptr<yaml_parser_t, void (*)(yaml_parser_t*)> guard(&p, yaml_parser_delete);
  yaml_parser_set_input_string(&p, reinterpret_cast<const unsigned char*>(text.data()), text.size());
  CharCursor cursor(text);
  size_t prev_end = cursor.Byte(0);
  auto tab_error = [&](size_t at) {
    return Fail(text, at, what,
                "found character '\\t' that cannot start any token (YAML allows tabs only in "
                "quoted or block scalars and comments)");
  };
  // A gap between tokens: spaces, breaks and comments.
  auto check_gap = [&](size_t from, size_t to) -> Status {
    bool comment = false;
    for (size_t i = from; i < to; ++i) {
      if (IsBreak(text, i)) comment = false;
      else if (text[i] == '#') comment = true;
      else if (text[i] == '\t' && !comment) return tab_error(i);
    }
    return Ok();
  };
  for (;;) {
    yaml_token_t t;
    if (!yaml_parser_scan(&p, &t)) return ParserError(p, what);
    std::unique_ptr<yaml_token_t, void (*)(yaml_token_t*)> tguard(&t, yaml_token_delete);
    size_t start = cursor.Byte(t.start_mark.index);
    size_t end = cursor.Byte(t.end_mark.index);
    NEMOFS_RETURN_IF_ERROR(check_gap(prev_end, start));
    if (t.type == YAML_STREAM_END_TOKEN) break;
    bool scalar = t.type == YAML_SCALAR_TOKEN;
    auto style = scalar ? t.data.scalar.style : YAML_ANY_SCALAR_STYLE;
    if (style == YAML_SINGLE_QUOTED_SCALAR_STYLE || style == YAML_DOUBLE_QUOTED_SCALAR_STYLE) {
      // tabs allowed inside
    } else if (style == YAML_LITERAL_SCALAR_STYLE || style == YAML_FOLDED_SCALAR_STYLE) {
      size_t i = start;
      while (i < end && !IsBreak(text, i) && text[i] != '#') {
        if (text[i] == '\t') return tab_error(i);
        ++i;
      }
    } else {
      for (size_t i = start; i < end; ++i) {
        if (text[i] == '\t') return tab_error(i);
      }
    }
    prev_end = std::max(prev_end, end);
  }
  return Ok();
}

// ---- implicit resolution (yaml/resolver.py + OmegaConf's float) ---------

enum class Kind { kStr, kNull, kBool, kInt, kFloat, kMerge, kValue, kBinary, kTimestamp, kOther };

struct Scan {
  std::string_view s;
  size_t i = 0;
  bool End() const { return i == s.size(); }
  bool Peek(char c) const { return i < s.size() && s[i] == c; }
  bool Eat(char c) {
    if (!Peek(c)) return false;
    ++i;
    return true;
  }
  bool EatAny(std::string_view set) {
    if (i < s.size() && set.find(s[i]) != std::string_view::npos) {
      ++i;
      return true;
    }
    return false;
  }
  size_t Many(std::string_view set) {
    size_t n = 0;
    while (EatAny(set)) ++n;
    return n;
  }
};

constexpr std::string_view kDigits = "0123456789";
constexpr std::string_view kDigitsU = "0123456789_";

// `(?:[eE]<sign>[0-9]+)?` then end; `sign_optional` for OmegaConf's `[-+]?`.
bool ExpThenEnd(Scan s, bool sign_optional) {
  if (s.EatAny("eE")) {
    if (!s.EatAny("-+") && !sign_optional) return false;
    if (!s.Many(kDigits)) return false;
  }
  return s.End();
}

// `(?::[0-5]?[0-9])+` greedy alternatives are unambiguous here.
bool Sexagesimal(Scan* s) {
  size_t groups = 0;
  while (s->Peek(':')) {
    Scan t = *s;
    t.Eat(':');
    if (t.i + 1 < t.s.size() && t.s[t.i] >= '0' && t.s[t.i] <= '5' && t.s[t.i + 1] >= '0' &&
        t.s[t.i + 1] <= '9') {
      t.i += 2;
    } else if (!t.EatAny(kDigits)) {
      break;
    }
    *s = t;
    ++groups;
  }
  return groups > 0;
}

bool InfNan(std::string_view v, bool sign) {
  std::string_view w = v;
  if (sign && !w.empty() && (w[0] == '-' || w[0] == '+')) w.remove_prefix(1);
  if (w == ".inf" || w == ".Inf" || w == ".INF") return true;
  return v == ".nan" || v == ".NaN" || v == ".NAN";
}

bool IsFloat(std::string_view v) {
  if (InfNan(v, true)) return true;
  // [-+]?[0-9][0-9_]*\.[0-9_]*(exp)?   (PyYAML: signed exp; OmegaConf: optional)
  {
    Scan s{v};
    s.EatAny("-+");
    if (s.EatAny(kDigits)) {
      Scan base = s;
      base.Many(kDigitsU);
      if (base.Eat('.')) {
        base.Many(kDigitsU);
        if (ExpThenEnd(base, true)) return true;
      }
      // OmegaConf: [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
      Scan e = s;
      e.Many(kDigitsU);
      if (e.Peek('e') || e.Peek('E')) {
        if (ExpThenEnd(e, true)) return true;
      }
      // sexagesimal: [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*
      Scan x = s;
      x.Many(kDigitsU);
      if (Sexagesimal(&x) && x.Eat('.')) {
        x.Many(kDigitsU);
        if (x.End()) return true;
      }
    }
  }
  // \.[0-9][0-9_]*(exp)?  and OmegaConf's \.[0-9_]+(exp)?
  {
    Scan s{v};
    if (s.Eat('.') && s.Many(kDigitsU) > 0 && ExpThenEnd(s, false)) return true;
  }
  return false;
}

bool IsInt(std::string_view v) {
  Scan s{v};
  s.EatAny("-+");
  size_t at = s.i;
  if (s.Eat('0')) {
    if (s.Eat('b')) return s.Many("01_") > 0 && s.End();
    if (s.Eat('x')) return s.Many("0123456789abcdefABCDEF_") > 0 && s.End();
    if (s.End()) return true;
    return s.Many("01234567_") > 0 && s.End();
  }
  s.i = at;
  if (s.i < v.size() && v[s.i] >= '1' && v[s.i] <= '9') {
    ++s.i;
    s.Many(kDigitsU);
    if (s.End()) return true;
    return Sexagesimal(&s) && s.End();
  }
  return false;
}

Kind ResolvePlain(std::string_view v) {
  static const std::unordered_set<std::string_view> kBools = {
      "yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE",
      "on", "On", "ON", "off", "Off", "OFF"};
  if (v.empty() || v == "~" || v == "null" || v == "Null" || v == "NULL") return Kind::kNull;
  if (kBools.count(v)) return Kind::kBool;
  char c = v[0];
  bool numeric_start = (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.';
  // Resolver order: bool, float (PyYAML), int, merge, null, value, float (OmegaConf).
  if (numeric_start && IsFloat(v) && (c == '.' || !IsInt(v))) return Kind::kFloat;
  if (numeric_start && IsInt(v)) return Kind::kInt;
  if (numeric_start && IsFloat(v)) return Kind::kFloat;
  if (v == "<<") return Kind::kMerge;
  if (v == "=") return Kind::kValue;
  return Kind::kStr;
}

// What construct_yaml_float accepts: underscores dropped, a sign, then
// Python's float() (or sexagesimal parts).
bool PyFloat(std::string_view w) {
  while (!w.empty() && std::string_view(" \t\n\r\f\v").find(w.front()) != std::string_view::npos) w.remove_prefix(1);
  while (!w.empty() && std::string_view(" \t\n\r\f\v").find(w.back()) != std::string_view::npos) w.remove_suffix(1);
  std::string l;
  for (char c : w) l += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  std::string_view x = l;
  if (!x.empty() && (x[0] == '-' || x[0] == '+')) x.remove_prefix(1);
  if (x == "inf" || x == "infinity" || x == "nan") return true;
  Scan s{x};
  size_t a = s.Many(kDigits);
  size_t b = 0;
  if (s.Eat('.')) b = s.Many(kDigits);
  if (a + b == 0) return false;
  if (s.Eat('e')) {
    s.EatAny("-+");
    if (!s.Many(kDigits)) return false;
  }
  return s.End();
}

bool ConstructFloat(std::string_view v) {
  std::string s;
  for (char c : v) if (c != '_') s += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  if (s.empty()) return false;  // value[0]: IndexError
  std::string_view x = s;
  if (x[0] == '-' || x[0] == '+') x.remove_prefix(1);
  if (x == ".inf" || x == ".nan") return true;
  if (x.find(':') != std::string_view::npos) {
    size_t from = 0;
    for (;;) {
      size_t colon = x.find(':', from);
      if (!PyFloat(x.substr(from, colon - from))) return false;
      if (colon == std::string_view::npos) return true;
      from = colon + 1;
    }
  }
  return PyFloat(x);
}

bool PyInt(std::string_view w, std::string_view digits) {
  while (!w.empty() && std::string_view(" \t\n\r\f\v").find(w.front()) != std::string_view::npos) w.remove_prefix(1);
  while (!w.empty() && std::string_view(" \t\n\r\f\v").find(w.back()) != std::string_view::npos) w.remove_suffix(1);
  if (!w.empty() && (w[0] == '-' || w[0] == '+')) w.remove_prefix(1);
  if (w.empty()) return false;
  for (char c : w) if (digits.find(c) == std::string_view::npos) return false;
  return true;
}

bool ConstructInt(std::string_view v) {
  std::string s;
  for (char c : v) if (c != '_') s += c;
  if (s.empty()) return false;
  std::string_view x = s;
  if (x[0] == '-' || x[0] == '+') x.remove_prefix(1);
  if (x.empty()) return false;
  if (x == "0") return true;
  if (x.substr(0, 2) == "0b") return PyInt(x.substr(2), "01");
  if (x.substr(0, 2) == "0x") return PyInt(x.substr(2), "0123456789abcdefABCDEF");
  if (x[0] == '0') return PyInt(x, "01234567");
  if (x.find(':') != std::string_view::npos) {
    size_t from = 0;
    for (;;) {
      size_t colon = x.find(':', from);
      if (!PyInt(x.substr(from, colon - from), kDigits)) return false;
      if (colon == std::string_view::npos) return true;
      from = colon + 1;
    }
  }
  return PyInt(x, kDigits);
}

// base64.decodebytes (binascii.a2b_base64, not strict): non-alphabet
// characters are skipped; the data characters before the padding must not
// leave a lone 6-bit group, and a partial group needs its '='.
bool Base64(std::string_view v) {
  size_t n = 0, pads = 0;
  for (char c : v) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;  // not ASCII
    bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '+' || c == '/';
    if (alpha) {
      if (pads) {
        // data after padding: a2b_base64 keeps decoding from a full quad
        pads = 0;
      }
      ++n;
    } else if (c == '=') {
      if (n % 4 >= 2 && pads < 4 - n % 4) {
        if (++pads == 4 - n % 4) {
          n += pads;
          pads = 0;
        }
      }
    }
  }
  return n % 4 == 0;
}

// ---- the composer and constructors --------------------------------------

enum class Shape { kScalar, kSequence, kMapping };

struct Node {
  Shape shape = Shape::kScalar;
  Kind kind = Kind::kStr;   // of a scalar
  std::string value;        // a scalar's value, when it may be a key
  bool nonempty = false;    // a mapping with entries (merges included); a
                            // sequence holding such a mapping
  size_t pairs = 0;         // a mapping's key: value pairs as written
  bool merge_list = false;  // a plain sequence of mappings (a `<<` value)
  bool done = false;        // fully composed (an alias to it is not a cycle)
  size_t height = 0;        // collection levels in it (a scalar: 0)
};

struct Frame {
  Shape shape;
  std::string tag;  // resolved: "map", "seq", "omap", "pairs", "set", "path"
  std::shared_ptr<Node> node;
  std::unordered_set<std::string> keys;  // mapping: str keys seen
  bool want_key = true;                  // mapping: next node is a key
  bool merge_value = false;              // mapping: the value of a `<<` key
  bool all_str = true;                   // path: every item a str scalar
  size_t items = 0;
  size_t child_height = 0;               // the highest item's height
  yaml_mark_t mark{};
};

std::string ShortTag(const char* tag) {
  std::string_view t = tag ? tag : "";
  if (t.rfind(kYamlTag, 0) == 0) return "!!" + std::string(t.substr(std::string_view(kYamlTag).size()));
  return std::string(t);
}

bool IsPathTag(std::string_view t) {
  return t == "tag:yaml.org,2002:python/object/apply:pathlib.Path" ||
         t == "tag:yaml.org,2002:python/object/apply:pathlib.PosixPath" ||
         t == "tag:yaml.org,2002:python/object/apply:pathlib.WindowsPath";
}

Status ValidateText(std::string_view text, const std::string& what, bool reparse);

class Composer {
 public:
  Composer(std::string_view text, const std::string& what, const Normalized& n, bool reparse)
      : text_(text), what_(what), reserved_directive_(n.reserved_directive),
        bom_stand_in_(n.bom_stand_in), reparse_(reparse) {}

  Status Run() {
    yaml_parser_t p;
    if (!yaml_parser_initialize(&p)) return Err(ENOMEM, "{}: out of memory", what_);
    std::unique_ptr<yaml_parser_t, void (*)(yaml_parser_t*)> guard(&p, yaml_parser_delete);
    yaml_parser_set_input_string(&p, reinterpret_cast<const unsigned char*>(text_.data()),
                                 text_.size());
    int documents = 0;
    for (;;) {
      yaml_event_t e;
      if (!yaml_parser_parse(&p, &e)) return ParserError(p, what_);
      std::unique_ptr<yaml_event_t, void (*)(yaml_event_t*)> eguard(&e, yaml_event_delete);
      switch (e.type) {
        case YAML_STREAM_START_EVENT:
        case YAML_DOCUMENT_END_EVENT:
        case YAML_NO_EVENT:
          break;
        case YAML_STREAM_END_EVENT:
          return Finish(e.start_mark);
        case YAML_DOCUMENT_START_EVENT:
          if (++documents > 1) {
            return FailAt(e.start_mark, what_,
                          "expected a single document in the stream, but found another document");
          }
          if (reserved_directive_ && e.data.document_start.implicit) {
            return FailAt(e.start_mark, what_,
                          "expected '<document start>' ('---') after the directives");
          }
          break;
        case YAML_ALIAS_EVENT:
          NEMOFS_RETURN_IF_ERROR(Alias(e));
          break;
        case YAML_SCALAR_EVENT:
          NEMOFS_RETURN_IF_ERROR(Scalar(e));
          break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT:
          NEMOFS_RETURN_IF_ERROR(Start(e));
          break;
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
          NEMOFS_RETURN_IF_ERROR(End(e));
          break;
      }
    }
  }

 private:
  Status Finish(const yaml_mark_t& mark) {
    // OmegaConf.create of a str loads it again as YAML: nothing -> empty,
    // a str s -> {s: None} (one key), a list or mapping -> as is.
    if (root_ && root_shape_ == Shape::kScalar && root_->kind == Kind::kStr) {
      if (reparse_) return Ok();
      return ValidateText(RestoreBoms(root_->value), what_ + " (the config is one string, read again as YAML)",
                          true);
    }
    if (!root_) {
      return FailAt(mark, what_, "a config must be a mapping (key: value lines), this is nothing");
    }
    if (root_shape_ != Shape::kMapping || !root_is_map_) {
      const char* kind = root_shape_ == Shape::kScalar     ? (root_->kind == Kind::kNull ? "nothing" : "a plain value")
                         : root_shape_ == Shape::kSequence ? "a list"
                                                           : "something else";
      return Err(EINVAL, "{}: line 1, column 1: a config must be a mapping (key: value lines), "
                 "this is {}", what_, kind);
    }
    if (!root_->nonempty) {
      return Err(EINVAL, "{}: line 1, column 1: a config must be a mapping (key: value lines), "
                 "this is an empty mapping", what_);
    }
    return Ok();
  }

  Status Anchor(const yaml_char_t* anchor, const yaml_mark_t& mark, std::shared_ptr<Node> node) {
    if (!anchor) return Ok();
    std::string name(reinterpret_cast<const char*>(anchor));
    if (!anchors_.emplace(name, std::move(node)).second) {
      return FailAt(mark, what_, fmt::format("found duplicate anchor '{}'", name));
    }
    return Ok();
  }

  // A complete node `n` becomes the next item of the enclosing collection.
  Status Place(const std::shared_ptr<Node>& n, const yaml_mark_t& mark, bool is_str_scalar) {
    if (stack_.empty()) {
      root_ = n;
      return Ok();
    }
    Frame& f = stack_.back();
    // A merged mapping (or list of them) does not nest: its entries join f.
    size_t h = n->height;
    if (f.shape == Shape::kMapping && f.merge_value && !f.want_key && h > 0) {
      h -= n->shape == Shape::kSequence ? std::min<size_t>(h, 2) : 1;
    }
    if (stack_.size() + h > kMaxNesting) {
      return FailAt(mark, what_, fmt::format("nested deeper than {} levels (OmegaConf fails with "
                                             "RecursionError)", kMaxNesting));
    }
    f.child_height = std::max(f.child_height, h);
    ++f.items;
    if (f.shape == Shape::kSequence) {
      if (f.tag == "omap" || f.tag == "pairs") {
        if (n->shape != Shape::kMapping || n->pairs != 1) {
          return FailAt(mark, what_, fmt::format("while constructing an ordered map: expected a "
                                                 "mapping of length 1"));
        }
      }
      if (f.tag == "path" && !is_str_scalar) f.all_str = false;
      if (n->shape != Shape::kMapping) f.node->merge_list = false;
      else if (n->nonempty) f.node->nonempty = true;
      return Ok();
    }
    if (f.want_key) {
      f.want_key = false;
      f.merge_value = false;
      ++f.node->pairs;
      if (n->shape != Shape::kScalar) {
        return FailAt(mark, what_, "found unhashable key (a list or mapping as a key)");
      }
      if (n->kind == Kind::kMerge) {
        f.merge_value = true;
        return Ok();
      }
      if (n->kind == Kind::kNull) {
        return FailAt(mark, what_, "a key may not be null (OmegaConf: Incompatible key type "
                                   "'NoneType')");
      }
      if (n->kind == Kind::kValue || n->kind == Kind::kTimestamp || n->kind == Kind::kOther) {
        return FailAt(mark, what_, "this key is not a string, number or boolean");
      }
      f.node->nonempty = true;
      if (n->kind == Kind::kStr && !f.keys.insert(n->value).second) {
        return FailAt(mark, what_, fmt::format("key '{}' appears twice in one mapping", n->value));
      }
      return Ok();
    }
    f.want_key = true;
    if (f.merge_value) {
      f.merge_value = false;
      if (n->shape == Shape::kMapping) {
        if (n->nonempty) f.node->nonempty = true;
        return Ok();
      }
      if (n->shape == Shape::kSequence && n->merge_list) {
        if (n->nonempty) f.node->nonempty = true;
        return Ok();
      }
      return FailAt(mark, what_, "while constructing a mapping: expected a mapping or list of "
                                 "mappings for merging");
    }
    return Ok();
  }

  Status Alias(const yaml_event_t& e) {
    std::string name(reinterpret_cast<const char*>(e.data.alias.anchor));
    auto it = anchors_.find(name);
    if (it == anchors_.end()) {
      return FailAt(e.start_mark, what_, fmt::format("found undefined alias '{}'", name));
    }
    if (!it->second->done) {
      return FailAt(e.start_mark, what_,
                    fmt::format("alias '{}' refers to a node that contains it (a cycle)", name));
    }
    return Place(it->second, e.start_mark, it->second->shape == Shape::kScalar && it->second->kind == Kind::kStr);
  }

  Status Scalar(const yaml_event_t& e) {
    const auto& s = e.data.scalar;
    std::string_view value(reinterpret_cast<const char*>(s.value), s.length);
    auto n = std::make_shared<Node>();
    n->shape = Shape::kScalar;
    const char* tag = reinterpret_cast<const char*>(s.tag);
    std::string_view t = tag ? tag : "";
    bool key = !stack_.empty() && stack_.back().shape == Shape::kMapping && stack_.back().want_key;
    if (t.empty() || t == "!") {
      n->kind = s.plain_implicit ? ResolvePlain(value) : Kind::kStr;
      if (n->kind == Kind::kInt && !ConstructInt(value)) {
        return FailAt(e.start_mark, what_, fmt::format("'{}' is not a valid integer", value));
      }
      if (n->kind == Kind::kFloat && !ConstructFloat(value)) {
        return FailAt(e.start_mark, what_, fmt::format("'{}' is not a valid number", value));
      }
      if (n->kind == Kind::kValue || (n->kind == Kind::kMerge && !key)) {
        return FailAt(e.start_mark, what_,
                      fmt::format("could not determine a constructor for '{}'", value));
      }
    } else if (t == kStr) {
      n->kind = Kind::kStr;
    } else if (t == "tag:yaml.org,2002:null") {
      n->kind = Kind::kNull;
    } else if (t == "tag:yaml.org,2002:bool") {
      std::string l;
      for (char c : value) l += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
      if (l != "yes" && l != "no" && l != "true" && l != "false" && l != "on" && l != "off") {
        return FailAt(e.start_mark, what_, fmt::format("'{}' is not a valid boolean", value));
      }
      n->kind = Kind::kBool;
    } else if (t == "tag:yaml.org,2002:int") {
      if (!ConstructInt(value)) {
        return FailAt(e.start_mark, what_, fmt::format("'{}' is not a valid integer", value));
      }
      n->kind = Kind::kInt;
    } else if (t == "tag:yaml.org,2002:float") {
      if (!ConstructFloat(value)) {
        return FailAt(e.start_mark, what_, fmt::format("'{}' is not a valid number", value));
      }
      n->kind = Kind::kFloat;
    } else if (t == "tag:yaml.org,2002:binary") {
      if (!Base64(value)) {
        return FailAt(e.start_mark, what_, "failed to decode base64 data");
      }
      n->kind = Kind::kBinary;
    } else {
      return FailAt(e.start_mark, what_,
                    fmt::format("the tag '{}' is not allowed here (OmegaConf loads strings, "
                                "numbers, booleans, null, lists and mappings)", ShortTag(tag)));
    }
    if (n->kind == Kind::kStr) {
      if (key || stack_.empty()) {  // a top-level str is loaded again (Finish)
        n->value.assign(value);
      } else if (value.find("${") != std::string_view::npos) {
        std::string why;
        if (!CheckInterpolation(value, &why)) {
          return FailAt(e.start_mark, what_, "invalid interpolation: " + why);
        }
      }
    }
    n->done = true;
    if (e.data.scalar.anchor && n->kind == Kind::kStr && !key) n->value.assign(value);
    NEMOFS_RETURN_IF_ERROR(Anchor(s.anchor, e.start_mark, n));
    return Place(n, e.start_mark, n->kind == Kind::kStr);
  }

  Status Start(const yaml_event_t& e) {
    bool mapping = e.type == YAML_MAPPING_START_EVENT;
    const yaml_char_t* raw = mapping ? e.data.mapping_start.tag : e.data.sequence_start.tag;
    const yaml_char_t* anchor = mapping ? e.data.mapping_start.anchor : e.data.sequence_start.anchor;
    std::string_view t = raw ? reinterpret_cast<const char*>(raw) : "";
    Frame f;
    f.shape = mapping ? Shape::kMapping : Shape::kSequence;
    f.mark = e.start_mark;
    if (t.empty() || t == "!") {
      f.tag = mapping ? "map" : "seq";
    } else if (mapping && t == "tag:yaml.org,2002:map") {
      f.tag = "map";
    } else if (!mapping && t == "tag:yaml.org,2002:seq") {
      f.tag = "seq";
    } else if (!mapping && (t == "tag:yaml.org,2002:omap" || t == "tag:yaml.org,2002:pairs")) {
      f.tag = t.substr(std::string_view(kYamlTag).size());
    } else if (!mapping && IsPathTag(t)) {
      f.tag = "path";
    } else {
      return FailAt(e.start_mark, what_,
                    fmt::format("the tag '{}' is not allowed here (OmegaConf loads strings, "
                                "numbers, booleans, null, lists and mappings)",
                                ShortTag(reinterpret_cast<const char*>(raw))));
    }
    bool key = !stack_.empty() && stack_.back().shape == Shape::kMapping && stack_.back().want_key;
    if (key) return FailAt(e.start_mark, what_, "found unhashable key (a list or mapping as a key)");
    f.node = std::make_shared<Node>();
    f.node->shape = f.shape;
    f.node->merge_list = !mapping;
    NEMOFS_RETURN_IF_ERROR(Anchor(anchor, e.start_mark, f.node));
    if (stack_.empty()) {
      root_shape_ = f.shape;
      root_is_map_ = f.tag == "map";
    }
    if (stack_.size() + 1 > kMaxNesting) {
      return FailAt(e.start_mark, what_, fmt::format("nested deeper than {} levels (OmegaConf "
                                                     "fails with RecursionError)", kMaxNesting));
    }
    stack_.push_back(std::move(f));
    return Ok();
  }

  Status End(const yaml_event_t& e) {
    Frame f = std::move(stack_.back());
    stack_.pop_back();
    if (f.tag == "path" && !f.all_str) {
      return FailAt(f.mark, what_, "a path must be a list of strings");
    }
    f.node->done = true;
    f.node->height = f.child_height + 1;
    auto n = f.node;
    if (f.shape == Shape::kSequence && f.tag != "seq") n->merge_list = false;
    return Place(n, e.start_mark, false);
  }

  std::string_view text_;
  const std::string& what_;
  std::vector<Frame> stack_;
  std::unordered_map<std::string, std::shared_ptr<Node>> anchors_;
  std::string RestoreBoms(const std::string& v) const {
    if (bom_stand_in_.empty()) return v;
    std::string r;
    for (size_t i = 0; i < v.size();) {
      if (v.compare(i, bom_stand_in_.size(), bom_stand_in_) == 0) {
        r += "\xEF\xBB\xBF";
        i += bom_stand_in_.size();
      } else {
        r += v[i++];
      }
    }
    return r;
  }

  bool reserved_directive_ = false;
  std::string bom_stand_in_;
  bool reparse_ = false;
  std::shared_ptr<Node> root_;
  Shape root_shape_ = Shape::kScalar;
  bool root_is_map_ = false;
};

Status ValidateText(std::string_view text, const std::string& what, bool reparse) {
  NEMOFS_RETURN_IF_ERROR(CheckCharacters(text, what));
  auto normalized = Normalize(text, what);
  if (!normalized.ok()) return normalized.error();
  const std::string& t = normalized->text;
  NEMOFS_RETURN_IF_ERROR(CheckTabs(t, what));
  return Composer(t, what, *normalized, reparse).Run();
}

}  // namespace

Status ValidateConfigYaml(std::string_view text, const std::string& what) {
  if (text.size() > kMaxConfigText) {
    return Err(EINVAL, "{}: line 1, column 1: larger than the {} MiB a config may hold", what,
               kMaxConfigText >> 20);
  }
  return ValidateText(text, what, false);
}

}  // namespace nemofs::write
