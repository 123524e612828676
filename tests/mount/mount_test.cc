// Real mounts driven by real tools: ls -R, find, stat, cat, cmp against
// tar -xOf, sha256sum, and the CLI's documented exit codes.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "mount_harness.h"
#include "test_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

// sha256 + size + mtime (seconds) of every file under `dir`, sorted by path.
std::string TreeDigest(const std::string& dir) {
  auto r = Sh("cd " + Q(dir) +
              " && find . -type f -printf '%P\\n' | LC_ALL=C sort | while IFS= read -r f; do "
              "printf '%s %s %s\\n' \"$(sha256sum < \"$f\" | cut -c1-64)\" \"$(stat -c '%s %Y' "
              "\"$f\")\" \"$f\"; done");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

// ---- tar sources: archive/ is exactly what tar -x produces -----------------

class TarMount : public ::testing::TestWithParam<std::string> {};

TEST_P(TarMount, ArchiveTreeEqualsTarExtraction) {
  std::string src = GetParam();
  if (src.find("real-fixtures") != std::string::npos) NEMOFS_REQUIRE_REAL_FIXTURES();
  TempDir extracted;
  auto r = Sh("tar -xf " + Q(src) + " -C " + Q(extracted.path()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  std::string digest = TreeDigest(m->path() + "/archive");
  EXPECT_FALSE(digest.empty());
  EXPECT_EQ(digest, TreeDigest(extracted.path()));

  // ls -R and find walk the whole tree; stat agrees with tar's sizes.
  r = Sh("ls -lR " + Q(m->path()) + " && find " + Q(m->path()) + " | wc -l");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("config.yaml"), std::string::npos);

  // config.yaml is the config member itself: same inode, same bytes.
  r = Sh("cd " + Q(m->path()) +
         " && test \"$(stat -c %i config.yaml)\" = \"$(stat -c %i archive/model_config.yaml)\""
         " && test \"$(stat -c %h config.yaml)\" = 2"
         " && cmp config.yaml <(tar -xOf " +
         Q(src) + " ./model_config.yaml)");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;

  // cp out of the mount, and nemofs cat, give the same bytes.
  r = Sh("cd " + Q(m->path()) +
         " && for f in config.yaml $(cd archive && find . -type f | sed 's|^|archive/|'); do "
         "cmp \"$f\" <(" +
         Q(NemofsBinary()) + " cat " + Q(src) + " \"$f\" --cache-dir " +
         Q(extracted.Join(".cache")) + ") || exit 1; done");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  m->Unmount();
}

TEST_P(TarMount, WritesAreRefusedWithEROFS) {
  std::string src = GetParam();
  if (src.find("real-fixtures") != std::string::npos) NEMOFS_REQUIRE_REAL_FIXTURES();
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  for (const std::string cmd :
       {"echo x >> config.yaml", "touch new_file", "rm config.yaml", "mkdir d", "mv config.yaml c2",
        "truncate -s 0 archive/model_config.yaml"}) {
    auto r = Sh("cd " + Q(m->path()) + " && " + cmd);
    EXPECT_NE(r.exit_code, 0) << cmd;
    EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << cmd << ": " << r.err;
  }
  m->Unmount();
}

INSTANTIATE_TEST_SUITE_P(
    Archives, TarMount,
    ::testing::Values(TestData("tiny_gpt.nemo"), TestData("tiny_gpt_gz.nemo"),
                      TestData("tiny_gpt_gnu.nemo"), TestData("tiny_gpt_tp2.nemo"),
                      RealFixture("nemo-tar/vad_marblenet.nemo"),
                      RealFixture("nemo-tar/vad_telephony_marblenet.nemo"),
                      RealFixture("nemo-tar/vad_multilingual_marblenet.nemo")));

TEST(TarMountTokenizer, NemoArtifactsAppearUnderTheirNames) {
  std::string src = TestData("tiny_gpt.nemo");
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) + "/tokenizer && ls | LC_ALL=C sort");
  ASSERT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out,
            "gpt2_bpe_tokenizer_legacy_sentencepiece_model_with_intentionally_very_long_file_name_"
            "to_force_pax_and_gnu_longlink.model\nmerges.txt\ntokenizer.model\nvocab.json\n");
  r = Sh("cd " + Q(m->path()) + " && cmp tokenizer/tokenizer.model <(tar -xOf " + Q(src) +
         " ./73a06e1aa17c45d28419c66d295163b8_tokenizer.model) && cp tokenizer/vocab.json " +
         Q(m->path() + "/../vocab.json") +
         " && /usr/bin/python3 -c 'import json,sys; "
         "print(len(json.load(open(sys.argv[1]))))' " +
         Q(m->path() + "/../vocab.json"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "128\n");
  m->Unmount();
}

