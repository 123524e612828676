// A read plan: the list of byte pieces that answer one read of a file of the
// tree, in order. Pieces either point into an open file descriptor (so the
// FUSE adapter can splice them without copying) or into memory kept alive by
// the plan. Building a plan never copies checkpoint bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nemofs/result.h"

namespace nemofs {

struct ReadPiece {
  int fd = -1;  // >= 0: `length` bytes at `offset` of this descriptor
  uint64_t offset = 0;
  uint64_t length = 0;
  const char* data = nullptr;  // fd < 0: `length` bytes here
};

struct ReadPlan {
  std::vector<ReadPiece> pieces;
  // Owners of the memory that `data` pieces point into.
  std::vector<std::shared_ptr<const void>> keepalive;

  uint64_t size() const {
    uint64_t n = 0;
    for (const auto& p : pieces) n += p.length;
    return n;
  }

  void AddFd(int fd, uint64_t offset, uint64_t length) {
    if (length == 0) return;
    if (!pieces.empty()) {
      auto& last = pieces.back();
      if (last.fd == fd && fd >= 0 && last.offset + last.length == offset) {
        last.length += length;  // coalesce adjacent pieces of one file
        return;
      }
    }
    pieces.push_back(ReadPiece{fd, offset, length, nullptr});
  }
  void AddMemory(const char* data, uint64_t length) {
    if (length == 0) return;
    pieces.push_back(ReadPiece{-1, 0, length, data});
  }
  // Appends another plan's pieces (and what keeps them alive).
  void Append(const ReadPlan& part) {
    for (const auto& piece : part.pieces) {
      if (piece.fd >= 0) {
        AddFd(piece.fd, piece.offset, piece.length);
      } else {
        AddMemory(piece.data, piece.length);
      }
    }
    keepalive.insert(keepalive.end(), part.keepalive.begin(), part.keepalive.end());
  }
};

// Executes a plan into `out` (plan.size() bytes) with pread; for the CLI and
// tests. Fails with EIO when a descriptor returns fewer bytes than planned.
Status ExecuteReadPlan(const ReadPlan& plan, char* out);

}  // namespace nemofs
