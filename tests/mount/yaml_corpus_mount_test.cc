// The differential test of the config validator (tests/yaml_corpus.py)
// through a real mount: a deterministic sample of ~200 one-edit mutations of
// real configs, each written to config.yaml (open O_TRUNC, write, close).
// The close succeeds exactly when OmegaConf.load accepts the text and its
// top level is a non-empty mapping (else EINVAL), and afterwards the
// checkpoint holds the new text (accepted) or the previous one (refused).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>

#include "mount_harness.h"
#include "test_util.h"
#include "util/fd.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

struct Case {
  std::string id;
  bool accept = false;
  std::string what;
};

std::vector<Case> Manifest(const std::string& dir) {
  std::vector<Case> out;
  std::istringstream in(ReadFile(dir + "/manifest.tsv"));
  std::string line;
  while (std::getline(in, line)) {
    size_t a = line.find('\t'), b = line.find('\t', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    out.push_back({line.substr(0, a), line.substr(a + 1, b - a - 1) == "1", line.substr(b + 1)});
  }
  return out;
}

// The errno of the write-and-close of `text` to `path` (0: saved).
int WriteThrough(const std::string& path, const std::string& text) {
  UniqueFd fd(open(path.c_str(), O_WRONLY | O_TRUNC));
  if (!fd.valid()) return errno;
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd.get(), text.data() + done, text.size() - done);
    if (n < 0) return errno;
    done += static_cast<size_t>(n);
  }
  // The close that commits is what is tested: its result is needed, which
  // UniqueFd's destructor drops.
  return ::close(fd.Release()) == 0 ? 0 : errno;
}

class YamlCorpusMount : public ::testing::TestWithParam<std::string> {};

TEST_P(YamlCorpusMount, CloseSucceedsExactlyWhenOmegaConfLoadsTheText) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string cases = dir.Join("cases");
  auto gen = Sh("/usr/bin/python3 " +
                    ShellQuote(std::string(NEMOFS_SOURCE_DIR) + "/tests/yaml_corpus.py") +
                    " --emit " + ShellQuote(cases) + " --sample 200",
                300);
  ASSERT_EQ(gen.exit_code, 0) << gen.out << gen.err;
  std::vector<Case> manifest = Manifest(cases);
  ASSERT_GE(manifest.size(), 190u);
  size_t accepted = 0;
  for (const auto& c : manifest) accepted += c.accept;
  // Both verdicts are exercised.
  ASSERT_GE(accepted, 40u);
  ASSERT_GE(manifest.size() - accepted, 40u);

  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  std::string config = m->path() + "/config.yaml";
  std::string current = ReadFile(config);
  ASSERT_FALSE(current.empty());
  size_t n = 0;
  for (const auto& c : manifest) {
    SCOPED_TRACE(c.id + " " + c.what);
    std::string text = ReadFile(cases + "/" + c.id + ".yaml");
    int err = WriteThrough(config, text);
    if (c.accept) {
      EXPECT_EQ(err, 0) << strerror(err) << "\n"
                        << m->Log().substr(m->Log().size() > 2000 ? m->Log().size() - 2000 : 0);
      if (err == 0) current = text;
    } else {
      EXPECT_EQ(err, EINVAL) << strerror(err);
    }
    EXPECT_TRUE(SameText(ReadFile(config), current));
    // The checkpoint itself, as its own readers see it, now and then.
    if (++n % 40 == 0) {
      EXPECT_TRUE(SameText(StoredConfig(kind, src), current));
    }
  }
  m->Unmount();
  EXPECT_TRUE(SameText(StoredConfig(kind, src), current));
  EXPECT_TRUE(SameText(CatConfig(src), current));
}

INSTANTIATE_TEST_SUITE_P(Kinds, YamlCorpusMount, ::testing::ValuesIn(OneKindPerCommit()),
                         KindParamName);

}  // namespace
}  // namespace nemofs::testing
