// The tensor catalog and per-rank merge rules, on generated fixtures and
// hostile torch files: bad tensors are named and skipped, the rest stays.
#include "checkpoint/catalog.h"

#include <gtest/gtest.h>

#include <set>

#include <filesystem>

#include "checkpoint/merge.h"
#include "source/source.h"
#include "test_util.h"

namespace nemofs::checkpoint {
namespace {

using testing::TempDir;
using testing::TestData;

struct Opened {
  std::unique_ptr<source::Source> src;
  Layout layout;
  Catalog cat;
};

Opened Open(const std::string& path) {
  Opened o;
  auto src = source::OpenSource(path, {});
  EXPECT_TRUE(src.ok()) << src.error().message();
  o.src = std::move(src).value();
  auto layout = Recognize(*o.src);
  EXPECT_TRUE(layout.ok()) << layout.error().message();
  o.layout = *layout;
  o.cat = BuildCatalog(*o.src, o.layout);
  return o;
}

const Tensor* FindTensor(const std::vector<Tensor>& ts, const std::string& key) {
  for (const auto& t : ts) {
    if (t.key == key) return &t;
  }
  return nullptr;
}

std::string AllWarnings(const Catalog& c) {
  std::string s;
  for (const auto& w : c.warnings) s += w + "\n";
  return s;
}

TEST(Catalog, LightningRoles) {
  Opened o = Open(TestData("torch/lightning.ckpt"));
  EXPECT_NE(FindTensor(o.cat.tensors, "layer.0.weight"), nullptr);
  EXPECT_NE(FindTensor(o.cat.optimizer, "0.state.0.exp_avg"), nullptr);
  EXPECT_EQ(FindTensor(o.cat.tensors, "state_dict.layer.0.weight"), nullptr);
  EXPECT_NE(o.cat.checkpoint_json.find("\"global_step\""), std::string::npos);
  EXPECT_TRUE(o.cat.ranks.empty());
}

TEST(Catalog, ViewsKeepTheirStrides) {
  Opened o = Open(TestData("torch/dtypes.pt"));
  const Tensor* t = FindTensor(o.cat.tensors, "view.transpose");
  ASSERT_NE(t, nullptr);
  ASSERT_EQ(t->chunks.size(), 1u);
  EXPECT_EQ(t->chunks[0].strides, (std::vector<int64_t>{1, 6}));
  const Tensor* e = FindTensor(o.cat.tensors, "view.expand");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->chunks[0].strides, (std::vector<int64_t>{0, 1}));
  const Tensor* s = FindTensor(o.cat.tensors, "scalar.f32");
  ASSERT_NE(s, nullptr);
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->nbytes(), 4u);
  const Tensor* empty = FindTensor(o.cat.tensors, "empty.3d");
  ASSERT_NE(empty, nullptr);
  EXPECT_EQ(empty->nbytes(), 0u);
}

TEST(Catalog, PerRankMergeTp2Pp2) {
  Opened o = Open(TestData("torch/tiny_gpt_tp2pp2.nemo"));
  ASSERT_EQ(o.cat.ranks.size(), 4u);
  const Tensor* fc2 = FindTensor(o.cat.tensors, "model.decoder.layers.3.mlp.linear_fc2.weight");
  ASSERT_NE(fc2, nullptr);
  EXPECT_EQ(fc2->shape, (std::vector<int64_t>{64, 256}));  // row-parallel: dim 1 doubled
  ASSERT_EQ(fc2->chunks.size(), 2u);
  EXPECT_EQ(fc2->chunks[1].offsets, (std::vector<int64_t>{0, 128}));
  EXPECT_EQ(FindTensor(o.cat.tensors, "model.decoder.layers.4.mlp.linear_fc2.weight"), nullptr);
  EXPECT_TRUE(
      o.cat.unmerged.count("model.decoder.layers.0.self_attention.linear_proj._extra_state"));
}

TEST(Catalog, SwigluFc1IsDeinterleaved) {
  Opened o = Open(TestData("torch/tiny_gpt_swiglu_tp2.nemo"));
  const Tensor* fc1 = FindTensor(o.cat.tensors, "model.decoder.layers.0.mlp.linear_fc1.weight");
  ASSERT_NE(fc1, nullptr);
  ASSERT_EQ(fc1->chunks.size(), 4u);  // gate_0, up_0, gate_1, up_1
  int64_t rows = fc1->shape[0];
  EXPECT_EQ(fc1->chunks[0].offsets[0], 0);
  EXPECT_EQ(fc1->chunks[1].offsets[0], rows / 2);
  EXPECT_EQ(fc1->chunks[2].offsets[0], rows / 4);
  EXPECT_EQ(fc1->chunks[3].offsets[0], rows / 2 + rows / 4);
}

