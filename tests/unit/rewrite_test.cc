// RewriteCompressedTar: every member survives with its header and bytes, the
// replaced member gets the new text, the compression stays, and failures
// (no such member, corrupt input, full disk, crashes) leave the original.
#include "write/rewrite.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <sstream>
#include <vector>

#include "test_util.h"
#include "write/fault.h"

namespace nemofs::write {
namespace {

using testing::ReadFile;
using testing::Sh;
using testing::ShellQuote;
using testing::TempDir;
using testing::TestData;
using testing::WriteFile;

constexpr int64_t kNewMtime = 1800000000;
const std::string kNewText = "model:\n  hidden_size: 4096  # rewritten\n";

// One line per member of the plain tar on stdin: name, type, mode, linkname,
// owner, hdrcharset, sparse map, atime/ctime PAX records, mtime (with PAX
// sub-seconds), size, sha256 of the content.
constexpr const char* kListScript = R"(
import sys, tarfile, hashlib
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as t:
    for m in t:
        d = t.extractfile(m).read() if m.isreg() else b""
        h = m.pax_headers
        at = float(h["atime"]) if "atime" in h else None
        ct = float(h["ctime"]) if "ctime" in h else None
        # GNU 'S' members come back as PAX sparse 1.0: same map, type '0'.
        typ = "0" if m.type == b"S" else m.type.decode()
        sparse = [s for s in m.sparse if s[1]] if m.sparse is not None else None
        print("\t".join(str(x) for x in (m.name, typ, oct(m.mode), m.linkname,
              m.uid, m.gid, m.uname, m.gname, h.get("hdrcharset"), sparse, at, ct,
              m.mtime, m.size, hashlib.sha256(d).hexdigest())))
)";
constexpr size_t kMtimeField = 12;  // the fields after it change for the replaced member
constexpr size_t kFields = 15;

std::vector<std::vector<std::string>> List(const std::string& path, const std::string& decompress) {
  auto r = Sh("cat " + ShellQuote(path) + " | " + decompress + " | /usr/bin/python3 -c " +
              ShellQuote(kListScript));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::vector<std::string>> members;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    std::vector<std::string> fields;
    std::istringstream in(line);
    for (std::string f; std::getline(in, f, '\t');) fields.push_back(f);
    members.push_back(fields);
  }
  return members;
}

std::string Sha256(const std::string& text) {
  TempDir dir;
  WriteFile(dir.Join("f"), text);
  return Sh("sha256sum " + ShellQuote(dir.Join("f")) + " | cut -d' ' -f1").out.substr(0, 64);
}

// `file -b` up to its first comma ("gzip compressed data", "XZ compressed data").
std::string Kind(const std::string& path) {
  return Sh("file -b " + ShellQuote(path) + " | cut -d, -f1").out;
}

std::vector<std::string> Leftovers(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string name = e.path().filename();
    if (name.find(".nemofs-rewrite.") != std::string::npos) out.push_back(name);
  }
  return out;
}

std::string Cp(const std::string& from, const std::string& to) {
  auto r = Sh("cp " + ShellQuote(from) + " " + ShellQuote(to));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return to;
}

// Asserts that `after` lists the members of `before` in the same order with
// the same fields, except the copies of `member` (normalised name), which
// carry kNewText and kNewMtime. Returns how many copies there were.
int ExpectSameButReplaced(const std::vector<std::vector<std::string>>& before,
                          const std::vector<std::vector<std::string>>& after,
                          const std::string& member) {
  EXPECT_EQ(after.size(), before.size());
  int replaced = 0;
  std::string new_sha = Sha256(kNewText);
  for (size_t i = 0; i < std::min(before.size(), after.size()); ++i) {
    const auto& b = before[i];
    const auto& a = after[i];
    EXPECT_EQ(a.size(), kFields);
    if (a.size() != kFields || b.size() != kFields) continue;
    std::string name = b[0].rfind("./", 0) == 0 ? b[0].substr(2) : b[0];
    if (name == member && b[1] == "0") {
      ++replaced;
      for (size_t f = 0; f < kMtimeField; ++f) EXPECT_EQ(a[f], b[f]) << b[0] << " field " << f;
      EXPECT_EQ(std::stod(a[kMtimeField]), static_cast<double>(kNewMtime)) << b[0];
      EXPECT_EQ(a[kMtimeField + 1], std::to_string(kNewText.size())) << b[0];
      EXPECT_EQ(a[kMtimeField + 2], new_sha) << b[0];
    } else {
      EXPECT_EQ(a, b) << "member #" << i << " " << b[0];
    }
  }
  return replaced;
}

