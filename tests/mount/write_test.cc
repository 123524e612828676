// Editing config.yaml through a real mount (DESIGN.md §4, README "Write
// semantics"): the editors people use (sed -i, vim, nano, shell
// redirection, cp, Python), on every kind of source that has a config;
// invalid YAML refused with EINVAL; scratch files; what is refused; readers
// during commits. Crash, full-disk and replaced-source cases are in
// write_safety_test.cc.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <functional>
#include <sstream>

#include "mount_harness.h"
#include "test_util.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }

std::string ArchiveName(const SourceKind& kind) {
  return "archive/" + (kind.member.rfind("./", 0) == 0 ? kind.member.substr(2) : kind.member);
}

// ---- every editor, every kind of source ------------------------------------

struct Editor {
  std::string name;
  std::string command;  // run in the mount's root; {NANO} = the nano driver
  // The text expected after the edit, from the text before.
  std::function<std::string(const std::string&)> expect;
};

std::string Append(const std::string& old, const std::string& line) {
  return old + (old.empty() || old.back() == '\n' ? "" : "\n") + line + "\n";
}

const std::vector<Editor>& Editors() {
  static const std::vector<Editor> editors = {
      {"sed_i", "sed -i '$a edited_by: sed' config.yaml",
       [](const std::string& o) { return Append(o, "edited_by: sed"); }},
      {"sed_i_backup", "sed -i.bak '$a edited_by: sed' config.yaml && cmp config.yaml.bak {OLD}",
       [](const std::string& o) { return Append(o, "edited_by: sed"); }},
      {"vim", "vim -u NONE -N -es -c 'normal Goedited_by: vim' -c wq config.yaml </dev/null",
       [](const std::string& o) { return Append(o, "edited_by: vim"); }},
      {"nano",
       "timeout 30 /usr/bin/python3 {NANO} config.yaml 'edited_by: nano' > ../nano.out && "
       "grep -q 'Wrote' ../nano.out",
       [](const std::string& o) { return "edited_by: nano\n" + o; }},
      {"echo_truncate", "echo 'edited_by: echo' > config.yaml",
       [](const std::string&) { return std::string("edited_by: echo\n"); }},
      {"echo_append", "echo 'edited_by: append' >> config.yaml",
       [](const std::string& o) { return Append(o, "edited_by: append"); }},
      {"cp", "printf 'edited_by: cp\\nlist: [1, 2]\\n' > ../new.yaml && cp ../new.yaml config.yaml",
       [](const std::string&) { return std::string("edited_by: cp\nlist: [1, 2]\n"); }},
      {"dd_at_offset",
       "printf 'edited_by: dd\n' | dd of=config.yaml bs=7 seek=$(stat -c %s config.yaml) "
       "oflag=seek_bytes conv=notrunc status=none",
       [](const std::string& o) { return Append(o, "edited_by: dd"); }},
      {"python_write",
       "/usr/bin/python3 -c \"open('config.yaml', 'w').write('edited_by: python\\n')\"",
       [](const std::string&) { return std::string("edited_by: python\n"); }},
      {"python_rplus_ftruncate",
       "/usr/bin/python3 -c \"f = open('config.yaml', 'r+'); f.seek(0); "
       "f.write('edited_by: ftruncate\\n'); f.truncate(); f.close()\"",
       [](const std::string&) { return std::string("edited_by: ftruncate\n"); }},
  };
  return editors;
}

