#include "write_util.h"

#include <stdexcept>

#include "mount_harness.h"

namespace nemofs::testing {
namespace {
std::string Q(const std::string& s) { return ShellQuote(s); }
}  // namespace

::testing::AssertionResult SameText(const std::string& actual, const std::string& expected) {
  if (actual == expected) return ::testing::AssertionSuccess();
  size_t i = 0;
  while (i < actual.size() && i < expected.size() && actual[i] == expected[i]) ++i;
  return ::testing::AssertionFailure() << "texts differ: " << actual.size() << " vs expected "
                                       << expected.size() << " bytes, first difference at byte "
                                       << i;
}

const std::vector<SourceKind>& Kinds() {
  static const std::vector<SourceKind> kinds = {
      {"plain_tar", "tiny_gpt.nemo", "./model_config.yaml", true, false},
      {"gnu_tar", "tiny_gpt_gnu.nemo", "./model_config.yaml", true, false},
      {"gzip_tar", "tiny_gpt_gz.nemo", "./model_config.yaml", true, false},
      // A NeMo 2 folder that `verify` passes (nemo2_tiny has no weights/.metadata).
      {"nemo2_folder", "dist/nemo2", "context/model.yaml", false, false},
      {"extracted_nemo_folder", "tiny_gpt.nemo", "model_config.yaml", false, true},
  };
  return kinds;
}

const SourceKind& Kind(const std::string& name) {
  for (const auto& k : Kinds()) {
    if (k.name == name) return k;
  }
  throw std::runtime_error("no source kind " + name);
}

std::vector<std::string> KindNames() {
  std::vector<std::string> names;
  for (const auto& k : Kinds()) names.push_back(k.name);
  return names;
}

const std::vector<std::string>& OneKindPerCommit() {
  static const std::vector<std::string> kinds = {"plain_tar", "gzip_tar", "nemo2_folder"};
  return kinds;
}

std::string KindParamName(const ::testing::TestParamInfo<std::string>& info) {
  return TestName(info.param);
}

std::string MakeSource(const SourceKind& kind, const TempDir& dir) {
  return MakeSourceAt(kind, dir.Join(kind.tar ? "src.nemo" : "src"));
}

std::string MakeSourceAt(const SourceKind& kind, const std::string& path) {
  std::string cmd = kind.extract ? "mkdir " + Q(path) + " && tar -xf " + Q(TestData(kind.data)) +
                                       " -C " + Q(path)
                                 : "cp -r " + Q(TestData(kind.data)) + " " + Q(path);
  auto r = Sh(cmd);
  EXPECT_EQ(r.exit_code, 0) << cmd << ": " << r.err;
  return path;
}

std::string CatConfig(const std::string& source) {
  auto r = Sh(Q(NemofsBinary()) + " cat " + Q(source) + " config.yaml");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

std::string StoredConfig(const SourceKind& kind, const std::string& source) {
  if (!kind.tar) return ReadFile(source + "/" + kind.member);
  auto py = Sh("/usr/bin/python3 -c 'import sys,tarfile; "
               "sys.stdout.buffer.write(tarfile.open(sys.argv[1]).extractfile(sys.argv[2]).read())' " +
               Q(source) + " " + Q(kind.member));
  EXPECT_EQ(py.exit_code, 0) << py.err;
  // GNU tar extracts every copy of a name in turn: the last one stays.
  // (`tar -xOf` would print them all, superseded ones included.)
  TempDir out;
  auto gnu = Sh("tar -xf " + Q(source) + " -C " + Q(out.path()) + " " + Q(kind.member));
  EXPECT_EQ(gnu.exit_code, 0) << gnu.err;
  EXPECT_TRUE(SameText(ReadFile(out.Join(kind.member)), py.out)) << "tarfile and GNU tar disagree";
  return py.out;
}

std::string Members(const SourceKind& kind, const std::string& src) {
  auto r = kind.tar ? Sh("tar -tf " + ShellQuote(src) +
                         " | sed 's|^\\./||' | grep -v '^$' | LC_ALL=C sort -u")
                    : Sh("cd " + ShellQuote(src) +
                         " && find . -mindepth 1 | sed 's|^\\./||' | LC_ALL=C sort");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

std::string Extracted(const SourceKind& kind, const std::string& src, const std::string& name) {
  if (!kind.tar) return ReadFile(src + "/" + name);
  TempDir x;  // GNU tar extracts every copy in turn: the last one stays
  auto r = Sh("tar -xf " + ShellQuote(src) + " -C " + ShellQuote(x.path()) + " && cat " +
              ShellQuote(x.Join(name)));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

std::string SourceDigest(const std::string& source) {
  auto r = Sh("if [ -d " + Q(source) + " ]; then cd " + Q(source) +
              " && find . -type f | LC_ALL=C sort | xargs sha256sum; else sha256sum < " +
              Q(source) + "; fi");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

}  // namespace nemofs::testing
