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
