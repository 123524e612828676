// tensors/, optimizer/, ranks/, index.json, checkpoint.json and
// model.safetensors through real mounts, checked by numpy and torch
// (tests/mount/check_tensors.py) against expected.json computed by torch.
#include <gtest/gtest.h>

#include <filesystem>

#include "mount_harness.h"
#include "test_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

std::string Checker() { return std::string(NEMOFS_TEST_DATA) + "/../mount/check_tensors.py"; }

struct Case {
  std::string fixture;  // relative to tests/data (the key of expected.json)
  std::string
      torch_member;  // tar member to compare with torch.load ("" = the file itself, "-" = none)
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.fixture; }

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return TestName(info.param.fixture);
}

class TensorMount : public ::testing::TestWithParam<Case> {};

TEST_P(TensorMount, EveryTensorMatchesTorch) {
  const Case& c = GetParam();
  std::string src = TestData(c.fixture);
  TempDir dir;
  std::string torch_arg;
  if (c.torch_member.empty()) {
    torch_arg = " --torch " + Q(src);
  } else if (c.torch_member != "-") {
    auto r = Sh("tar -xOf " + Q(src) + " " + Q(c.torch_member) + " > " + Q(dir.Join("w.ckpt")));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    torch_arg = " --torch " + Q(dir.Join("w.ckpt"));
  }
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  auto r =
      Sh("/usr/bin/python3 " + Q(Checker()) + " " + Q(m->path()) + " " + Q(c.fixture) + torch_arg,
         300);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find(", 0 failures"), std::string::npos) << r.out;
  m->Unmount();
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, TensorMount,
    ::testing::Values(Case{"torch/dtypes.pt", ""}, Case{"torch/dtypes_legacy.pt", ""},
                      Case{"torch/dtypes_p4.pt", ""}, Case{"torch/lightning.ckpt", ""},
                      Case{"tiny_gpt.nemo", "./model_weights.ckpt"},
                      Case{"tiny_gpt_gz.nemo", "./model_weights.ckpt"},
                      Case{"tiny_gpt_tp2.nemo", "-"}, Case{"torch/tiny_gpt_tp2pp2.nemo", "-"},
                      Case{"torch/tiny_gpt_swiglu_tp2.nemo", "-"},
                      Case{"torch/megatron_lm_tp2", "-"}),
    CaseName);

class RealNemoTensors : public ::testing::TestWithParam<std::string> {};

TEST_P(RealNemoTensors, EveryTensorByteIdenticalToTorchLoad) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  std::string src = RealFixture(GetParam());
  TempDir dir;
  auto r = Sh("tar -xOf " + Q(src) + " ./model_weights.ckpt > " + Q(dir.Join("w.ckpt")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  r = Sh("/usr/bin/python3 " + Q(Checker()) + " " + Q(m->path()) + " real --torch " +
             Q(dir.Join("w.ckpt")),
         300);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("compared 8"), std::string::npos) << r.out;  // 84 or 85 tensors
  m->Unmount();
}

INSTANTIATE_TEST_SUITE_P(Real, RealNemoTensors,
                         ::testing::Values("nemo-tar/vad_marblenet.nemo",
                                           "nemo-tar/vad_telephony_marblenet.nemo",
                                           "nemo-tar/vad_multilingual_marblenet.nemo"));

TEST(TensorMountExtras, LegacyRealFileAndOddOffsets) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  std::string src = RealFixture("legacy-torch-save/JasperDecoderForCTC-STEP-243800.pt");
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  auto r = Sh("/usr/bin/python3 " + Q(Checker()) + " " + Q(m->path()) + " real --torch " + Q(src));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("compared 2 tensors"), std::string::npos) << r.out;
  // dd at odd offsets and sizes equals the same slice of nemofs cat.
  r = Sh("f=" + Q(m->path() + "/tensors/decoder_layers.0.weight") +
         "; for spec in '1 7' '13 1000' '4095 4099' '100000 50000'; do set -- $spec; "
         "cmp <(dd if=\"$f\" bs=1 skip=$1 count=$2 2>/dev/null) <(" +
         Q(NemofsBinary()) + " cat " + Q(src) +
         " tensors/decoder_layers.0.weight | tail -c +$(($1+1)) | head -c $2) "
         "|| exit 1; done");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  m->Unmount();
}

TEST(TensorMountExtras, CheckpointJsonAndXattrs) {
  std::string src = TestData("torch/lightning.ckpt");
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && /usr/bin/python3 -c 'import json; c=json.load(open(\"checkpoint.json\")); "
              "print(c[\"global_step\"], c[\"pytorch-lightning_version\"], "
              "c[\"hyper_parameters\"][\"model\"][\"hidden\"], "
              "c[\"state_dict\"][\"layer.0.weight\"][\"tensor\"], "
              "c[\"optimizer_states\"][0][\"state\"][\"0\"][\"exp_avg\"][\"tensor\"])'"
              " && getfattr --only-values -n user.nemofs.shape tensors/layer.0.weight && echo"
              " && ls tensors | grep -c '%2F'");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("tensors/layer.0.weight optimizer/0.state.0.exp_avg"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("64"), std::string::npos) << r.out;
  m->Unmount();
}

TEST(TensorMountExtras, WritesToTensorsAreRefused) {
  auto m = Mount::Start(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && dd if=/dev/zero of=tensors/model.output_layer.weight "
              "bs=1 count=1 conv=notrunc");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << r.err;
  m->Unmount();
}

}  // namespace
}  // namespace nemofs::testing
