#include "write/interpolation_check.h"

namespace nemofs::write {
namespace {

constexpr int kMaxDepth = 64;

bool IsIdStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsIdChar(char c) { return IsIdStart(c) || (c >= '0' && c <= '9') || c == '-'; }
bool IsWs(char c) { return c == ' ' || c == '\t'; }
// INTER_KEY: ~[\\{}()[\]:. \t'"]+
bool IsKeyChar(char c) {
  return std::string_view("\\{}()[]:. \t'\"").find(c) == std::string_view::npos;
}
// The characters of ID, NULL, INT, FLOAT, BOOL, UNQUOTED_CHAR and WS in VALUE_MODE.
bool IsPrimitiveChar(char c) {
  return IsIdChar(c) || std::string_view("/-\\+.$%*@?| \t").find(c) != std::string_view::npos;
}
// ESC: a backslash and one of these.
bool IsEscaped(char c) { return std::string_view("()[]{}:=, t\\").find(c) != std::string_view::npos; }

class Parser {
 public:
  explicit Parser(std::string_view s) : s_(s) {}

  bool Run(std::string* why) {
    bool ok = Text(0, 0) && i_ == s_.size();
    if (!ok && why) *why = why_.empty() ? "syntax error" : why_;
    return ok;
  }

 private:
  bool Fail(const char* why) {
    if (why_.empty()) why_ = std::string(why) + " at offset " + std::to_string(i_);
    return false;
  }
  bool At(std::string_view t) const { return s_.substr(i_, t.size()) == t; }
  char Peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  bool End() const { return i_ >= s_.size(); }
  void SkipWs() {
    while (!End() && IsWs(s_[i_])) ++i_;
  }

  // text in DEFAULT_MODE (quote == 0) or inside a quoted value.
  bool Text(char quote, int depth) {
    while (!End()) {
      char c = s_[i_];
      if (c == '\\') {
        size_t n = 0;
        while (!End() && s_[i_] == '\\') {
          ++n;
          ++i_;
        }
        if (n % 2 == 1 && At("${")) i_ += 2;          // ESC_INTER
        else if (quote && n % 2 == 1 && Peek() == quote) ++i_;  // escaped quote
        continue;
      }
      if (At("${")) {
        if (!Interpolation(depth + 1)) return false;
        continue;
      }
      if (quote && c == quote) {
        ++i_;
        return true;
      }
      ++i_;
    }
    return quote ? Fail("unterminated quoted value") : true;
  }

  // One configKey or resolver-name part: an interpolation, an ID or an INTER_KEY.
  // *is_id: an ID or an interpolation (allowed in a resolver name).
  bool Key(int depth, bool* is_id) {
    if (At("${")) {
      *is_id = true;
      return Interpolation(depth + 1);
    }
    size_t start = i_;
    while (!End() && IsKeyChar(s_[i_])) ++i_;
    if (i_ == start) return Fail("expected a key");
    std::string_view k = s_.substr(start, i_ - start);
    bool id = IsIdStart(k[0]);
    for (char c : k) id = id && IsIdChar(c);
    *is_id = id;
    return true;
  }

  // INTERPOLATION_MODE (OmegaConfGrammarLexer.g4): whitespace only after
  // "${" and before ':' or '}' (INTER_OPEN, INTER_COLON, INTER_CLOSE); none
  // around '.', '[' or ']'.
  bool Interpolation(int depth) {
    if (depth > kMaxDepth) return Fail("interpolations nested too deeply");
    i_ += 2;  // ${
    SkipWs();
    bool resolver_ok = true;  // the parts so far form a resolverName
    size_t dots = 0;
    while (Peek() == '.') {
      ++dots;
      ++i_;
    }
    if (dots) resolver_ok = false;
    bool first = true;
    for (;;) {
      if (first || Peek() == '.') {
        if (!first) ++i_;
        if (first && Peek() == '[') {  // `.[` is no key: DOT configKey only
          resolver_ok = false;
          if (!Bracketed(depth)) return false;
        } else {
          bool id = false;
          if (!Key(depth, &id)) return false;
          if (!id) resolver_ok = false;
        }
        first = false;
        continue;
      }
      if (Peek() == '[') {
        resolver_ok = false;
        if (!Bracketed(depth)) return false;
        continue;
      }
      SkipWs();
      if (Peek() == '}') {
        ++i_;
        return true;
      }
      if (Peek() == ':') {
        if (!resolver_ok) return Fail("unexpected ':' in a node interpolation");
        ++i_;
        SkipWs();
        return Sequence('}', depth);
      }
      return Fail("unexpected character in an interpolation");
    }
  }

