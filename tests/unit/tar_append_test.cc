// Crash-safe tar append: the new member wins for our index, Python's tarfile
// and GNU tar; a crash at any step leaves exactly the old or the new archive.
#include "write/tar_append.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include "source/source.h"
#include "source/tar_index.h"
#include "test_util.h"
#include "util/fd.h"
#include "util/io.h"
#include "write/fault.h"

namespace nemofs::write {
namespace {

using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;

const char kMember[] = "./model_config.yaml";

uint64_t EndOf(const std::string& path) {
  auto fd = OpenReadOnly(path);
  auto st = FStat(fd->get(), path);
  auto index = source::IndexTar(fd->get(), 0, static_cast<uint64_t>(st->st_size), path);
  EXPECT_TRUE(index.ok() && index->has_end_marker);
  return index->end_offset;
}

// The config as each reader sees it: ours, Python's tarfile, GNU tar -x.
void ExpectConfig(const std::string& path, const std::string& want) {
  auto src = source::OpenSource(path, {});
  ASSERT_TRUE(src.ok()) << src.error().message();
  EXPECT_EQ(*(*src)->ReadAll(*(*src)->Find("model_config.yaml"), 1 << 20), want);
  auto r =
      Sh("/usr/bin/python3 -c 'import sys,tarfile; "
         "sys.stdout.buffer.write(tarfile.open(sys.argv[1]).extractfile(\"./"
         "model_config.yaml\").read())' " +
         ShellQuote(path));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, want);
  TempDir out;
  r = Sh("tar -xf " + ShellQuote(path) + " -C " + ShellQuote(out.path()) + " && tar -tf " +
         ShellQuote(path) + " > /dev/null");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(testing::ReadFile(out.Join("model_config.yaml")), want);
}

TEST(TarAppend, NewMemberWinsEverywhereAndRepeats) {
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(path)).exit_code,
            0);
  std::string old = testing::ReadFile(path);
  UniqueFd fd(::open(path.c_str(), O_RDWR));
  ASSERT_TRUE(fd.valid());
  auto r1 = AppendTarMember(fd.get(), EndOf(path), kMember, "a: 1\n", 1700000000, 0644, path);
  ASSERT_TRUE(r1.ok()) << r1.error().message();
  ExpectConfig(path, "a: 1\n");
  EXPECT_EQ(testing::ReadFile(path).compare(0, EndOf(TestData("tiny_gpt.nemo")), old, 0,
                                            EndOf(TestData("tiny_gpt.nemo"))),
            0)
      << "bytes before the old end marker must not change";
  auto r2 = AppendTarMember(fd.get(), r1->new_end, kMember, "a: 2\n", 1700000001, 0644, path);
  ASSERT_TRUE(r2.ok()) << r2.error().message();
  EXPECT_EQ(EndOf(path), r2->new_end);
  ExpectConfig(path, "a: 2\n");
  EXPECT_EQ(testing::ReadFile(path).size() % 10240, 0u);
}

TEST(TarAppend, LongNamesGetAPaxPathRecord) {
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(path)).exit_code,
            0);
  UniqueFd fd(::open(path.c_str(), O_RDWR));
  std::string name = "./" + std::string(150, 'x') + ".yaml";
  ASSERT_TRUE(AppendTarMember(fd.get(), EndOf(path), name, "b: 1\n", 1, 0644, path).ok());
  auto r =
      Sh("/usr/bin/python3 -c 'import sys,tarfile; t=tarfile.open(sys.argv[1]); "
         "print(t.getmembers()[-1].name[-10:], t.extractfile(t.getmembers()[-1]).read())' " +
         ShellQuote(path));
  EXPECT_EQ(r.out, "xxxxx.yaml b'b: 1\\n'\n") << r.err;
}

