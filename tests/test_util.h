// Helpers shared by the unit and mount tests: temporary directories, running
// real command-line tools with a timeout, hand-built tar archives.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nemofs::testing {

std::string TestData(const std::string& rel);     // tests/data/<rel>
std::string RealFixture(const std::string& rel);  // ../shared/real-fixtures/<rel>
bool RealFixturesPresent();
#define NEMOFS_REQUIRE_REAL_FIXTURES()                                                   \
  do {                                                                                   \
    if (!::nemofs::testing::RealFixturesPresent())                                       \
      GTEST_SKIP() << "../shared/real-fixtures is absent (clone outside the workplace)"; \
  } while (0)

// A fresh directory under $TMPDIR, removed (recursively) on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Join(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;  // 124 when the timeout killed it
  std::string out;
  std::string err;
};

// Runs `script` with bash under `timeout`; captures stdout and stderr.
CommandResult Sh(const std::string& script, int timeout_s = 120);

std::string ReadFile(const std::string& path);
// A GoogleTest parameter name from any text: every non-alphanumeric -> '_'.
std::string TestName(std::string text);
void WriteFile(const std::string& path, const std::string& data);
std::string ShellQuote(const std::string& s);

// Builds tar archives byte by byte, including malformed ones.
class TarBuilder {
 public:
  struct Header {
    std::string name;
    char type = '0';
    uint64_t size = 0;
    std::string link;
    uint32_t mode = 0644;
    int64_t mtime = 1700000000;
    bool base256_size = false;
    std::string prefix;  // ustar prefix field
  };
  // Appends a header block (checksum computed unless `corrupt_checksum`).
  TarBuilder& AddHeader(const Header& h, bool corrupt_checksum = false);
  // Appends data padded to 512 bytes.
  TarBuilder& AddData(const std::string& data);
  TarBuilder& AddFile(const std::string& name, const std::string& data, char type = '0');
  TarBuilder& AddDir(const std::string& name);
  TarBuilder& AddSymlink(const std::string& name, const std::string& target);
  TarBuilder& AddHardlink(const std::string& name, const std::string& target);
  // PAX extended header ('x' or 'g') holding `records` verbatim.
  TarBuilder& AddPax(const std::string& records, char type = 'x');
  static std::string PaxRecord(const std::string& key, const std::string& value);
  TarBuilder& AddGnuLongName(const std::string& name);
  TarBuilder& AddRaw(const std::string& bytes);
  TarBuilder& End();  // two zero blocks
  const std::string& bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

// A small tmpfs at `dir` (made if missing), lazily unmounted on
// destruction whatever happens: a full disk for ENOSPC tests.
class SmallTmpfs {
 public:
  SmallTmpfs(const std::string& dir, const std::string& size);
  ~SmallTmpfs();
  SmallTmpfs(const SmallTmpfs&) = delete;
  SmallTmpfs& operator=(const SmallTmpfs&) = delete;
  bool mounted() const { return mounted_; }

 private:
  std::string dir_;
  bool mounted_ = false;
};

}  // namespace nemofs::testing
