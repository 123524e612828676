// Distributed checkpoints through real mounts: every stitched tensor against
// the bytes torch computed from the unsharded originals (check_dist.py).
#include <gtest/gtest.h>

#include "mount_harness.h"
#include "test_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

class DistMount : public ::testing::TestWithParam<std::string> {};

TEST_P(DistMount, StitchedTensorsEqualTheOriginals) {
  std::string fixture = GetParam();
  auto m = Mount::Start(TestData(fixture));
  ASSERT_TRUE(m);
  auto r = Sh("/usr/bin/python3 " + Q(std::string(NEMOFS_TEST_DATA) + "/../mount/check_dist.py") +
                  " " + Q(m->path()) + " " + Q(fixture),
              300);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find(", 0 failures"), std::string::npos) << r.out;
  // cat and dd agree with nemofs cat (the mount's oracle) on the first tensor.
  r = Sh(
      "cd " + Q(m->path()) + " && f=$(ls tensors | head -1) && cmp tensors/$f <(" +
      Q(NemofsBinary()) + " cat " + Q(TestData(fixture)) +
      " tensors/$f) && "
      "cmp <(dd if=tensors/$f bs=7 skip=3 count=11 2>/dev/null) <(cat tensors/$f | tail -c +22 | "
      "head -c 77)");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  m->Unmount();
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DistMount,
                         ::testing::Values("dist/torch_dist_v23", "dist/torch_dist_v22",
                                           "dist/mcore015_flattened", "dist/missing_shard",
                                           "dist/zarr", "dist/zarr_zstd",
                                           "dist/model_weights_dist.nemo", "dist/nemo2"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return TestName(info.param);
                         });

TEST(DistMountErrors, MissingShardAndUnsupportedCodecAreNamed) {
  auto m = Mount::Start(TestData("dist/missing_shard"));
  ASSERT_TRUE(m);
  auto r = Sh("cat " + Q(m->path() + "/tensors/model.output_layer.weight") + " > /dev/null");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Input/output error"), std::string::npos) << r.err;
  // The untouched tensors still read.
  r = Sh("cat " + Q(m->path() + "/tensors/model.embedding.word_embeddings.weight") + " | wc -c");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out, "8192\n");
  m->Unmount();
  EXPECT_NE(m->Log().find("__1_1.distcp is missing"), std::string::npos) << m->Log();

  r = Sh(Q(NemofsBinary()) + " info " + Q(TestData("dist/zarr_zstd")));
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("compressor 'blosc' is not supported"), std::string::npos) << r.out;
  r = Sh(Q(NemofsBinary()) + " verify -q " + Q(TestData("dist/missing_shard")));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find("__1_1.distcp is missing"), std::string::npos) << r.out;
}

struct HostileDist {
  std::string name;
  std::string key;      // the tensor the defect affects ("" = the whole checkpoint)
  std::string message;  // expected in the problem line
};

void PrintTo(const HostileDist& h, std::ostream* os) { *os << h.name; }

class DistHostile : public ::testing::TestWithParam<HostileDist> {};

// Each defect is named (file and key) by verify, which exits 1; nothing crashes;
// the other tensors still read through a mount.
TEST_P(DistHostile, VerifyNamesTheKeyAndTheRestStillReads) {
  const HostileDist& h = GetParam();
  std::string src = TestData("dist/hostile/" + h.name);
  if (h.key.empty()) {
    auto r = Sh(Q(NemofsBinary()) + " info " + Q(src));
    EXPECT_EQ(r.exit_code, 3) << r.out << r.err;
    EXPECT_NE(r.err.find(h.message), std::string::npos) << r.err;
    return;
  }
  auto r = Sh(Q(NemofsBinary()) + " verify -q " + Q(src));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.out.find(h.key), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(h.message), std::string::npos) << r.out;
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  r = Sh("cd " + Q(m->path()) + "/tensors && n=0 && for f in *; do [ \"$f\" = " + Q(h.key) +
         " ] && continue; cat \"$f\" > /dev/null || exit 1; n=$((n+1)); done; echo $n");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_GE(std::atoi(r.out.c_str()), 3) << r.out;
  m->Unmount();
}

INSTANTIATE_TEST_SUITE_P(
    Defects, DistHostile,
    ::testing::Values(
        HostileDist{"overlap", "model.decoder.layers.0.self_attention.linear_proj.weight",
                    "overlap"},
        HostileDist{"hole", "model.decoder.layers.0.self_attention.linear_qkv.bias", "holes"},
        HostileDist{"exceed", "model.embedding.word_embeddings.weight", "exceeds shape"},
        HostileDist{"item_outside", "model.output_layer.weight", "lies outside"},
        HostileDist{"unknown_backend", "", "unknown sharded_backend 'tensorstore9'"},
        HostileDist{"zarr_bad_shape", "model.embedding.position_ids", "shape and chunks disagree"},
        HostileDist{"zarr_bad_dtype", "model.decoder.layers.self_attention.linear_qkv.weight",
                    "dtype '<q9' is not supported"},
        HostileDist{"zarr_truncated_chunk", "model.decoder.layers.mlp.linear_fc2.weight",
                    "has 512 bytes, expected 1024"}),
    [](const ::testing::TestParamInfo<HostileDist>& info) { return TestName(info.param.name); });

TEST(DistMountJson, CommonStateAndShardedObjectsInCheckpointJson) {
  for (const std::string fixture : {"dist/torch_dist_v23", "dist/zarr"}) {
    auto m = Mount::Start(TestData(fixture));
    ASSERT_TRUE(m);
    auto r =
        Sh("/usr/bin/python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); "
           "print(c[\"common\"][\"global_step\"], sorted(c[\"sharded_objects\"])[0])' " +
           Q(m->path() + "/checkpoint.json"));
    EXPECT_EQ(r.exit_code, 0) << fixture << r.err;
    EXPECT_NE(r.out.find("_extra_state/shard_0_1"), std::string::npos) << fixture << r.out;
    m->Unmount();
  }
}

}  // namespace
}  // namespace nemofs::testing
