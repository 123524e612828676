// Distributed checkpoints through the core: the real NeMo 2 / Megatron-LM
// torch_dist metadata and the real Megatron zarr checkpoint.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "nemofs/filesystem.h"
#include "test_util.h"

namespace nemofs {
namespace {

using testing::RealFixture;
using testing::TempDir;

std::string Shape(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

struct Listing {
  std::string checkpoint;
  std::string tsv;
};

void PrintTo(const Listing& l, std::ostream* os) { *os << l.checkpoint; }

class RealDistListing : public ::testing::TestWithParam<Listing> {};

// Keys, dtypes and global shapes equal the listings made from the real files.
TEST_P(RealDistListing, MatchesTheReferenceListing) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  TempDir cache;
  auto fs = Filesystem::Open({RealFixture(GetParam().checkpoint), cache.path()});
  ASSERT_TRUE(fs.ok()) << fs.error().message();
  std::set<std::string> ours;
  for (const auto& t : (*fs)->ListTensors()) {
    ours.insert(t.key + "\t" + t.dtype + "\t" + Shape(t.shape));
  }
  std::set<std::string> want;
  std::ifstream in(RealFixture("listings/" + GetParam().tsv));
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string name, dtype, shape;
    std::getline(f, name, '\t');
    std::getline(f, dtype, '\t');
    std::getline(f, shape, '\t');
    want.insert(name + "\t" + dtype + "\t" + shape);
  }
  EXPECT_FALSE(want.empty());
  EXPECT_EQ(ours, want);
}

INSTANTIATE_TEST_SUITE_P(
    Real, RealDistListing,
    ::testing::Values(Listing{"nemo2-dcp-metadata-only/esm2_model_checkpoint",
                              "nemo2-dcp-metadata-only__esm2.tsv"},
                      Listing{
                          "megatron-torch_dist-metadata-only/deepseek_mtp_dummy_ckpt/checkpoints",
                          "megatron-torch_dist-metadata-only__deepseek_mtp.tsv"}),
    [](const ::testing::TestParamInfo<Listing>& info) {
      return testing::TestName(info.param.tsv);
    });

TEST(RealDist, ReadsOfAbsentShardsFailWithEioNamingTheFile) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  TempDir cache;
  auto fs = Filesystem::Open(
      {RealFixture("nemo2-dcp-metadata-only/esm2_model_checkpoint"), cache.path()});
  ASSERT_TRUE(fs.ok()) << fs.error().message();
  auto ino = (*fs)->Resolve("tensors/module.embedding.word_embeddings.weight");
  ASSERT_TRUE(ino.ok());
  auto plan = (*fs)->Read(*ino, 0, 4096);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.error().code(), EIO);
  EXPECT_NE(plan.error().message().find(".distcp is missing"), std::string::npos)
      << plan.error().message();
  // The rest of the mount works.
  EXPECT_TRUE((*fs)->Resolve("config.yaml").ok());
  EXPECT_NE((*fs)->info().warnings.size(), 0u);
}

TEST(RealDist, ZarrTensorsEqualTheChunksNumpyReads) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  std::string src =
      RealFixture("megatron-zarr/megatron_gpt--val_loss=10.86-step=2-consumed_samples=16.0");
  TempDir dir;
  auto fs = Filesystem::Open({src, dir.Join("cache")});
  ASSERT_TRUE(fs.ok()) << fs.error().message();
  int n = 0;
  std::filesystem::create_directory(dir.Join("out"));
  for (const auto& t : (*fs)->ListTensors()) {
    auto ino = (*fs)->Resolve(t.path);
    ASSERT_TRUE(ino.ok());
    auto plan = (*fs)->Read(*ino, 0, t.nbytes);
    ASSERT_TRUE(plan.ok()) << plan.error().message();
    std::string bytes(plan->size(), '\0');
    ASSERT_TRUE(ExecuteReadPlan(*plan, bytes.data()).ok());
    testing::WriteFile(dir.Join("out/" + t.key), bytes);
    ++n;
  }
  EXPECT_EQ(n, 34);
  // numpy assembles every array from its raw chunk files (the zarr layout).
  auto r = testing::Sh(
      "/usr/bin/python3 -c 'import sys, os, json, itertools, numpy as np\n"
      "src, out = sys.argv[1], sys.argv[2]\n"
      "bad = 0\n"
      "for key in sorted(os.listdir(out)):\n"
      "    m = json.load(open(os.path.join(src, key, \".zarray\")))\n"
      "    shape, ch = m[\"shape\"], m[\"chunks\"]\n"
      "    a = np.zeros(shape, dtype=m[\"dtype\"])\n"
      "    for idx in itertools.product(*[range(-(-s // c)) for s, c in zip(shape, ch)]):\n"
      "        name = \".\".join(map(str, idx)) if shape else \"0\"\n"
      "        blk = np.fromfile(os.path.join(src, key, name), dtype=m[\"dtype\"]).reshape(ch)\n"
      "        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, ch, shape))\n"
      "        a[sl] = blk[tuple(slice(0, x.stop - x.start) for x in sl)]\n"
      "    bad += open(os.path.join(out, key), \"rb\").read() != a.tobytes()\n"
      "print(\"differ:\", bad)' " +
      testing::ShellQuote(src) + " " + testing::ShellQuote(dir.Join("out")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "differ: 0\n");
}

}  // namespace
}  // namespace nemofs
