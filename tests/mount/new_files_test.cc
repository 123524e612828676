// Issue 16 §4 (a failed write poisons its handle, xattrs of new files,
// touch -d) and §5 (a file the user creates is stored in the checkpoint at
// fsync or unmount, editors' temp files are not), through real mounts.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <filesystem>
#include <map>

#include "mount_harness.h"
#include "nemofs/filesystem.h"
#include "test_util.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

// ---- §4 ---------------------------------------------------------------------

TEST(FailedWrite, PoisonsTheHandleCloseSavesNothingAndReturnsTheError) {
  const SourceKind& kind = Kind("plain_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string old = CatConfig(src);
  std::string digest = SourceDigest(src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  // "key: xxx..." is a valid mapping at any length: before the fix its
  // first 64 MiB were saved at close.
  std::string script =
      "import errno, os\n"
      "fd = os.open('config.yaml', os.O_WRONLY | os.O_TRUNC)\n"
      "os.write(fd, b'key: ')\n"
      "chunk = b'x' * (1 << 20)\n"
      "failed = None\n"
      "for i in range(70):\n"
      "    try:\n"
      "        os.write(fd, chunk)\n"
      "    except OSError as e:\n"
      "        failed = e.errno\n"
      "        break\n"
      "print('write', errno.errorcode.get(failed))\n"
      "try:\n"
      "    os.close(fd)\n"
      "    print('close ok')\n"
      "except OSError as e:\n"
      "    print('close', errno.errorcode[e.errno])\n";
  WriteFile(dir.Join("poison.py"), script);
  auto r = Sh("cd " + Q(m->path()) + " && /usr/bin/python3 " + Q(dir.Join("poison.py")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("write EFBIG"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("close EFBIG"), std::string::npos) << r.out;
  EXPECT_TRUE(SameText(ReadFile(m->path() + "/config.yaml"), old));
  m->Unmount();
  EXPECT_EQ(SourceDigest(src), digest);
  EXPECT_TRUE(SameText(StoredConfig(kind, src), old));
}

TEST(NewFileXattrs, AreEnodataAndAnEmptyListLikeEveryOtherFile) {
  TempDir dir;
  std::string src = MakeSource(Kind("plain_tar"), dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  std::string script =
      "import errno, os\n"
      "open('.config.yaml.swp', 'w').write('swap')\n"
      "for p in ['.config.yaml.swp', 'archive/model_config.yaml']:\n"
      "    try:\n"
      "        os.getxattr(p, 'security.selinux')\n"
      "    except OSError as e:\n"
      "        print(p, errno.errorcode[e.errno])\n"
      "    print(p, 'list', os.listxattr(p))\n"
      "os.unlink('.config.yaml.swp')\n";
  WriteFile(dir.Join("x.py"), script);
  auto r = Sh("cd " + Q(m->path()) + " && /usr/bin/python3 " + Q(dir.Join("x.py")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find(".config.yaml.swp ENODATA"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(".config.yaml.swp list []"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("archive/model_config.yaml ENODATA"), std::string::npos) << r.out;
  r = Sh("cd " + Q(m->path()) + " && touch .x.swp && ls -la >/dev/null && rm .x.swp");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err, "");
}

TEST(TouchD, SetsTheShownMtimeOfTheConfigAndOfANewFile) {
  TempDir dir;
  std::string src = MakeSource(Kind("plain_tar"), dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && touch -d @1600000000 config.yaml && stat -c %Y config.yaml"
              " && echo hi > notes.txt && touch -d @1500000000 notes.txt && stat -c %Y notes.txt");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "1600000000\n1500000000\n");
  // The config keeps it across a save of the same text (cat >> nothing).
  r = Sh("cd " + Q(m->path()) + " && : >> config.yaml && stat -c %Y config.yaml");
  EXPECT_EQ(r.out, "1600000000\n") << r.err;
}

// ---- §5: a file the user created never vanishes -----------------------------

// Kinds with one way of storing each: append, rewrite, file in a folder.
const std::vector<std::string>& StoreKinds() {
  static const std::vector<std::string> kinds = {"plain_tar", "gzip_tar", "extracted_nemo_folder"};
  return kinds;
}

// Editors' temp files of every kind that can outlive the editor (open or
// crashed), made and left in place.
const char* kTempFiles =
    "echo s > .notes.txt.swp && echo b > notes.txt~"
    " && echo g > .goutputstream-XY12ZW && echo e > '#notes.txt#'";

class NewFiles : public ::testing::TestWithParam<std::string> {};

TEST_P(NewFiles, AreStoredAtUnmountShownAfterRemountAndTempFilesAreNot) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string before = Members(kind, src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && echo hi > notes.txt &&"
              " printf 'x\\n' > archive/extra.txt && echo gone > gone.txt && rm gone.txt && " +
              kTempFiles + " && ls");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("notes.txt\n"), std::string::npos) << r.out;
  // `nemofs umount` waits for the store (the daemon's exit).
  r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  m->Unmount();
  EXPECT_NE(m->Log().find("stored 2 new files"), std::string::npos) << m->Log();
  // Exactly the two new files are new members: no temp file, no deleted one.
  std::string after = Members(kind, src);
  std::string expected = before + "extra.txt\nnotes.txt\n";
  auto sorted = Sh("printf '%s' " + Q(expected) + " | LC_ALL=C sort");
  EXPECT_EQ(after, sorted.out);
  EXPECT_EQ(Extracted(kind, src, "notes.txt"), "hi\n");
  EXPECT_EQ(Extracted(kind, src, "extra.txt"), "x\n");
  r = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;

  auto again = Mount::StartWritable(src);
  ASSERT_TRUE(again);
  EXPECT_EQ(ReadFile(again->path() + "/notes.txt"), "hi\n");
  EXPECT_EQ(ReadFile(again->path() + "/archive/notes.txt"), "hi\n");
  EXPECT_EQ(ReadFile(again->path() + "/extra.txt"), "x\n");  // a top-level member
  r = Sh("ls -A " + Q(again->path()));
  EXPECT_EQ(r.out.find(".swp"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("gone.txt"), std::string::npos) << r.out;
}

TEST_P(NewFiles, CreatedAndDeletedOrTempOnlyCostsNothing) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string digest = SourceDigest(src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && echo gone > gone.txt && mv gone.txt gone2.txt && "
              "rm gone2.txt && echo a > archive/b.txt && rm archive/b.txt && " +
              kTempFiles);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  m->Unmount();
  EXPECT_EQ(SourceDigest(src), digest);
}

TEST_P(NewFiles, VimAndSedEditsOfTheConfigAddNoMember) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string before = Members(kind, src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r =
      Sh("cd " + Q(m->path()) +
             " && vim -u NONE -N -es -c 'set backup writebackup' -c 'normal Goby_vim: 1' -c wq "
             "config.yaml </dev/null && sed -i '$a by_sed: 2' config.yaml && "
             "grep -q by_vim config.yaml && grep -q by_sed config.yaml",
         60);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  m->Unmount();
  EXPECT_EQ(Members(kind, src), before);
  EXPECT_NE(StoredConfig(kind, src).find("by_sed: 2"), std::string::npos);
}

TEST_P(NewFiles, FsyncStoresANewFileAtOnce) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && /usr/bin/python3 -c \"import os; f = open('synced.txt', 'w'); f.write('now\\n');"
              " f.flush(); os.fsync(f.fileno()); f.close()\"");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Visible to the format's own tool while still mounted.
  EXPECT_NE(Members(kind, src).find("synced.txt\n"), std::string::npos);
  EXPECT_EQ(Extracted(kind, src, "synced.txt"), "now\n");
  // Stored now, so part of the checkpoint: not deletable; unmount adds nothing.
  r = Sh("rm " + Q(m->path() + "/synced.txt"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Operation not permitted"), std::string::npos) << r.err;
  std::string digest = SourceDigest(src);
  m->Unmount();
  EXPECT_EQ(SourceDigest(src), digest);
}

TEST_P(NewFiles, AStoredFileWrittenAgainIsStoredAgainAtUnmount) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && /usr/bin/python3 -c \"import os; f = open('log.txt', 'w'); f.write('one\\n');"
              " f.flush(); os.fsync(f.fileno()); f.close()\" && echo two >> log.txt");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Extracted(kind, src, "log.txt"), "one\n");
  m->Unmount();
  EXPECT_EQ(Extracted(kind, src, "log.txt"), "one\ntwo\n");
  if (kind.name == "gzip_tar") {  // a rewrite replaces the member: listed once
    EXPECT_EQ(Sh("tar -tf " + Q(src) + " | grep -c log.txt").out, "1\n");
  }
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  EXPECT_EQ(ReadFile(again->path() + "/log.txt"), "one\ntwo\n");
}

// G5: names that an over-broad rule once dropped silently (any all-digit
// name, "sed" + 6 letters or digits) are ordinary files: stored at unmount,
// there after a remount, the same bytes the format's own tool extracts.
TEST_P(NewFiles, DigitAndSedLikeNamesAreStoredAtUnmount) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) +
              " && echo important > 2024 && echo rock > sediments && echo kept > 4913"
              " && echo t > sedAb12Cd && echo five > archive/5036");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_EQ(r.err.find("not stored"), std::string::npos) << r.err;
  m->Unmount();
  const std::map<std::string, std::string> files = {{"2024", "important\n"},
                                                    {"sediments", "rock\n"},
                                                    {"4913", "kept\n"},
                                                    {"sedAb12Cd", "t\n"},
                                                    {"5036", "five\n"}};
  for (const auto& [name, text] : files) EXPECT_EQ(Extracted(kind, src, name), text) << name;
  auto again = Mount::Start(src);
  ASSERT_TRUE(again);
  for (const auto& [name, text] : files) {
    EXPECT_EQ(ReadFile(again->path() + "/" + name), text) << name;
  }
}