// ---- archives made by real tar, one per compression --------------------------

struct Codec {
  std::string name;
  std::string create;      // bash; {out} is the archive, {args} the members
  std::string decompress;  // stdin -> plain tar on stdout
  std::string magic;       // first bytes of the compressed file
};

void PrintTo(const Codec& codec, std::ostream* os) { *os << codec.name; }

std::string Fill(std::string s, const std::string& key, const std::string& value) {
  for (size_t at = s.find(key); at != std::string::npos; at = s.find(key, at + value.size())) {
    s.replace(at, key.size(), value);
  }
  return s;
}

class RewriteCodec : public ::testing::TestWithParam<Codec> {
 protected:
  // src/: a.txt, hard.txt (hard link to a.txt), dir/ with a 1.5 MB random
  // file, a file with a 120-character name, a 3 MB sparse file and a
  // non-ASCII name, a symlink, a symlink with a long target, config.yaml;
  // src2/config.yaml is the second copy.
  std::string MakeArchive(const std::string& file) {
    std::string long_name = "dir/" + std::string(120, 'n') + ".txt";
    std::string script = Fill(
        R"sh(set -e
cd {dir}
mkdir -p src/dir src2
printf 'alpha\n' > src/a.txt
ln src/a.txt src/hard.txt
head -c 1500000 /dev/urandom > src/dir/weights.bin
printf 'long\n' > src/{long}
truncate -s 3M src/dir/sparse
printf 'abc' | dd of=src/dir/sparse bs=1 seek=1000000 conv=notrunc 2>/dev/null
printf 'caf\xc3\xa9\n' > "$(printf 'src/dir/caf\xc3\xa9.txt')"
chmod 0600 src/{long}
ln -s a.txt src/link
ln -s {long} src/longlink
printf 'first: 1\n' > src/config.yaml
printf 'second: 2\n' > src2/config.yaml
)sh",
        "{dir}", ShellQuote(dir_.path()));
    script = Fill(script, "{long}", long_name);
    auto r = Sh(script);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string args =
        "-S -C src ./a.txt ./dir ./link ./longlink ./hard.txt ./config.yaml -C ../src2 "
        "./config.yaml";
    std::string out = dir_.Join(file);
    std::string create = Fill(GetParam().create, "{out}", ShellQuote(out));
    r = Sh("cd " + ShellQuote(dir_.path()) + " && " + Fill(create, "{args}", args));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return out;
  }

  TempDir dir_;
};

TEST_P(RewriteCodec, KeepsEveryMemberAndTheCompression) {
  const Codec& codec = GetParam();
  std::string path = MakeArchive("m.tar.x");
  ASSERT_EQ(ReadFile(path).substr(0, codec.magic.size()), codec.magic);
  std::string kind = Kind(path);
  auto before = List(path, codec.decompress);
  ASSERT_EQ(before.size(), 11u);  // a, dir/, 4 in dir, 2 symlinks, hard link, 2 configs
  ASSERT_EQ(::chmod(path.c_str(), 0640), 0);

  auto r = RewriteCompressedTar(path, "config.yaml", kNewText, kNewMtime, nullptr);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->members, 11u);
  EXPECT_EQ(r->replaced, 2u);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(r->bytes_out, static_cast<uint64_t>(st.st_size));
  EXPECT_EQ(st.st_mode & 07777, 0640u);

  EXPECT_EQ(ReadFile(path).substr(0, codec.magic.size()), codec.magic);
  EXPECT_EQ(Kind(path), kind);
  auto after = List(path, codec.decompress);
  EXPECT_EQ(ExpectSameButReplaced(before, after, "config.yaml"), 2);
  int special = 0;
  for (const auto& m : after) {
    ASSERT_EQ(m.size(), kFields);
    // Still sparse, and the UTF-8 name needs no hdrcharset=BINARY.
    if (m[0] == "./dir/sparse") {
      ++special;
      EXPECT_EQ(m[9], "[(999424, 4096)]");
    }
    if (m[0] == "./dir/caf\xc3\xa9.txt") {
      ++special;
      EXPECT_EQ(m[8], "None");
    }
  }
  EXPECT_EQ(special, 2);
  // Both copies carry the new text; GNU tar reads the whole archive.
  auto x = Sh("cat " + ShellQuote(path) + " | " + codec.decompress + " | tar -xOf - ./config.yaml");
  EXPECT_EQ(x.exit_code, 0) << x.err;
  EXPECT_EQ(x.out, kNewText + kNewText);
  auto t = Sh("cat " + ShellQuote(path) + " | " + codec.decompress + " | tar -tvf -");
  EXPECT_EQ(t.exit_code, 0) << t.err;
  EXPECT_NE(t.out.find("./hard.txt link to ./a.txt"), std::string::npos) << t.out;
  EXPECT_TRUE(Leftovers(dir_.path()).empty());
}