// ---- hostile torch files ----------------------------------------------------

TEST(CatalogHostile, EvilReduceStaysInertAndIsReported) {
  std::filesystem::remove("/tmp/nemofs-pwned-marker");
  Opened o = Open(TestData("torch/hostile/evil_reduce.pt"));
  EXPECT_FALSE(std::filesystem::exists("/tmp/nemofs-pwned-marker"));
  EXPECT_NE(AllWarnings(o.cat).find("calls posix.system"), std::string::npos) << AllWarnings(o.cat);
  EXPECT_EQ(o.cat.tensors.size(), 1u);
  EXPECT_NE(o.cat.checkpoint_json.find("posix.system"), std::string::npos);
}

struct Hostile {
  std::string file;
  std::string message;  // expected in an error or warning
  bool whole_file;      // the file cannot be read at all
};

class CatalogHostileFiles : public ::testing::TestWithParam<Hostile> {};

void PrintTo(const Hostile& h, std::ostream* os) { *os << h.file; }

TEST_P(CatalogHostileFiles, ClearErrorNamingFileAndKey) {
  const Hostile& h = GetParam();
  std::string path = TestData("torch/hostile/" + h.file);
  Opened o = Open(path);
  std::string all = AllWarnings(o.cat);
  EXPECT_NE(all.find(path), std::string::npos) << all;
  EXPECT_NE(all.find(h.message), std::string::npos) << all;
  EXPECT_EQ(o.cat.errors.empty(), !h.whole_file) << all;
}

INSTANTIATE_TEST_SUITE_P(
    Files, CatalogHostileFiles,
    ::testing::Values(
        Hostile{"zero_datapkl.pt", "data.pkl is empty", true},
        Hostile{"truncated_datapkl.pt", "unexpected end", true},
        Hostile{"cd_outside.pt", "central directory", true},
        Hostile{"missing_storage.pt", "tensor weight is not shown: storage record", false},
        Hostile{"short_storage.pt",
                "tensor weight is not shown: storage record data/0 has 40 bytes", false},
        Hostile{"negative_stride.pt", "tensor w is not shown: negative size or stride", false},
        Hostile{"overflow_size.pt", "tensor w is not shown: element count overflows", false}),
    [](const ::testing::TestParamInfo<Hostile>& info) {
      return testing::TestName(info.param.file);
    });

TEST(CatalogHostile, DeepNestingAndHugeMemoDoNotCrash) {
  for (const char* f : {"deep_nesting.pt", "huge_memo.pt", "sparse_memo.pt"}) {
    Opened o = Open(TestData(std::string("torch/hostile/") + f));
    EXPECT_GE(o.cat.tensors.size() + o.cat.errors.size(), 1u) << f;
  }
}

// ---- merge rules without files ------------------------------------------------

Tensor Shard(const std::string& key, std::vector<int64_t> shape, uint64_t at) {
  Tensor t;
  t.key = key;
  t.dtype = torch::DType::kFloat32;
  t.shape = shape;
  Chunk c;
  c.offsets.assign(shape.size(), 0);
  c.sizes = shape;
  c.blob = 0;
  c.byte_offset = at;
  t.chunks.push_back(c);
  return t;
}

TEST(Merge, UnevenPipelineIsRefused) {
  MergeConfig cfg{1, 2, 3, false};  // 3 layers over 2 stages
  auto r = MergeRanks({{0, 0, Shard("decoder.layers.0.x.weight", {4}, 0)},
                       {0, 1, Shard("decoder.layers.0.x.weight", {4}, 64)}},
                      cfg);
  EXPECT_TRUE(r.merged.empty());
  EXPECT_EQ(r.unmerged.size(), 2u);
}

