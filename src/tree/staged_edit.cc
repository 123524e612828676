#include "tree/staged_edit.h"

#include <algorithm>

namespace nemofs::tree {

Status StagedEdit::Write(uint64_t offset, std::string_view data) {
  if (data.empty()) return Ok();
  NEMOFS_RETURN_IF_ERROR(bytes_.Write(offset, data));
  // A hole between the old end and `offset` reads as zeros: past keep_below.
  if (offset > size_) keep_below_ = std::min(keep_below_, size_);
  uint64_t start = offset, stop = offset + data.size();
  auto it = extents_.upper_bound(offset);
  if (it != extents_.begin() && std::prev(it)->second >= offset) --it;
  while (it != extents_.end() && it->first <= stop) {
    start = std::min(start, it->first);
    stop = std::max(stop, it->second);
    it = extents_.erase(it);
  }
  extents_.emplace(start, stop);
  size_ = std::max(size_, offset + data.size());
  return Ok();
}

Status StagedEdit::Truncate(uint64_t size) {
  if (size < size_) {
    extents_.erase(extents_.lower_bound(size), extents_.end());
    if (!extents_.empty()) {
      auto last = std::prev(extents_.end());
      last->second = std::min(last->second, size);
    }
    if (bytes_.size() > size) NEMOFS_RETURN_IF_ERROR(bytes_.Resize(size));
    keep_below_ = std::min(keep_below_, size);
  } else {
    keep_below_ = std::min(keep_below_, size_);  // grown: zeros past the old end
  }
  size_ = size;
  return Ok();
}

void StagedEdit::Reset(uint64_t base_size) {
  extents_.clear();
  (void)bytes_.Resize(0);  // cannot fail: back to an empty buffer
  size_ = keep_below_ = base_size;
}

Result<std::vector<StagedEdit::Piece>> StagedEdit::Pieces(uint64_t offset, uint64_t n) const {
  std::vector<Piece> out;
  if (offset >= size_) return out;
  const uint64_t end = std::min(size_, offset + n);
  uint64_t p = offset;
  auto gap = [&](uint64_t to) {
    if (p < to && p < keep_below_) {
      const uint64_t stop = std::min(to, keep_below_);
      out.push_back(Piece{Piece::kBase, p, stop - p, nullptr});
      p = stop;
    }
    if (p < to) {
      out.push_back(Piece{Piece::kZero, p, to - p, nullptr});
      p = to;
    }
  };
  auto e = extents_.upper_bound(offset);
  if (e != extents_.begin()) --e;
  for (; e != extents_.end() && e->first < end; ++e) {
    const uint64_t from = std::max(e->first, p);
    const uint64_t to = std::min(e->second, end);
    if (from >= to) continue;
    gap(from);
    NEMOFS_ASSIGN_OR_RETURN(std::string b, bytes_.Read(from, to - from));
    out.push_back(Piece{Piece::kStaged, from, to - from,
                        std::make_shared<const std::string>(std::move(b))});
    p = to;
  }
  gap(end);
  return out;
}

Result<StagedEdit::Changes> StagedEdit::Snapshot() {
  if (bytes_.size() < size_) NEMOFS_RETURN_IF_ERROR(bytes_.Resize(size_));  // zeros to the end
  Changes c;
  NEMOFS_ASSIGN_OR_RETURN(c.snapshot, bytes_.Snapshot());
  for (const auto& [at, stop] : extents_) {
    if (at >= keep_below_) break;
    c.ranges.emplace_back(at, c.snapshot.bytes.substr(at, std::min(stop, keep_below_) - at));
  }
  if (keep_below_ < size_) {
    c.ranges.emplace_back(keep_below_, c.snapshot.bytes.substr(keep_below_, size_ - keep_below_));
  }
  return c;
}

Result<std::string> StagedEdit::Materialize(std::string_view base) const {
  std::string out(size_, '\0');
  const uint64_t keep = std::min<uint64_t>(keep_below_, base.size());
  std::copy(base.begin(), base.begin() + static_cast<ptrdiff_t>(keep), out.begin());
  for (const auto& [at, stop] : extents_) {
    NEMOFS_ASSIGN_OR_RETURN(std::string b, bytes_.Read(at, stop - at));
    std::copy(b.begin(), b.end(), out.begin() + static_cast<ptrdiff_t>(at));
  }
  return out;
}

}  // namespace nemofs::tree
