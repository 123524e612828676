// Result<T>: a value or an Error that carries its errno from birth.
//
// Every fallible core function returns Result<T> (Status for no value). The
// errno is the one the FUSE boundary will reply with; the message names the
// file and the problem and is what users read ("x.nemo: tar header at offset
// 1024 has a bad checksum"). Errors are never logged where they are made: the
// boundary (FUSE op, CLI command) logs or prints each failure once.
#pragma once

#include <fmt/format.h>

#include <cerrno>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace nemofs {

class Error {
 public:
  Error(int code, std::string message) : code_(code), message_(std::move(message)) {}

  int code() const { return code_; }
  const std::string& message() const { return message_; }

  // "<prefix>: <message>", same errno.
  Error Context(std::string_view prefix) const {
    return Error(code_, fmt::format("{}: {}", prefix, message_));
  }

 private:
  int code_;
  std::string message_;
};

template <typename... Args>
Error Err(int code, fmt::format_string<Args...> format, Args&&... args) {
  return Error(code, fmt::format(format, std::forward<Args>(args)...));
}

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(const T& value) : v_(value) {}
  Result(T&& value) : v_(std::move(value)) {}
  Result(Error error) : v_(std::move(error)) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U&&, T> &&
                                                    !std::is_same_v<std::decay_t<U>, Error> &&
                                                    !std::is_same_v<std::decay_t<U>, T>>>
  Result(U&& value) : v_(T(std::forward<U>(value))) {}

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}

  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const { return error_; }

 private:
  Error error_{0, {}};
  bool ok_ = true;
};

using Status = Result<void>;

inline Status Ok() { return {}; }

}  // namespace nemofs

#define NEMOFS_CONCAT_INNER(a, b) a##b
#define NEMOFS_CONCAT(a, b) NEMOFS_CONCAT_INNER(a, b)

// Evaluates `expr` (a Result or Status); returns its error from the caller.
#define NEMOFS_RETURN_IF_ERROR(expr)                         \
  do {                                                       \
    auto&& nemofs_status_ = (expr);                          \
    if (!nemofs_status_.ok()) return nemofs_status_.error(); \
  } while (0)

// `lhs = value of expr`, or return its error from the caller.
#define NEMOFS_ASSIGN_OR_RETURN(lhs, expr) \
  NEMOFS_ASSIGN_OR_RETURN_IMPL(NEMOFS_CONCAT(nemofs_result_, __LINE__), lhs, expr)
#define NEMOFS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.error();                 \
  lhs = std::move(tmp).value()
