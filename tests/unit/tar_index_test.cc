// The tar header index and TarSource on real archives (GNU tar and Python's
// tarfile as oracles) and on hand-built hostile ones.
#include "source/tar_index.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include "source/source.h"
#include "test_util.h"
#include "util/io.h"

namespace nemofs::source {
namespace {

using testing::RealFixture;
using testing::Sh;
using testing::ShellQuote;
using testing::TarBuilder;
using testing::TempDir;
using testing::TestData;

Result<TarIndex> IndexFile(const std::string& path) {
  auto fd = OpenReadOnly(path);
  if (!fd) return fd.error();
  auto st = FStat(fd->get(), path);
  return IndexTar(fd->get(), 0, static_cast<uint64_t>(st->st_size), path);
}

Result<TarIndex> IndexBytes(const TempDir& dir, const std::string& bytes) {
  std::string path = dir.Join("t.tar");
  testing::WriteFile(path, bytes);
  return IndexFile(path);
}

// Python's tarfile listing: name, data offset, size per member (its oracle).
std::string PythonListing(const std::string& path) {
  auto r =
      Sh("/usr/bin/python3 -c 'import sys,tarfile\n"
         "for m in tarfile.open(sys.argv[1]).getmembers():\n"
         "    print(m.name, m.offset_data, m.size if m.isreg() else 0)' " +
         ShellQuote(path));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

std::string OurListing(const TarIndex& index) {
  std::string out;
  for (const auto& m : index.members) {
    std::string name = m.name;
    while (name.size() > 1 && name.back() == '/') name.pop_back();  // tarfile strips dir slashes
    bool reg = m.type == '0' || m.type == '\0' || m.type == '7';
    out += fmt::format("{} {} {}\n", name, m.data_offset, reg ? m.size : 0);
  }
  return out;
}

class RealArchives : public ::testing::TestWithParam<std::string> {};

TEST_P(RealArchives, MatchesPythonTarfile) {
  std::string path = GetParam();
  if (path.find("real-fixtures") != std::string::npos) NEMOFS_REQUIRE_REAL_FIXTURES();
  auto index = IndexFile(path);
  ASSERT_TRUE(index.ok()) << index.error().message();
  EXPECT_EQ(OurListing(*index), PythonListing(path));
  EXPECT_TRUE(index->has_end_marker);
}

TEST_P(RealArchives, MemberBytesMatchGnuTar) {
  std::string path = GetParam();
  if (path.find("real-fixtures") != std::string::npos) NEMOFS_REQUIRE_REAL_FIXTURES();
  auto src = OpenSource(path, {});
  ASSERT_TRUE(src.ok()) << src.error().message();
  int files = 0;
  for (const auto& e : (*src)->entries()) {
    if (e.type != EntryType::kFile) continue;
    auto bytes = (*src)->ReadAll(e, 64 << 20);
    ASSERT_TRUE(bytes.ok()) << bytes.error().message();
    auto r = Sh("tar -xOf " + ShellQuote(path) + " " + ShellQuote("./" + e.path));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(*bytes, r.out) << e.path;
    ++files;
  }
  EXPECT_GE(files, 2);
}

INSTANTIATE_TEST_SUITE_P(
    Tar, RealArchives,
    ::testing::Values(TestData("tiny_gpt.nemo"), TestData("tiny_gpt_gnu.nemo"),
                      TestData("tiny_gpt_tp2.nemo"),
                      RealFixture("nemo-tar/vad_multilingual_marblenet.nemo")));

TEST(TarIndex, PaxPathAndMtimeApplied) {
  auto index = IndexFile(TestData("tiny_gpt.nemo"));
  ASSERT_TRUE(index.ok()) << index.error().message();
  EXPECT_TRUE(index->pax);
  bool found_long = false;
  for (const auto& m : index->members) {
    EXPECT_EQ(m.mtime_sec, 1717171717);
    EXPECT_EQ(m.mtime_nsec, 500000000u);
    if (m.name.size() > 100) found_long = true;
  }
  EXPECT_TRUE(found_long);
}

TEST(TarIndex, GnuLongNames) {
  auto index = IndexFile(TestData("tiny_gpt_gnu.nemo"));
  ASSERT_TRUE(index.ok()) << index.error().message();
  EXPECT_TRUE(index->gnu);
  bool found_long = false;
  for (const auto& m : index->members) found_long |= m.name.size() > 100;
  EXPECT_TRUE(found_long);
}

TEST(TarIndex, HandBuiltDialects) {
  TempDir dir;
  std::string long_name(150, 'n');
  TarBuilder t;
  t.AddDir("./")
      .AddFile("./a.txt", "hello")
      .AddPax(TarBuilder::PaxRecord("path", "./" + long_name) +
              TarBuilder::PaxRecord("mtime", "12.25"))
      .AddFile("./short", "pax-named")
      .AddGnuLongName("./gnu_" + long_name)
      .AddFile("./trunc", "gnu-named")
      .AddHeader({"b256", '0', 5, "", 0644, 1700000000, /*base256_size=*/true})
      .AddData("12345")
      .AddHeader({"inner.txt", '0', 3, "", 0644, 1700000000, false, "some/prefix"})
      .AddData("pre")
      .End();
  auto index = IndexBytes(dir, t.bytes());
  ASSERT_TRUE(index.ok()) << index.error().message();
  ASSERT_EQ(index->members.size(), 6u);
  EXPECT_EQ(index->members[1].name, "./a.txt");
  EXPECT_EQ(index->members[1].size, 5u);
  EXPECT_EQ(index->members[1].data_offset, 1024u);
  EXPECT_EQ(index->members[2].name, "./" + long_name);
  EXPECT_EQ(index->members[2].mtime_sec, 12);
  EXPECT_EQ(index->members[2].mtime_nsec, 250000000u);
  EXPECT_EQ(index->members[3].name, "./gnu_" + long_name);
  EXPECT_EQ(index->members[4].name, "b256");
  EXPECT_EQ(index->members[4].size, 5u);
  EXPECT_EQ(index->members[5].name, "some/prefix/inner.txt");
  EXPECT_TRUE(index->has_end_marker);
}

TEST(TarIndex, PaxSizeOverridesHeader) {
  TempDir dir;
  TarBuilder t;
  t.AddPax(TarBuilder::PaxRecord("size", "7")).AddHeader({"big", '0', 0}).AddData("1234567").End();
  auto index = IndexBytes(dir, t.bytes());
  ASSERT_TRUE(index.ok()) << index.error().message();
  ASSERT_EQ(index->members.size(), 1u);
  EXPECT_EQ(index->members[0].size, 7u);
}

TEST(TarIndex, GlobalPaxAppliesToFollowingMembers) {
  TempDir dir;
  TarBuilder t;
  t.AddPax(TarBuilder::PaxRecord("mtime", "42"), 'g').AddFile("a", "x").AddFile("b", "y").End();
  auto index = IndexBytes(dir, t.bytes());
  ASSERT_TRUE(index.ok()) << index.error().message();
  ASSERT_EQ(index->members.size(), 2u);
  EXPECT_EQ(index->members[0].mtime_sec, 42);
  EXPECT_EQ(index->members[1].mtime_sec, 42);
}

TEST(TarIndex, NoEndMarkerAcceptedLikeTarfile) {
  TempDir dir;
  TarBuilder t;
  t.AddFile("a", "abc");
  auto index = IndexBytes(dir, t.bytes());
  ASSERT_TRUE(index.ok()) << index.error().message();
  EXPECT_FALSE(index->has_end_marker);
  EXPECT_EQ(index->members.size(), 1u);
}

// ---- hostile inputs: each a clear EINVAL naming the file, never a crash ----

void ExpectRejected(const std::string& bytes, const std::string& what) {
  TempDir dir;
  auto index = IndexBytes(dir, bytes);
  ASSERT_FALSE(index.ok()) << "accepted: " << what;
  EXPECT_EQ(index.error().code(), EINVAL) << index.error().message();
  EXPECT_NE(index.error().message().find(dir.Join("t.tar")), std::string::npos)
      << index.error().message();
  EXPECT_NE(index.error().message().find(what), std::string::npos) << index.error().message();
}

TEST(TarIndexHostile, BadChecksum) {
  TarBuilder t;
  t.AddFile("a", "abc").AddHeader({"b", '0', 3}, /*corrupt_checksum=*/true).AddData("xyz").End();
  ExpectRejected(t.bytes(), "offset 1024 has a bad checksum");
}

TEST(TarIndexHostile, TruncatedHeader) {
  TarBuilder t;
  t.AddFile("a", "abc").AddFile("b", "defg");
  std::string bytes = t.bytes();
  ExpectRejected(bytes.substr(0, 1024 + 300), "truncated tar header at offset 1024");
}

TEST(TarIndexHostile, SizeRunsPastEnd) {
  TarBuilder t;
  t.AddHeader({"big", '0', 1 << 20}).AddData("only a little");
  ExpectRejected(t.bytes(), "has 1048576 bytes of data but the archive ends");
}

TEST(TarIndexHostile, HugeBase256Size) {
  TarBuilder t;
  t.AddHeader({"huge", '0', ~uint64_t{0} >> 2, "", 0644, 0, true}).AddData("x");
  ExpectRejected(t.bytes(), "bytes of data but the archive ends");
}

TEST(TarIndexHostile, PaxLengthTooLong) {
  TarBuilder t;
  t.AddPax("99 path=x\n").AddFile("a", "x").End();
  ExpectRejected(t.bytes(), "malformed record");
}

TEST(TarIndexHostile, PaxLengthNotANumber) {
  TarBuilder t;
  t.AddPax("1x path=abc\n").AddFile("a", "x").End();
  ExpectRejected(t.bytes(), "malformed record");
}

TEST(TarIndexHostile, PaxLengthZero) {
  TarBuilder t;
  t.AddPax("0 path=abc\n").AddFile("a", "x").End();
  ExpectRejected(t.bytes(), "malformed record");
}

TEST(TarIndexHostile, PaxRecordWithoutEquals) {
  TarBuilder t;
  t.AddPax("11 pathabc\n").AddFile("a", "x").End();
  ExpectRejected(t.bytes(), "without key=value");
}

TEST(TarIndexHostile, PaxBadSizeValue) {
  TarBuilder t;
  t.AddPax(TarBuilder::PaxRecord("size", "-5")).AddFile("a", "x").End();
  ExpectRejected(t.bytes(), "PAX size '-5'");
}

TEST(TarIndexHostile, ExtendedHeaderWithoutMember) {
  TarBuilder t;
  t.AddFile("a", "x").AddPax(TarBuilder::PaxRecord("path", "zzz")).End();
  ExpectRejected(t.bytes(), "not followed by a member");
}

TEST(TarIndexHostile, HugeExtendedHeader) {
  TarBuilder t;
  t.AddHeader({"././@PaxHeader", 'x', uint64_t{1} << 30}).AddData("12 path=abc\n");
  ExpectRejected(t.bytes(), "claims 1073741824 bytes");
}

TEST(TarIndexHostile, GarbageSizeField) {
  TarBuilder t;
  t.AddFile("a", "x");
  std::string bytes = t.bytes();
  std::memcpy(bytes.data() + 124, "12z4567", 7);
  // recompute the checksum so that only the size field is wrong
  std::memset(bytes.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (int i = 0; i < 512; ++i) sum += static_cast<unsigned char>(bytes[i]);
  snprintf(bytes.data() + 148, 8, "%06o", sum);
  ExpectRejected(bytes, "invalid size field");
}

TEST(TarIndexHostile, TruncatedAtEveryOffsetNeverCrashes) {
  std::string good = testing::ReadFile(TestData("tiny_gpt.nemo"));
  TempDir dir;
  // Every cut inside the headers region and a stride through the data.
  for (size_t cut = 1; cut < good.size(); cut += (cut < 8192 ? 97 : 4093)) {
    auto index = IndexBytes(dir, good.substr(0, cut));
    if (!index.ok()) {
      EXPECT_EQ(index.error().code(), EINVAL) << "cut " << cut;
    } else {
      for (const auto& m : index->members) EXPECT_LE(m.data_offset + m.size, cut) << "cut " << cut;
    }
  }
}

// ---- TarSource: the normalised tree ----

TEST(TarSource, HidesUnsafeMembersAndLastDuplicateWins) {
  TempDir dir;
  TarBuilder t;
  t.AddDir("./")
      .AddFile("./config.yaml", "old: 1\n")
      .AddFile("../evil", "x")
      .AddFile("/etc/abs", "x")
      .AddFile("./sub/../../up", "x")
      .AddSymlink("./escape", "../../etc/passwd")
      .AddSymlink("./abs_link", "/etc/passwd")
      .AddSymlink("./ok_link", "config.yaml")
      .AddHardlink("./hard", "./config.yaml")
      .AddHardlink("./bad_hard", "./missing")
      .AddFile("./config.yaml", "new: 2\n")
      .AddFile("deep/dir/file.txt", "implicit parents")
      .End();
  std::string path = dir.Join("x.tar");
  testing::WriteFile(path, t.bytes());
  auto src = OpenSource(path, {});
  ASSERT_TRUE(src.ok()) << src.error().message();
  std::vector<std::string> paths;
  for (const auto& e : (*src)->entries()) paths.push_back(e.path);
  EXPECT_EQ(paths, (std::vector<std::string>{"", "config.yaml", "deep", "deep/dir",
                                             "deep/dir/file.txt", "hard", "ok_link"}));
  const Entry* cfg = (*src)->Find("config.yaml");
  ASSERT_NE(cfg, nullptr);
  EXPECT_EQ(*(*src)->ReadAll(*cfg, 100), "new: 2\n");
  // The hard link points at the member before it (the old text), as tar -x gives.
  EXPECT_EQ(*(*src)->ReadAll(*(*src)->Find("hard"), 100), "old: 1\n");
  std::string warnings;
  for (const auto& w : (*src)->warnings()) warnings += w + "\n";
  for (const char* hidden :
       {"../evil", "/etc/abs", "./sub/../../up", "./escape", "./abs_link", "./bad_hard"}) {
    EXPECT_NE(warnings.find(std::string("'") + hidden + "'"), std::string::npos)
        << hidden << " not reported in:\n"
        << warnings;
  }
}

TEST(TarSource, EmptyFileIsAnError) {
  TempDir dir;
  testing::WriteFile(dir.Join("empty.nemo"), "");
  auto src = OpenSource(dir.Join("empty.nemo"), {});
  ASSERT_FALSE(src.ok());
  EXPECT_EQ(src.error().message(), dir.Join("empty.nemo") + ": empty file");
}

}  // namespace
}  // namespace nemofs::source
