// Writes into a folder source never follow a symbolic link: the owner of
// the checkpoint folder (not the root running the mount) swaps a folder of
// it for a link to elsewhere after mounting; the store at unmount and the
// config commit must fail, naming the path, and write nothing outside.
#include <gtest/gtest.h>

#include "mount_harness.h"
#include "test_util.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

// Everything in `dir`, hidden files too, one a line ("" if empty).
std::string Listing(const std::string& dir) { return Sh("ls -A " + Q(dir)).out; }

// Puts `<src>/context` back (before the mount's destructor unmounts).
struct Unswap {
  std::string src;
  ~Unswap() { Sh("cd " + Q(src) + " && [ -L context ] && rm context && mv ctx.real context"); }
};

TEST(FolderWritesBeneath, ANewFileIsNotStoredThroughASwappedInSymlink) {
  const SourceKind& kind = Kind("nemo2_folder");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string outside = dir.Join("outside");
  ASSERT_EQ(Sh("mkdir " + Q(outside)).exit_code, 0);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("echo evil-content > " + Q(m->path() + "/archive/context/evil"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Unswap unswap{src};
  r = Sh("mv " + Q(src + "/context") + " " + Q(src + "/ctx.real") + " && ln -s " + Q(outside) +
         " " + Q(src + "/context"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()));
  EXPECT_NE(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_NE(r.err.find("could not store the new files"), std::string::npos) << r.err;
  EXPECT_EQ(Listing(outside), "") << m->Log();
  EXPECT_EQ(Sh("ls -A " + Q(src + "/ctx.real") + " | grep -c evil").out, "0\n");
  // The error names the path and the reason; the content is kept.
  EXPECT_NE(m->Log().find(src + "/context: a symbolic link is in the way"), std::string::npos)
      << m->Log();
  auto copy = Sh("cat " + Q(m->CacheDir()) + "/unsaved/*/context/evil");
  EXPECT_EQ(copy.out, "evil-content\n") << m->Log();
  EXPECT_NE(m->Log().find("their content is kept in " + m->CacheDir() + "/unsaved/"),
            std::string::npos)
      << m->Log();
  // Not stored, it can go; then the unmount goes through.
  r = Sh("rm " + Q(m->path() + "/archive/context/evil"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  m->Unmount();
  EXPECT_EQ(Listing(outside), "");
}

TEST(FolderWritesBeneath, AConfigCommitIsNotWrittenThroughASwappedInSymlink) {
  const SourceKind& kind = Kind("nemo2_folder");
  ASSERT_EQ(kind.member, "context/model.yaml");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string outside = dir.Join("outside");
  ASSERT_EQ(Sh("mkdir " + Q(outside)).exit_code, 0);
  const std::string old_text = ReadFile(src + "/" + kind.member);
  WriteFile(dir.Join("new.yaml"), old_text + "edited: true\n");
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  Unswap unswap{src};
  // The link leads to a folder holding the very file (a hard link: same
  // identity), so only following the link, not the identity check, stops it.
  auto r = Sh("mv " + Q(src + "/context") + " " + Q(src + "/ctx.real") + " && ln " +
              Q(src + "/ctx.real/model.yaml") + " " + Q(outside + "/model.yaml") + " && ln -s " +
              Q(outside) + " " + Q(src + "/context"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh("cp " + Q(dir.Join("new.yaml")) + " " + Q(m->path() + "/config.yaml"));
  EXPECT_NE(r.exit_code, 0) << m->Log();
  EXPECT_NE(m->Log().find(src + "/context: a symbolic link is in the way"), std::string::npos)
      << r.err << "\n"
      << m->Log();
  EXPECT_EQ(Listing(outside), "model.yaml\n");
  EXPECT_EQ(ReadFile(outside + "/model.yaml"), old_text);
  EXPECT_EQ(ReadFile(src + "/ctx.real/model.yaml"), old_text);
  EXPECT_EQ(Sh("stat -c %h " + Q(outside + "/model.yaml")).out, "2\n") << "the file was replaced";
  m->Unmount();
  EXPECT_EQ(Listing(outside), "model.yaml\n");
}

}  // namespace
}  // namespace nemofs::testing