// An editor's swap file still there at unmount (the editor open or crashed)
// is not stored, and `nemofs umount` names it on stderr, with what to do;
// the daemon logs it as a warning.
TEST_P(NewFiles, ASwapFileLeftAtUnmountIsNamedByUmount) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string before = Members(kind, src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  // vim really makes it (-n off: a swap file), then is killed: it stays.
  // Wait for a non-empty swap file: vim first creates and removes an empty
  // one (and a look-alike name) to test for 8.3 names, and a kill in between
  // leaves nothing; block 0 ("b0VIM") is written right after the real one.
  auto r = Sh("cd " + Q(m->path()) +
                  " && (vim -u NONE -N -es -c 'sleep 30' config.yaml </dev/null >/dev/null 2>&1 &"
                  " echo $! > " +
                  Q(dir.Join("vim.pid")) +
                  ") && for i in $(seq 100); do [ -s .config.yaml.swp ] && break; sleep 0.1;"
                  " done && kill -9 $(cat " +
                  Q(dir.Join("vim.pid")) + ") && sleep 0.3 && ls -A && echo x > archive/'#draft#'",
              60);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ASSERT_NE(r.out.find(".config.yaml.swp\n"), std::string::npos) << r.out;
  r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_NE(r.err.find("not stored: .config.yaml.swp (an editor's swap file; copy it out before "
                       "unmounting if you need it)"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("not stored: archive/#draft# (emacs's auto-save file"), std::string::npos)
      << r.err;
  m->Unmount();
  EXPECT_NE(m->Log().find("not stored: .config.yaml.swp"), std::string::npos) << m->Log();
  EXPECT_EQ(Members(kind, src), before);
}

// G4: a time set on the config (touch -d) is written into the source by
// the next commit: at the close of touch's own descriptor, or, set by path
// (os.utime), at unmount. The text stays byte for byte; after a remount
// stat shows the time, and so does the format's own tool (tar -tv, stat).
std::string StoredConfigTime(const SourceKind& kind, const std::string& src) {
  auto r = kind.tar ? Sh("TZ=UTC tar -tvf " + Q(src) + " --full-time | grep -F " + Q(kind.member) +
                         " | tail -1")
                    : Sh("TZ=UTC stat -c %y " + Q(src + "/" + kind.member));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

TEST_P(NewFiles, ATimeSetOnTheConfigIsStoredAndTheTextIsUnchanged) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  const std::string text = StoredConfig(kind, src);
  struct Case {
    std::string set;   // run in the mount
    std::string time;  // as the stored time prints (UTC)
    std::string epoch;
  };
  const std::vector<Case> cases = {
      {"TZ=UTC touch -d '2020-01-01 00:00:00' config.yaml", "2020-01-01 00:00:00", "1577836800"},
      {"/usr/bin/python3 -c \"import os; os.utime('config.yaml', (1500000000, 1500000000))\"",
       "2017-07-14 02:40:00", "1500000000"}};
  for (const Case& c : cases) {
    auto m = Mount::StartWritable(src);
    ASSERT_TRUE(m);
    auto r = Sh("cd " + Q(m->path()) + " && " + c.set + " && stat -c %Y config.yaml");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, c.epoch + "\n") << c.set;
    r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()));
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
    m->Unmount();
    EXPECT_EQ(StoredConfig(kind, src), text) << c.set;  // byte for byte
    EXPECT_NE(StoredConfigTime(kind, src).find(c.time), std::string::npos)
        << c.set << ": " << StoredConfigTime(kind, src);
    auto again = Mount::Start(src);
    ASSERT_TRUE(again);
    r = Sh("stat -c %Y " + Q(again->path() + "/config.yaml"));
    EXPECT_EQ(r.out, c.epoch + "\n") << c.set << r.err;
    EXPECT_EQ(ReadFile(again->path() + "/config.yaml"), text);
  }
  auto r = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