// ---- directory and single-file sources ------------------------------------

struct DirCase {
  std::string path;
  std::string config;  // relative path of the config in the source, or ""
};

void PrintTo(const DirCase& c, std::ostream* os) { *os << c.path; }

class DirMount : public ::testing::TestWithParam<DirCase> {};

std::string DirCaseName(const ::testing::TestParamInfo<DirCase>& info) {
  return TestName(std::filesystem::path(info.param.path).filename().string());
}

TEST_P(DirMount, ArchiveTreeEqualsTheFolder) {
  const DirCase& c = GetParam();
  if (c.path.find("real-fixtures") != std::string::npos) NEMOFS_REQUIRE_REAL_FIXTURES();
  auto m = Mount::Start(c.path);
  ASSERT_TRUE(m);
  bool is_dir = std::filesystem::is_directory(c.path);
  if (is_dir) {
    EXPECT_EQ(TreeDigest(m->path() + "/archive"), TreeDigest(c.path));
  } else {
    auto name = std::filesystem::path(c.path).filename().string();
    auto r = Sh("cmp " + Q(c.path) + " " + Q(m->path() + "/archive/" + name));
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
  if (!c.config.empty()) {
    auto r = Sh("cmp " + Q(m->path() + "/config.yaml") + " " + Q(c.path + "/" + c.config));
    EXPECT_EQ(r.exit_code, 0) << r.err;
  } else {
    EXPECT_FALSE(std::filesystem::exists(m->path() + "/config.yaml"));
  }
  m->Unmount();
}

INSTANTIATE_TEST_SUITE_P(
    Folders, DirMount,
    ::testing::Values(
        DirCase{TestData("nemo2_tiny"), "context/model.yaml"},
        DirCase{TestData("nemo2_0_tiny"), "context/model.yaml"},
        DirCase{RealFixture("nemo2-dcp-metadata-only/esm2_model_checkpoint"), "context/model.yaml"},
        DirCase{
            RealFixture("megatron-torch_dist-metadata-only/deepseek_mtp_dummy_ckpt/checkpoints"),
            ""},
        DirCase{
            RealFixture("megatron-zarr/megatron_gpt--val_loss=10.86-step=2-consumed_samples=16.0"),
            ""},
        DirCase{RealFixture("legacy-torch-save/JasperDecoderForCTC-STEP-243800.pt"), ""}),
    DirCaseName);

TEST(DirMountTokenizer, Nemo2TokenizerFiles) {
  std::string src = TestData("nemo2_tiny");
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && ls tokenizer | LC_ALL=C sort && cmp tokenizer/tokenizer.json " +
              Q(src + "/context/nemo_tokenizer/tokenizer.json") +
              " && cmp tokenizer/tokenizer.model " + Q(src + "/context/tokenizer.model"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out,
            "special_tokens_map.json\ntokenizer.json\ntokenizer.model\ntokenizer_config.json\n");
  m->Unmount();
}

// ---- unsafe members are hidden and logged ---------------------------------

TEST(MountSafety, UnsafeMembersAreHiddenAndLogged) {
  TempDir dir;
  TarBuilder t;
  t.AddDir("./")
      .AddFile("./model_config.yaml", "a: 1\n")
      .AddFile("../evil", "x")
      .AddFile("/abs", "x")
      .AddSymlink("./escape", "../../etc/passwd")
      .AddSymlink("./inside", "model_config.yaml")
      .End();
  WriteFile(dir.Join("x.nemo"), t.bytes());
  auto m = Mount::Start(dir.Join("x.nemo"));
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              "/archive && ls -A | LC_ALL=C sort && readlink inside && cat inside");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "inside\nmodel_config.yaml\nmodel_config.yaml\na: 1\n");
  std::string log = m->Log();
  for (const char* name : {"'../evil'", "'/abs'", "'./escape'"}) {
    EXPECT_NE(log.find(std::string("hidden ") + name), std::string::npos) << name << "\n" << log;
  }
  m->Unmount();
}

