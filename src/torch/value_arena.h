// New pickle Values made while editing an unpickled graph (torch/pickle.h):
// they live as long as the arena, at stable addresses, so the edited graph
// can point at them until it is written back (torch/pickle_writer.h).
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "nemofs/result.h"
#include "torch/pickle.h"

namespace nemofs::torch {

class ValueArena {
 public:
  Value* New(Kind k) {
    values_.emplace_back();
    values_.back().kind = k;
    return &values_.back();
  }
  Value* Str(std::string s) {
    Value* v = New(Kind::kString);
    v->str = std::move(s);
    return v;
  }
  Value* Int(int64_t i) {
    Value* v = New(Kind::kInt);
    v->integer = i;
    return v;
  }
  Value* Tuple(std::vector<const Value*> items) {
    Value* v = New(Kind::kTuple);
    v->items = std::move(items);
    return v;
  }

 private:
  std::deque<Value> values_;
};

// EINVAL "<name>: <message>": an edit the file `name` cannot take.
template <typename... Args>
Error InvalidEdit(const std::string& name, fmt::format_string<Args...> format, Args&&... args) {
  return Err(EINVAL, "{}: {}", name, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace nemofs::torch
