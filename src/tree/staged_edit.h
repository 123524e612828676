// The write model of every writable node whose stored bytes are edited in
// place (issue 10): the config and tensor files. A StagedEdit holds only
// what the handles wrote: sparse extents over the node's current content
// (its "base": the committed config text, a tensor's stored bytes), with
// the bytes of those extents in a SpillBytes (memory while small, a sparse
// spill file past that). Shared by the node's open handles until a commit.
//
//   base:    [....................................]   (not held here)
//   extents:      [xxxx]        [yyyyyyy]              staged bytes
//   keep_below:                              |         a truncate: the base
//                                                      shows below it, zeros
//                                                      at and above it
// Not thread-safe: the owner's lock serialises calls.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"
#include "util/spill.h"

namespace nemofs::tree {

class StagedEdit {
 public:
  StagedEdit(std::shared_ptr<SpillPool> pool, uint64_t base_size)
      : bytes_(std::move(pool)), size_(base_size), keep_below_(base_size) {}

  uint64_t size() const { return size_; }
  uint64_t keep_below() const { return keep_below_; }
  bool empty_edit() const { return extents_.empty() && keep_below_ == size_; }

  // Puts `data` at `offset` (a gap past the end reads as zeros).
  Status Write(uint64_t offset, std::string_view data);
  // Cuts the content to `size`, or grows it with zeros.
  Status Truncate(uint64_t size);
  // Drops every staged byte: the content is the base again, of `base_size`
  // bytes (after a commit, or to abandon the edit).
  void Reset(uint64_t base_size);

  // What [offset, offset + n) of the content is made of, in order.
  struct Piece {
    enum Kind { kStaged, kBase, kZero } kind = kZero;
    uint64_t offset = 0;
    uint64_t length = 0;
    std::shared_ptr<const std::string> bytes;  // kStaged: a copy of the staged bytes
  };
  Result<std::vector<Piece>> Pieces(uint64_t offset, uint64_t n) const;

  // For a commit: the ranges that may differ from the base, with views of
  // their bytes in `snapshot` (a write meanwhile copies; zeros where a
  // truncate left a hole), in order. Requires size() bytes of content.
  struct Changes {
    SpillBytes::View snapshot;
    std::vector<std::pair<uint64_t, std::string_view>> ranges;
  };
  Result<Changes> Snapshot();

  // The whole content as one string, the base given (the config).
  Result<std::string> Materialize(std::string_view base) const;

 private:
  SpillBytes bytes_;                   // staged bytes at their offsets
  std::map<uint64_t, uint64_t> extents_;  // offset -> end; disjoint, not touching
  uint64_t size_ = 0;
  uint64_t keep_below_ = 0;
};

}  // namespace nemofs::tree