INSTANTIATE_TEST_SUITE_P(Kinds, NewFiles, ::testing::ValuesIn(StoreKinds()), KindParamName);

TEST(NewFilesFailedStore, UmountReportsItKeepsTheMountAndACopyInTheCache) {
  const SourceKind& kind = Kind("plain_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("echo keep-me > " + Q(m->path() + "/notes.txt"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Someone else changes the archive: the store must refuse (ESTALE).
  r = Sh("touch -d @1000000000 " + Q(src));
  ASSERT_EQ(r.exit_code, 0);
  std::string digest = SourceDigest(src);
  r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("could not store the new files"), std::string::npos) << r.err;
  EXPECT_TRUE(IsMounted(m->path()));
  EXPECT_EQ(ReadFile(m->path() + "/notes.txt"), "keep-me\n");
  auto copy = Sh("cat " + Q(m->CacheDir()) + "/unsaved/*/notes.txt");
  EXPECT_EQ(copy.out, "keep-me\n") << m->Log();
  EXPECT_NE(m->Log().find("their content is kept in " + m->CacheDir() + "/unsaved/"),
            std::string::npos)
      << m->Log();
  EXPECT_EQ(SourceDigest(src), digest);
  // Deleting it (not stored) lets the unmount go through.
  r = Sh("rm " + Q(m->path() + "/notes.txt") + " && " + Q(NemofsBinary()) + " umount " +
         Q(m->path()));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  m->Unmount();
}

