// tensors/, optimizer/, ranks/, index.json, checkpoint.json and
// model.safetensors through real mounts, checked by numpy and torch
// (tests/mount/check_tensors.py) against expected.json computed by torch.
#include <gtest/gtest.h>
#include <signal.h>

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
                      Case{"torch/complex.pt", ""},
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

// ---- model.safetensors drops nothing silently (issue 16 §6) ----------------

// __metadata__["nemofs.omitted"] of <mnt>/model.safetensors and the header's
// tensor names with their dtypes, parsed by Python's json module (no
// safetensors package): "omitted <json>\n" then "<key> <dtype>" per tensor.
std::string ParseHeader(const std::string& file) {
  auto r = Sh("/usr/bin/python3 -c 'import json,struct,sys\n"
              "raw=open(sys.argv[1],\"rb\").read()\n"
              "(n,)=struct.unpack(\"<Q\",raw[:8])\n"
              "h=json.loads(raw[8:8+n])\n"
              "m=h.pop(\"__metadata__\")\n"
              "print(\"omitted\", json.dumps(json.loads(m[\"nemofs.omitted\"]), sort_keys=True) "
              "if \"nemofs.omitted\" in m else \"-\")\n"
              "[print(k, v[\"dtype\"]) for k, v in h.items()]' " +
              Q(file));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

TEST(SafetensorsOmitted, ComplexTensorIsNamedInHeaderInfoLsAndMountWarning) {
  const std::string src = TestData("torch/complex.pt");
  TempDir dir;
  std::string mnt = dir.Join("mnt");
  std::filesystem::create_directory(mnt);
  // The daemonizing mount prints its warnings before it returns.
  auto r = Sh(Q(NemofsBinary()) + " mount " + Q(src) + " " + Q(mnt) + " -o ro --log-file " +
              Q(dir.Join("log")) + " --cache-dir " + Q(dir.Join("c")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(IsMounted(mnt));
  pid_t pid = std::atoi(Sh("getfattr --only-values -n user.nemofs.pid " + Q(mnt)).out.c_str());
  EXPECT_NE(r.err.find("warning: model.safetensors leaves out filter.spectrum: complex128"),
            std::string::npos)
      << r.err;
  EXPECT_NE(ReadFile(dir.Join("log")).find("model.safetensors leaves out filter.spectrum"),
            std::string::npos);
  std::string header = ParseHeader(mnt + "/model.safetensors");
  EXPECT_EQ(header,
            "omitted {\"filter.spectrum\": \"complex128: safetensors has no such dtype\"}\n"
            "proj.weight F32\nrope.freqs_cis C64\nfilter.scale F64\n");
  // tensors/ still has all four.
  auto ls = Sh("ls " + Q(mnt + "/tensors"));
  EXPECT_EQ(ls.out, "filter.scale\nfilter.spectrum\nproj.weight\nrope.freqs_cis\n");
  auto um = Sh(Q(NemofsBinary()) + " umount " + Q(mnt));
  EXPECT_EQ(um.exit_code, 0) << um.err;
  if (IsMounted(mnt)) {  // cleanup on failure: only the daemon this test started
    Sh("fusermount3 -u " + Q(mnt));
    if (pid > 0) ::kill(pid, SIGKILL);
  }

  r = Sh(Q(NemofsBinary()) + " info --json " + Q(src) +
         " | /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin); "
         "print(json.dumps(j[\"safetensors_omitted\"]), j[\"warnings\"])'");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "{\"filter.spectrum\": \"complex128: safetensors has no such dtype\"} []\n");
  r = Sh(Q(NemofsBinary()) + " info " + Q(src));
  EXPECT_NE(r.out.find("omitted:     model.safetensors leaves out filter.spectrum: complex128: "
                       "safetensors has no such dtype\n"),
            std::string::npos)
      << r.out;
  r = Sh(Q(NemofsBinary()) + " ls " + Q(src) + " | tail -n 2");
  EXPECT_EQ(r.out,
            "4 tensors, 224 bytes\n"
            "model.safetensors leaves out 1: filter.spectrum (`nemofs info` says why)\n");
  r = Sh(Q(NemofsBinary()) + " ls --json " + Q(src) + " 2>&1 >/dev/null");
  EXPECT_EQ(r.out, "nemofs: model.safetensors leaves out 1: filter.spectrum (`nemofs info` says why)\n");
}

TEST(SafetensorsOmitted, OptimizerStateIsNamedAndCleanCheckpointsSayNothing) {
  // lightning.ckpt: 12 optimizer tensors (Adam over 4 parameters: step,
  // exp_avg, exp_avg_sq), counted by `info`.
  const std::string ckpt = TestData("torch/lightning.ckpt");
  auto r = Sh(Q(NemofsBinary()) + " info --json " + Q(ckpt) +
              " | /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin); "
              "print(j[\"optimizer\"][\"count\"], json.dumps(j[\"safetensors_omitted\"]))'");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "12 {\"optimizer/\": \"12 optimizer tensors: not model weights\"}\n");
  auto m = Mount::Start(ckpt);
  ASSERT_TRUE(m);
  std::string header = ParseHeader(m->path() + "/model.safetensors");
  EXPECT_EQ(header.rfind("omitted {\"optimizer/\": \"12 optimizer tensors: not model weights\"}\n", 0),
            0u)
      << header;
  EXPECT_NE(header.find("\nout_scale F32\n"), std::string::npos) << header;
  m->Unmount();
  // Everything of tiny_gpt.nemo fits: no note anywhere, no nemofs.omitted key.
  const std::string nemo = TestData("tiny_gpt.nemo");
  r = Sh(Q(NemofsBinary()) + " ls " + Q(nemo) + " 2>&1; " + Q(NemofsBinary()) + " info " + Q(nemo));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("leaves out"), std::string::npos) << r.out;
  auto m2 = Mount::Start(nemo);
  ASSERT_TRUE(m2);
  EXPECT_EQ(ParseHeader(m2->path() + "/model.safetensors").substr(0, 10), "omitted -\n");
  m2->Unmount();
}

}  // namespace
}  // namespace nemofs::testing
