// SourceLock: flock on the source itself, its holder found in /proc/locks.
// Every lock here is a real one, taken by this process or a child.
#include "nemofs/source_lock.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "test_util.h"
#include "util/atomic_replace.h"
#include "util/fd.h"

namespace nemofs::testing {
namespace {

std::string ProcLocks() {
  std::ifstream in("/proc/locks");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void WriteText(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// A child that flocks `path` (LOCK_EX, blocking when `blocking`), says so on
// a pipe ('1' once locked, or '0' right before a blocking attempt) and then
// waits to be killed.
class Locker {
 public:
  Locker(const std::string& path, bool blocking) {
    int p[2];
    if (::pipe(p) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(p[0]);
      int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) ::_exit(2);
      if (blocking) {
        (void)!::write(p[1], "0", 1);
        if (::flock(fd, LOCK_EX) != 0) ::_exit(3);
      } else {
        if (::flock(fd, LOCK_EX | LOCK_NB) != 0) ::_exit(3);
        (void)!::write(p[1], "1", 1);
      }
      for (;;) ::pause();
    }
    ::close(p[1]);
    char c = 0;
    ok_ = pid_ > 0 && ::read(p[0], &c, 1) == 1;
    ::close(p[0]);
  }
  ~Locker() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
  }
  bool ok() const { return ok_; }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  bool ok_ = false;
};

struct stat StatOf(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st;
}

TEST(SourceLock, ProcLocksNamesTheChildThatHoldsTheLock) {
  TempDir dir;
  std::string file = dir.Join("src.nemo");
  WriteText(file, "x");
  Locker holder(file, false);
  ASSERT_TRUE(holder.ok());
  struct stat st = StatOf(file);
  std::string locks = ProcLocks();
  // The line the kernel wrote parses back to the child's pid and our inode.
  bool seen = false;
  std::istringstream in(locks);
  for (std::string line; std::getline(in, line);) {
    auto e = ParseFlockLine(line);
    if (e && e->inode == st.st_ino && e->pid == holder.pid()) {
      seen = true;
      EXPECT_TRUE(e->write) << line;
    }
  }
  EXPECT_TRUE(seen) << locks;
  auto pid = FlockHolder(locks, st.st_dev, st.st_ino);
  ASSERT_TRUE(pid.has_value()) << locks;
  EXPECT_EQ(*pid, holder.pid());
  // Another file's inode is not held by anyone.
  std::string other = dir.Join("other");
  WriteText(other, "y");
  struct stat ost = StatOf(other);
  EXPECT_FALSE(FlockHolder(ProcLocks(), ost.st_dev, ost.st_ino).has_value());
}

TEST(SourceLock, ABlockedWaiterIsNotTheHolder) {
  TempDir dir;
  std::string file = dir.Join("src.nemo");
  WriteText(file, "x");
  Locker holder(file, false);
  ASSERT_TRUE(holder.ok());
  Locker waiter(file, true);
  ASSERT_TRUE(waiter.ok());
  struct stat st = StatOf(file);
  // Wait (bounded) until the kernel lists the waiter ("N: -> FLOCK ...").
  std::string locks;
  for (int i = 0; i < 200; ++i) {
    locks = ProcLocks();
    if (locks.find("-> FLOCK  ADVISORY  WRITE " + std::to_string(waiter.pid()) + " ") !=
        std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_NE(locks.find("-> FLOCK  ADVISORY  WRITE " + std::to_string(waiter.pid())),
            std::string::npos)
      << locks;
  auto pid = FlockHolder(locks, st.st_dev, st.st_ino);
  ASSERT_TRUE(pid.has_value()) << locks;
  EXPECT_EQ(*pid, holder.pid());
}

TEST(SourceLock, AcquireOfAHeldSourceIsBusyAndNamesTheHolder) {
  TempDir dir;
  std::string file = dir.Join("src.nemo");
  WriteText(file, "x");
  Locker holder(file, false);
  ASSERT_TRUE(holder.ok());
  auto lock = SourceLock::Acquire(file);
  ASSERT_FALSE(lock.ok());
  EXPECT_EQ(lock.error().code(), EBUSY);
  // The child is this test binary (not a nemofs command): process N (comm).
  EXPECT_NE(lock.error().message().find(file + " is in use: process " +
                                        std::to_string(holder.pid()) + " ("),
            std::string::npos)
      << lock.error().message();
}

TEST(SourceLock, HardLinkAndFolderAreLockedByInode) {
  TempDir dir;
  std::string file = dir.Join("a.nemo");
  std::string link = dir.Join("b.nemo");
  WriteText(file, "x");
  ASSERT_EQ(::link(file.c_str(), link.c_str()), 0);
  auto first = SourceLock::Acquire(file);
  ASSERT_TRUE(first.ok()) << first.error().message();
  auto second = SourceLock::Acquire(link);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code(), EBUSY);
  EXPECT_NE(second.error().message().find(link + " is in use: process " +
                                          std::to_string(::getpid()) + " ("),
            std::string::npos)
      << second.error().message();
  first->reset();
  EXPECT_TRUE(SourceLock::Acquire(link).ok());  // released with the lock

  std::string folder = dir.Join("ckpt");
  ASSERT_EQ(::mkdir(folder.c_str(), 0755), 0);
  auto f1 = SourceLock::Acquire(folder);
  ASSERT_TRUE(f1.ok()) << f1.error().message();
  auto f2 = SourceLock::Acquire(folder + "/.");
  ASSERT_FALSE(f2.ok());
  EXPECT_EQ(f2.error().code(), EBUSY);
}

TEST(SourceLock, ReplaceFileHandsTheLockOverToTheNewFile) {
  TempDir dir;
  std::string file = dir.Join("a.nemo");
  WriteText(file, "old");
  UniqueFd old_inode(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(old_inode.valid());
  auto lock = SourceLock::Acquire(file);
  ASSERT_TRUE(lock.ok()) << lock.error().message();
  ino_t before = StatOf(file).st_ino;
  ReplaceOptions options;
  options.temp_path = file + ".tmp";
  options.durable = false;
  ASSERT_TRUE(ReplaceFile(file, options, [](int fd) -> Status {
                if (::write(fd, "new", 3) != 3) return Err(EIO, "short write");
                return Ok();
              }).ok());
  ino_t after = StatOf(file).st_ino;
  ASSERT_NE(before, after);
  EXPECT_EQ((*lock)->ino(), after);
  // The new file is held (by this process, per /proc/locks)...
  auto again = SourceLock::Acquire(file);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), EBUSY);
  struct stat st = StatOf(file);
  EXPECT_EQ(FlockHolder(ProcLocks(), st.st_dev, st.st_ino), ::getpid());
  // ...and the old inode is free again.
  EXPECT_EQ(::flock(old_inode.get(), LOCK_EX | LOCK_NB), 0) << std::strerror(errno);
  // A target nobody locked is replaced without a lock.
  std::string plain = dir.Join("plain");
  WriteText(plain, "p");
  options.temp_path = plain + ".tmp";
  ASSERT_TRUE(ReplaceFile(plain, options, [](int) -> Status { return Ok(); }).ok());
  EXPECT_TRUE(SourceLock::Acquire(plain).ok());
}

TEST(SourceLock, ClaimAfterForkNamesTheChild) {
  TempDir dir;
  std::string file = dir.Join("a.nemo");
  WriteText(file, "x");
  auto lock = SourceLock::Acquire(file);
  ASSERT_TRUE(lock.ok()) << lock.error().message();
  struct stat st = StatOf(file);
  ASSERT_EQ(FlockHolder(ProcLocks(), st.st_dev, st.st_ino), ::getpid());
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  pid_t child = ::fork();
  if (child == 0) {
    ::close(p[0]);
    char c = (*lock)->ClaimForThisProcess() ? '1' : '0';
    (void)!::write(p[1], &c, 1);
    for (;;) ::pause();
  }
  ASSERT_GT(child, 0);
  ::close(p[1]);
  char c = 0;
  EXPECT_EQ(::read(p[0], &c, 1), 1);
  ::close(p[0]);
  EXPECT_EQ(c, '1');
  EXPECT_EQ(FlockHolder(ProcLocks(), st.st_dev, st.st_ino), child) << ProcLocks();
  // Still exclusive: another open file description cannot take it.
  auto other = SourceLock::Acquire(file);
  EXPECT_FALSE(other.ok());
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
}

// A holder whose command line claims to be `nemofs mount SRC /mnt/fake` is
// not called a mount unless the kernel lists a nemofs mount there.
TEST(SourceLock, AForgedNemofsCommandLineIsNotCalledAMount) {
  TempDir dir;
  std::string file = dir.Join("src.nemo");
  WriteText(file, "x");
  std::string ready = dir.Join("ready");
  // The script is named `mount` so that argv reads "nemofs mount SRC MNT".
  WriteText(dir.Join("mount"),
            "import fcntl, sys, time\n"
            "f = open(sys.argv[1])\n"
            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "open(sys.argv[3], 'w').close()\n"
            "time.sleep(30)\n");
  std::string fake = dir.Join("fake-mnt");
  pid_t child = ::fork();
  if (child == 0) {
    if (::chdir(dir.path().c_str()) != 0) ::_exit(2);
    ::execl("/usr/bin/python3", "nemofs", "mount", file.c_str(), fake.c_str(), ready.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(3);
  }
  ASSERT_GT(child, 0);
  struct stat st {};
  for (int i = 0; i < 500 && ::stat(ready.c_str(), &st) != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  auto lock = SourceLock::Acquire(file);
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_FALSE(lock.ok());
  const std::string& m = lock.error().message();
  EXPECT_NE(m.find("is in use: process " + std::to_string(child) + " ("), std::string::npos) << m;
  EXPECT_EQ(m.find("nemofs mount"), std::string::npos) << m;
}

}  // namespace
}  // namespace nemofs::testing