TEST(Merge, UnknownNameWithTpIsRefusedButReplicatedAndSplitMerge) {
  MergeConfig cfg{2, 1, 2, false};
  auto r = MergeRanks({{0, 0, Shard("mystery.weight", {4}, 0)},
                       {1, 0, Shard("mystery.weight", {4}, 64)},
                       {0, 0, Shard("decoder.final_layernorm.weight", {8}, 128)},
                       {1, 0, Shard("decoder.final_layernorm.weight", {8}, 256)},
                       {0, 0, Shard("embedding.word_embeddings.weight", {3, 8}, 512)},
                       {1, 0, Shard("embedding.word_embeddings.weight", {3, 8}, 1024)}},
                      cfg);
  EXPECT_TRUE(r.unmerged.count("mystery.weight"));
  ASSERT_EQ(r.merged.size(), 2u);
  const Tensor* emb = FindTensor(r.merged, "embedding.word_embeddings.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->shape, (std::vector<int64_t>{6, 8}));
}

TEST(Merge, MissingTpRankIsRefused) {
  MergeConfig cfg{2, 1, 2, false};
  auto r = MergeRanks({{0, 0, Shard("embedding.word_embeddings.weight", {3, 8}, 0)}}, cfg);
  EXPECT_TRUE(r.merged.empty());
  EXPECT_NE(r.unmerged["embedding.word_embeddings.weight"].find("TP rank 1"), std::string::npos);
}

// SplitForRanks is MergeRanks undone: the slices it gives, stored as rank
// tensors, merge back to the global tensor, each merged chunk being the
// slice's range of the split dim.
TEST(Merge, SplitForRanksIsMergeUndone) {
  struct Case {
    std::string key;
    std::vector<int64_t> shape;
    MergeConfig cfg;
    size_t files;  // rank files that get a slice
  };
  const Case cases[] = {
      {"decoder.layers.3.self_attention.linear_qkv.weight", {12, 4}, {2, 2, 4, false}, 2},
      {"decoder.layers.1.self_attention.linear_proj.weight", {4, 6}, {2, 2, 4, false}, 2},
      {"decoder.layers.0.mlp.linear_fc1.weight", {8, 4}, {2, 1, 2, true}, 2},
      {"decoder.final_layernorm.weight", {8}, {2, 2, 4, false}, 4},
      {"output_layer.weight", {6, 2}, {3, 1, 2, false}, 3},
      {"anything.at.all", {5}, {1, 2, 2, false}, 2},
  };
  for (const auto& c : cases) {
    auto slices = SplitForRanks(c.key, c.shape, c.cfg, {});
    ASSERT_TRUE(slices.ok()) << c.key << ": " << slices.error().message();
    ASSERT_EQ(slices->size(), c.files) << c.key;
    std::vector<RankTensor> shards;
    uint64_t at = 0;
    for (const auto& s : *slices) {
      shards.push_back({s.tp, s.pp, Shard(s.key, s.shape, at)});
      at += 1 << 20;
    }
    MergeResult r = MergeRanks(shards, c.cfg);
    const Tensor* t = FindTensor(r.merged, c.key);
    ASSERT_NE(t, nullptr) << c.key << (r.unmerged.empty() ? "" : ": " + r.unmerged.begin()->second);
    EXPECT_EQ(t->shape, c.shape) << c.key;
    // Merged chunks, from the first stage's slices, cover the same ranges.
    std::set<std::pair<int64_t, int64_t>> want, got;
    const int first = (*slices)[0].pp;
    for (const auto& s : *slices) {
      if (s.pp != first) continue;
      for (auto rg : s.ranges) want.insert(rg);
    }
    const size_t dim = (*slices)[0].dim;
    for (const auto& ch : t->chunks) {
      if (c.shape.empty()) break;
      got.emplace(ch.offsets[dim], ch.offsets[dim] + ch.sizes[dim]);
    }
    EXPECT_EQ(got, want) << c.key;
  }
  // Layer renumbering: global layer 3 of 4 over 2 stages is local 1 of stage 1.
  auto rk = RankKeyOf("decoder.layers.3.x.weight", {1, 2, 4, false});
  ASSERT_TRUE(rk.ok());
  EXPECT_EQ(rk->first, "decoder.layers.1.x.weight");
  EXPECT_EQ(rk->second, 1);
}

TEST(Merge, SplitForRanksRefusesWhatReadsCouldNotMergeBack) {
  auto msg = [](const std::string& key, std::vector<int64_t> shape, MergeConfig cfg) {
    auto r = SplitForRanks(key, shape, cfg, {});
    return r.ok() ? std::string("ok") : r.error().message();
  };
  EXPECT_NE(msg("mystery.weight", {4}, {2, 1, 2, false}).find("split is known"), std::string::npos);
  EXPECT_NE(msg("output_layer.weight", {5, 2}, {2, 1, 2, false}).find("evenly"), std::string::npos);
  EXPECT_NE(msg("decoder.layers.0.mlp.linear_fc1.weight", {6, 2}, {2, 1, 2, true}).find("SwiGLU"),
            std::string::npos);
  EXPECT_NE(msg("decoder.layers.7.x.layer_norm_weight", {4}, {1, 2, 4, false}).find("past"),
            std::string::npos);
  EXPECT_NE(msg("decoder.layers.0.x.layer_norm_weight", {4}, {1, 2, 3, false}).find("evenly"),
            std::string::npos);
  EXPECT_NE(msg("decoder.layers.0.self_attention.core_attention._extra_state", {4},
                {2, 1, 2, false}).find("_extra_state"),
            std::string::npos);
  EXPECT_NE(msg("decoder.layers.0.self_attention.linear_proj.weight", {4}, {2, 1, 2, false})
                .find("dims"),
            std::string::npos);
}

TEST(Tensor, ChunkValidation) {
  Tensor t = Shard("x", {4, 4}, 0);
  t.chunks[0].sizes = {2, 4};
  EXPECT_NE(ValidateChunks(t).error().message().find("holes"), std::string::npos);
  Chunk c = t.chunks[0];
  c.offsets = {1, 0};
  t.chunks.push_back(c);
  EXPECT_NE(ValidateChunks(t).error().message().find("overlap"), std::string::npos);
  t.chunks[1].offsets = {3, 0};
  EXPECT_NE(ValidateChunks(t).error().message().find("exceeds"), std::string::npos);
  t.chunks[1].offsets = {2, 0};
  EXPECT_TRUE(ValidateChunks(t).ok());
}

}  // namespace
}  // namespace nemofs::checkpoint

