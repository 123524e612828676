// nemofs repack: superseded copies dropped, everything else byte-identical,
// gzip -> plain, and a crash before the rename leaves the archive untouched.
#include "nemofs/repack.h"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "source/tar_index.h"
#include "test_util.h"
#include "util/fd.h"
#include "util/io.h"
#include "write/fault.h"
#include "write/tar_append.h"

namespace nemofs::write {
namespace {

using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;

uint64_t EndOf(const std::string& path) {
  auto fd = OpenReadOnly(path);
  auto st = FStat(fd->get(), path);
  return source::IndexTar(fd->get(), 0, static_cast<uint64_t>(st->st_size), path)->end_offset;
}

std::string Members(const std::string& path) {
  auto r =
      Sh("/usr/bin/python3 -c 'import sys,tarfile,hashlib; t=tarfile.open(sys.argv[1])\n"
         "for m in t.getmembers():\n"
         "    d = t.extractfile(m).read() if m.isreg() else b\"\"\n"
         "    print(m.name, m.type, hashlib.sha256(d).hexdigest()[:16])' " +
         ShellQuote(path));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

TEST(Repack, DropsSupersededCopiesAndKeepsEverythingElse) {
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(Sh("cp " + ShellQuote(TestData("tiny_gpt.nemo")) + " " + ShellQuote(path)).exit_code,
            0);
  std::string before = Members(path);
  {
    UniqueFd fd(::open(path.c_str(), O_RDWR));
    auto r1 =
        AppendTarMember(fd.get(), EndOf(path), "./model_config.yaml", "v: 1\n", 1, 0644, path);
    ASSERT_TRUE(r1.ok());
    ASSERT_TRUE(
        AppendTarMember(fd.get(), r1->new_end, "./model_config.yaml", "v: 2\n", 2, 0644, path)
            .ok());
  }
  auto stats = Repack(path, path, dir.Join("cache"), nullptr);
  ASSERT_TRUE(stats.ok()) << stats.error().message();
  EXPECT_EQ(stats->members, 7u);
  std::string after = Members(path);
  // Same members in the same order; only the config's bytes changed.
  auto r = Sh("tar -xOf " + ShellQuote(path) + " ./model_config.yaml");
  EXPECT_EQ(r.out, "v: 2\n");
  EXPECT_EQ(std::count(after.begin(), after.end(), '\n'), 7);
  for (const char* name :
       {"./model_weights.ckpt", "./0c79b648c99d47c28a5d98eba838b355_merges.txt"}) {
    auto line = [&](const std::string& listing) {
      auto at = listing.find(std::string(name) + " ");
      return at == std::string::npos ? std::string()
                                     : listing.substr(at, listing.find('\n', at) - at);
    };
    EXPECT_EQ(line(after), line(before)) << name;
  }
  EXPECT_EQ(Sh("tar -tf " + ShellQuote(path) + " >/dev/null").exit_code, 0);
}

TEST(Repack, GzipBecomesPlainWithTheSameMembers) {
  TempDir dir;
  auto plain = Repack(TestData("tiny_gpt.nemo"), dir.Join("a.nemo"), dir.Join("c"), nullptr);
  ASSERT_TRUE(plain.ok()) << plain.error().message();
  uint64_t last = 0;
  auto gz = Repack(TestData("tiny_gpt_gz.nemo"), dir.Join("b.nemo"), dir.Join("c"),
                   [&](uint64_t done, uint64_t total) {
                     EXPECT_GE(done, last);
                     EXPECT_LE(done, total);
                     last = done;
                   });
  ASSERT_TRUE(gz.ok()) << gz.error().message();
  EXPECT_GT(last, 0u) << "progress was reported";
  EXPECT_EQ(testing::ReadFile(dir.Join("a.nemo")), testing::ReadFile(dir.Join("b.nemo")));
  EXPECT_EQ(Members(dir.Join("b.nemo")), Members(TestData("tiny_gpt.nemo")));
}

TEST(Repack, CrashBeforeTheRenameLeavesTheArchiveUntouched) {
  TempDir dir;
  std::string path = dir.Join("m.nemo");
  ASSERT_EQ(
      Sh("cp " + ShellQuote(TestData("tiny_gpt_tp2.nemo")) + " " + ShellQuote(path)).exit_code, 0);
  std::string before = testing::ReadFile(path);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("NEMOFS_FAULT", "repack:written", 1);
    auto r = Repack(path, path, dir.Join("c"), nullptr);
    ::_exit(r.ok() ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_EQ(WEXITSTATUS(status), kFaultExitCode);
  EXPECT_EQ(testing::ReadFile(path), before);
}

// `tar -tvf` (names) or `tar --numeric-owner -tvf` (ids) of `path`, sorted,
// directories without their trailing slash (repack writes "./sub", GNU tar "./sub/").
std::string TarListing(const std::string& path, bool numeric) {
  auto r = Sh(std::string("tar ") + (numeric ? "--numeric-owner " : "") + "-tvf " +
              ShellQuote(path) + " | sed -E 's|/$||' | LC_ALL=C sort");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(Repack, KeepsTarOwnerNamesAndIds) {
  TempDir dir;
  const std::string long_name = "sub/" + std::string(120, 'n') + ".txt";  // > 100: GNU L / PAX path
  auto r = Sh("cd " + ShellQuote(dir.path()) +
              " && mkdir -p src/sub extra && echo hi > src/" + long_name +
              " && echo a > src/a.txt && ln -s a.txt src/link && echo late > extra/late.txt"
              // GNU format: a GNU long-name record; a second owner appended.
              " && tar --format=gnu -cf gnu.tar --sort=name --owner=alice:1234 "
              "--group=team:5678 -C src ."
              " && tar --format=gnu -rf gnu.tar --owner=bob:4321 --group=staff:8765 "
              "-C extra ./late.txt"
              " && gzip -kn gnu.tar"
              // PAX format: a user name longer than ustar's 32 bytes, a uid above 7 octal digits.
              " && tar --format=pax -cf pax.tar --sort=name "
              "--owner=a_user_name_longer_than_thirty_two_chars:3000000 --group=team:5678 "
              "-C src .");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  struct Case {
    std::string file;
    std::vector<std::pair<std::string, size_t>> names, ids;  // owner column -> members
  };
  const std::vector<Case> cases = {
      {"gnu.tar", {{"alice/team ", 5}, {"bob/staff ", 1}}, {{"1234/5678 ", 5}, {"4321/8765 ", 1}}},
      {"gnu.tar.gz", {{"alice/team ", 5}, {"bob/staff ", 1}}, {{"1234/5678 ", 5}, {"4321/8765 ", 1}}},
      {"pax.tar",
       {{"a_user_name_longer_than_thirty_two_chars/team ", 5}},
       {{"3000000/5678 ", 5}}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.file);
    const std::string in = dir.Join(c.file), out = dir.Join(c.file + ".repacked");
    auto stats = Repack(in, out, dir.Join("cache"), nullptr);
    ASSERT_TRUE(stats.ok()) << stats.error().message();
    for (bool numeric : {false, true}) {
      std::string before = TarListing(in, numeric), after = TarListing(out, numeric);
      EXPECT_EQ(after, before) << (numeric ? "--numeric-owner" : "names");
      size_t members = 0;
      for (const auto& [owner, n] : numeric ? c.ids : c.names) {
        EXPECT_EQ(Count(after, owner), n) << owner << "\n" << after;
        members += n;
      }
      EXPECT_EQ(static_cast<size_t>(std::count(after.begin(), after.end(), '\n')), members)
          << after;
    }
    // The long name and the root entry are there (with their owners, above).
    const std::string listed = TarListing(out, false);
    EXPECT_NE(listed.find("./" + long_name + "\n"), std::string::npos) << listed;
    EXPECT_NE(listed.find(" .\n"), std::string::npos) << listed;
  }
}

// A folder (or single file) has no archive to rewrite: repack in place
// removes what interrupted commits left (a dead process's temp files, not a
// live one's), and refuses another OUT.
TEST(Repack, AFolderGetsItsOrphansRemovedInPlaceOnly) {
  auto r = Repack(TestData("nemo2_tiny"), "/tmp/never", "/tmp", nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("repacked in place only"), std::string::npos);
  testing::TempDir dir;
  const std::string src = dir.Join("src");
  ASSERT_EQ(Sh("cp -a " + ShellQuote(TestData("nemo2_tiny")) + " " + ShellQuote(src)).exit_code, 0);
  // pid 999999999 cannot exist; our own is alive.
  testing::WriteFile(src + "/context/.model.yaml.nemofs-tmp.999999999", "half a save");
  const std::string live = src + "/.x.nemofs-tmp." + std::to_string(::getpid());
  testing::WriteFile(live, "a save running now");
  auto done = Repack(src, src, dir.Join("cache"), nullptr);
  ASSERT_TRUE(done.ok()) << done.error().message();
  EXPECT_EQ(done->orphans, 1u);
  EXPECT_EQ(done->orphan_bytes, 11u);
  EXPECT_FALSE(std::filesystem::exists(src + "/context/.model.yaml.nemofs-tmp.999999999"));
  EXPECT_TRUE(std::filesystem::exists(live));
}

}  // namespace
}  // namespace nemofs::write