// A member written in place by a writer (a repacked weight file): its size
// goes in a PAX record, rewritten once known; past 8 GiB (the ustar size
// field's limit) too. Python's tarfile, GNU tar and our index agree on it,
// and its bytes are where the writer put them. The 9 GiB member is sparse.
TEST(TarAppend, AWriterMemberOfAnySizeGetsAPaxSizeRecord) {
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(path)).exit_code,
            0);
  UniqueFd fd(::open(path.c_str(), O_RDWR));
  for (uint64_t size : {uint64_t{5}, (uint64_t{9} << 30) + 3}) {
    NewMember m;
    m.name = "./big.bin";
    m.mtime = 1700000000;
    uint64_t wrote_at = 0;
    m.writer = [&](int out, uint64_t at) -> Result<uint64_t> {
      wrote_at = at;
      NEMOFS_RETURN_IF_ERROR(PwriteFull(out, "head", at, path));
      NEMOFS_RETURN_IF_ERROR(PwriteFull(out, "x", at + size - 1, path));
      return size;
    };
    auto r = AppendTarMembers(fd.get(), EndOf(path), {m}, path);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(r->data_offset, wrote_at);
    auto py = Sh("/usr/bin/python3 -c 'import sys,tarfile; t=tarfile.open(sys.argv[1]); "
                 "m=[x for x in t.getmembers() if x.name == \"./big.bin\"][-1]; "
                 "print(m.size, m.offset_data)' " + ShellQuote(path));
    EXPECT_EQ(py.out, std::to_string(size) + " " + std::to_string(wrote_at) + "\n") << py.err;
    auto gnu = Sh("tar -tvf " + ShellQuote(path) + " | grep big.bin | tail -1 | awk '{print $3}'");
    EXPECT_EQ(gnu.out, std::to_string(size) + "\n") << gnu.err;
    auto src = source::OpenSource(path, {});
    ASSERT_TRUE(src.ok()) << src.error().message();
    EXPECT_EQ((*src)->Find("big.bin")->size, size);
  }
}

// Several members in one append, each after one whose data ends mid-block
// (a writer's, a large one's, a small one's): every header, PAX ones
// included, is on a block boundary, and GNU tar reads every member back.
TEST(TarAppend, MembersAfterOnesEndingMidBlockStayAligned) {
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(path)).exit_code,
            0);
  UniqueFd fd(::open(path.c_str(), O_RDWR));
  const std::string big((3u << 19) + 7, 'b');  // past the 1 MiB copied-in-pending limit
  std::vector<NewMember> members(4);
  members[0].name = "./w1.bin";
  members[0].writer = [&](int out, uint64_t at) -> Result<uint64_t> {
    NEMOFS_RETURN_IF_ERROR(PwriteFull(out, "writer-one", at, path));
    return 10;
  };
  members[1].name = "./w2.bin";  // a writer right after a writer
  members[1].writer = [&](int out, uint64_t at) -> Result<uint64_t> {
    NEMOFS_RETURN_IF_ERROR(PwriteFull(out, "second", at, path));
    return 6;
  };
  members[2].name = "./big.bin";
  members[2].data = big;
  members[3].name = "./" + std::string(120, 'l') + ".txt";  // a PAX path after the big one
  members[3].data = "last";
  for (auto& m : members) m.mtime = 1700000000;
  auto r = AppendTarMembers(fd.get(), EndOf(path), members, path);
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto gnu = Sh("cd " + ShellQuote(dir.path()) + " && mkdir x && tar -xf m.nemo -C x && cat x/w1.bin; "
                "echo; cat x/w2.bin; echo; wc -c < x/big.bin; cat x/llll*.txt");
  EXPECT_EQ(gnu.exit_code, 0) << gnu.err;
  EXPECT_EQ(gnu.out, "writer-one\nsecond\n" + std::to_string(big.size()) + "\nlast") << gnu.err;
}

TEST(TarAppend, RefusesAnArchiveThatChanged) {
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(path)).exit_code,
            0);
  UniqueFd fd(::open(path.c_str(), O_RDWR));
  auto r = AppendTarMember(fd.get(), EndOf(path) - 512, kMember, "x", 1, 0644, path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), EINVAL);
  EXPECT_NE(r.error().message().find("no end-of-archive marker"), std::string::npos);
}

// Kill (_exit) the writer at every step; the archive is exactly old or new.
class TarAppendCrash : public ::testing::TestWithParam<std::pair<std::string, bool>> {};

TEST_P(TarAppendCrash, ArchiveIsOldOrNew) {
  const auto& [step, committed] = GetParam();
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(path)).exit_code,
            0);
  std::string old_config = Sh("tar -xOf " + ShellQuote(path) + " ./model_config.yaml").out;
  uint64_t end = EndOf(path);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("NEMOFS_FAULT", step.c_str(), 1);
    UniqueFd fd(::open(path.c_str(), O_RDWR));
    auto r = AppendTarMember(fd.get(), end, kMember, "crashed: edit\n", 1, 0644, path);
    ::_exit(r.ok() ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kFaultExitCode) << "the fault point was not reached";
  ExpectConfig(path, committed ? "crashed: edit\n" : old_config);
}

INSTANTIATE_TEST_SUITE_P(Steps, TarAppendCrash,
                         ::testing::Values(std::make_pair("tar-append:before", false),
                                           std::make_pair("tar-append:data-written", false),
                                           std::make_pair("tar-append:committed", true)),
                         [](const auto& info) { return testing::TestName(info.param.first); });

}  // namespace
}  // namespace nemofs::write
