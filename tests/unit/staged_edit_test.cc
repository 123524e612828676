// tree/staged_edit.h against a model (a plain string edited the same way):
// random writes and truncates over a base, in memory and spilled; every
// view of the edit (Pieces, Materialize, the commit's Snapshot ranges
// applied to the base) must be the model's bytes.
#include "tree/staged_edit.h"

#include <gtest/gtest.h>

#include <random>
#include <string>

#include "test_util.h"

namespace nemofs::tree {
namespace {

std::string FromPieces(const StagedEdit& e, std::string_view base, uint64_t offset, uint64_t n) {
  auto pieces = e.Pieces(offset, n);
  EXPECT_TRUE(pieces.ok());
  std::string out;
  uint64_t p = offset;
  for (const auto& piece : *pieces) {
    EXPECT_EQ(piece.offset, p) << "pieces are in order, without gaps";
    p += piece.length;
    switch (piece.kind) {
      case StagedEdit::Piece::kStaged:
        EXPECT_EQ(piece.bytes->size(), piece.length);
        out += *piece.bytes;
        break;
      case StagedEdit::Piece::kBase:
        EXPECT_LE(piece.offset + piece.length, base.size());
        out += base.substr(piece.offset, piece.length);
        break;
      case StagedEdit::Piece::kZero:
        out.append(piece.length, '\0');
        break;
    }
  }
  return out;
}

class StagedEditModel : public ::testing::TestWithParam<uint64_t> {};

TEST_P(StagedEditModel, EveryViewIsTheModelsBytes) {
  testing::TempDir dir;
  auto pool = std::make_shared<SpillPool>();
  pool->dir = dir.Join("spill");
  pool->file_above = GetParam();
  std::mt19937 rng(1234);
  for (int round = 0; round < 40; ++round) {
    std::string base(rng() % 3000, '\0');
    for (auto& c : base) c = static_cast<char>('a' + rng() % 26);
    StagedEdit e(pool, base.size());
    std::string model = base;
    for (int op = 0; op < 30; ++op) {
      const uint64_t r = rng() % 10;
      if (r < 7) {
        uint64_t at = rng() % (model.size() + 200);
        std::string data(1 + rng() % 400, static_cast<char>('A' + op % 26));
        ASSERT_TRUE(e.Write(at, data).ok());
        if (at + data.size() > model.size()) model.resize(at + data.size(), '\0');
        model.replace(at, data.size(), data);
      } else {
        uint64_t to = rng() % (model.size() + 300);
        ASSERT_TRUE(e.Truncate(to).ok());
        model.resize(to, '\0');
      }
      ASSERT_EQ(e.size(), model.size());
      uint64_t off = rng() % (model.size() + 1);
      uint64_t n = rng() % 1000;
      ASSERT_EQ(FromPieces(e, base, off, n), model.substr(off, n)) << "round " << round;
    }
    auto whole = e.Materialize(base);
    ASSERT_TRUE(whole.ok());
    ASSERT_EQ(*whole, model);
    ASSERT_EQ(FromPieces(e, base, 0, model.size()), model);
    auto changes = e.Snapshot();
    ASSERT_TRUE(changes.ok());
    std::string applied = base;
    applied.resize(model.size(), '\0');
    uint64_t last = 0;
    for (const auto& [at, bytes] : changes->ranges) {
      EXPECT_GE(at, last) << "ranges are in order and disjoint";
      last = at + bytes.size();
      applied.replace(at, bytes.size(), bytes);
    }
    // Bytes past the base's end that no range covers are the model's zeros.
    ASSERT_EQ(applied, model) << "round " << round;
    e.Reset(model.size());
    EXPECT_TRUE(e.empty_edit());
    EXPECT_EQ(FromPieces(e, model, 0, model.size()), model);
  }
}

INSTANTIATE_TEST_SUITE_P(MemoryAndSpilled, StagedEditModel, ::testing::Values(1ull << 20, 64ull));

}  // namespace
}  // namespace nemofs::tree