  bool Bracketed(int depth) {
    ++i_;  // [
    bool id = false;
    if (!Key(depth, &id)) return false;
    if (Peek() != ']') return Fail("expected ']'");
    ++i_;
    return true;
  }

  // sequence? then `close`: elements separated by commas, any may be empty.
  bool Sequence(char close, int depth) {
    if (depth > kMaxDepth) return Fail("nested too deeply");
    bool have_element = false;
    for (;;) {
      if (End()) return Fail("unterminated interpolation or list");
      // WS before ',' or the close belongs to that token.
      size_t save = i_;
      SkipWs();
      char c = Peek();
      if (c == close) {
        ++i_;
        return true;
      }
      if (c == ',') {
        ++i_;
        SkipWs();
        have_element = false;
        continue;
      }
      i_ = save;
      if (have_element) return Fail("expected ',' between elements");
      if (!Element(depth)) return false;
      have_element = true;
    }
  }

  bool Element(int depth) {
    char c = Peek();
    if (c == '\'' || c == '"') {
      ++i_;
      return Text(c, depth);
    }
    if (c == '[') {
      ++i_;
      SkipWs();
      return Sequence(']', depth + 1);
    }
    if (c == '{') {
      ++i_;
      SkipWs();
      return Dict(depth + 1);
    }
    return Primitive(depth);
  }

  bool Primitive(int depth) {
    size_t start = i_;
    for (;;) {
      if (End()) break;
      char c = s_[i_];
      if (At("${")) {
        if (!Interpolation(depth + 1)) return false;
        continue;
      }
      if (c == '\\' && i_ + 1 < s_.size() && IsEscaped(s_[i_ + 1])) {
        i_ += 2;
        continue;
      }
      if (IsPrimitiveChar(c) || c == ':') {
        ++i_;
        continue;
      }
      break;
    }
    if (i_ == start) return Fail("token recognition error");
    return true;
  }

  bool Dict(int depth) {
    if (depth > kMaxDepth) return Fail("nested too deeply");
    if (Peek() == '}') {
      ++i_;
      return true;
    }
    for (;;) {
      size_t start = i_;
      while (!End() && !At("${")) {
        char c = s_[i_];
        if (c == '\\' && i_ + 1 < s_.size() && IsEscaped(s_[i_ + 1])) {
          i_ += 2;
        } else if (IsPrimitiveChar(c)) {
          ++i_;
        } else {
          break;
        }
      }
      // The WS before ':' belongs to COLON; a key of only WS is no key.
      bool any = false;
      for (size_t k = start; k < i_; ++k) any = any || !IsWs(s_[k]);
      if (!any) return Fail("expected a dictionary key");
      if (Peek() != ':') return Fail("expected ':' after a dictionary key");
      ++i_;
      SkipWs();
      if (End() || Peek() == ',' || Peek() == '}') return Fail("expected a dictionary value");
      if (!Element(depth)) return false;
      SkipWs();
      if (Peek() == '}') {
        ++i_;
        return true;
      }
      if (Peek() != ',') return Fail("expected ',' or '}' in a dictionary");
      ++i_;
      SkipWs();
    }
  }

  std::string_view s_;
  size_t i_ = 0;
  std::string why_;
};

}  // namespace

bool CheckInterpolation(std::string_view value, std::string* why) {
  return Parser(value).Run(why);
}

}  // namespace nemofs::write