// A touch -d by another process while a writer's edit is half written
// stores the time with the COMMITTED text, never the writer's buffer; the
// writer's own close then stores its whole text.
TEST(TouchDDuringAnEdit, StoresTheCommittedTextNotTheHalfWrittenBuffer) {
  const SourceKind& kind = Kind("plain_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  const std::string old = StoredConfig(kind, src);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  // The prefix alone is valid YAML: before the fix, touch's close saved it.
  std::string script =
      "import os, shutil, subprocess, sys\n"
      "prefix = b'written_by_test: 1\\n'\n"
      "old = open(sys.argv[1], 'rb').read()\n"
      "f = open('config.yaml', 'wb')\n"
      "f.write(prefix)\n"
      "f.flush()\n"
      "subprocess.run(['touch', '-d', '2004-04-04', 'config.yaml'], check=True, timeout=30)\n"
      "shutil.copy(sys.argv[2], sys.argv[3])\n"
      "f.write(old)\n"
      "f.close()\n"
      "print('done')\n";
  WriteFile(dir.Join("edit.py"), script);
  WriteFile(dir.Join("old.yaml"), old);
  auto r = Sh("cd " + Q(m->path()) + " && /usr/bin/python3 " + Q(dir.Join("edit.py")) + " " +
                  Q(dir.Join("old.yaml")) + " " + Q(src) + " " + Q(dir.Join("mid.tar")),
              60);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_EQ(r.out, "done\n");
  EXPECT_EQ(StoredConfig(kind, dir.Join("mid.tar")), old) << m->Log();
  EXPECT_NE(StoredConfigTime(kind, dir.Join("mid.tar")).find("2004-04-04"), std::string::npos)
      << StoredConfigTime(kind, dir.Join("mid.tar"));
  m->Unmount();
  EXPECT_EQ(StoredConfig(kind, src), "written_by_test: 1\n" + old);
}

// A new file whose write failed (ENOSPC: its spill file's folder, the
// cache folder, is full) is not stored, truncated, at unmount; umount names
// it; a file beside it is stored.
TEST(NewFileFailedWrite, IsNotStoredAndUmountNamesIt) {
  const SourceKind& kind = Kind("plain_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  SmallTmpfs cache(dir.Join("cache"), "16m");
  ASSERT_TRUE(cache.mounted());
  MountOptions options;
  options.writable = true;
  options.cache_dir = dir.Join("cache");
  auto m = Mount::Start(src, {}, options);
  ASSERT_TRUE(m);
  auto r = Sh("head -c 40000000 /dev/urandom > " + Q(dir.Join("big.bin")) + " && cp " +
                  Q(dir.Join("big.bin")) + " " + Q(m->path() + "/big.bin"),
              120);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("No space left on device"), std::string::npos) << r.err;
  r = Sh("echo small > " + Q(m->path() + "/small.txt"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh("cd " + Q(m->path()) + " && /usr/bin/python3 -c \"import os; fd = os.open('big.bin', "
         "os.O_WRONLY); os.fsync(fd)\"");
  EXPECT_NE(r.exit_code, 0) << "fsync of a failed file must fail";
  r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()), 120);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  EXPECT_NE(r.err.find("not stored: big.bin (a write to it failed: No space left on device)"),
            std::string::npos)
      << r.err;
  m->Unmount();
  std::string members = Members(kind, src);
  EXPECT_EQ(members.find("big.bin"), std::string::npos) << members;
  EXPECT_NE(members.find("small.txt\n"), std::string::npos) << members;
}

TEST(NewFilesTouchD, TheTimeIsStoredWithTheFile) {
  TempDir dir;
  std::string src = MakeSource(Kind("plain_tar"), dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) + " && echo hi > dated.txt && touch -d @1500000000 dated.txt");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  m->Unmount();
  r = Sh("tar -tvf " + Q(src) + " --full-time | grep dated.txt");
  EXPECT_NE(r.out.find("2017-07-14"), std::string::npos) << r.out;
  auto again = Mount::StartWritable(src);
  ASSERT_TRUE(again);
  r = Sh("stat -c %Y " + Q(again->path() + "/dated.txt"));
  EXPECT_EQ(r.out, "1500000000\n") << r.err;
}