// ---- concurrent readers -----------------------------------------------------

TEST(MountConcurrency, ParallelReadersSeeTheSameBytes) {
  std::string src = TestData("tiny_gpt_tp2.nemo");
  auto m = Mount::Start(src);
  ASSERT_TRUE(m);
  std::string f = m->path() + "/archive/mp_rank_01/model_weights.ckpt";
  auto r = Sh("want=$(tar -xOf " + Q(src) +
              " ./mp_rank_01/model_weights.ckpt | sha256sum); "
              "for i in $(seq 16); do (sha256sum < " +
              Q(f) +
              ") & done | sort | uniq -c | "
              "awk '{print $1}'; test \"$(sha256sum < " +
              Q(f) + ")\" = \"$want\"");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "16\n");
  m->Unmount();
}

// ---- the CLI: daemon mode, umount, exit codes, bad input --------------------

TEST(Cli, MountDaemonizesAndUmountWaitsForTheDaemon) {
  TempDir dir;
  std::string mnt = dir.Join("mnt");
  std::filesystem::create_directory(mnt);
  auto r = Sh(Q(NemofsBinary()) + " mount " + Q(TestData("tiny_gpt.nemo")) + " " + Q(mnt) +
              " --log-file " + Q(dir.Join("log")) + " --cache-dir " + Q(dir.Join("c")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The mount is ready when the command returns.
  ASSERT_TRUE(IsMounted(mnt));
  auto pid_r = Sh("getfattr --only-values -n user.nemofs.pid " + Q(mnt));
  pid_t pid = std::atoi(pid_r.out.c_str());
  auto ls = Sh("ls " + Q(mnt));
  EXPECT_EQ(
      ls.out,
      "archive\ncheckpoint.json\nconfig.yaml\nindex.json\nmodel.safetensors\nnpy\ntensors\ntokenizer\n");
  auto um = Sh(Q(NemofsBinary()) + " umount " + Q(mnt));
  EXPECT_EQ(um.exit_code, 0) << um.err;
  EXPECT_FALSE(IsMounted(mnt));
  if (pid > 0) {
    // Gone, or a zombie waiting for init to reap it: either way it has exited.
    bool running =
        ::kill(pid, 0) == 0 &&
        Sh("grep -q '^State:.*Z' /proc/" + std::to_string(pid) + "/status").exit_code != 0;
    EXPECT_FALSE(running) << "daemon " << pid << " still running after umount";
  } else {
    ADD_FAILURE() << "no pid xattr: " << pid_r.err;
  }
  if (IsMounted(mnt)) {  // cleanup on failure: only the daemon this test started
    Sh("fusermount3 -u " + Q(mnt));
    if (pid > 0) ::kill(pid, SIGKILL);
  }
}

struct BadInput {
  std::string name;
  std::string bytes;  // written to <tmp>/<name>; empty name -> a directory case
  int exit_code;
  std::string message;  // expected in the one-line error
};

std::vector<BadInput> BadInputs() {
  TarBuilder bad_sum;
  bad_sum.AddFile("./model_config.yaml", "a: 1\n")
      .AddHeader({"./x", '0', 1}, true)
      .AddData("x")
      .End();
  TarBuilder past_end;
  past_end.AddHeader({"./model_weights.ckpt", '0', 1 << 20}).AddData("short");
  TarBuilder pax;
  pax.AddPax("999 path=./x\n").AddFile("./model_config.yaml", "a: 1\n").End();
  TarBuilder no_ckpt;
  no_ckpt.AddFile("./readme.txt", "hello").End();
  std::string good = ReadFile(TestData("tiny_gpt.nemo"));
  return {
      {"empty.nemo", "", 3, "empty file"},
      {"truncated.nemo", good.substr(0, 1700), 3, "truncated tar header at offset 1536"},
      {"badsum.nemo", bad_sum.bytes(), 3, "bad checksum"},
      {"past_end.nemo", past_end.bytes(), 3, "bytes of data but the archive ends"},
      {"pax.nemo", pax.bytes(), 3, "malformed record"},
      {"text.nemo", "hello, I am not a checkpoint\n", 3, "not a checkpoint"},
      {"notckpt.tar", no_ckpt.bytes(), 3, "not a checkpoint"},
  };
}

TEST(Cli, BadInputGetsOneLineErrorAndExitCode) {
  for (const auto& bad : BadInputs()) {
    TempDir dir;
    std::string path = dir.Join(bad.name);
    WriteFile(path, bad.bytes);
    std::filesystem::create_directory(dir.Join("mnt"));
    for (const std::string cmd : {"mount", "info"}) {
      std::string line = Q(NemofsBinary()) + " " + cmd + " " + Q(path) +
                         (cmd == "mount" ? " " + Q(dir.Join("mnt")) : "") + " --cache-dir " +
                         Q(dir.Join("c"));
      auto r = Sh(line, 30);
      EXPECT_EQ(r.exit_code, bad.exit_code) << bad.name << " " << cmd << ": " << r.err;
      EXPECT_NE(r.err.find(path), std::string::npos) << bad.name << ": " << r.err;
      EXPECT_NE(r.err.find(bad.message), std::string::npos) << bad.name << ": " << r.err;
      EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << bad.name << ": " << r.err;
      EXPECT_FALSE(IsMounted(dir.Join("mnt")));
    }
  }
}

TEST(Cli, DirectoryThatIsNoCheckpoint) {
  TempDir dir;
  WriteFile(dir.Join("notes.txt"), "x");
  std::filesystem::create_directory(dir.Join("mnt"));
  auto r = Sh(Q(NemofsBinary()) + " mount " + Q(dir.path()) + " " + Q(dir.Join("mnt")));
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_NE(r.err.find(dir.path() + ": not a checkpoint"), std::string::npos) << r.err;
}

TEST(Cli, MissingSourceAndMountPoint) {
  TempDir dir;
  std::filesystem::create_directory(dir.Join("mnt"));
  auto r = Sh(Q(NemofsBinary()) + " mount " + Q(dir.Join("nope.nemo")) + " " + Q(dir.Join("mnt")));
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_NE(r.err.find("nope.nemo: No such file or directory"), std::string::npos) << r.err;
  r = Sh(Q(NemofsBinary()) + " mount " + Q(TestData("tiny_gpt.nemo")) + " " +
         Q(dir.Join("absent")));
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_NE(r.err.find("absent: mount point does not exist"), std::string::npos) << r.err;
}

TEST(Cli, MountPointAlreadyInUse) {
  auto m = Mount::Start(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(m);
  auto r =
      Sh(Q(NemofsBinary()) + " mount " + Q(TestData("tiny_gpt_tp2.nemo")) + " " + Q(m->path()), 30);
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_NE(r.err.find("mount point is already in use"), std::string::npos) << r.err;
  // The first mount is untouched.
  auto ls = Sh("ls " + Q(m->path() + "/archive"));
  EXPECT_EQ(ls.exit_code, 0);
  EXPECT_EQ(ls.out.find("mp_rank_00"), std::string::npos);
  m->Unmount();
}

TEST(Cli, UsageHelpVersionAndCat) {
  auto r = Sh(Q(NemofsBinary()));
  EXPECT_EQ(r.exit_code, 2);
  r = Sh(Q(NemofsBinary()) + " --help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* cmd : {"mount", "umount", "info", "cat", "Exit codes"}) {
    EXPECT_NE(r.out.find(cmd), std::string::npos) << cmd;
  }
  r = Sh(Q(NemofsBinary()) + " --version");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* lib : {"libfuse 3.", "libarchive 3.", "yaml-cpp", "spdlog", "zstd"}) {
    EXPECT_NE(r.out.find(lib), std::string::npos) << lib << " in " << r.out;
  }
  r = Sh(Q(NemofsBinary()) + " cat " + Q(TestData("tiny_gpt.nemo")) + " archive/nope");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("archive/nope"), std::string::npos);
  r = Sh(Q(NemofsBinary()) + " cat " + Q(TestData("tiny_gpt.nemo")) + " tokenizer");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("is a directory"), std::string::npos);
  r = Sh(Q(NemofsBinary()) + " info --json " + Q(TestData("tiny_gpt_tp2.nemo")) +
         " | /usr/bin/python3 -c 'import json,sys; j=json.load(sys.stdin); print(j[\"format\"], "
         "len(j[\"tokenizer\"]), j[\"weights\"])'");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "nemo 4 per-rank model_weights.ckpt (TP=2, PP=1)\n");
}