class EditConfig : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(EditConfig, CommitsIntoTheSourceAndEveryViewShowsIt) {
  const SourceKind& kind = Kind(std::get<0>(GetParam()));
  const Editor* editor = nullptr;
  for (const auto& e : Editors()) {
    if (e.name == std::get<1>(GetParam())) editor = &e;
  }
  ASSERT_TRUE(editor);
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string old = CatConfig(src);
  ASSERT_FALSE(old.empty());
  WriteFile(dir.Join("old.yaml"), old);
  std::string expected = editor->expect(old);
  // What `nemofs verify` says before the edit (a fixture may be partial on purpose).
  auto verify_before = Sh(Q(NemofsBinary()) + " verify " + Q(src));

  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto listing = Sh("ls -A " + Q(m->path()));
  // {NANO} and {OLD} in the command (plain replacement: libstdc++'s
  // std::regex warns under the sanitizer build).
  auto replace_all = [](std::string text, const std::string& what, const std::string& with) {
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + with.size())) {
      text.replace(at, what.size(), with);
    }
    return text;
  };
  std::string cmd = replace_all(editor->command, "{NANO}",
                                Q(std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/nano_drive.py"));
  cmd = replace_all(cmd, "{OLD}", Q(dir.Join("old.yaml")));
  auto r = Sh("cd " + Q(m->path()) + " && " + cmd, 60);
  ASSERT_EQ(r.exit_code, 0) << cmd << "\n" << r.out << r.err << "\n" << m->Log();

  // A compressed archive is rewritten, with progress in the log.
  if (kind.name == "gzip_tar") {
    EXPECT_NE(m->Log().find("saving config.yaml (model_config.yaml): rewrite of the tar (gzip) "),
              std::string::npos)
        << m->Log();
  }
  // The mount: both names of the config, and stat's size.
  EXPECT_EQ(ReadFile(m->path() + "/config.yaml"), expected);
  EXPECT_EQ(ReadFile(m->path() + "/" + ArchiveName(kind)), expected);
  r = Sh("stat -c %s " + Q(m->path() + "/config.yaml"));
  EXPECT_EQ(r.out, std::to_string(expected.size()) + "\n");
  // Editors' temp, swap and backup files are gone, except a backup asked for.
  std::string after = Sh("ls -A " + Q(m->path())).out;
  if (editor->name == "sed_i_backup") {  // the backup is a scratch file with the old text
    EXPECT_EQ(Sh("ls -A " + Q(m->path()) + " | grep -vx config.yaml.bak").out, listing.out);
    EXPECT_EQ(ReadFile(m->path() + "/config.yaml.bak"), old);
  } else {
    EXPECT_EQ(after, listing.out);
  }
  m->Unmount();

  // The source itself, as its own tools and a fresh nemofs see it.
  EXPECT_EQ(StoredConfig(kind, src), expected);
  EXPECT_EQ(CatConfig(src), expected);
  auto v = Sh(Q(NemofsBinary()) + " verify " + Q(src));
  EXPECT_EQ(v.exit_code, verify_before.exit_code) << v.out << v.err;
  EXPECT_EQ(v.out.find(": OK\n") != std::string::npos,
            verify_before.out.find(": OK\n") != std::string::npos)
      << v.out;
  if (kind.tar) {
    // Every copy has the same owner (an appended copy takes the old one's).
    r = Sh("tar -tvf " + Q(src) + " | grep model_config.yaml | awk '{print $2}' | sort -u");
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
    // The superseded copy is invisible: archive/ lists one config.
    auto fresh = Mount::Start(src);
    ASSERT_TRUE(fresh);
    EXPECT_EQ(ReadFile(fresh->path() + "/config.yaml"), expected);
    r = Sh("ls " + Q(fresh->path() + "/archive") + " | grep -c model_config.yaml");
    EXPECT_EQ(r.out, "1\n");
  } else {
    // Nothing but the config changed in the folder: no temp files left.
    r = Sh("cd " + Q(src) + " && find . -name '*nemofs*' | wc -l");
    EXPECT_EQ(r.out, "0\n");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Editors, EditConfig,
    ::testing::Combine(::testing::ValuesIn(KindNames()),
                       ::testing::Values("sed_i", "sed_i_backup", "vim", "nano", "echo_truncate",
                                         "echo_append", "cp", "dd_at_offset", "python_write",
                                         "python_rplus_ftruncate")),
    [](const auto& info) {
      return TestName(std::get<0>(info.param) + "_" + std::get<1>(info.param));
    });

// ---- a private copy of a source, and a mount of it ---------------------

// What most tests below start from: a copy of a source kind, its config and
// digest before the test, and (once the test starts it) a mount of it.
class WithSource {
 protected:
  void Use(const std::string& kind_name) {
    kind = &Kind(kind_name);
    src = MakeSource(*kind, dir);
    old = CatConfig(src);
    digest = SourceDigest(src);
  }
  // Unmounts; the checkpoint must be byte for byte what it was.
  void ExpectUnchanged() {
    if (m) m->Unmount();
    EXPECT_EQ(SourceDigest(src), digest);
    EXPECT_TRUE(SameText(CatConfig(src), old));
  }
  const SourceKind* kind = nullptr;
  TempDir dir;
  std::string src, old, digest;
  std::unique_ptr<Mount> m;
};

class PlainTarTest : public ::testing::Test, public WithSource {
 protected:
  void SetUp() override { Use("plain_tar"); }
};

// ---- invalid YAML: EINVAL, the source untouched, the log names the line ----

struct BadText {
  std::string name;
  std::string text;
  std::string log;  // expected in the daemon log
};

class InvalidConfig : public ::testing::TestWithParam<std::string>, public WithSource {
 protected:
  void SetUp() override { Use(GetParam()); }
};

TEST_P(InvalidConfig, IsRefusedWithEINVALAndChangesNothing) {
  m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  const std::vector<BadText> bad = {
      {"unclosed_flow", "a: 1\nb: [1, 2\nc: 3\n", "line 3, column 2: end of sequence flow not found"},
      {"bad_indent", "a:\n  b: 1\n c: 2\n", "line 3, column"},
      {"binary", std::string("a: 1\n\x00\x01\x02\xff\xfe", 10), "line 2, column 1: control character 0x00"},
      {"not_utf8", "a: caf\xe9\n", "line 1, column 7: not valid UTF-8"},
      {"list", "- a\n- b\n", "a config must be a mapping"},
      {"plain_value", "42\n", "a config must be a mapping"},
      {"duplicate_key", "a: 1\nb:\n  x: 1\n  x: 2\n", "line 4, column 3: key 'x' appears twice"},
  };
  for (const auto& b : bad) {
    SCOPED_TRACE(b.name);
    WriteFile(dir.Join("bad.yaml"), b.text);
    // cp: the close that commits fails.
    auto r = Sh("cp " + Q(dir.Join("bad.yaml")) + " " + Q(m->path() + "/config.yaml"));
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
    // sed -i: the rename that commits fails.
    r = Sh("cd " + Q(m->path()) + " && sed -i '1i " + (b.name == "list" ? "- x" : "{") +
           "' config.yaml");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
    EXPECT_EQ(ReadFile(m->path() + "/config.yaml"), old);
    EXPECT_NE(m->Log().find(b.log), std::string::npos) << m->Log();
  }
  // bash does not check close() after a builtin's redirection: `echo >>`
  // returns 0 although nothing was saved; tee and /bin/echo report it.
  auto r0 = Sh("echo 'broken: [' >> " + Q(m->path() + "/config.yaml"));
  EXPECT_EQ(r0.exit_code, 0);
  r0 = Sh("echo 'broken: [' | tee -a " + Q(m->path() + "/config.yaml") + " >/dev/null");
  EXPECT_EQ(r0.exit_code, 1);
  EXPECT_NE(r0.err.find("Invalid argument"), std::string::npos) << r0.err;
  r0 = Sh("/bin/echo 'broken: [' >> " + Q(m->path() + "/config.yaml"));
  EXPECT_EQ(r0.exit_code, 1);
  EXPECT_EQ(ReadFile(m->path() + "/config.yaml"), old);
  // fsync saves too: EINVAL there, before close.
  r0 = Sh("/usr/bin/python3 -c \"import os, errno\n"
          "fd = os.open('" + m->path() + "/config.yaml', os.O_WRONLY | os.O_TRUNC)\n"
          "os.write(fd, b'a: [')\n"
          "try:\n    os.fsync(fd)\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
          "try:\n    os.close(fd)\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n\"");
  EXPECT_EQ(r0.out, "EINVAL\nEINVAL\n") << r0.err;
  // `truncate -s 0` (by path) would leave an empty config: refused too.
  auto r = Sh("truncate -s 0 " + Q(m->path() + "/config.yaml"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Invalid argument"), std::string::npos) << r.err;
  EXPECT_EQ(ReadFile(m->path() + "/config.yaml"), old);
  // sed removed its temp file after the failed rename: nothing is left over.
  EXPECT_EQ(Sh("ls -A " + Q(m->path()) + " | grep -c '^sed'").out, "0\n");
  ExpectUnchanged();
}

INSTANTIATE_TEST_SUITE_P(Kinds, InvalidConfig,
                         ::testing::ValuesIn(OneKindPerCommit()), KindParamName);

class InvalidConfigVim : public PlainTarTest {};

TEST_F(InvalidConfigVim, VimReportsTheFailureAndKeepsTheBuffer) {
  m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  // :w fails (vim exits 1); the buffer, still holding the edit, is then
  // saved elsewhere.
  auto r = Sh("cd " + Q(m->path()) + " && vim -u NONE -N -es -c 'normal Gob: [' -c w -c 'w! " +
              dir.Join("kept.yaml") + "' -c 'q!' config.yaml </dev/null");
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_EQ(ReadFile(dir.Join("kept.yaml")), Append(old, "b: ["));
  EXPECT_EQ(ReadFile(m->path() + "/config.yaml"), old);
  EXPECT_NE(m->Log().find("end of sequence flow not found"), std::string::npos);
  ExpectUnchanged();
}

class InvalidConfigNano : public PlainTarTest {};

TEST_F(InvalidConfigNano, NanoReportsTheFailure) {
  m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cd " + Q(m->path()) + " && timeout 30 /usr/bin/python3 " +
                  Q(std::string(NEMOFS_SOURCE_DIR) + "/tests/mount/nano_drive.py") +
                  " config.yaml 'bad: ['",
              60);
  EXPECT_NE(r.out.find("Invalid argument"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("Wrote"), std::string::npos);
  ExpectUnchanged();
}

// ---- size limits --------------------------------------------------------

TEST(ConfigSize, AMultiMegabyteConfigCommitsAndBeyond64MiBIsEFBIG) {
  const SourceKind& kind = Kind("plain_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string big;
  for (int i = 0; big.size() < (5 << 20); ++i) big += "key_" + std::to_string(i) + ": value\n";
  WriteFile(dir.Join("big.yaml"), big);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  auto r = Sh("cp " + Q(dir.Join("big.yaml")) + " " + Q(m->path() + "/config.yaml"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(SameText(ReadFile(m->path() + "/config.yaml"), big));
  std::string digest = SourceDigest(src);
  r = Sh("head -c 70000000 /dev/zero | tr '\\0' a > " + Q(m->path() + "/config.yaml"));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("File too large"), std::string::npos) << r.err;
  EXPECT_TRUE(SameText(ReadFile(m->path() + "/config.yaml"), big));
  m->Unmount();
  EXPECT_EQ(SourceDigest(src), digest);
  EXPECT_TRUE(SameText(StoredConfig(kind, src), big));
}

// ---- scratch files and what is refused ---------------------------------

class ScratchFiles : public PlainTarTest {};

TEST_F(ScratchFiles, EditorsTempFilesLiveInMemoryNextToTheConfigAndNeverReachTheSource) {
  m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  // df shows the free space saves can use: the source's file system's.
  auto df = Sh("stat -f -c %a " + Q(m->path()) + " " + Q(dir.path()));
  auto lines = df.out;
  auto mount_avail = std::stoull(lines.substr(0, lines.find('\n')));
  auto under_avail = std::stoull(lines.substr(lines.find('\n') + 1));
  EXPECT_GT(mount_avail, 0u);
  EXPECT_NEAR(static_cast<double>(mount_avail), static_cast<double>(under_avail),
              0.01 * static_cast<double>(under_avail) + 1024);
  auto r = Sh("cd " + Q(m->path()) +
              " && echo swap > .config.yaml.swp && echo backup > config.yaml~"
              " && echo tmp > archive/.model_config.yaml.swx && chmod 600 config.yaml~"
              " && test \"$(stat -c %a config.yaml~)\" = 600"
              " && mv config.yaml~ other~ && cat other~ .config.yaml.swp archive/.model_config.yaml.swx"
              " && ls -A | LC_ALL=C sort | tr '\\n' ' ' && rm .config.yaml.swp");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("backup\nswap\ntmp\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(".config.yaml.swp"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("other~"), std::string::npos) << r.out;
  r = Sh("ls -A " + Q(m->path()));
  EXPECT_EQ(r.out.find(".config.yaml.swp"), std::string::npos) << r.out;
  ExpectUnchanged();  // never written into the checkpoint
  auto fresh = Mount::StartWritable(src);
  ASSERT_TRUE(fresh);
  r = Sh("ls -A " + Q(fresh->path()) + " " + Q(fresh->path() + "/archive"));
  EXPECT_EQ(r.out.find("other~"), std::string::npos) << r.out;  // gone with the mount
  EXPECT_EQ(r.out.find(".swx"), std::string::npos) << r.out;
}

class Refusals : public PlainTarTest {};

TEST_F(Refusals, EverythingButTheWritableFilesIsRefused) {
  m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  std::string tensor = Sh("ls " + Q(m->path() + "/tensors") + " | head -1").out;
  tensor = tensor.substr(0, tensor.size() - 1);
  const std::vector<std::pair<std::string, std::string>> cases = {
      // A tensor file is writable, but only at its size: EINVAL at close.
      {"/usr/bin/python3 -c \"f = open('tensors/" + tensor + "', 'wb'); f.write(b'x'); f.close()\"",
       "Invalid argument"},
      // Stored files are replaceable (replace_test.cc); synthesized ones are not.
      // No valid safetensors file (dd reports the close's error; a shell's
      // >> does not).
      {"printf x | dd of=model.safetensors oflag=append conv=notrunc status=none",
       "Invalid argument"},
      {"truncate -s 0 index.json", "Read-only file system"},
      {"touch tokenizer/new", "Operation not permitted"},
      {"mkdir newdir", "Operation not permitted"},
      {"ln -s config.yaml link", "Operation not permitted"},
      {"rm config.yaml", "Operation not permitted"},
      {"rm archive/model_weights.ckpt", "Operation not permitted"},
      {"mv index.json index2.json", "Operation not permitted"},
      {"echo a: 1 > x.yaml && mv x.yaml index.json", "Operation not permitted"},
      {"chmod 600 config.yaml", "Operation not permitted"},
  };
  for (const auto& [cmd, error] : cases) {
    auto r = Sh("cd " + Q(m->path()) + " && " + cmd);
    EXPECT_NE(r.exit_code, 0) << cmd;
    EXPECT_NE(r.err.find(error), std::string::npos) << cmd << ": " << r.err;
  }
  // x.yaml is a new file: it would be stored at unmount (new_files_test.cc).
  ASSERT_EQ(Sh("rm " + Q(m->path() + "/x.yaml")).exit_code, 0);
  ExpectUnchanged();
}

class ReadOnlyMount : public PlainTarTest {};

TEST_F(ReadOnlyMount, OptionRoRefusesEveryWriteWithEROFS) {
  m = Mount::Start(src, {"-o", "ro"});
  ASSERT_TRUE(m);
  for (const std::string cmd : {"echo 'a: 1' > config.yaml", "sed -i '$a b: 2' config.yaml",
                                "touch config.yaml~", "truncate -s 0 config.yaml"}) {
    auto r = Sh("cd " + Q(m->path()) + " && " + cmd);
    EXPECT_NE(r.exit_code, 0) << cmd;
    EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << cmd << ": " << r.err;
  }
  ExpectUnchanged();
}

// ---- readers during commits see old or new, never a mix ---------------

class ConcurrentReaders : public ::testing::TestWithParam<std::string> {};

TEST_P(ConcurrentReaders, SeeACommittedTextWhole) {
  const SourceKind& kind = Kind(GetParam());
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string old = CatConfig(src);
  // Two 1 MiB configs: a reader reads each in many 4 KiB pieces.
  std::string a, b;
  for (int i = 0; a.size() < (1 << 20); ++i) {
    a += "a_" + std::to_string(i) + ": first\n";
    b += "b_" + std::to_string(i) + ": second text\n";
  }
  WriteFile(dir.Join("a.yaml"), a);
  WriteFile(dir.Join("b.yaml"), b);
  WriteFile(dir.Join("old.yaml"), old);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  std::string cfg = m->path() + "/config.yaml";
  auto r = Sh("( for i in $(seq 10); do cp " + Q(dir.Join("a.yaml")) + " " + Q(cfg) + "; cp " +
                  Q(dir.Join("b.yaml")) + " " + Q(cfg) + "; done; touch " + Q(dir.Join("done")) +
                  " ) & "
                  "/usr/bin/python3 - " +
                  Q(cfg) + " " + Q(dir.path()) + " <<'EOF'\n"
                  "import os, sys\n"
                  "cfg, d = sys.argv[1], sys.argv[2]\n"
                  "texts = {open(os.path.join(d, n), 'rb').read(): n for n in "
                  "('a.yaml', 'b.yaml', 'old.yaml')}\n"
                  "seen, reads = {}, 0\n"
                  "while True:\n"
                  "    finished = os.path.exists(os.path.join(d, 'done'))\n"
                  "    fd = os.open(cfg, os.O_RDONLY)\n"
                  "    parts = []\n"
                  "    while True:\n"
                  "        p = os.read(fd, 4096)\n"
                  "        if not p: break\n"
                  "        parts.append(p)\n"
                  "    os.close(fd)\n"
                  "    text = b''.join(parts)\n"
                  "    reads += 1\n"
                  "    if text not in texts:\n"
                  "        print('MIXED', len(text)); sys.exit(1)\n"
                  "    seen[texts[text]] = seen.get(texts[text], 0) + 1\n"
                  "    if finished: break\n"
                  "print(reads, sorted(seen))\n"
                  "EOF\n"
                  "rc=$?; wait; exit $rc",
              300);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("b.yaml"), std::string::npos) << r.out;  // the last commit was read
  EXPECT_TRUE(SameText(ReadFile(cfg), b));
  m->Unmount();
  EXPECT_TRUE(SameText(StoredConfig(kind, src), b));
}

INSTANTIATE_TEST_SUITE_P(Kinds, ConcurrentReaders,
                         ::testing::ValuesIn(OneKindPerCommit()), KindParamName);

// ---- repack drops what the edits superseded --------------------------------

TEST(RepackAfterEdits, KeepsOnlyTheLastConfig) {
  const SourceKind& kind = Kind("plain_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  auto m = Mount::StartWritable(src);
  ASSERT_TRUE(m);
  for (int i = 0; i < 3; ++i) {
    auto r = Sh("echo 'round: " + std::to_string(i) + "' > " + Q(m->path() + "/config.yaml"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  m->Unmount();
  EXPECT_EQ(Sh("tar -tf " + Q(src) + " | grep -c model_config.yaml").out, "4\n");
  auto r = Sh(Q(NemofsBinary()) + " repack " + Q(src));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Sh("tar -tf " + Q(src) + " | grep -c model_config.yaml").out, "1\n");
  EXPECT_EQ(StoredConfig(kind, src), "round: 2\n");
}

// ---- the extraction cache keeps one entry per compressed source ----------

// The cache entries (directories with a record) under `cache`, with the
// source each record names.
std::vector<std::pair<std::string, std::string>> CacheEntries(const std::string& cache) {
  auto r = Sh("cd " + Q(cache) +
              " && for f in */nemofs-entry.json; do [ -f \"$f\" ] && "
              "/usr/bin/python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); "
              "print(sys.argv[1].split(\"/\")[0], d[\"source\"], d[\"ino\"], d[\"mtime_ns\"])' "
              "\"$f\"; done; true");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream lines(r.out);
  std::string name, rest;
  while (lines >> name && std::getline(lines, rest)) out.emplace_back(name, rest.substr(1));
  return out;
}

TEST(CacheAfterSaves, OneEntryPerCompressedSourceRemains) {
  const SourceKind& kind = Kind("gzip_tar");
  TempDir dir;
  std::string src = MakeSource(kind, dir);
  std::string cache = dir.Join("cache");
  std::string weights_before;
  for (int i = 0; i < 3; ++i) {
    auto m = Mount::Start(src, {}, MountOptions{true, {}, cache});
    ASSERT_TRUE(m);
    // Extract a member, so each entry holds more than the listing.
    std::string weights = ReadFile(m->path() + "/archive/model_weights.ckpt");
    ASSERT_FALSE(weights.empty());
    if (i == 0) weights_before = weights;
    EXPECT_EQ(weights, weights_before);
    auto r = Sh("echo 'round: " + std::to_string(i) + "' > " + Q(m->path() + "/config.yaml"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // The mount's own entry is in use (and the earlier one is gone).
    auto during = CacheEntries(cache);
    EXPECT_EQ(during.size(), 1u) << i;
    m->Unmount();
  }
  // The next open of the source (here `nemofs cat`) replaces the entry of
  // the version the last save superseded.
  auto r = Sh(Q(NemofsBinary()) + " cat " + Q(src) + " config.yaml --cache-dir " + Q(cache));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "round: 2\n");
  EXPECT_EQ(StoredConfig(kind, src), "round: 2\n");
  auto left = CacheEntries(cache);
  ASSERT_EQ(left.size(), 1u);
  struct stat st {};
  ASSERT_EQ(::stat(src.c_str(), &st), 0);
  EXPECT_EQ(left[0].second,
            src + " " + std::to_string(st.st_ino) + " " +
                std::to_string(int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec));
}

TEST(CacheAfterSaves, ASmallCapEvictsTheUnusedEntriesOfOtherSources) {
  const SourceKind& kind = Kind("gzip_tar");
  TempDir dir;
  std::string a = MakeSourceAt(kind, dir.Join("a.nemo"));
  std::string b = MakeSourceAt(kind, dir.Join("b.nemo"));
  std::string cache = dir.Join("cache");
  auto cat = [&](const std::string& src, const std::string& max) {
    return Sh(Q(NemofsBinary()) + " cat " + Q(src) + " archive/model_weights.ckpt --cache-dir " +
              Q(cache) + " --cache-max " + max + " > /dev/null");
  };
  ASSERT_EQ(cat(a, "0").exit_code, 0);
  ASSERT_EQ(cat(b, "0").exit_code, 0);
  EXPECT_EQ(CacheEntries(cache).size(), 2u);  // no cap
  ASSERT_EQ(cat(b, "1K").exit_code, 0);       // b in use, a evicted
  auto left = CacheEntries(cache);
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].second.substr(0, b.size() + 1), b + " ");
}

TEST(CacheMax, EveryCommandWithACacheDirTakesItAndRefusesABadSize) {
  TempDir dir;
  std::string src = MakeSource(Kind("gzip_tar"), dir);
  std::string cache = " --cache-dir " + Q(dir.Join("cache"));
  const std::vector<std::string> commands = {
      "info " + Q(src),
      "ls " + Q(src),
      "verify -q " + Q(src),
      "cat " + Q(src) + " config.yaml",
      "repack -q -o " + Q(dir.Join("out.nemo")) + " " + Q(src),
      "mount " + Q(src) + " " + Q(dir.path()) + " -o ro"};
  for (const auto& c : commands) {
    auto bad = Sh(Q(NemofsBinary()) + " " + c + cache + " --cache-max 20Q");
    EXPECT_EQ(bad.exit_code, 2) << c << ": " << bad.err;
    EXPECT_NE(bad.err.find("--cache-max"), std::string::npos) << c << ": " << bad.err;
    EXPECT_NE(bad.err.find("20Q"), std::string::npos) << c << ": " << bad.err;
    if (c.rfind("mount", 0) == 0) continue;  // mounting it is the other tests' business
    auto good = Sh(Q(NemofsBinary()) + " " + c + cache + " --cache-max 1.5G");
    EXPECT_EQ(good.exit_code, 0) << c << ": " << good.err;
  }
}

}  // namespace
}  // namespace nemofs::testing
