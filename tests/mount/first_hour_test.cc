// Issue "the first hour of a new user", sections 2 and 3 and the fstab form:
// `nemofs mount` tells the truth (readiness, refused options, warnings,
// logs without syslog, umount --timeout on a stopped daemon, df, the cache
// directory, unknown commands), shared mounts leak nothing (outside
// symlinks, modes and owners, a non-root user, the source lock), and
// `mount -t fuse.nemofs` through /etc/fstab.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <algorithm>
#include <iterator>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "mount_harness.h"
#include "test_util.h"
#include "write_util.h"

namespace nemofs::testing {
namespace {

std::string Q(const std::string& s) { return ShellQuote(s); }
std::string Bin() { return Q(NemofsBinary()); }


pid_t DaemonPid(const std::string& mnt) {
  auto r = Sh("getfattr --only-values -n user.nemofs.pid " + Q(mnt), 10);
  return r.exit_code == 0 ? static_cast<pid_t>(std::atoi(r.out.c_str())) : -1;
}

// A mount made by `nemofs mount` without -f (the daemon in the background),
// always unmounted and its daemon (by PID) killed at the end.
class BgMount {
 public:
  BgMount() { std::filesystem::create_directory(mnt()); }
  ~BgMount() { Stop(); }
  std::string mnt() const { return dir_.Join("mnt"); }
  const TempDir& dir() const { return dir_; }
  // Runs `nemofs mount SOURCE MNT ARGS`; remembers the daemon's pid.
  CommandResult Start(const std::string& source, const std::string& args = "",
                      const std::string& env = "") {
    auto r = Sh(env + " " + Bin() + " mount " + Q(source) + " " + Q(mnt()) + " --cache-dir " +
                    Q(dir_.Join("cache")) + " " + args,
                60);
    if (r.exit_code == 0 && IsMounted(mnt())) pid_ = DaemonPid(mnt());
    return r;
  }
  pid_t pid() const { return pid_; }
  void Stop() {
    if (pid_ > 0) ::kill(pid_, SIGCONT);
    if (IsMounted(mnt())) Sh("fusermount3 -u " + Q(mnt()) + " || fusermount3 -uz " + Q(mnt()), 20);
    if (pid_ > 0) {
      for (int i = 0; i < 200 && ::kill(pid_, 0) == 0 && !Zombie(pid_); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (::kill(pid_, 0) == 0 && !Zombie(pid_)) ::kill(pid_, SIGKILL);
      pid_ = -1;
    }
  }
  static bool Zombie(pid_t pid) {
    return Sh("grep -q '^State:.*Z' /proc/" + std::to_string(pid) + "/status", 5).exit_code == 0;
  }

 private:
  TempDir dir_;
  pid_t pid_ = -1;
};

// ---- 2. the mount tells the truth ------------------------------------------

TEST(MountTruth, MaxReadOptionMountsAndReads) {
  BgMount m;
  auto r = m.Start(TestData("tiny_gpt.nemo"), "-o ro,max_read=65536");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(IsMounted(m.mnt()));
  auto cmp = Sh("cmp " + Q(m.mnt() + "/archive/model_weights.ckpt") + " <(tar -xOf " +
                Q(TestData("tiny_gpt.nemo")) + " ./model_weights.ckpt)");
  EXPECT_EQ(cmp.exit_code, 0) << cmp.out << cmp.err;
  EXPECT_NE(Sh("grep ' " + m.mnt() + " ' /proc/self/mountinfo").out.find("max_read=65536"),
            std::string::npos);
}

TEST(MountTruth, RefusedOptionsExitNonZeroWithTheReasonAndMountNothing) {
  struct Case {
    std::string opts, message;
  };
  for (const Case& c : {Case{"frobnicate", "unknown option"},
                        Case{"max_read=abc", "invalid parameter"},
                        Case{"blksize=512", "mount failed"}}) {
    BgMount m;
    auto r = m.Start(TestData("tiny_gpt.nemo"), "-o " + c.opts);
    EXPECT_NE(r.exit_code, 0) << c.opts;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.opts << ": " << r.err;
    EXPECT_FALSE(IsMounted(m.mnt())) << c.opts;
  }
}

TEST(MountTruth, DaemonDyingDuringInitFailsTheMountAndLeavesNoDeadMount) {
  BgMount m;
  auto r = m.Start(TestData("tiny_gpt.nemo"), "-o ro", "NEMOFS_FAULT=fuse-init");
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_NE(r.err.find("the daemon died before the mount was ready"), std::string::npos) << r.err;
  EXPECT_FALSE(IsMounted(m.mnt()));
}

TEST(MountTruth, WarningsThatChangeTheTreeArePrintedByMount) {
  // A hidden member (absolute path) and a read-only fallback (0444 copy).
  TempDir dir;
  TarBuilder tar;
  tar.AddFile("./model_config.yaml", "a: 1\n").AddFile("/etc/evil", "x").End();
  std::string src = dir.Join("hidden.nemo");
  WriteFile(src, tar.bytes());
  ::chmod(src.c_str(), 0444);
  BgMount m;
  auto r = m.Start(src);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("warning: mounted read-only"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("/etc/evil"), std::string::npos) << r.err;
}

TEST(MountTruth, WithoutSyslogTheDaemonLogsToTheCacheDirAndSaysSo) {
  BgMount m;
  auto r = m.Start(TestData("tiny_gpt.nemo"), "-o ro",
                   "NEMOFS_SYSLOG_SOCKET=" + m.dir().Join("no-such-socket"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string log = m.dir().Join("cache/nemofs.log");
  EXPECT_NE(r.err.find("the daemon logs to " + log), std::string::npos) << r.err;
  EXPECT_NE(ReadFile(log).find("mounted " + TestData("tiny_gpt.nemo")), std::string::npos);
}

TEST(MountTruth, UmountTimeoutDetachesAStoppedDaemon) {
  struct Case {
    bool busy;
    int timeout;
  };
  for (const Case c : {Case{false, 2}, Case{true, 2}, Case{false, 5}, Case{true, 5}}) {
    std::string what =
        std::string(c.busy ? "busy" : "idle") + " --timeout " + std::to_string(c.timeout);
    BgMount m;
    auto r = m.Start(TestData("tiny_gpt.nemo"), "-o ro");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_GT(m.pid(), 0);
    ASSERT_EQ(::kill(m.pid(), SIGSTOP), 0);
    // A process waiting inside the mount keeps it busy; `exec` makes $! its pid.
    pid_t waiter = 0;
    if (c.busy) {
      auto w =
          Sh("(cd " + Q(m.mnt() + "/archive") + " && exec sleep 30) >/dev/null 2>&1 & echo $!", 5);
      waiter = static_cast<pid_t>(std::atol(w.out.c_str()));
      ASSERT_GT(waiter, 0) << w.out;
    }
    auto start = std::chrono::steady_clock::now();
    r = Sh(Bin() + " umount " + Q(m.mnt()) + " --timeout " + std::to_string(c.timeout), 60);
    double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waiter > 0) ::kill(waiter, SIGKILL);
    EXPECT_EQ(r.exit_code, 1) << what << ": " << r.err;
    // The whole budget goes to the daemon before the mount is detached.
    EXPECT_GE(took, c.timeout) << what << ": " << r.err;
    EXPECT_FALSE(IsMounted(m.mnt())) << what;
    if (c.busy) {
      EXPECT_NE(r.err.find("detached the mount"), std::string::npos) << what << ": " << r.err;
    }
    // The message states the time actually waited.
    const std::string said = "did not answer within ";
    auto at = r.err.find(said);
    ASSERT_NE(at, std::string::npos) << what << ": " << r.err;
    EXPECT_GE(std::stod(r.err.substr(at + said.size())), c.timeout) << what << ": " << r.err;
    // fusermount3's own words stay out of the user's terminal.
    EXPECT_EQ(r.err.find("fusermount3:"), std::string::npos) << what << ": " << r.err;
    EXPECT_EQ(r.err.find("Device or resource busy"), std::string::npos) << what << ": " << r.err;
  }
}

TEST(MountTruth, StatfsIsConsistent) {
  TempDir dir;
  std::string src = dir.Join("a.nemo");
  Sh("cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(src));
  for (const std::string opts : {"-o ro", ""}) {
    BgMount m;
    auto r = m.Start(src, opts);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = Sh("/usr/bin/python3 -c 'import os,sys; s=os.statvfs(sys.argv[1]); "
           "print(s.f_blocks, s.f_bfree, s.f_bavail, s.f_frsize)' " +
           Q(m.mnt()));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    unsigned long long blocks, bfree, bavail, frsize;
    ASSERT_EQ(std::sscanf(r.out.c_str(), "%llu %llu %llu %llu", &blocks, &bfree, &bavail, &frsize),
              4);
    EXPECT_GE(blocks, bfree) << opts;
    EXPECT_GE(bfree, bavail) << opts;
    // Used = the checkpoint's size.
    uint64_t size = std::filesystem::file_size(src);
    EXPECT_EQ((blocks - bfree) * frsize, (size + 4095) / 4096 * 4096) << opts;
    if (opts.empty()) {
      EXPECT_GT(bavail, 0u);
    }
    auto df = Sh("df -P " + Q(m.mnt()) + " | tail -1 | awk '{print $3, $5}'");
    EXPECT_EQ(df.out.find("-"), std::string::npos) << df.out;  // no negative Used
  }
}

TEST(MountTruth, CacheDirThatIsNotAWritableDirectoryIsRefusedAtMount) {
  TempDir dir;
  WriteFile(dir.Join("file"), "x");
  ASSERT_EQ(Sh("mkdir " + Q(dir.Join("ro")) + " && mount -t tmpfs -o ro,size=1m tmpfs " +
               Q(dir.Join("ro")))
                .exit_code,
            0);
  std::filesystem::create_directory(dir.Join("mnt"));
  struct Case {
    std::string cache, message;
  };
  for (const Case& c : {Case{dir.Join("file"), "not a directory"},
                        Case{dir.Join("file/sub"), "cannot create it"},
                        Case{dir.Join("ro"), "not writable"}}) {
    auto r = Sh(Bin() + " mount " + Q(TestData("tiny_gpt_gz.nemo")) + " " + Q(dir.Join("mnt")) +
                " --cache-dir " + Q(c.cache));
    EXPECT_EQ(r.exit_code, 2) << c.cache << ": " << r.err;
    EXPECT_NE(r.err.find("--cache-dir " + c.cache + ": " + c.message), std::string::npos)
        << r.err;
    EXPECT_FALSE(IsMounted(dir.Join("mnt")));
    if (IsMounted(dir.Join("mnt"))) Sh("fusermount3 -u " + Q(dir.Join("mnt")));
  }
  Sh("umount " + Q(dir.Join("ro")));
}

// nemofs names its mounts (fuse.nemofs): a user subtype= or fsname= would
// leave a mount `nemofs umount` does not recognise, so it is refused.
TEST(MountTruth, SubtypeAndFsnameOptionsAreRefused) {
  TempDir dir;
  std::string mnt = dir.Join("mnt");
  std::filesystem::create_directory(mnt);
  for (const std::string opt : {"subtype=y", "fsname=mine", "ro,subtype=y", "fsname=nemofs:x"}) {
    auto r = Sh(Bin() + " mount " + Q(TestData("tiny_gpt.nemo")) + " " + Q(mnt) + " -o " + opt, 30);
    bool mounted = IsMounted(mnt);
    if (mounted) Sh("fusermount3 -u " + Q(mnt), 10);
    EXPECT_EQ(r.exit_code, 2) << opt << ": " << r.err;
    EXPECT_FALSE(mounted) << opt;
    std::string given = opt.substr(opt.rfind(',') == std::string::npos ? 0 : opt.rfind(',') + 1);
    EXPECT_NE(r.err.find("-o " + given + ": nemofs sets the mount's"), std::string::npos)
        << opt << ": " << r.err;
  }
  // Its own subtype (what a `mount -t fuse.nemofs` may pass) is fine.
  BgMount m;
  auto r = m.Start(TestData("tiny_gpt.nemo"), "-o ro,subtype=nemofs");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Sh(Bin() + " umount " + Q(m.mnt()), 30);
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(MountTruth, UnknownCommandIsNamed) {
  auto r = Sh(Bin() + " frobnicate");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("unknown command 'frobnicate'"), std::string::npos) << r.err;
  r = Sh(Bin() + " frobnicate a b");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("unknown command 'frobnicate'"), std::string::npos) << r.err;
}

// ---- 6. /etc/fstab and mount -t fuse.nemofs --------------------------------

TEST(Fstab, MountThroughMountFuse3WithFstabOptions) {
  TempDir dir;
  std::string mnt = dir.Join("mnt");
  std::filesystem::create_directory(mnt);
  std::string fstab = dir.Join("fstab");
  // mount(8) runs helpers with a fixed PATH, so `fuse.nemofs` finds an
  // installed nemofs (cmake --install, the .deb); an uninstalled build is
  // named in the `fuse` type's PROGRAM#SOURCE form. Both make mount.fuse3
  // run `nemofs SOURCE MOUNTPOINT -o OPTIONS`.
  WriteFile(fstab, NemofsBinary() + "#" + TestData("tiny_gpt.nemo") + " " + mnt +
                       " fuse ro,noauto,user,_netdev,x-systemd.automount,nofail 0 0\n");
  auto r = Sh("HOME=" + Q(dir.path()) + " mount -T " + Q(fstab) + " " + Q(mnt), 60);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ASSERT_TRUE(IsMounted(mnt));
  pid_t pid = DaemonPid(mnt);
  auto cmp = Sh("cmp " + Q(mnt + "/config.yaml") + " <(tar -xOf " + Q(TestData("tiny_gpt.nemo")) +
                " ./model_config.yaml) && grep ' " + mnt + " ' /proc/self/mountinfo");
  EXPECT_EQ(cmp.exit_code, 0) << cmp.err;
  EXPECT_NE(cmp.out.find("fuse.nemofs"), std::string::npos) << cmp.out;
  EXPECT_NE(cmp.out.find(" ro"), std::string::npos) << cmp.out;
  // The plain form mount.fuse3 runs works without it too.
  auto um = Sh(Bin() + " umount " + Q(mnt));
  EXPECT_EQ(um.exit_code, 0) << um.err;
  r = Sh("XDG_CACHE_HOME=" + Q(dir.Join("cache")) + " " + Bin() + " " +
         Q(TestData("tiny_gpt.nemo")) + " " + Q(mnt) + " -o ro,noauto,_netdev && ls " + Q(mnt) +
         " && " + Bin() + " umount " + Q(mnt));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("tensors"), std::string::npos) << r.out;
  if (IsMounted(mnt)) {
    Sh("fusermount3 -uz " + Q(mnt));
    if (pid > 0) ::kill(pid, SIGKILL);
  }
}

// ---- 3. shared mounts leak nothing ------------------------------------------

// A folder source with a symlink to a secret outside it, a 0600 member and
// a 0644 one, mounted -o allow_other by root and read as `nobody`.
TEST(SharedMount, AllowOtherLeaksNothingOfAFolder) {
  TempDir dir;
  ::chmod(dir.path().c_str(), 0755);
  std::string src = dir.Join("ckpt");
  ASSERT_EQ(Sh("cp -r " + Q(TestData("nemo2_tiny")) + " " + Q(src) + " && echo secret > " +
               Q(dir.Join("secret")) + " && chmod 600 " + Q(dir.Join("secret")) +
               " && ln -s ../../secret " + Q(src + "/context/leak") + " && ln -s /etc/shadow " +
               Q(src + "/context/shadow") + " && ln -s io.json " + Q(src + "/context/inside") +
               " && echo private > " + Q(src + "/context/private.txt") + " && chmod 600 " +
               Q(src + "/context/private.txt") + " && chmod -R a+rX " + Q(src) +
               " && chmod 600 " + Q(src + "/context/private.txt"))
                .exit_code,
            0);
  BgMount m;
  ::chmod(m.dir().path().c_str(), 0755);
  auto r = m.Start(src, "-o ro,allow_other");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The outside links are hidden, with a warning each; the inside one works.
  EXPECT_NE(r.err.find("'context/leak': symbolic link to '" + dir.Join("secret") +
                       "' leaves the source folder"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("'context/shadow'"), std::string::npos) << r.err;
  std::string ctx = m.mnt() + "/archive/context";
  EXPECT_FALSE(std::filesystem::exists(ctx + "/leak"));
  EXPECT_FALSE(std::filesystem::exists(ctx + "/shadow"));
  auto cmp = Sh("cmp " + Q(ctx + "/inside") + " " + Q(src + "/context/io.json"));
  EXPECT_EQ(cmp.exit_code, 0) << cmp.err;
  // Modes and owners as in the source; nobody reads what they could not.
  r = Sh("stat -c '%a %u' " + Q(ctx + "/private.txt") + " " + Q(ctx + "/io.json"));
  EXPECT_EQ(r.out, "400 0\n444 0\n") << r.err;
  r = Sh(AsNobody("cat " + Q(ctx + "/private.txt")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Permission denied"), std::string::npos) << r.err;
  r = Sh(AsNobody("cat " + Q(ctx + "/io.json") + " | wc -c"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(std::stoul(r.out), std::filesystem::file_size(src + "/context/io.json"));
  r = Sh(AsNobody("cat " + Q(ctx + "/leak") + " " + Q(ctx + "/shadow")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.out.find("secret"), std::string::npos);
}

// A .nemo with a 0600 member, and one whose archive file is 0600.
TEST(SharedMount, AllowOtherKeepsTarMemberAndArchiveModes) {
  TempDir dir;
  ::chmod(dir.path().c_str(), 0755);
  std::string src = dir.Join("modes.nemo");
  ASSERT_EQ(Sh("cd " + Q(dir.path()) + " && mkdir x && tar -xf " + Q(TestData("tiny_gpt.nemo")) +
               " -C x && chmod 600 x/model_weights.ckpt && chmod 644 x/model_config.yaml && tar "
               "-cf " + Q(src) + " -C x . && chmod 644 " + Q(src))
                .exit_code,
            0);
  {
    BgMount m;
    ::chmod(m.dir().path().c_str(), 0755);
    ASSERT_EQ(m.Start(src, "-o ro,allow_other").exit_code, 0);
    auto r = Sh("stat -c '%a' " + Q(m.mnt() + "/archive/model_weights.ckpt") + " " +
                Q(m.mnt() + "/config.yaml") + " " +
                Q(m.mnt() + "/tensors/model.embedding.word_embeddings.weight") + " " +
                Q(m.mnt() + "/model.safetensors"));
    EXPECT_EQ(r.out, "400\n444\n400\n400\n") << r.err;
    EXPECT_NE(Sh(AsNobody("cat " + Q(m.mnt() + "/archive/model_weights.ckpt") + " >/dev/null"))
                  .exit_code,
              0);
    EXPECT_NE(Sh(AsNobody("head -c1 " + Q(m.mnt() + "/model.safetensors") + " >/dev/null"))
                  .exit_code,
              0);
    EXPECT_EQ(Sh(AsNobody("cat " + Q(m.mnt() + "/config.yaml") + " >/dev/null")).exit_code, 0);
  }
  ::chmod(src.c_str(), 0600);
  BgMount m;
  ::chmod(m.dir().path().c_str(), 0755);
  ASSERT_EQ(m.Start(src, "-o ro,allow_other").exit_code, 0);
  auto r = Sh(AsNobody("cat " + Q(m.mnt() + "/config.yaml")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Permission denied"), std::string::npos) << r.err;
  EXPECT_EQ(Sh("cat " + Q(m.mnt() + "/config.yaml") + " >/dev/null").exit_code, 0);
}

// /dev/fuse is 0666 on Debian; some containers make it 0600. The test gives
// it 0666 for its duration and puts back what it found.
class DevFuseOpen {
 public:
  DevFuseOpen() {
    struct stat st {};
    if (::stat("/dev/fuse", &st) == 0) {
      mode_ = st.st_mode & 07777;
      ::chmod("/dev/fuse", 0666);
    }
  }
  ~DevFuseOpen() {
    if (mode_) ::chmod("/dev/fuse", mode_);
  }

 private:
  mode_t mode_ = 0;
};

TEST(SharedMount, NonRootUserMountsReadsEditsAndUnmounts) {
  DevFuseOpen open_fuse;
  TempDir dir;
  ::chmod(dir.path().c_str(), 0755);
  std::string home = dir.Join("home");
  std::string src = home + "/model.nemo";
  std::string mnt = home + "/mnt";
  ASSERT_EQ(Sh("mkdir -p " + Q(mnt) + " && cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(src) +
               " && chown -R " + std::to_string(kNobody) + ":" + std::to_string(kNobody) + " " +
               Q(home))
                .exit_code,
            0);
  auto r = Sh(AsNobody("HOME=" + home + " " + Bin() + " mount " + Q(src) + " " + Q(mnt)), 60);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  pid_t pid = DaemonPid(mnt);
  r = Sh(AsNobody("stat -c '%u %a' " + Q(mnt + "/config.yaml") + " && grep -c . " +
                  Q(mnt + "/config.yaml") + " >/dev/null && sed -i 's/^precision: .*/precision: "
                  "bf16-mixed/' " + Q(mnt + "/config.yaml") + " && grep '^precision' " +
                  Q(mnt + "/config.yaml")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, std::to_string(kNobody) + " 644\nprecision: bf16-mixed\n");
  // A tokenizer file replaced (6 MB: staged in a spill file under the
  // user's own cache folder) and a tensor patched, as the same user.
  const std::string tensor = mnt + "/tensors/model.embedding.word_embeddings.weight";
  r = Sh(AsNobody("head -c 6000000 /dev/urandom > " + Q(home + "/new.model") + " && cp " +
                  Q(home + "/new.model") + " " + Q(mnt + "/tokenizer/merges.txt") +
                  " && printf abcd | dd of=" + Q(tensor) + " conv=notrunc status=none"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = Sh(AsNobody(Bin() + " umount " + Q(mnt)), 60);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(IsMounted(mnt));
  if (IsMounted(mnt)) {
    Sh("fusermount3 -uz " + Q(mnt));
    if (pid > 0) ::kill(pid, SIGKILL);
  }
  std::string stored = StoredConfig(Kind("plain_tar"), src);  // tarfile and GNU tar agree
  EXPECT_NE(stored.find("\nprecision: bf16-mixed\n"), std::string::npos) << stored;
  BgMount again;
  ASSERT_EQ(again.Start(src, "-o ro").exit_code, 0);
  EXPECT_EQ(Sh("cmp " + Q(home + "/new.model") + " " + Q(again.mnt() + "/tokenizer/merges.txt"))
                .exit_code,
            0);
  EXPECT_EQ(Sh("head -c 4 " + Q(again.mnt() + "/tensors/model.embedding.word_embeddings.weight"))
                .out,
            "abcd");
  EXPECT_EQ(Sh(Bin() + " verify " + Q(src)).exit_code, 0);
}

TEST(SharedMount, SecondWritableMountIsReadOnlyAndRepackRefuses) {
  TempDir dir;
  std::string src = dir.Join("a.nemo");
  Sh("cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(src));
  BgMount first;
  ASSERT_EQ(first.Start(src).exit_code, 0);
  BgMount second;
  auto r = second.Start(src);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("mounted read-only: " + src + " is in use: a writable nemofs mount at " +
                       first.mnt()),
            std::string::npos)
      << r.err;
  r = Sh("echo 'x: 1' >> " + Q(second.mnt() + "/config.yaml"));
  EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << r.err;
  r = Sh(Bin() + " repack -q " + Q(src));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("refusing to repack: " + src + " is in use: a writable nemofs mount at " +
                       first.mnt()),
            std::string::npos)
      << r.err;
  // The first mount still saves; once it is gone, repack works.
  r = Sh("/bin/echo 'extra_key: 1' >> " + Q(first.mnt() + "/config.yaml"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  second.Stop();
  first.Stop();
  r = Sh(Bin() + " repack -q " + Q(src));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(CatConfig(src).find("extra_key: 1"), std::string::npos);
}

// Repacking another checkpoint into the path of a mounted writable source
// would replace it under the mount (its next save: ESTALE): refused, naming
// the mount, and the mount keeps saving; once unmounted it works.
TEST(SharedMount, RepackIntoAMountedSourceRefuses) {
  TempDir dir;
  std::string mounted = dir.Join("a.nemo");
  std::string other = dir.Join("b.nemo");
  Sh("cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(mounted) + " && cp " +
     Q(TestData("tiny_gpt.nemo")) + " " + Q(other));
  BgMount m;
  ASSERT_EQ(m.Start(mounted).exit_code, 0);
  auto r = Sh(Bin() + " repack -q " + Q(other) + " -o " + Q(mounted));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("refusing to repack into " + mounted + ": " + mounted +
                       " is in use: a writable nemofs mount at " + m.mnt()),
            std::string::npos)
      << r.err;
  r = Sh("/bin/echo 'extra_key: 1' >> " + Q(m.mnt() + "/config.yaml"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  m.Stop();
  EXPECT_NE(CatConfig(mounted).find("extra_key: 1"), std::string::npos);
  r = Sh(Bin() + " repack -q " + Q(other) + " -o " + Q(mounted));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(CatConfig(mounted).find("extra_key: 1"), std::string::npos);
}

// The lock is on the source's inode: a hard link of a mounted source is the
// same source (the old lock file, named after the path, let both mount rw).
TEST(SharedMount, HardLinkOfAMountedSourceIsReadOnlyAndRepackViaItRefuses) {
  TempDir dir;
  std::string src = dir.Join("a.nemo");
  std::string link = dir.Join("b.nemo");
  ASSERT_EQ(
      Sh("cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(src) + " && ln " + Q(src) + " " + Q(link))
          .exit_code,
      0);
  BgMount first;
  ASSERT_EQ(first.Start(src).exit_code, 0);
  ASSERT_GT(first.pid(), 0);
  // Named by the daemon's pid (the lock is retaken in its name after the fork).
  std::string holder =
      "a writable nemofs mount at " + first.mnt() + " (pid " + std::to_string(first.pid()) + ")";
  BgMount second;
  auto r = second.Start(link);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("mounted read-only: " + link + " is in use: " + holder), std::string::npos)
      << r.err;
  r = Sh("echo 'x: 1' >> " + Q(second.mnt() + "/config.yaml"));
  EXPECT_NE(r.err.find("Read-only file system"), std::string::npos) << r.err;
  r = Sh(Bin() + " repack -q " + Q(link));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("refusing to repack: " + link + " is in use: " + holder), std::string::npos)
      << r.err;
  second.Stop();
  first.Stop();
  r = Sh(Bin() + " repack -q " + Q(link));
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

// A compressed archive's commit renames a new file over the source: the
// lock moves to it, so a mount started after the commit is still refused.
TEST(SharedMount, LockFollowsACompressedArchiveCommit) {
  TempDir dir;
  std::string src = dir.Join("a.nemo");
  ASSERT_EQ(Sh("cp " + Q(TestData("tiny_gpt_gz.nemo")) + " " + Q(src)).exit_code, 0);
  BgMount first;
  ASSERT_EQ(first.Start(src).exit_code, 0);
  struct stat before {};
  ASSERT_EQ(::stat(src.c_str(), &before), 0);
  auto r = Sh("/bin/echo 'extra_key: 1' >> " + Q(first.mnt() + "/config.yaml"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  struct stat after {};
  ASSERT_EQ(::stat(src.c_str(), &after), 0);
  ASSERT_NE(before.st_ino, after.st_ino) << "the commit did not replace the archive";
  BgMount second;
  r = second.Start(src);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("mounted read-only: " + src + " is in use: a writable nemofs mount at " +
                       first.mnt()),
            std::string::npos)
      << r.err;
  r = Sh(Bin() + " repack -q " + Q(src));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  // The first mount still saves (another rewrite, another handover).
  r = Sh("/bin/echo 'extra_key2: 2' >> " + Q(first.mnt() + "/config.yaml"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  second.Stop();
  first.Stop();
  EXPECT_NE(CatConfig(src).find("extra_key2: 2"), std::string::npos);
}

std::set<std::string> RunLockFiles() {
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/run/lock", ec)) {
    std::string n = e.path().filename().string();
    if (n.rfind("nemofs-", 0) == 0) names.insert(e.path().string());
  }
  return names;
}

TEST(SharedMount, SourceLockCreatesNoFilesInRunLock) {
  TempDir dir;
  std::string src = dir.Join("fresh-" + std::to_string(::getpid()) + ".nemo");
  ASSERT_EQ(Sh("cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(src)).exit_code, 0);
  auto before = RunLockFiles();
  {
    BgMount first;
    ASSERT_EQ(first.Start(src).exit_code, 0);
    BgMount second;
    auto r = second.Start(src);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("mounted read-only: "), std::string::npos) << r.err;
    EXPECT_EQ(Sh(Bin() + " repack -q " + Q(src)).exit_code, 1);
  }
  EXPECT_EQ(Sh(Bin() + " repack -q " + Q(src)).exit_code, 0);
  auto after = RunLockFiles();
  std::vector<std::string> created;
  std::set_difference(after.begin(), after.end(), before.begin(), before.end(),
                      std::back_inserter(created));
  EXPECT_TRUE(created.empty()) << created.front();
}

// A user who cannot read the source cannot open it, so cannot flock it:
// nothing they can lock (the source, any file in /run/lock) makes root's
// mount read-only.
TEST(SharedMount, UserWhoCannotReadTheSourceCannotMakeAMountReadOnly) {
  TempDir dir;
  ::chmod(dir.path().c_str(), 0755);
  std::string src = dir.Join("private-" + std::to_string(::getpid()) + ".nemo");
  ASSERT_EQ(
      Sh("cp " + Q(TestData("tiny_gpt.nemo")) + " " + Q(src) + " && chmod 600 " + Q(src)).exit_code,
      0);
  // A writable mount once (the old design left its lock file behind here).
  auto before = RunLockFiles();
  {
    BgMount once;
    ASSERT_EQ(once.Start(src).exit_code, 0);
  }
  auto after = RunLockFiles();
  std::string targets = Q(src);
  for (const auto& f : after) {
    if (!before.count(f)) targets += " " + Q(f);
  }
  // The user tries to hold every candidate for 8 s.
  std::string tries = dir.Join("tries");
  ASSERT_EQ(Sh("touch " + Q(tries) + " && chmod 666 " + Q(tries)).exit_code, 0);
  auto r = Sh(AsNobody("for f in " + targets + "; do (flock -x -n \"$f\" sh -c 'echo held " +
                       "\"$0\"; sleep 8' \"$f\" || echo refused \"$f\") >> " + Q(tries) +
                       " 2>/dev/null & done; true"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  BgMount m;
  r = m.Start(src);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.find("mounted read-only"), std::string::npos) << r.err << ReadFile(tries);
  r = Sh("/bin/echo 'extra_key: 1' >> " + Q(m.mnt() + "/config.yaml"));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::string log = ReadFile(tries);
  EXPECT_NE(log.find("refused " + src), std::string::npos) << log;
  EXPECT_EQ(log.find("held " + src), std::string::npos) << log;
}

}  // namespace
}  // namespace nemofs::testing