// README: SIGTERM and SIGINT unmount cleanly.
class CliSignal : public ::testing::TestWithParam<int> {};

TEST_P(CliSignal, UnmountsCleanly) {
  auto m = Mount::Start(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(m);
  ASSERT_EQ(::kill(m->pid(), GetParam()), 0);
  for (int i = 0; i < 500 && IsMounted(m->path()); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_FALSE(IsMounted(m->path())) << "signal " << GetParam() << " did not unmount";
  m->Unmount();  // reaps the daemon and checks it exited with status 0
}

INSTANTIATE_TEST_SUITE_P(Signals, CliSignal, ::testing::Values(SIGTERM, SIGINT),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::string(info.param == SIGTERM ? "SIGTERM" : "SIGINT");
                         });

TEST(Cli, AllowOtherReachesTheKernel) {
  auto m = Mount::Start(TestData("tiny_gpt.nemo"), {"-o", "allow_other"});
  ASSERT_TRUE(m);
  auto r = Sh("grep ' " + m->path() + " ' /proc/self/mountinfo");
  EXPECT_NE(r.out.find("allow_other"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("fuse.nemofs"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" ro"), std::string::npos) << r.out;
  m->Unmount();
}

TEST(Cli, DefaultCacheDirFollowsXdgCacheHome) {
  TempDir dir;
  auto r = Sh("XDG_CACHE_HOME=" + Q(dir.path()) + " " + Q(NemofsBinary()) + " cat " +
              Q(TestData("tiny_gpt_gz.nemo")) + " archive/model_weights.ckpt | cmp - <(tar -xOf " +
              Q(TestData("tiny_gpt.nemo")) + " ./model_weights.ckpt) && find " +
              Q(dir.Join("nemofs")) + " -type f -name 'm[0-9]*' | wc -l");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "1\n");
  r = Sh("HOME=" + Q(dir.path()) + " XDG_CACHE_HOME= " + Q(NemofsBinary()) + " cat " +
         Q(TestData("tiny_gpt_gz.nemo")) + " archive/model_weights.ckpt >/dev/null && find " +
         Q(dir.Join(".cache/nemofs")) + " -type f -name 'm[0-9]*' | wc -l");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "1\n");
}