INSTANTIATE_TEST_SUITE_P(
    Rewrite, RewriteCodec,
    ::testing::Values(
        Codec{"gzip", "tar -czf {out} {args}", "gzip -dc", "\x1f\x8b"},
        Codec{"gzip_posix", "tar --format=posix -czf {out} {args}", "gzip -dc", "\x1f\x8b"},
        Codec{"xz", "tar -cJf {out} {args}", "xz -dc", std::string("\xfd\x37\x7a\x58\x5a\x00", 6)},
        Codec{"zstd", "tar --zstd -cf {out} {args}", "zstd -dc", "\x28\xb5\x2f\xfd"},
        Codec{"bzip2", "tar -cjf {out} {args}", "bzip2 -dc", "BZh"},
        // xz inside gzip: the filters come back in the same nesting.
        Codec{"xz_in_gzip", "tar -cJf - {args} | gzip -c > {out}", "gzip -dc | xz -dc",
              "\x1f\x8b"}),
    [](const ::testing::TestParamInfo<Codec>& info) { return info.param.name; });

// ---- the NeMo fixture: Python tarfile, PAX sub-second mtimes -----------------

TEST(Rewrite, NemoGzipFixtureKeepsSubSecondMtimesAndLongNames) {
  TempDir dir;
  std::string path = Cp(TestData("tiny_gpt_gz.nemo"), dir.Join("m.nemo"));
  auto before = List(path, "gzip -dc");
  ASSERT_EQ(before.size(), 7u);
  ASSERT_EQ(before[1][kMtimeField], "1717171717.5");  // what the check below relies on
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  auto r =
      RewriteCompressedTar(path, "model_config.yaml", kNewText, kNewMtime,
                           [&](uint64_t done, uint64_t total) { calls.emplace_back(done, total); });
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->members, 7u);
  EXPECT_EQ(r->replaced, 1u);
  EXPECT_EQ(ReadFile(path).substr(0, 2), "\x1f\x8b");
  EXPECT_EQ(ExpectSameButReplaced(before, List(path, "gzip -dc"), "model_config.yaml"), 1);
  EXPECT_EQ(Sh("tar -tzf " + ShellQuote(path)).exit_code, 0);
  EXPECT_FALSE(calls.empty());
}

TEST(Rewrite, ProgressIsMonotonicAndEndsNearTheFileSize) {
  TempDir dir;
  // 3 MB of random data: several 1 MiB reads of compressed input.
  auto r = Sh("cd " + ShellQuote(dir.path()) +
              " && head -c 3000000 /dev/urandom > w.bin && printf 'a: 1\\n' > c.yaml"
              " && tar -czf m.tgz w.bin c.yaml");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string path = dir.Join("m.tgz");
  uint64_t size = std::filesystem::file_size(path);
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  auto rw =
      RewriteCompressedTar(path, "c.yaml", kNewText, kNewMtime,
                           [&](uint64_t done, uint64_t total) { calls.emplace_back(done, total); });
  ASSERT_TRUE(rw.ok()) << rw.error().message();
  ASSERT_GE(calls.size(), 3u);
  uint64_t last = 0;
  for (auto [done, total] : calls) {
    EXPECT_EQ(total, size);
    EXPECT_LE(done, total);
    EXPECT_GE(done, last);
    last = done;
  }
  EXPECT_GT(calls.front().first, 0u);
  // The reader stops at the tar end marker, so the last block may stay unread.
  EXPECT_GT(last, size / 2);
  EXPECT_LE(last, size);
}

// ---- refusals and failures leave the original ---------------------------------

class RewriteFailure : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = Sh("cd " + ShellQuote(dir_.path()) +
                " && mkdir d && printf 'a: 1\\n' > c.yaml && ln -s c.yaml l && ln c.yaml h"
                " && tar -czf m.tgz d c.yaml l h");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    path_ = dir_.Join("m.tgz");
    bytes_ = ReadFile(path_);
  }
  void ExpectUntouched() {
    EXPECT_EQ(ReadFile(path_), bytes_);
    EXPECT_TRUE(Leftovers(dir_.path()).empty());
  }

  TempDir dir_;
  std::string path_;
  std::string bytes_;
};

