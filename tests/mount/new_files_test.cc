// Issue 16 §4 (a failed write poisons its handle, xattrs of new files,
// touch -d) and §5 (a file the user creates is stored in the checkpoint at
// fsync or unmount, editors' temp files are not), through real mounts.
#include <gtest/gtest.h>

#include "mount_harness.h"
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

}  // namespace
}  // namespace nemofs::testing