TEST(Cli, VerifyFindsEveryProblemAndExitsOne) {
  auto r = Sh(Q(NemofsBinary()) + " verify -q " + Q(TestData("tiny_gpt.nemo")));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find(": OK"), std::string::npos) << r.out;
  // One flipped byte inside a tensor record: the zip CRC catches it.
  TempDir dir;
  std::string bad = dir.Join("bad.nemo");
  r = Sh(
      "cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(bad) +
      " && off=$(/usr/bin/python3 -c 'import tarfile,sys; "
      "print(tarfile.open(sys.argv[1]).getmember(\"./model_weights.ckpt\").offset_data + 20000)' " +
      Q(bad) + ") && printf '\\377' | dd of=" + Q(bad) +
      " bs=1 seek=$off conv=notrunc 2>/dev/null");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh(Q(NemofsBinary()) + " verify -q " + Q(bad));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("has CRC-32"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(": 1 problem\n"), std::string::npos) << r.out;
  // A central-directory CRC-32 of 0 over non-empty data is checked too (0 is
  // only the CRC of empty data).
  std::string zeroed = dir.Join("zeroed_crc.pt");
  r = Sh("/usr/bin/python3 -c 'import sys\n"
         "b = bytearray(open(sys.argv[1], \"rb\").read())\n"
         "i = 0\n"
         "while True:\n"
         "    i = b.index(b\"PK\\x01\\x02\", i)\n"
         "    n = int.from_bytes(b[i+28:i+30], \"little\")\n"
         "    size = int.from_bytes(b[i+24:i+28], \"little\")\n"
         "    if b\"/data/\" in b[i+46:i+46+n] and size > 0: break\n"
         "    i += 4\n"
         "b[i+16:i+20] = bytes(4)\n"
         "open(sys.argv[2], \"wb\").write(b)' " +
         Q(TestData("torch/dtypes.pt")) + " " + Q(zeroed));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh(Q(NemofsBinary()) + " verify -q " + Q(zeroed));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("its central directory says 00000000"), std::string::npos) << r.out;
  // A malformed tensor is a problem too.
  r = Sh(Q(NemofsBinary()) + " verify -q " + Q(TestData("torch/hostile/negative_stride.pt")));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("negative size or stride"), std::string::npos) << r.out;
}

