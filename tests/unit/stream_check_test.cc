// Stream integrity checks on archives made by the real gzip, xz, zstd and
// bzip2 tools, corrupted the way disks and truncated copies corrupt them.
#include "source/stream_check.h"

#include <gtest/gtest.h>

#include <fmt/format.h>

#include <string>

#include "test_util.h"

namespace nemofs::source {
namespace {
using namespace nemofs::testing;

std::string Q(const std::string& s) { return ShellQuote(s); }

// Random-ish payload of `n` bytes (compressible but not trivially).
std::string Payload(size_t n, unsigned seed) {
  std::string s(n, '\0');
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; ++i) {
    x = x * 1103515245u + 12345u;
    s[i] = static_cast<char>('a' + (x >> 16) % 7);
  }
  return s;
}

// Compresses `data` with `cmd` (e.g. "gzip -c") and returns the bytes.
std::string Compress(TempDir& dir, const std::string& data, const std::string& cmd,
                     const std::string& name) {
  WriteFile(dir.Join(name), data);
  auto r = Sh(cmd + " < " + Q(dir.Join(name)) + " > " + Q(dir.Join(name + ".z")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return ReadFile(dir.Join(name + ".z"));
}

// Runs `tool -t` on `bytes`; true when the tool says the stream is intact.
bool ToolAccepts(TempDir& dir, const std::string& bytes, const std::string& tool) {
  WriteFile(dir.Join("probe"), bytes);
  return Sh(tool + " -t < " + Q(dir.Join("probe")) + " 2>/dev/null").exit_code == 0;
}

TEST(StreamCheck, IntactStreamsOfEveryFormatPass) {
  TempDir dir;
  std::string data = Payload(700000, 1);
  for (const char* cmd : {"gzip -c", "xz -c", "zstd -q -c --check", "bzip2 -c"}) {
    std::string z = Compress(dir, data, cmd, "a");
    EXPECT_FALSE(DetectCompression(z).empty()) << cmd;
    EXPECT_EQ(CheckStreamBytes(z, "x"), "") << cmd;
  }
  EXPECT_EQ(CheckStreamBytes("plain bytes, not compressed", "x"), "");
}

TEST(StreamCheck, GzipFlippedTrailerCrcIsNamed) {
  TempDir dir;
  std::string z = Compress(dir, Payload(300000, 2), "gzip -c", "a");
  z[z.size() - 8] ^= 0x01;  // first byte of the CRC-32
  ASSERT_FALSE(ToolAccepts(dir, z, "gzip"));
  std::string msg = CheckStreamBytes(z, "a.nemo");
  EXPECT_NE(msg.find("a.nemo: gzip member 1 at offset 0: CRC-32"), std::string::npos) << msg;
  EXPECT_NE(msg.find(fmt::format("offset {}", z.size() - 8)), std::string::npos) << msg;
}

TEST(StreamCheck, GzipWrongIsizeIsNamed) {
  TempDir dir;
  std::string z = Compress(dir, Payload(300000, 3), "gzip -c", "a");
  z[z.size() - 1] ^= 0x40;
  ASSERT_FALSE(ToolAccepts(dir, z, "gzip"));
  std::string msg = CheckStreamBytes(z, "a.nemo");
  EXPECT_NE(msg.find("length (ISIZE)"), std::string::npos) << msg;
}

TEST(StreamCheck, GzipTruncatedTrailerIsNamed) {
  TempDir dir;
  std::string z = Compress(dir, Payload(300000, 4), "gzip -c", "a");
  z.resize(z.size() - 3);
  ASSERT_FALSE(ToolAccepts(dir, z, "gzip"));
  std::string msg = CheckStreamBytes(z, "a.nemo");
  EXPECT_NE(msg.find("gzip member 1 at offset 0 is truncated"), std::string::npos) << msg;
}

TEST(StreamCheck, GzipMultiMemberGoodAndSecondMemberBad) {
  TempDir dir;
  std::string m1 = Compress(dir, Payload(200000, 5), "gzip -c", "a");
  std::string m2 = Compress(dir, Payload(100000, 6), "gzip -c", "b");
  std::string both = m1 + m2;
  ASSERT_TRUE(ToolAccepts(dir, both, "gzip"));
  EXPECT_EQ(CheckStreamBytes(both, "x"), "");
  both[both.size() - 6] ^= 0x10;  // CRC of the second member
  ASSERT_FALSE(ToolAccepts(dir, both, "gzip"));
  std::string msg = CheckStreamBytes(both, "x");
  EXPECT_NE(msg.find(fmt::format("gzip member 2 at offset {}", m1.size())), std::string::npos)
      << msg;
  // Garbage after the last member.
  std::string tail = m1 + "garbage";
  EXPECT_NE(CheckStreamBytes(tail, "x").find("trailing garbage"), std::string::npos);
}

TEST(StreamCheck, XzZstdBzip2CorruptionIsFound) {
  TempDir dir;
  std::string data = Payload(400000, 7);
  struct Case {
    const char* cmd;
    const char* tool;
    size_t from_end;  // byte to flip, counted from the end
  };
  // xz: inside the CRC-64 check of the block (before the index + footer);
  // zstd: the frame's content checksum (last 4 bytes); bzip2: the combined
  // stream CRC (bytes -6..-3 of the end-of-stream marker, bit-aligned).
  for (Case c : {Case{"xz -c", "xz", 30}, Case{"zstd -q -c --check", "zstd -q", 2},
                 Case{"bzip2 -c", "bzip2", 4}}) {
    std::string z = Compress(dir, data, c.cmd, "a");
    std::string bad = z;
    bad[bad.size() - c.from_end] ^= 0x01;
    ASSERT_FALSE(ToolAccepts(dir, bad, c.tool)) << c.cmd;
    std::string msg = CheckStreamBytes(bad, "a.nemo");
    EXPECT_NE(msg.find("a.nemo: "), std::string::npos) << c.cmd << ": " << msg;
    std::string cut = z.substr(0, z.size() - 10);
    ASSERT_FALSE(ToolAccepts(dir, cut, c.tool)) << c.cmd;
    EXPECT_NE(CheckStreamBytes(cut, "a.nemo"), "") << c.cmd;
  }
}

}  // namespace
}  // namespace nemofs::source