TEST_F(RewriteFailure, NoSuchMemberIsEinvalNamingIt) {
  auto r = RewriteCompressedTar(path_, "model_config.yaml", kNewText, kNewMtime, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), EINVAL);
  EXPECT_NE(r.error().message().find("model_config.yaml"), std::string::npos)
      << r.error().message();
  EXPECT_NE(r.error().message().find(path_), std::string::npos) << r.error().message();
  ExpectUntouched();
}

TEST_F(RewriteFailure, DirectoriesSymlinksAndHardLinksAreNotReplaced) {
  // "h" is the hard link GNU tar stored for c.yaml's second name.
  for (const char* name : {"d", "l", "h"}) {
    auto r = RewriteCompressedTar(path_, name, kNewText, kNewMtime, nullptr);
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_EQ(r.error().code(), EINVAL) << name;
  }
  ExpectUntouched();
}

// Patches of members by position (tensor writes into a compressed .nemo):
// the bytes change, nothing else; GNU tar reads the result. A patch of a
// link or directory, past a member's end or of no member is EINVAL.
TEST_F(RewriteFailure, PatchesChangeTheBytesOfTheMemberAtTheirPosition) {
  // Members in order: d/ (0), c.yaml (1), l (2), h (3).
  auto r = RewriteCompressedTar(path_, "", "", 0, nullptr, {},
                                {MemberPatch{1, "c.yaml", 0, "b"}, MemberPatch{1, "c.yaml", 3, "7"}});
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto x = Sh("tar -xzOf " + ShellQuote(path_) + " c.yaml");
  EXPECT_EQ(x.exit_code, 0) << x.err;
  EXPECT_EQ(x.out, "b: 7\n");
  auto list = Sh("tar -tzf " + ShellQuote(path_));
  EXPECT_EQ(list.out, "d/\nc.yaml\nl\nh\n");
  bytes_ = ReadFile(path_);
  for (const MemberPatch& bad : {MemberPatch{0, "d", 0, "x"}, MemberPatch{2, "l", 0, "x"},
                                 MemberPatch{3, "h", 0, "x"}, MemberPatch{1, "c.yaml", 5, "xx"},
                                 MemberPatch{9, "none", 0, "x"}}) {
    auto e = RewriteCompressedTar(path_, "", "", 0, nullptr, {}, {bad});
    ASSERT_FALSE(e.ok()) << bad.member;
    EXPECT_EQ(e.error().code(), EINVAL) << bad.member;
    EXPECT_NE(e.error().message().find(bad.member), std::string::npos) << e.error().message();
  }
  ExpectUntouched();
}

TEST_F(RewriteFailure, TruncatedGzipIsAnErrorAndLeavesTheOriginal) {
  // Big enough that the cut falls inside the data, not in the gzip trailer.
  auto r = Sh("cd " + ShellQuote(dir_.path()) +
              " && head -c 200000 /dev/urandom > w.bin && tar -czf big.tgz c.yaml w.bin"
              " && head -c 100000 big.tgz > cut.tgz && rm big.tgz w.bin");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string cut = dir_.Join("cut.tgz");
  std::string cut_bytes = ReadFile(cut);
  auto rw = RewriteCompressedTar(cut, "c.yaml", kNewText, kNewMtime, nullptr);
  ASSERT_FALSE(rw.ok());
  EXPECT_EQ(rw.error().code(), EINVAL) << rw.error().message();
  EXPECT_NE(rw.error().message().find(cut), std::string::npos) << rw.error().message();
  EXPECT_EQ(ReadFile(cut), cut_bytes);
  ExpectUntouched();
}

TEST_F(RewriteFailure, PlainTarAndNonTarAreEinval) {
  auto r = Sh("cd " + ShellQuote(dir_.path()) +
              " && tar -cf plain.tar c.yaml && head -c 5000 /dev/urandom | gzip > noise.gz");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* name : {"plain.tar", "noise.gz"}) {
    std::string p = dir_.Join(name);
    std::string b = ReadFile(p);
    auto rw = RewriteCompressedTar(p, "c.yaml", kNewText, kNewMtime, nullptr);
    ASSERT_FALSE(rw.ok()) << name;
    EXPECT_EQ(rw.error().code(), EINVAL) << name << ": " << rw.error().message();
    EXPECT_EQ(ReadFile(p), b) << name;
  }
  auto missing = RewriteCompressedTar(dir_.Join("absent.tgz"), "c.yaml", kNewText, 0, nullptr);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code(), ENOENT);
  ExpectUntouched();
}

// ---- crash steps ------------------------------------------------------------------