TEST(Cli, VerifyListsAbsentShards) {
  NEMOFS_REQUIRE_REAL_FIXTURES();
  auto r = Sh(Q(NemofsBinary()) + " verify -q " +
              Q(RealFixture("nemo2-dcp-metadata-only/esm2_model_checkpoint")));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("__0_0.distcp is missing"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("__0_1.distcp is missing"), std::string::npos) << r.out;
}

TEST(Cli, UmountOfSomethingElseFails) {
  TempDir dir;
  auto r = Sh(Q(NemofsBinary()) + " umount " + Q(dir.path()));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("not mounted"), std::string::npos) << r.err;
}

TEST(Cli, UnreadableWeightsGiveAnEmptyTensorsDirAndAPrintedWarning) {
  TempDir dir;
  std::string mnt = dir.Join("mnt"), bad = dir.Join("bad.nemo");
  std::filesystem::create_directory(mnt);
  auto r = Sh("cd " + Q(dir.path()) + " && mkdir src && tar -xf " + Q(TestData("tiny_gpt.nemo")) +
              " -C src && head -c 5000 /dev/urandom > src/model_weights.ckpt && tar -cf " + Q(bad) +
              " -C src .");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh(Q(NemofsBinary()) + " mount " + Q(bad) + " " + Q(mnt) + " -o ro --log-file " +
         Q(dir.Join("log")) + " --cache-dir " + Q(dir.Join("c")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(IsMounted(mnt));
  auto pid_r = Sh("getfattr --only-values -n user.nemofs.pid " + Q(mnt));
  pid_t pid = std::atoi(pid_r.out.c_str());
  EXPECT_NE(r.err.find("warning"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("model_weights.ckpt"), std::string::npos) << r.err;
  auto ls = Sh("test -d " + Q(mnt + "/tensors") + " && ls -A " + Q(mnt + "/tensors") + " | wc -l");
  EXPECT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_EQ(ls.out, "0\n");
  EXPECT_NE(ReadFile(dir.Join("log")).find("model_weights.ckpt"), std::string::npos);
  auto um = Sh(Q(NemofsBinary()) + " umount " + Q(mnt));
  EXPECT_EQ(um.exit_code, 0) << um.err;
  if (IsMounted(mnt)) {  // cleanup on failure: only the daemon this test started
    Sh("fusermount3 -u " + Q(mnt));
    if (pid > 0) ::kill(pid, SIGKILL);
  }
}

// A torch file whose only tensor is malformed: tensors/ is there and empty,
// model.safetensors is an empty one naming it, and `mount` and `ls` say so.
TEST(Cli, MalformedOnlyTensorGivesAnEmptyTensorsDirAndIsNamed) {
  TempDir dir;
  std::string mnt = dir.Join("mnt");
  std::filesystem::create_directory(mnt);
  std::string src = TestData("torch/hostile/negative_stride.pt");
  auto r = Sh(Q(NemofsBinary()) + " mount " + Q(src) + " " + Q(mnt) + " -o ro --log-file " +
              Q(dir.Join("log")) + " --cache-dir " + Q(dir.Join("c")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(IsMounted(mnt));
  auto pid_r = Sh("getfattr --only-values -n user.nemofs.pid " + Q(mnt));
  pid_t pid = std::atoi(pid_r.out.c_str());
  EXPECT_NE(r.err.find("warning"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tensor w is not shown: negative size or stride"), std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find(src + ": " + src), std::string::npos) << r.err;  // the source named once
  auto ls = Sh("ls -A " + Q(mnt + "/tensors") + " | wc -l; test -d " + Q(mnt + "/tensors"));
  EXPECT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_EQ(ls.out, "0\n") << ls.err;
  // model.safetensors: no tensors; its __metadata__ names the omitted one.
  auto st = Sh(
      "/usr/bin/python3 -c 'import json,sys,struct\n"
      "f = open(sys.argv[1], \"rb\")\n"
      "n = struct.unpack(\"<Q\", f.read(8))[0]\n"
      "h = json.loads(f.read(n))\n"
      "rest = f.read()\n"
      "print(sorted(h), len(rest), sorted(json.loads(h[\"__metadata__\"][\"nemofs.omitted\"])))' " +
      Q(mnt + "/model.safetensors"));
  EXPECT_EQ(st.exit_code, 0) << st.err;
  EXPECT_EQ(st.out, "['__metadata__'] 0 ['w']\n") << st.err;
  auto um = Sh(Q(NemofsBinary()) + " umount " + Q(mnt));
  EXPECT_EQ(um.exit_code, 0) << um.err;
  if (IsMounted(mnt)) {  // cleanup on failure: only the daemon this test started
    Sh("fusermount3 -u " + Q(mnt));
    if (pid > 0) ::kill(pid, SIGKILL);
  }
  // `nemofs ls` names the omitted tensor and why, on stderr.
  r = Sh(Q(NemofsBinary()) + " ls " + Q(src));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("0 tensors, 0 bytes"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("tensor w is omitted (it cannot be read): negative size or stride"),
            std::string::npos)
      << r.err;
  r = Sh(Q(NemofsBinary()) + " ls --json " + Q(src));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "[]\n");
  EXPECT_NE(r.err.find("tensor w is omitted"), std::string::npos) << r.err;
}

TEST(Cli, VerifyFindsAFlippedGzipTrailerCrc) {
  // gzip -t is the oracle: the copy fails it, the original passes it.
  TempDir dir;
  std::string bad = dir.Join("bad.nemo");
  auto r = Sh("cp " + Q(TestData("tiny_gpt_gz.nemo")) + " " + Q(bad) +
              " && size=$(stat -c %s " + Q(bad) + ") && b=$(dd if=" + Q(bad) +
              " bs=1 skip=$((size - 8)) count=1 2>/dev/null | od -An -tu1 | tr -d ' ') && "
              "printf \"\\\\$(printf %o $(( (b ^ 1) & 255 )))\" | dd of=" + Q(bad) +
              " bs=1 seek=$((size - 8)) conv=notrunc 2>/dev/null && ! gzip -t " + Q(bad) +
              " 2>/dev/null && gzip -t " + Q(TestData("tiny_gpt_gz.nemo")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh(Q(NemofsBinary()) + " verify -q --cache-dir " + Q(dir.Join("cache")) + " " +
         Q(TestData("tiny_gpt_gz.nemo")));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find(": OK"), std::string::npos) << r.out;
  r = Sh(Q(NemofsBinary()) + " verify -q --cache-dir " + Q(dir.Join("cache")) + " " + Q(bad));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("problem: " + bad + ": gzip member 1 at offset 0: CRC-32"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find(": 1 problem\n"), std::string::npos) << r.out;
}


// Kernels without openat2 (before 5.6) or seccomp profiles that refuse it:
// folder sources still read, beneath the folder, by a component walk; and a
// source lock that cannot be taken at all (NFS without locks: ENOLCK) only
// warns. The failures are injected into the real syscalls with strace.
constexpr const char* kNoLeakCheck =
    "ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 ";

TEST(Cli, WithoutOpenat2OrLocksFoldersReadAndRepackWarns) {
  if (Sh("strace -o /dev/null true").exit_code != 0) {
    GTEST_SKIP() << "strace cannot trace here (no ptrace); it injects the syscall failures";
  }
  const std::string folder = TestData("nemo2_tiny");
  auto plain = Sh(Q(NemofsBinary()) + " cat " + Q(folder) + " config.yaml | sha256sum");
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  for (const char* err : {"ENOSYS", "EPERM"}) {
    // LeakSanitizer cannot run under ptrace: the sanitizer build leaves it out here.
    std::string strace = std::string(kNoLeakCheck) +
                         "timeout 120 strace -f -o /dev/null -e inject=openat2:error=" +
                         err + " " + Q(NemofsBinary());
    auto r = Sh(strace + " cat " + Q(folder) + " config.yaml | sha256sum");
    EXPECT_EQ(r.exit_code, 0) << err << ": " << r.err;
    EXPECT_EQ(r.out, plain.out) << err;
    // Every file and tensor byte of a NeMo 2 folder with weights (.distcp).
    r = Sh(strace + " verify -q " + Q(TestData("dist/nemo2")));
    EXPECT_EQ(r.exit_code, 0) << err << ": " << r.out << r.err;
    EXPECT_NE(r.out.find(": OK"), std::string::npos) << r.out;
  }
  TempDir dir;
  const std::string copy = dir.Join("t.nemo");
  ASSERT_EQ(Sh("cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(copy)).exit_code, 0);
  auto r = Sh(std::string(kNoLeakCheck) +
              "timeout 120 strace -f -o /dev/null -e inject=flock:error=ENOLCK " +
              Q(NemofsBinary()) + " repack " + Q(copy) + " --cache-dir " + Q(dir.Join("c")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("cannot lock " + copy + " (No locks available)"), std::string::npos)
      << r.err;
  EXPECT_EQ(Sh(Q(NemofsBinary()) + " verify -q " + Q(copy)).exit_code, 0);
}

}  // namespace
}  // namespace nemofs::testing
