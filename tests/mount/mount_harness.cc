#include "mount_harness.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

extern char** environ;

namespace nemofs::testing {

std::string NemofsBinary() { return NEMOFS_BINARY; }

bool IsMounted(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string a, b, c, d, mountpoint;
    f >> a >> b >> c >> d >> mountpoint;
    if (mountpoint == path) return true;
  }
  return false;
}

namespace {

// Waits up to `timeout` for `pid` to exit; returns its wait status or -1.
int WaitFor(pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0) return -1;
    if (std::chrono::steady_clock::now() > deadline) return -2;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace

std::unique_ptr<Mount> Mount::Start(const std::string& source,
                                    const std::vector<std::string>& extra_args,
                                    const MountOptions& options) {
  std::unique_ptr<Mount> m(new Mount());
  m->mnt_ = m->dir_.Join("mnt");
  m->cache_dir_ = options.cache_dir.empty() ? m->dir_.Join("cache") : options.cache_dir;
  ::mkdir(m->mnt_.c_str(), 0755);
  std::vector<std::string> args = {NemofsBinary(),
                                   "mount",
                                   "-f",
                                   source,
                                   m->mnt_,
                                   "--log-file",
                                   m->dir_.Join("daemon.log"),
                                   "--cache-dir",
                                   m->cache_dir_,
                                   "--log-level",
                                   "debug"};
  if (!options.writable) {
    args.push_back("-o");
    args.push_back("ro");
  }
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  std::vector<std::string> env_storage = options.env;
  std::vector<char*> envp;
  for (auto& e : env_storage) envp.push_back(e.data());
  for (char** e = environ; *e; ++e) envp.push_back(*e);
  envp.push_back(nullptr);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  std::string out = m->dir_.Join("stderr");
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  int rc = posix_spawn(&m->pid_, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "cannot start " << argv[0];
    m->pid_ = -1;
    return nullptr;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!IsMounted(m->mnt_)) {
    int status = 0;
    if (::waitpid(m->pid_, &status, WNOHANG) == m->pid_) {
      ADD_FAILURE() << "nemofs mount exited before mounting (status " << status
                    << "): " << ReadFile(out);
      m->pid_ = -1;
      return nullptr;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << "mount did not appear within 20 s: " << ReadFile(out);
      return nullptr;  // the destructor kills the child
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return m;
}

void Mount::Unmount() {
  if (pid_ < 0) return;
  if (IsMounted(mnt_)) {
    auto r = Sh("fusermount3 -u " + ShellQuote(mnt_), 20);
    EXPECT_EQ(r.exit_code, 0) << "fusermount3 -u: " << r.err;
  }
  int status = WaitFor(pid_, std::chrono::seconds(20));
  if (status >= 0) {
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "daemon exit status " << status << "; log:\n"
        << Log();
    pid_ = -1;
    return;
  }
  ADD_FAILURE() << "daemon " << pid_ << " did not exit after unmount; killing it";
  ::kill(pid_, SIGKILL);
  WaitFor(pid_, std::chrono::seconds(10));
  Sh("fusermount3 -uz " + ShellQuote(mnt_), 20);
  pid_ = -1;
}

int Mount::ExpectDeath(int sig) {
  if (pid_ < 0) return -1;
  if (sig > 0) ::kill(pid_, sig);
  int status = WaitFor(pid_, std::chrono::seconds(20));
  if (status < 0) {
    ADD_FAILURE() << "daemon " << pid_ << " did not die; killing it";
    ::kill(pid_, SIGKILL);
    WaitFor(pid_, std::chrono::seconds(10));
  }
  pid_ = -1;
  Sh("fusermount3 -uz " + ShellQuote(mnt_), 20);
  return status;
}

Mount::~Mount() {
  if (pid_ >= 0) Unmount();
  if (IsMounted(mnt_)) {
    ADD_FAILURE() << mnt_ << " still mounted after the test";
    Sh("fusermount3 -uz " + ShellQuote(mnt_), 20);
  }
}

std::string TensorFile(const Mount& m, const std::string& ls_flags) {
  auto files = Sh("ls " + ls_flags + " " + ShellQuote(m.path() + "/tensors") + " | head -1");
  return m.path() + "/tensors/" + files.out.substr(0, files.out.find('\n'));
}

uint64_t VmData(pid_t pid) {
  std::string status = ReadFile("/proc/" + std::to_string(pid) + "/status");
  auto at = status.find("VmData:");
  if (at == std::string::npos) {
    ADD_FAILURE() << "no VmData for pid " << pid;
    return 0;
  }
  return std::stoull(status.substr(at + 7)) << 10;
}

bool LimitDaemonMemory(pid_t pid, uint64_t headroom) {
#if defined(__SANITIZE_ADDRESS__)
  // ASan's allocator maps its quarantine and caches as private memory: the
  // limit only proves streaming in the plain build.
  headroom += 4ull << 30;
#endif
  const std::string limit = std::to_string(VmData(pid) + headroom);
  auto r = Sh("prlimit --pid " + std::to_string(pid) + " --data=" + limit + ":" + limit);
  EXPECT_EQ(r.exit_code, 0) << "prlimit: " << r.err;
  return r.exit_code == 0;
}

std::string AsNobody(const std::string& cmd) {
  return "setpriv --reuid=" + std::to_string(kNobody) + " --regid=" + std::to_string(kNobody) +
         " --clear-groups -- bash -c " + ShellQuote(cmd);
}

}  // namespace nemofs::testing