// The refusals say what is true: new regular files in the root and
// archive/ are stored (and new tensors in tensors/); directories cannot be
// made, and tokenizer/ takes no new file (EPERM, named in the log).
TEST(NewFilesRefusals, MkdirAndACreateInTensorsSayWhatIsAllowed) {
  TempDir dir;
  std::string src = MakeSource(Kind("plain_tar"), dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("mkdir " + Q(m->path() + "/newdir"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Operation not permitted"), std::string::npos) << r.err;
  r = Sh("touch " + Q(m->path() + "/tokenizer/new.bin"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Operation not permitted"), std::string::npos) << r.err;
  m->Unmount();
  std::string log = m->Log();
  EXPECT_NE(log.find("mkdir: directories, links and device nodes cannot be created in the tree "
                     "(new regular files in the root and archive/ can, and are stored) "
                     "(Operation not permitted)"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("cannot create 'new.bin': new files can be created only in the mount's root"),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find("scratch files"), std::string::npos) << log;
}

// A crash inside the store at unmount leaves the checkpoint without the new
// files or with all of them (a folder: with one file, old or new), never
// broken; `verify` passes either way.
struct StoreCrash {
  std::string kind;
  std::string step;
  bool committed;
};

void PrintTo(const StoreCrash& c, std::ostream* os) { *os << c.kind << " at " << c.step; }

class NewFilesCrash : public ::testing::TestWithParam<StoreCrash> {};

TEST_P(NewFilesCrash, LeavesNoneOrAll) {
  const StoreCrash& c = GetParam();
  const SourceKind& kind = Kind(c.kind);
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string before = Members(kind, src);
  {
    auto m = Mount::StartWritable(src, {"NEMOFS_FAULT=" + c.step});
    ASSERT_TRUE(m);
    std::string make = kind.tar ? "echo 1 > one.txt && echo 2 > two.txt" : "echo 1 > one.txt";
    auto r = Sh("cd " + Q(m->path()) + " && " + make);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    Sh("fusermount3 -u " + Q(m->path()));
    int status = m->ExpectDeath();
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 77) << status << "\n" << m->Log();
  }
  std::string added = kind.tar ? "one.txt\ntwo.txt\n" : "one.txt\n";
  auto sorted = Sh("printf '%s' " + Q(before + added) + " | LC_ALL=C sort");
  std::string after = Members(kind, src);
  if (!kind.tar) {  // the temp file a crash before the rename leaves is not part of it
    after = Sh("printf '%s' " + Q(after) + " | grep -v nemofs-tmp || true").out;
  }
  EXPECT_EQ(after, c.committed ? sorted.out : before);
  auto r = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

INSTANTIATE_TEST_SUITE_P(
    Steps, NewFilesCrash,
    ::testing::Values(StoreCrash{"plain_tar", "tar-append:before", false},
                      StoreCrash{"plain_tar", "tar-append:data-written", false},
                      StoreCrash{"plain_tar", "tar-append:committed", true},
                      StoreCrash{"gzip_tar", "rewrite:written", false},
                      StoreCrash{"gzip_tar", "rewrite:renamed", true},
                      StoreCrash{"extracted_nemo_folder", "folder:written", false},
                      StoreCrash{"extracted_nemo_folder", "folder:renamed", true}),
    [](const auto& info) { return TestName(info.param.kind + "_" + info.param.step); });

TEST(EditorTempNames, AreRecognisedAndOrdinaryNamesAreNot) {
  for (const char* n : {".config.yaml.swp", ".x.swo", ".x.swx", "config.yaml~", "notes.txt.~1~",
                        ".goutputstream-XY12ZW", "#notes.txt#", ".#notes.txt",
                        ".model_config.yaml.nemofs-tmp.123"}) {
    EXPECT_TRUE(IsEditorTempName(n)) << n;
  }
  // vim's 4913 probe and sed -i's sedXXXXXX are deleted or renamed at once:
  // no rule, so a file the user names so is stored like any other.
  for (const char* n : {"notes.txt",
                        "config.yaml.bak",
                        "sed.txt",
                        "sedimentary",
                        "sediments",
                        "sedAb12Cd",
                        "4913",
                        "5036",
                        "2024",
                        "x.swp",
                        ".x.sw1",
                        ".x.swP",
                        "2024-notes",
                        ".hidden",
                        "a#b",
                        "#",
                        "~",
                        ".#",
                        ".goutputstream-foo",
                        ".goutputstream-XY12ZW.txt",
                        "config.yaml.save"}) {
    EXPECT_FALSE(IsEditorTempName(n)) << n;
  }
}


// A folder entry the mount does not show (a symlink out of the folder, to a
// directory) still takes its name: a new file of that name is refused at
// create with EEXIST, and the other new files are stored as usual.
TEST(NewFilesHiddenName, IsRefusedAtCreateAndTheOthersAreStored) {
  TempDir dir;
  std::string src = dir.Join("ckpt");
  ASSERT_EQ(Sh("cp -r " + Q(TestData("nemo2_tiny")) + " " + Q(src) + " && echo victim > " +
               Q(dir.Join("victim")) + " && ln -s " + Q(dir.Join("victim")) + " " +
               Q(src + "/context/evil") + " && ln -s . " + Q(src + "/context/loop"))
                .exit_code,
            0);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  const std::string ctx = m->path() + "/archive/context";
  for (const char* name : {"evil", "loop"}) {
    auto r = Sh("echo pwn > " + Q(ctx + "/" + name));
    EXPECT_NE(r.exit_code, 0) << name;
    EXPECT_NE(r.err.find("File exists"), std::string::npos) << name << ": " << r.err;
  }
  ASSERT_EQ(Sh("echo ok > " + Q(ctx + "/ok.txt")).exit_code, 0);
  auto r = Sh(Q(NemofsBinary()) + " umount " + Q(m->path()));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err << m->Log();
  m->Unmount();
  EXPECT_EQ(ReadFile(src + "/context/ok.txt"), "ok\n");
  EXPECT_EQ(ReadFile(dir.Join("victim")), "victim\n");
  EXPECT_TRUE(std::filesystem::is_symlink(src + "/context/evil"));
}

}  // namespace
}  // namespace nemofs::testing
