// Recognition of every supported layout, on generated and real checkpoints,
// and clear errors for what is no checkpoint.
#include "checkpoint/layout.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "test_util.h"

namespace nemofs::checkpoint {
namespace {

using testing::RealFixture;
using testing::TempDir;
using testing::TestData;

struct Expected {
  std::string path;
  Format format;
  std::string config;
  std::vector<std::string> tokenizer;  // names under tokenizer/, sorted
  std::string weights_substring;
};

void PrintTo(const Expected& e, std::ostream* os) { *os << e.path; }

std::string Name(const ::testing::TestParamInfo<Expected>& info) {
  return testing::TestName(std::filesystem::path(info.param.path).filename().string());
}

class Recognition : public ::testing::TestWithParam<Expected> {};

TEST_P(Recognition, FindsFormatConfigTokenizerWeights) {
  const Expected& want = GetParam();
  if (want.path.find("real-fixtures") != std::string::npos) NEMOFS_REQUIRE_REAL_FIXTURES();
  TempDir cache;
  auto src = source::OpenSource(want.path, {cache.path()});
  ASSERT_TRUE(src.ok()) << src.error().message();
  auto layout = Recognize(**src);
  ASSERT_TRUE(layout.ok()) << layout.error().message();
  EXPECT_EQ(layout->format, want.format) << layout->description;
  EXPECT_EQ(layout->config_path, want.config);
  std::vector<std::string> names;
  for (const auto& t : layout->tokenizer) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, want.tokenizer);
  EXPECT_NE(layout->weights.find(want.weights_substring), std::string::npos) << layout->weights;
  EXPECT_TRUE(layout->warnings.empty()) << layout->warnings.front();
}

const std::string kLong =
    "gpt2_bpe_tokenizer_legacy_sentencepiece_model_with_intentionally_very_long_file_name_to_"
    "force_pax_and_gnu_longlink.model";
const std::vector<std::string> kTinyTokenizer = {kLong, "merges.txt", "tokenizer.model",
                                                 "vocab.json"};
const std::vector<std::string> kNemo2Tokenizer = {"special_tokens_map.json", "tokenizer.json",
                                                  "tokenizer.model", "tokenizer_config.json"};

INSTANTIATE_TEST_SUITE_P(
    Layouts, Recognition,
    ::testing::Values(
        Expected{TestData("tiny_gpt.nemo"), Format::kNemo, "model_config.yaml", kTinyTokenizer,
                 "model_weights.ckpt"},
        Expected{TestData("tiny_gpt_gz.nemo"), Format::kNemo, "model_config.yaml", kTinyTokenizer,
                 "model_weights.ckpt"},
        Expected{TestData("tiny_gpt_gnu.nemo"), Format::kNemo, "model_config.yaml", kTinyTokenizer,
                 "model_weights.ckpt"},
        Expected{TestData("tiny_gpt_tp2.nemo"), Format::kNemo, "model_config.yaml", kTinyTokenizer,
                 "TP=2, PP=1"},
        Expected{TestData("nemo2_tiny"), Format::kNemo2, "context/model.yaml", kNemo2Tokenizer,
                 "torch_dist) in weights/"},
        Expected{TestData("nemo2_0_tiny"), Format::kNemo2, "context/model.yaml", kNemo2Tokenizer,
                 "torch_dist) in ./"},
        Expected{RealFixture("nemo-tar/vad_marblenet.nemo"),
                 Format::kNemo,
                 "model_config.yaml",
                 {},
                 "model_weights.ckpt"},
        Expected{RealFixture("nemo-tar/vad_telephony_marblenet.nemo"),
                 Format::kNemo,
                 "model_config.yaml",
                 {},
                 "model_weights.ckpt"},
        Expected{RealFixture("nemo-tar/vad_multilingual_marblenet.nemo"),
                 Format::kNemo,
                 "model_config.yaml",
                 {},
                 "model_weights.ckpt"},
        Expected{RealFixture("nemo2-dcp-metadata-only/esm2_model_checkpoint"),
                 Format::kNemo2,
                 "context/model.yaml",
                 {},
                 "torch_dist) in weights/"},
        Expected{
            RealFixture("megatron-torch_dist-metadata-only/deepseek_mtp_dummy_ckpt/checkpoints"),
            Format::kMegatronLmRoot,
            "",
            {},
            "torch_dist) in iter_0000001/"},
        Expected{
            RealFixture("megatron-zarr/megatron_gpt--val_loss=10.86-step=2-consumed_samples=16.0"),
            Format::kMcoreDist,
            "",
            {},
            "(zarr)"},
        Expected{RealFixture("legacy-torch-save/JasperDecoderForCTC-STEP-243800.pt"),
                 Format::kTorchSaveLegacy,
                 "",
                 {},
                 "JasperDecoderForCTC-STEP-243800.pt"}),
    Name);

TEST(Recognition, ExtractedNemoFolderIsRecognisedLikeTheArchive) {
  TempDir dir;
  auto r = testing::Sh("tar -xf " + testing::ShellQuote(TestData("tiny_gpt.nemo")) + " -C " +
                       testing::ShellQuote(dir.path()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto src = source::OpenSource(dir.path(), {});
  ASSERT_TRUE(src.ok()) << src.error().message();
  auto layout = Recognize(**src);
  ASSERT_TRUE(layout.ok()) << layout.error().message();
  EXPECT_EQ(layout->format, Format::kNemoFolder);
  EXPECT_EQ(layout->tokenizer.size(), 4u);
}

TEST(Recognition, TorchSaveZipFile) {
  TempDir dir;
  auto r = testing::Sh("tar -xf " + testing::ShellQuote(TestData("tiny_gpt.nemo")) + " -C " +
                       testing::ShellQuote(dir.path()) + " ./model_weights.ckpt");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto src = source::OpenSource(dir.Join("model_weights.ckpt"), {});
  ASSERT_TRUE(src.ok()) << src.error().message();
  auto layout = Recognize(**src);
  ASSERT_TRUE(layout.ok()) << layout.error().message();
  EXPECT_EQ(layout->format, Format::kTorchSave);
}

TEST(Recognition, NemoArtifactPrefixIsStripped) {
  EXPECT_EQ(StripArtifactPrefix("0123456789abcdef0123456789abcdef_tokenizer.model"),
            "tokenizer.model");
  EXPECT_EQ(StripArtifactPrefix("0123456789ABCDEF0123456789abcdef_x"),
            "0123456789ABCDEF0123456789abcdef_x");
  EXPECT_EQ(StripArtifactPrefix("tokenizer.model"), "tokenizer.model");
}

TEST(Recognition, MissingArtifactIsAWarningNotAFailure) {
  TempDir dir;
  testing::WriteFile(dir.Join("model_config.yaml"),
                     "tokenizer:\n  model: nemo:0123456789abcdef0123456789abcdef_gone.model\n");
  auto src = source::OpenSource(dir.path(), {});
  ASSERT_TRUE(src.ok());
  auto layout = Recognize(**src);
  ASSERT_TRUE(layout.ok()) << layout.error().message();
  ASSERT_EQ(layout->warnings.size(), 1u);
  EXPECT_NE(layout->warnings[0].find("gone.model"), std::string::npos);
}

TEST(Recognition, BrokenYamlIsAWarningWithLineAndColumn) {
  TempDir dir;
  testing::WriteFile(dir.Join("model_config.yaml"), "a: 1\nb: [unclosed\n");
  auto src = source::OpenSource(dir.path(), {});
  ASSERT_TRUE(src.ok());
  auto layout = Recognize(**src);
  ASSERT_TRUE(layout.ok()) << layout.error().message();
  ASSERT_EQ(layout->warnings.size(), 1u);
  EXPECT_NE(layout->warnings[0].find("does not parse as YAML (line"), std::string::npos)
      << layout->warnings[0];
}

TEST(RecognitionErrors, DirectoryThatIsNoCheckpoint) {
  TempDir dir;
  testing::WriteFile(dir.Join("notes.txt"), "hello");
  auto src = source::OpenSource(dir.path(), {});
  ASSERT_TRUE(src.ok());
  auto layout = Recognize(**src);
  ASSERT_FALSE(layout.ok());
  EXPECT_EQ(layout.error().code(), EINVAL);
  EXPECT_EQ(layout.error().message().rfind(dir.path() + ": not a checkpoint", 0), 0u)
      << layout.error().message();
}

TEST(RecognitionErrors, FileWithUnknownMagic) {
  TempDir dir;
  testing::WriteFile(dir.Join("x.nemo"), "this is plain text, not a checkpoint at all");
  auto src = source::OpenSource(dir.Join("x.nemo"), {});
  ASSERT_TRUE(src.ok());
  auto layout = Recognize(**src);
  ASSERT_FALSE(layout.ok());
  EXPECT_NE(
      layout.error().message().find("x.nemo: not a checkpoint: starts with bytes 74 68 69 73"),
      std::string::npos)
      << layout.error().message();
}

TEST(RecognitionErrors, TarWithoutCheckpointInside) {
  TempDir dir;
  testing::TarBuilder t;
  t.AddFile("./readme.txt", "hi").End();
  testing::WriteFile(dir.Join("x.tar"), t.bytes());
  auto src = source::OpenSource(dir.Join("x.tar"), {});
  ASSERT_TRUE(src.ok());
  auto layout = Recognize(**src);
  ASSERT_FALSE(layout.ok());
  EXPECT_NE(layout.error().message().find("not a checkpoint"), std::string::npos);
}

TEST(RecognitionErrors, UnknownDistBackend) {
  TempDir dir;
  testing::WriteFile(dir.Join("metadata.json"), R"({"sharded_backend": "tensorstore9"})");
  auto src = source::OpenSource(dir.path(), {});
  ASSERT_TRUE(src.ok());
  auto layout = Recognize(**src);
  ASSERT_FALSE(layout.ok());
  EXPECT_NE(layout.error().message().find("metadata.json: unknown sharded_backend 'tensorstore9'"),
            std::string::npos)
      << layout.error().message();
}

TEST(RecognitionErrors, GzipThatIsNoTar) {
  TempDir dir;
  auto r = testing::Sh("echo 'just text' | gzip > " + testing::ShellQuote(dir.Join("x.nemo")));
  ASSERT_EQ(r.exit_code, 0);
  auto src = source::OpenSource(dir.Join("x.nemo"), {dir.Join("cache")});
  ASSERT_FALSE(src.ok());
  EXPECT_NE(src.error().message().find(dir.Join("x.nemo")), std::string::npos);
}

TEST(RecognitionErrors, TruncatedGzip) {
  TempDir dir;
  std::string gz = testing::ReadFile(TestData("tiny_gpt_gz.nemo"));
  testing::WriteFile(dir.Join("cut.nemo"), gz.substr(0, gz.size() / 2));
  auto src = source::OpenSource(dir.Join("cut.nemo"), {dir.Join("cache")});
  ASSERT_FALSE(src.ok());
  EXPECT_NE(src.error().message().find("cut.nemo"), std::string::npos) << src.error().message();
}

}  // namespace
}  // namespace nemofs::checkpoint