int CrashAt(const std::string& step, const std::string& path, pid_t* child) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("NEMOFS_FAULT", step.c_str(), 1);
    auto r = RewriteCompressedTar(path, "c.yaml", kNewText, kNewMtime, nullptr);
    ::_exit(r.ok() ? 0 : 1);
  }
  *child = pid;
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_F(RewriteFailure, CrashBeforeTheRenameLeavesTheOldArchive) {
  pid_t child = 0;
  ASSERT_EQ(CrashAt("rewrite:written", path_, &child), kFaultExitCode);
  EXPECT_EQ(ReadFile(path_), bytes_);
  // A crash leaves the complete, fsynced temp behind (a later run, with
  // another pid, does not reuse it); it is already the new archive.
  std::string tmp = path_ + ".nemofs-rewrite." + std::to_string(child);
  ASSERT_TRUE(std::filesystem::exists(tmp));
  EXPECT_EQ(Sh("tar -xzOf " + ShellQuote(tmp) + " c.yaml").out, kNewText);
}

TEST_F(RewriteFailure, CrashAfterTheRenameLeavesTheNewArchive) {
  pid_t child = 0;
  ASSERT_EQ(CrashAt("rewrite:renamed", path_, &child), kFaultExitCode);
  EXPECT_NE(ReadFile(path_), bytes_);
  auto x = Sh("tar -xzOf " + ShellQuote(path_) + " c.yaml");
  EXPECT_EQ(x.exit_code, 0) << x.err;
  EXPECT_EQ(x.out, kNewText);
  EXPECT_EQ(Sh("tar -tzf " + ShellQuote(path_)).out, "d/\nc.yaml\nl\nh\n");
  EXPECT_TRUE(Leftovers(dir_.path()).empty());
}

// ---- a full disk --------------------------------------------------------------------

// Unmounts on every exit from the test, before the TempDir holding it goes.
struct Unmount {
  std::string dir;
  ~Unmount() {
    auto r = Sh("umount " + ShellQuote(dir) + " || umount -l " + ShellQuote(dir));
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
};

// Fills a fresh tmpfs of `tmpfs_size` after copying in a gzip tar holding
// `random_bytes` of incompressible data, so that the rewrite's temp cannot fit.
void ExpectEnospc(uint64_t random_bytes, const std::string& tmpfs_size) {
  TempDir dir;
  std::string mnt = dir.Join("mnt");
  std::filesystem::create_directory(mnt);
  auto m = Sh("mount -t tmpfs -o size=" + tmpfs_size + " tmpfs " + ShellQuote(mnt));
  if (m.exit_code != 0) GTEST_SKIP() << "cannot mount a tmpfs (root needed): " << m.err;
  Unmount unmount{mnt};
  auto r = Sh("cd " + ShellQuote(dir.path()) + " && head -c " + std::to_string(random_bytes) +
              " /dev/urandom > w.bin && printf 'a: 1\\n' > c.yaml"
              " && tar -czf m.tgz w.bin c.yaml && cp m.tgz " +
              ShellQuote(mnt) + " && (dd if=/dev/zero of=" + ShellQuote(mnt + "/fill") +
              " bs=4k 2>/dev/null; true)");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string path = mnt + "/m.tgz";
  std::string bytes = ReadFile(path);
  ASSERT_EQ(bytes, ReadFile(dir.Join("m.tgz")));

  auto rw = RewriteCompressedTar(path, "c.yaml", kNewText, kNewMtime, nullptr);
  ASSERT_FALSE(rw.ok());
  EXPECT_EQ(rw.error().code(), ENOSPC) << rw.error().message();
  EXPECT_NE(rw.error().message().find(path), std::string::npos) << rw.error().message();
  EXPECT_EQ(ReadFile(path), bytes);
  EXPECT_TRUE(Leftovers(mnt).empty());

  // With room again the same call succeeds.
  std::filesystem::remove(mnt + "/fill");
  auto again = RewriteCompressedTar(path, "c.yaml", kNewText, kNewMtime, nullptr);
  ASSERT_TRUE(again.ok()) << again.error().message();
  EXPECT_EQ(Sh("tar -xzOf " + ShellQuote(path) + " c.yaml").out, kNewText);
}

// The archive is smaller than one 1 MiB output write: the failure shows when
// archive_write_close flushes the compressor.
TEST(Rewrite, FullDiskAtTheFinalFlushIsEnospc) { ExpectEnospc(300000, "1m"); }

// The first 1 MiB output write fails inside archive_write_data.
TEST(Rewrite, FullDiskMidStreamIsEnospc) { ExpectEnospc(1500000, "4m"); }

}  // namespace
}  // namespace nemofs::write