namespace nemofs::checkpoint {
namespace {

TEST(Catalog, KeyEscaping) {
  EXPECT_EQ(EscapeKey("a/b%c"), "a%2Fb%25c");
  EXPECT_EQ(EscapeKey("model.layers.0.weight"), "model.layers.0.weight");
  EXPECT_EQ(EscapeKey("."), "%2E");
  EXPECT_EQ(EscapeKey(".."), "%2E%2E");
  EXPECT_EQ(EscapeKey(""), "%00");
}

}  // namespace
}  // namespace nemofs::checkpoint

#include "nemofs/filesystem.h"

namespace nemofs::checkpoint {
namespace {

// Every tensor of the real NGC .nemo files, read through the core (no FUSE),
// equals what torch.load gives for the same key.
class RealNemoCatalog : public ::testing::TestWithParam<std::string> {};

TEST_P(RealNemoCatalog, EveryTensorByteIdenticalToTorchLoad) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  std::string src = testing::RealFixture(GetParam());
  TempDir dir;
  auto fs = Filesystem::Open({src, dir.Join("cache")});
  ASSERT_TRUE(fs.ok()) << fs.error().message();
  std::filesystem::create_directory(dir.Join("out"));
  int n = 0;
  for (const auto& t : (*fs)->ListTensors()) {
    auto ino = (*fs)->Resolve(t.path);
    ASSERT_TRUE(ino.ok()) << t.path;
    auto plan = (*fs)->Read(*ino, 0, t.nbytes);
    ASSERT_TRUE(plan.ok()) << plan.error().message();
    std::string bytes(plan->size(), '\0');
    ASSERT_TRUE(ExecuteReadPlan(*plan, bytes.data()).ok());
    ASSERT_EQ(bytes.size(), t.nbytes);
    testing::WriteFile(dir.Join("out/" + t.key), bytes);
    ++n;
  }
  EXPECT_GE(n, 84);
  auto r = testing::Sh(
      "tar -xOf " + testing::ShellQuote(src) + " ./model_weights.ckpt > " +
      testing::ShellQuote(dir.Join("w.ckpt")) +
      " && /usr/bin/python3 -c 'import sys, torch, numpy as np\n"
      "sd = torch.load(sys.argv[1], map_location=\"cpu\")\n"
      "bad = [k for k, t in sd.items() if open(sys.argv[2] + \"/\" + k, \"rb\").read() != "
      "t.contiguous().numpy().tobytes()]\n"
      "print(len(sd), \"tensors,\", len(bad), \"differ\", bad[:3])' " +
      testing::ShellQuote(dir.Join("w.ckpt")) + " " + testing::ShellQuote(dir.Join("out")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find(" 0 differ"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.rfind(std::to_string(n) + " tensors", 0), 0u) << r.out;
}

INSTANTIATE_TEST_SUITE_P(Real, RealNemoCatalog,
                         ::testing::Values("nemo-tar/vad_marblenet.nemo",
                                           "nemo-tar/vad_telephony_marblenet.nemo",
                                           "nemo-tar/vad_multilingual_marblenet.nemo"));

}  // namespace
}  // namespace nemofs::checkpoint
