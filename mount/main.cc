// nemofs: mount NeMo / Megatron / PyTorch checkpoints as a filesystem.
// Command line (DESIGN.md §3): mount, umount, info, cat. Exit codes: exit_codes.h.
#define FUSE_USE_VERSION 314
#include <fcntl.h>
#include <fnmatch.h>
#include <fuse3/fuse_lowlevel.h>
#include <signal.h>
#include <spawn.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>

#include "exit_codes.h"
#include "fuse_ops.h"
#include "mountinfo.h"
#include "nemofs/filesystem.h"
#include "nemofs/repack.h"
#include "nemofs/source_lock.h"
#include "nemofs/strings.h"

extern char** environ;

namespace nemofs::mountcmd {
namespace {

void PrintError(std::string_view message) { fmt::print(stderr, "nemofs: {}\n", message); }

std::string DefaultCacheDir() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    return std::string(xdg) + "/nemofs";
  }
  if (const char* home = std::getenv("HOME"); home && *home) {
    return std::string(home) + "/.cache/nemofs";
  }
  return "/tmp/nemofs-cache-" + std::to_string(::getuid());
}

std::string Absolute(const std::string& path) {
  if (!path.empty() && path[0] == '/') return path;
  char cwd[4096];
  if (!::getcwd(cwd, sizeof cwd)) return path;
  return std::string(cwd) + "/" + path;
}

void PrintWarning(std::string_view message) {
  fmt::print(stderr, "nemofs: warning: {}\n", message);
}

// Makes sure `dir` is a writable directory (creating it and its parents,
// 0700, if absent). The error names the directory and the problem.
Status EnsureWritableDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    int e = ec ? ec.value() : errno;
    return Err(e, "--cache-dir {}: cannot create it: {}", dir, std::strerror(e));
  }
  if (!S_ISDIR(st.st_mode)) return Err(ENOTDIR, "--cache-dir {}: not a directory", dir);
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    int e = errno;
    return Err(e, "--cache-dir {}: not writable: {}", dir, std::strerror(e));
  }
  return Ok();
}

// The cache directory a command uses: --cache-dir as given (it must be a
// writable directory), or the default; a default that cannot be used (no
// HOME, as for system users) falls back to /tmp/nemofs-cache-UID.
Result<std::string> ResolveCacheDir(const std::string& given, bool check) {
  if (!given.empty()) {
    std::string dir = Absolute(given);
    if (check) NEMOFS_RETURN_IF_ERROR(EnsureWritableDir(dir));
    return dir;
  }
  std::string dir = Absolute(DefaultCacheDir());
  if (!check || EnsureWritableDir(dir)) return dir;
  std::string fallback = "/tmp/nemofs-cache-" + std::to_string(::getuid());
  if (::mkdir(fallback.c_str(), 0700) != 0 && errno != EEXIST) {
    return Err(errno, "cache directory {} unusable, and so is {}: {}", dir, fallback,
               std::strerror(errno));
  }
  struct stat st {};
  if (::lstat(fallback.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::getuid()) {
    return Err(EACCES, "cache directory {} unusable, and {} is not a directory of yours", dir,
               fallback);
  }
  return fallback;
}

// NEMOFS_SYSLOG_SOCKET (tests) names another socket than /dev/log.
std::string SyslogSocket() {
  const char* env = std::getenv("NEMOFS_SYSLOG_SOCKET");
  return env && *env ? env : "/dev/log";
}

bool SyslogAvailable() {
  struct stat st {};
  return ::stat(SyslogSocket().c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

std::optional<std::string> RealPath(const std::string& path) {
  char* r = ::realpath(path.c_str(), nullptr);
  if (!r) return std::nullopt;
  std::string out(r);
  std::free(r);
  return out;
}


struct LogOptions {
  std::string level = "info";
  std::string file;
};

bool SetupLogging(const LogOptions& opts, bool to_stderr, bool to_syslog,
                  bool quiet_stderr = false) {
  auto level = spdlog::level::from_str(opts.level);
  if (level == spdlog::level::off && opts.level != "off") {
    PrintError(fmt::format("--log-level: unknown level '{}' (trace, debug, info, warn, error, off)",
                           opts.level));
    return false;
  }
  std::vector<spdlog::sink_ptr> sinks;
  if (to_stderr) {
    auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    // Behind a daemonizing `mount` the terminal hears only errors through
    // the log; warnings are printed by `mount` itself (RunMount).
    if (quiet_stderr) sink->set_level(std::max(level, spdlog::level::err));
    sinks.push_back(sink);
  }
  if (!opts.file.empty()) {
    try {
      sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(opts.file));
    } catch (const spdlog::spdlog_ex& e) {
      PrintError(fmt::format("--log-file {}: {}", opts.file, e.what()));
      return false;
    }
  } else if (to_syslog) {
    sinks.push_back(
        std::make_shared<spdlog::sinks::syslog_sink_mt>("nemofs", LOG_PID, LOG_USER, false));
  }
  auto logger = std::make_shared<spdlog::logger>("nemofs", sinks.begin(), sinks.end());
  logger->set_level(level);
  logger->flush_on(spdlog::level::debug);
  logger->set_pattern("%Y-%m-%d %H:%M:%S.%e [%l] [%P] %v");
  spdlog::set_default_logger(logger);
  return true;
}

// --cache-dir and --cache-max, as every command that reads a source takes them.
struct CacheArgs {
  std::string dir;
  uint64_t max = kDefaultCacheMax;
};

// Adds --cache-dir (help `dir_help`) and --cache-max to `app`.
void AddCacheOptions(CLI::App* app, CacheArgs* cache, const std::string& dir_help) {
  app->add_option("--cache-dir", cache->dir, dir_help);
  app->add_option_function<std::string>(
         "--cache-max",
         [cache](const std::string& text) {
           auto size = ParseByteSize(text);
           if (!size) throw CLI::ValidationError("--cache-max", size.error().message());
           cache->max = *size;
         },
         "cap of the cache directory's extraction entries, e.g. 20G or 500M (K/M/G/T = "
         "1024^n bytes); past it, the least recently used entries no process uses are "
         "removed; 0 = no cap (default 50G)")
      ->type_name("SIZE");
}

Result<std::unique_ptr<Filesystem>> OpenCheckpoint(
    const std::string& source, const CacheArgs& cache, bool writable = false,
    JournalPolicy journal = JournalPolicy::kRollBack) {
  auto real = RealPath(source);
  if (!real) {
    int e = errno;
    return Err(e, "{}: {}", source, std::strerror(e));
  }
  FilesystemOptions options;
  options.source = *real;
  options.cache_dir = Absolute(cache.dir.empty() ? DefaultCacheDir() : cache.dir);
  options.cache_max = cache.max;
  options.writable = writable;
  options.journal = journal;
  return Filesystem::Open(options);
}

// Opens SOURCE, or prints the one-line error and returns null (exit code 3).
std::unique_ptr<Filesystem> OpenOrPrint(const std::string& source, const CacheArgs& cache,
                                        bool writable = false,
                                        JournalPolicy journal = JournalPolicy::kRollBack) {
  auto fs = OpenCheckpoint(source, cache, writable, journal);
  if (!fs) {
    PrintError(fs.error().message());
    return nullptr;
  }
  return std::move(fs).value();
}

// Lets one daemon serve thousands of shard files.
void RaiseFileLimit() {
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// ---- mount -------------------------------------------------------------------
struct MountArgs {
  std::string source;
  std::string mountpoint;
  bool foreground = false;
  std::vector<std::string> options;
  CacheArgs cache;
  LogOptions log;
};

// Splits -o groups into FUSE options; `ro`/`rw` set `read_only` (the last
// wins, as in mount(8)); options meant for mount(8) and /etc/fstab only
// (what mount.fuse3 passes through) are dropped.
std::vector<std::string> ParseMountOptions(const std::vector<std::string>& groups,
                                           bool* read_only) {
  static const std::set<std::string, std::less<>> kFstabOnly = {
      "auto", "noauto", "user", "nouser", "users", "owner", "nofail", "_netdev",
      "defaults", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "async", "sync",
      "atime", "noatime", "relatime", "norelatime", "strictatime", "lazytime", "nolazytime",
      "diratime", "nodiratime", "loud", "silent"};
  std::vector<std::string> out;
  for (const auto& group : groups) {
    for (std::string_view view : Split(group, ',')) {
      std::string opt(view);
      if (opt.empty()) continue;
      if (opt == "ro" || opt == "rw") {
        *read_only = opt == "ro";
        continue;
      }
      if (kFstabOnly.count(opt) || opt.rfind("x-", 0) == 0 || opt.rfind("comment=", 0) == 0) {
        continue;
      }
      out.push_back(opt);
    }
  }
  return out;
}

// What model.safetensors leaves out, one line each, at most `shown` of them.
constexpr size_t kOmittedShown = 8;
std::vector<std::string> OmittedLines(const CheckpointInfo& info, size_t shown) {
  std::vector<std::string> lines;
  const auto& omitted = info.safetensors_omitted;
  for (size_t k = 0; k < omitted.size() && k < shown; ++k) {
    lines.push_back(fmt::format("model.safetensors leaves out {}: {}", omitted[k].first,
                                omitted[k].second));
  }
  if (omitted.size() > shown) {
    lines.push_back(fmt::format("model.safetensors leaves out {} more (`nemofs info {}` lists them)",
                                omitted.size() - shown, info.source));
  }
  return lines;
}

int RunMount(const MountArgs& args) {
  FuseMountConfig config;
  config.foreground = args.foreground;
  bool read_only = false;
  config.fuse_options = ParseMountOptions(args.options, &read_only);
  // nemofs names its mounts itself (fuse.nemofs, nemofs:SOURCE): `umount`,
  // `ls` of mounts and fstab find them by these.
  for (const auto& o : config.fuse_options) {
    if ((o.rfind("subtype=", 0) == 0 && o != "subtype=nemofs") || o.rfind("fsname=", 0) == 0) {
      PrintError(fmt::format(
          "-o {}: nemofs sets the mount's {} itself (type fuse.nemofs, source nemofs:SOURCE), "
          "so that `nemofs umount` knows the mount; leave this option out",
          o, o.substr(0, o.find('='))));
      return kExitUsage;
    }
  }
  auto cache_dir = ResolveCacheDir(args.cache.dir, true);
  if (!cache_dir) {
    PrintError(cache_dir.error().message());
    return kExitUsage;
  }
  // Behind a daemonizing `mount`, the log goes to syslog; on a machine
  // without one (containers), to a file in the cache directory, said here.
  LogOptions log = args.log;
  bool to_syslog = !args.foreground && log.file.empty();
  if (to_syslog && !SyslogAvailable()) {
    log.file = *cache_dir + "/nemofs.log";
    to_syslog = false;
  }
  if (!SetupLogging(log, true, to_syslog, !args.foreground)) return kExitUsage;
  auto mnt = RealPath(args.mountpoint);
  if (!mnt) {
    int e = errno;
    PrintError(fmt::format("{}: mount point {}", args.mountpoint,
                           e == ENOENT ? "does not exist" : std::strerror(e)));
    return kExitMount;
  }
  struct stat st {};
  if (::stat(mnt->c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    PrintError(fmt::format("{}: mount point is not a directory", args.mountpoint));
    return kExitMount;
  }
  if (auto existing = FindMount(*mnt)) {
    PrintError(
        fmt::format("{}: mount point is already in use ({} is mounted there); unmount it "
                    "first",
                    args.mountpoint, existing->fstype));
    return kExitMount;
  }
  RaiseFileLimit();
  // A writable mount holds the source's lock for its life (the daemon
  // inherits the descriptor and retakes it in its own name); a second one
  // falls back to read-only.
  // Only a holder makes it read-only: where the lock cannot be taken at all
  // (NFS without flock) the mount is writable and says it is unguarded.
  std::unique_ptr<SourceLock> lock;
  std::string lock_refusal;
  std::string lock_unavailable;
  auto real_source = RealPath(args.source);
  if (!read_only && real_source) {
    auto locked = SourceLock::Acquire(*real_source);
    if (locked) {
      lock = std::move(locked).value();
    } else if (locked.error().code() == EBUSY) {
      lock_refusal = locked.error().message();
    } else {
      lock_unavailable = locked.error().message();
    }
  }
  // A hot journal: rolled back under the lock this mount holds; refused
  // for -o ro; left alone when another writable mount holds the lock (its
  // write may be in progress).
  const JournalPolicy journal = read_only               ? JournalPolicy::kRefuse
                                : !lock_refusal.empty() ? JournalPolicy::kLeave
                                : lock                  ? JournalPolicy::kRollBackLocked
                                                        : JournalPolicy::kRollBack;
  auto fs = OpenOrPrint(args.source, CacheArgs{*cache_dir, args.cache.max},
                        !read_only && lock_refusal.empty(), journal);
  if (!fs) return kExitSource;
  const CheckpointInfo& info = fs->info();
  // What changes what the user gets is said here, before returning.
  std::vector<std::string> warnings;
  if (!args.foreground && args.log.file.empty() && !log.file.empty()) {
    fmt::print(stderr, "nemofs: no syslog here ({}): the daemon logs to {}\n", SyslogSocket(),
               log.file);
  }
  if (!lock_refusal.empty()) {
    warnings.push_back(fmt::format("mounted read-only: {}", lock_refusal));
  } else if (!read_only && !fs->writable()) {
    warnings.push_back(fmt::format("mounted read-only: {}", info.read_only_reason.empty()
                                                                ? "the source cannot be written"
                                                                : info.read_only_reason));
  }
  if (!lock_unavailable.empty() && fs->writable()) {
    warnings.push_back(
        fmt::format("{}: a second writable mount of it would not be detected", lock_unavailable));
  }
  for (const auto& e : info.weight_errors) warnings.push_back(e);
  for (const auto& w : info.warnings) {  // named by the source, once
    warnings.push_back(w.rfind(info.source, 0) == 0 ? w : fmt::format("{}: {}", info.source, w));
  }
  for (const auto& line : OmittedLines(info, kOmittedShown)) warnings.push_back(line);
  for (const auto& w : warnings) {
    if (args.foreground) {
      spdlog::warn("{}", w);
    } else {
      PrintWarning(w);  // the terminal; the daemon's log gets it below
      spdlog::warn("{}", w);
    }
  }
  if (!fs->writable()) lock.reset();
  // A source that cannot be written (or one without a config) mounts
  // read-only: the kernel then answers every write with EROFS.
  config.read_only = !fs->writable();
  config.mountpoint = *mnt;
  config.source = info.source;
  if (lock) {
    config.in_daemon = [&lock, source = info.source] {
      if (!lock->ClaimForThisProcess()) {
        spdlog::warn("{}: the source's lock is held shared only (another process took a shared "
                     "lock on it)",
                     source);
      }
    };
  }
  return MountAndServe(*fs, config);
}

// ---- umount ------------------------------------------------------------------
bool ProcessGone(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return true;
  std::string line;
  std::getline(stat, line);
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

// Closes a file descriptor it owns.
struct OwnedFd {
  int fd = -1;
  OwnedFd() = default;
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  ~OwnedFd() {
    if (fd >= 0) ::close(fd);
  }
};

// Runs argv; waits until `deadline` at most. Returns the exit code, -1 if
// it could not run, or -2 if it was still running at the deadline (it is
// then killed). Its stdout and stderr go to `*output` (not to the user's
// terminal: the caller says what happened in its own words).
int RunCommand(const std::vector<std::string>& argv_in,
               std::chrono::steady_clock::time_point deadline, std::string* output = nullptr) {
  std::vector<char*> argv;
  std::vector<std::string> storage = argv_in;
  for (auto& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  OwnedFd read_end, write_end;
  {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return -1;
    read_end.fd = fds[0];
    write_end.fd = fds[1];
  }
  posix_spawn_file_actions_t actions;
  if (posix_spawn_file_actions_init(&actions) != 0) return -1;
  posix_spawn_file_actions_adddup2(&actions, write_end.fd, STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, write_end.fd, STDERR_FILENO);
  pid_t pid;
  int spawned = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) return -1;
  ::close(std::exchange(write_end.fd, -1));
  std::string captured;
  auto drain = [&] {
    char buf[512];
    ssize_t n;
    while ((n = ::read(read_end.fd, buf, sizeof buf)) > 0) {
      if (captured.size() < 64 * 1024) captured.append(buf, static_cast<size_t>(n));
    }
  };
  int status = 0;
  int result = 0;
  for (;;) {
    drain();
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      result = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      break;
    }
    if (r < 0 && errno != EINTR) {
      result = -1;
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      result = -2;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  drain();
  while (!captured.empty() && (captured.back() == '\n' || captured.back() == ' ')) {
    captured.pop_back();
  }
  if (!captured.empty()) spdlog::debug("{}: {}", argv_in[0], captured);
  if (output) *output = std::move(captured);
  return result;
}

// Runs `call` on a detached thread and waits at most `wait` for its answer,
// so that a stopped or hung daemon (whose getxattr/setxattr never returns)
// costs the caller `wait`, not forever. nullopt when it did not answer.
template <typename T>
std::optional<T> CallWithDeadline(std::function<T()> call, std::chrono::milliseconds wait) {
  struct Answer {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<T> value;
  };
  auto answer = std::make_shared<Answer>();
  std::thread([answer, call = std::move(call)] {
    T v = call();
    std::lock_guard<std::mutex> lock(answer->mu);
    answer->value = v;
    answer->cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lock(answer->mu);
  answer->cv.wait_for(lock, wait, [&] { return answer->value.has_value(); });
  return answer->value;
}

// The daemon's pid from the root's user.nemofs.pid, asked with a deadline.
// 0 if it did not answer, -1 if it answered without a pid.
pid_t AskDaemonPid(const std::string& path, std::chrono::milliseconds wait) {
  auto pid = CallWithDeadline<pid_t>(
      [path] {
        char buf[32] = {};
        ssize_t n = ::getxattr(path.c_str(), "user.nemofs.pid", buf, sizeof buf - 1);
        pid_t p = n > 0 ? static_cast<pid_t>(std::atol(buf)) : -1;
        return p == 0 ? -1 : p;
      },
      wait);
  return pid.value_or(0);
}

// Asks the daemon to store its new files now (setxattr user.nemofs.store on
// the root, with a deadline). 0 when stored (or nothing to store, or a
// read-only mount), -1 when it did not answer in time, else the errno of
// the failed store.
int AskDaemonStore(const std::string& path, std::chrono::milliseconds wait) {
  auto err = CallWithDeadline<int>(
      [path] {
        int rc = ::setxattr(path.c_str(), "user.nemofs.store", "", 0, 0);
        int e = rc == 0 ? 0 : errno;
        if (e == EROFS || e == ENOTSUP || e == EPERM) e = 0;  // nothing to store / older daemon
        return e;
      },
      wait);
  return err.value_or(-1);
}

// The daemon's list of new files it leaves out as editors' temp files
// (user.nemofs.unstored on the root, one line each), asked with a deadline;
// empty when none, or when it did not answer.
std::string AskDaemonUnstored(const std::string& path, std::chrono::milliseconds wait) {
  auto lines = CallWithDeadline<std::string>(
      [path] {
        std::string buf(64 << 10, '\0');  // the daemon keeps it below 64 KiB
        ssize_t n = ::getxattr(path.c_str(), "user.nemofs.unstored", buf.data(), buf.size());
        buf.resize(n > 0 ? static_cast<size_t>(n) : 0);
        return buf;
      },
      wait);
  return lines.value_or(std::string());
}

// Detaches a mount whose daemon does not answer: aborts its FUSE
// connection (root: /sys/fs/fuse/connections/N/abort, N = the minor device
// number) so that every waiting process gets ENOTCONN, then lazily unmounts.
// Returns what it did, for the message.
std::string ForceDetach(const std::string& path, const MountEntry& m) {
  std::vector<std::string> done;
  auto colon = m.device.find(':');
  if (::geteuid() == 0 && ::access("/sys/fs/fuse/connections/", F_OK) == 0 &&
      std::filesystem::is_empty("/sys/fs/fuse/connections/")) {
    // fusectl is not mounted (containers): mount it to reach the abort file.
    auto soon = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    std::string said;
    RunCommand({"mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"}, soon, &said);
  }
  if (colon != std::string::npos) {
    std::string abort_path = "/sys/fs/fuse/connections/" + m.device.substr(colon + 1) + "/abort";
    std::ofstream f(abort_path);
    if (f) f << "1" << std::endl;
    if (f) done.push_back("aborted its FUSE connection (" + abort_path + ")");
  }
  auto soon = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::string said;  // their stderr: what happened is said below, in nemofs's words
  if (RunCommand({"fusermount3", "-u", "-z", path}, soon, &said) == 0 ||
      RunCommand({"umount", "-l", path}, soon, &said) == 0) {
    done.push_back("detached the mount (lazy unmount)");
  }
  if (done.empty()) return "could not detach it (run: fusermount3 -u -z " + path + ")";
  std::string out;
  for (size_t i = 0; i < done.size(); ++i) out += (i ? " and " : "") + done[i];
  return out;
}

// The mount point's absolute path without entering it: the parent is
// resolved, the last component is kept as given (realpath would stat the
// mount root, which blocks when the daemon is stopped).
std::string MountPointPath(const std::string& arg) {
  std::filesystem::path p = std::filesystem::path(Absolute(arg)).lexically_normal();
  if (p.has_filename() == false) p = p.parent_path();
  auto parent = RealPath(p.parent_path().string());
  if (!parent) return p.string();
  return JoinPath(*parent, p.filename().string());
}

int RunUmount(const std::string& mountpoint, double timeout_s) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  // The time actually waited, for the messages ("2.0 s").
  auto waited = [&] {
    return fmt::format("{:.1f} s", std::chrono::duration<double>(Clock::now() - start).count());
  };
  std::string path = MountPointPath(mountpoint);
  auto m = FindMount(path);
  if (!m) {
    PrintError(fmt::format("{}: not mounted", mountpoint));
    return kExitFailure;
  }
  if (m->fstype != "fuse.nemofs") {
    PrintError(fmt::format("{}: not a nemofs mount ({})", mountpoint, m->fstype));
    return kExitFailure;
  }
  auto remaining = [&] {
    return std::max(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()),
                    std::chrono::milliseconds(0));
  };
  // The whole --timeout is the daemon's to answer (pid, then the store),
  // before a mount is detached under it.
  pid_t pid = AskDaemonPid(path, remaining());
  // New files go into the checkpoint first: a failure is reported here and
  // the mount stays, with the files (README "Writes").
  if (pid > 0) {
    int err = AskDaemonStore(path, remaining());
    if (err > 0) {
      PrintError(fmt::format(
          "{}: could not store the new files in the checkpoint: {}; still mounted, the files are "
          "still there (and copied under the cache directory's unsaved/, see the daemon's log)",
          mountpoint, std::strerror(err)));
      return kExitFailure;
    }
    if (err < 0) {
      PrintError(fmt::format("{}: the daemon is still storing new files after {}; not unmounted",
                             mountpoint, waited()));
      return kExitFailure;
    }
    // Never silently: each new file the temp-file rule leaves out is named.
    std::string unstored = AskDaemonUnstored(
        path,
        std::clamp(remaining(), std::chrono::milliseconds(0), std::chrono::milliseconds(2000)));
    for (size_t at = 0; at < unstored.size();) {
      size_t end = unstored.find('\n', at);
      if (end == std::string::npos) end = unstored.size();
      if (end > at) PrintWarning(fmt::format("{}: {}", mountpoint, unstored.substr(at, end - at)));
      at = end + 1;
    }
  }
  // fusermount3 itself does not wait for the daemon; it gets a few seconds
  // of its own when the daemon used up the budget.
  std::string said;
  int rc = RunCommand({"fusermount3", "-u", path},
                      std::max(deadline, Clock::now() + std::chrono::seconds(5)), &said);
  if (pid == 0 && rc == 0) {
    PrintError(fmt::format(
        "{}: unmounted, but its daemon did not answer within {} (stopped or hung?); it exits "
        "once it runs again",
        mountpoint, waited()));
    return kExitFailure;
  }
  if (rc == -2 || (pid == 0 && rc != 0)) {
    std::string when = waited();
    PrintError(fmt::format("{}: the daemon{} did not answer within {}: {}", mountpoint,
                           pid > 0 ? fmt::format(" (pid {})", pid) : std::string(), when,
                           ForceDetach(path, *m)));
    return kExitFailure;
  }
  if (rc != 0) {
    bool busy = said.find("busy") != std::string::npos;
    PrintError(fmt::format("{}: not unmounted: {}", mountpoint,
                           rc < 0 ? "cannot run fusermount3"
                           : busy ? "it is in use (a process has a file open or its working "
                                    "directory in it)"
                                  : "fusermount3 failed (is a process still using it?)"));
    return kExitFailure;
  }
  while (pid > 0 && !ProcessGone(pid)) {
    if (Clock::now() > deadline) {
      PrintError(fmt::format("{}: unmounted, but daemon {} did not exit within {}", mountpoint, pid,
                             waited()));
      return kExitFailure;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return kExitOk;
}

// ---- info --------------------------------------------------------------------
int RunInfo(const std::string& source, const CacheArgs& cache_dir, bool json) {
  auto fs = OpenOrPrint(source, cache_dir);
  if (!fs) return kExitSource;
  const CheckpointInfo& i = fs->info();
  if (json) {
    nlohmann::ordered_json j;
    j["source"] = i.source;
    j["source_kind"] = i.source_kind;
    j["format"] = i.format;
    j["description"] = i.description;
    j["source_bytes"] = i.source_bytes;
    j["files"] = i.files;
    j["directories"] = i.directories;
    j["config"] = i.config.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(i.config);
    j["config_bytes"] = i.config_bytes;
    j["tokenizer"] = nlohmann::ordered_json::array();
    for (const auto& t : i.tokenizer) {
      j["tokenizer"].push_back(
          {{"name", t.name}, {"member", t.member}, {"reference", t.reference}});
    }
    j["weights"] = i.weights;
    j["tensors"] = {{"count", i.tensors}, {"bytes", i.tensor_bytes}};
    j["optimizer"] = {{"count", i.optimizer_tensors}, {"bytes", i.optimizer_bytes}};
    j["ranks"] = {{"count", i.ranks}, {"tensors", i.rank_tensors}};
    j["unmerged"] = i.unmerged;
    j["safetensors_omitted"] = nlohmann::ordered_json::object();
    for (const auto& [name, why] : i.safetensors_omitted) j["safetensors_omitted"][name] = why;
    j["writable"] = fs->DescribeWritable();
    j["warnings"] = i.warnings;
    fmt::print("{}\n", j.dump(2));
    return kExitOk;
  }
  fmt::print("source:      {}\n", i.source);
  fmt::print("format:      {} ({})\n", i.description, i.format);
  fmt::print("stored as:   {}, {} files, {} directories, {} bytes\n", i.source_kind, i.files,
             i.directories, i.source_bytes);
  if (i.config.empty()) {
    fmt::print("config:      none\n");
  } else {
    fmt::print("config:      {} ({} bytes) -> config.yaml\n", i.config, i.config_bytes);
  }
  if (i.tokenizer.empty()) fmt::print("tokenizer:   none\n");
  for (size_t k = 0; k < i.tokenizer.size(); ++k) {
    fmt::print("{}tokenizer/{} <- {} ({})\n", k == 0 ? "tokenizer:   " : "             ",
               i.tokenizer[k].name, i.tokenizer[k].member, i.tokenizer[k].reference);
  }
  fmt::print("weights:     {}\n", i.weights);
  fmt::print("tensors:     {} in tensors/, {} bytes\n", i.tensors, i.tensor_bytes);
  if (i.optimizer_tensors) {
    fmt::print("optimizer:   {} in optimizer/, {} bytes\n", i.optimizer_tensors, i.optimizer_bytes);
  }
  if (i.ranks)
    fmt::print("ranks:       {} rank folders, {} tensors as stored\n", i.ranks, i.rank_tensors);
  for (const auto& [key, why] : i.unmerged) fmt::print("unmerged:    {}: {}\n", key, why);
  for (const auto& [name, why] : i.safetensors_omitted) {
    fmt::print("omitted:     model.safetensors leaves out {}: {}\n", name, why);
  }
  fmt::print("writable:    {}\n", fs->DescribeWritable());
  for (const auto& w : i.warnings) fmt::print("warning:     {}\n", w);
  return kExitOk;
}

// ---- repack ------------------------------------------------------------------
int RunRepack(const std::string& source, const std::string& out_arg, const CacheArgs& cache,
              bool quiet) {
  auto real = RealPath(source);
  if (!real) {
    PrintError(fmt::format("{}: {}", source, std::strerror(errno)));
    return kExitSource;
  }
  std::string out = out_arg.empty() ? *real : Absolute(out_arg);
  // A writable mount of SOURCE would fail its next save (ESTALE) after the
  // rename: refuse while one holds the source's lock.
  auto lock = SourceLock::Acquire(*real);
  if (!lock && lock.error().code() == EBUSY) {
    PrintError(fmt::format("refusing to repack: {}; unmount it first", lock.error().message()));
    return kExitFailure;
  }
  if (!lock) {
    PrintWarning(fmt::format("{}: a writable mount of it would not be detected",
                             lock.error().message()));
  }
  // Repacking into the path of another mounted source replaces it just the
  // same: its lock is checked too.
  std::optional<Result<std::unique_ptr<SourceLock>>> out_lock;
  struct stat out_st {};
  if (out != *real && ::stat(out.c_str(), &out_st) == 0) {
    auto real_out = RealPath(out);
    if (real_out && *real_out != *real) {
      out_lock.emplace(SourceLock::Acquire(*real_out));
      if (!*out_lock && out_lock->error().code() == EBUSY) {
        PrintError(fmt::format("refusing to repack into {}: {}; unmount it first", out,
                               out_lock->error().message()));
        return kExitFailure;
      }
    }
  }
  const bool tty = ::isatty(2) && !quiet;
  int last_pct = -1;
  auto stats = write::Repack(
      *real, out, Absolute(cache.dir.empty() ? DefaultCacheDir() : cache.dir),
      [&](uint64_t done, uint64_t total) {
        int pct = total ? static_cast<int>(done * 100 / total) : 100;
        if (tty && pct != last_pct) {
          fmt::print(stderr, "\rnemofs repack: {}% of {} bytes", pct, total);
          last_pct = pct;
        }
      },
      cache.max);
  if (tty) fmt::print(stderr, "\n");
  if (!stats) {
    PrintError(stats.error().message());
    return stats.error().code() == EINVAL ? kExitSource : kExitFailure;
  }
  if (stats->members || out != *real || stats->bytes_in != stats->bytes_out) {
    fmt::print("repacked {} -> {}: {} members, {} -> {} bytes\n", *real, out, stats->members,
               stats->bytes_in, stats->bytes_out);
  } else {
    fmt::print("{}: nothing to rewrite (its commits replace files whole)\n", *real);
  }
  if (stats->dcp_reclaimed) {
    fmt::print("{}: {} bytes of superseded distributed-checkpoint items reclaimed\n", *real,
               stats->dcp_reclaimed);
  }
  if (stats->orphans) {
    fmt::print("removed {} file{} ({} bytes) left by interrupted commits\n", stats->orphans,
               stats->orphans == 1 ? "" : "s", stats->orphan_bytes);
  }
  return kExitOk;
}

// ---- verify ------------------------------------------------------------------
int RunVerify(const std::string& source, const CacheArgs& cache_dir, bool quiet) {
  auto fs = OpenOrPrint(source, cache_dir);
  if (!fs) return kExitSource;
  const bool tty = ::isatty(2) && !quiet;
  int last_pct = -1;
  auto problems = fs->Verify([&](uint64_t done, uint64_t total) {
    int pct = total ? static_cast<int>(done * 100 / total) : 100;
    if (tty && pct != last_pct) {
      fmt::print(stderr, "\rnemofs verify: {}% of {} bytes", pct, total);
      last_pct = pct;
    }
  });
  if (tty) fmt::print(stderr, "\n");
  for (const auto& p : problems) fmt::print("problem: {}\n", p);
  for (const auto& o : fs->Orphans()) fmt::print("orphan: {}\n", o);
  const auto& i = fs->info();
  fmt::print("{}: {} ({} tensors, {} bytes): {}\n", i.source, i.description, i.tensors,
             i.tensor_bytes, problems.empty() ? "OK"
             : fmt::format("{} problem{}", problems.size(), problems.size() == 1 ? "" : "s"));
  return problems.empty() ? kExitOk : kExitFailure;
}

// ---- ls ----------------------------------------------------------------------
// "model.safetensors leaves out 2: a, optimizer/ (`nemofs info` says why)".
std::string OmittedNote(const CheckpointInfo& info) {
  std::string names;
  for (const auto& [name, why] : info.safetensors_omitted) {
    names += (names.empty() ? "" : ", ") + name;
  }
  return fmt::format("model.safetensors leaves out {}: {} (`nemofs info` says why)",
                     info.safetensors_omitted.size(), names);
}

std::string Shape(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

int RunLs(const std::string& source, const std::string& glob, bool all, bool json,
          const CacheArgs& cache_dir) {
  auto fs = OpenOrPrint(source, cache_dir);
  if (!fs) return kExitSource;
  for (const auto& e : fs->info().weight_errors) PrintError(e);
  if (!fs->info().weight_errors.empty() && fs->info().tensors == 0) return kExitSource;
  // Malformed tensors are not listed; each is named, with why, on stderr.
  constexpr std::string_view kUnreadable = "unreadable: ";
  for (const auto& [name, why] : fs->info().safetensors_omitted) {
    if (why.rfind(kUnreadable, 0) != 0) continue;
    PrintWarning(fmt::format("tensor {} is omitted (it cannot be read): {}", name,
                             why.substr(kUnreadable.size())));
  }
  std::vector<TensorEntry> rows;
  for (auto& t : fs->ListTensors()) {
    bool model = t.path.rfind("tensors/", 0) == 0;
    if (!all && !model) continue;
    const std::string& name = model ? t.key : t.path;
    if (!glob.empty() && ::fnmatch(glob.c_str(), name.c_str(), 0) != 0) continue;
    rows.push_back(std::move(t));
  }
  if (json) {
    auto j = nlohmann::ordered_json::array();
    for (const auto& t : rows) {
      j.push_back({{"key", t.key},
                   {"path", t.path},
                   {"dtype", t.dtype},
                   {"shape", t.shape},
                   {"nbytes", t.nbytes}});
    }
    fmt::print("{}\n", j.dump(2));
    // The JSON stays a plain array; the note goes to stderr.
    if (!fs->info().safetensors_omitted.empty()) {
      fmt::print(stderr, "nemofs: {}\n", OmittedNote(fs->info()));
    }
    return kExitOk;
  }
  size_t wk = 3, wd = 5, ws = 5;
  for (const auto& t : rows) {
    wk = std::max(wk, (t.path.rfind("tensors/", 0) == 0 ? t.key : t.path).size());
    wd = std::max(wd, t.dtype.size());
    ws = std::max(ws, Shape(t.shape).size());
  }
  fmt::print("{:<{}}  {:<{}}  {:<{}}  {:>14}\n", "KEY", wk, "DTYPE", wd, "SHAPE", ws, "BYTES");
  uint64_t total = 0;
  for (const auto& t : rows) {
    fmt::print("{:<{}}  {:<{}}  {:<{}}  {:>14}\n",
               t.path.rfind("tensors/", 0) == 0 ? t.key : t.path, wk, t.dtype, wd, Shape(t.shape),
               ws, t.nbytes);
    total += t.nbytes;
  }
  fmt::print("{} tensors, {} bytes\n", rows.size(), total);
  if (!fs->info().safetensors_omitted.empty()) fmt::print("{}\n", OmittedNote(fs->info()));
  return kExitOk;
}

// ---- cat ---------------------------------------------------------------------
int RunCat(const std::string& source, const std::string& path, const CacheArgs& cache_dir) {
  auto fs = OpenOrPrint(source, cache_dir);
  if (!fs) return kExitSource;
  auto ino = fs->Resolve(path);
  if (!ino) {
    PrintError(ino.error().message());
    return kExitFailure;
  }
  auto attr = fs->GetAttr(*ino);
  if (!attr) {
    PrintError(attr.error().message());
    return kExitFailure;
  }
  if (attr->type != NodeType::kFile) {
    PrintError(fmt::format("'{}': is a {}", path,
                           attr->type == NodeType::kDirectory ? "directory" : "symbolic link"));
    return kExitFailure;
  }
  constexpr uint64_t kChunk = 1 << 20;
  std::string buf(kChunk, '\0');
  for (uint64_t off = 0; off < attr->size; off += kChunk) {
    auto plan = fs->Read(*ino, off, kChunk);
    if (!plan) {
      PrintError(plan.error().message());
      return kExitFailure;
    }
    auto ok = ExecuteReadPlan(*plan, buf.data());
    if (!ok) {
      PrintError(ok.error().message());
      return kExitFailure;
    }
    if (std::fwrite(buf.data(), 1, plan->size(), stdout) != plan->size()) {
      if (errno != EPIPE)
        PrintError(fmt::format("write to stdout failed: {}", std::strerror(errno)));
      return kExitFailure;
    }
  }
  return std::fflush(stdout) == 0 ? kExitOk : kExitFailure;
}

std::string VersionText() {
  return fmt::format("nemofs {}\nlibfuse {}\n{}\nCLI11 {}", NEMOFS_VERSION, fuse_pkgversion(),
                     CoreLibraryVersions(), CLI11_VERSION);
}

}  // namespace

int Main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  CLI::App app{
      "nemofs: mount NeMo, Megatron and PyTorch checkpoints (.nemo, NeMo 2 folders, "
      "distributed checkpoints, torch.save files) as one filesystem tree: config.yaml (editable "
      "in place), tokenizer/, tensors/ (one writable file per tensor), index.json, "
      "model.safetensors, archive/. Writes are saved into the checkpoint crash-safely: tensors "
      "patched in place, the config and new files appended or replaced (`nemofs info SOURCE` "
      "says what is writable).",
      "nemofs"};
  app.require_subcommand(1);
  app.set_version_flag("-V,--version", VersionText);
  app.footer(
      "Exit codes: 0 ok, 1 command failed (verify: problems found), 2 usage error, 3 bad or "
      "unreadable source, "
      "4 mount point unusable or FUSE failure.\nRun 'nemofs COMMAND --help' for a command's "
      "options.");

  MountArgs margs;
  auto* mount =
      app.add_subcommand("mount", "Mount SOURCE at MOUNTPOINT; returns once the mount is ready");
  mount->add_option("SOURCE", margs.source, ".nemo file, checkpoint folder or torch.save file")
      ->required();
  mount->add_option("MOUNTPOINT", margs.mountpoint, "existing empty directory")->required();
  mount->add_flag("-f,--foreground", margs.foreground, "stay in the foreground (log to stderr)");
  mount->add_option("-o", margs.options, "mount options, comma separated: ro (no writes at all; the default "
                    "is rw: config.yaml, tensor files and new files can be written), allow_other, "
                    "any FUSE option")
      ->allow_extra_args(false);
  AddCacheOptions(mount, &margs.cache,
                  "extraction cache for compressed archives, and spill/ for files "
                  "being written (default $XDG_CACHE_HOME/nemofs or ~/.cache/nemofs)");
  mount->add_option("--log-level", margs.log.level, "trace, debug, info, warn, error, off")
      ->capture_default_str();
  mount->add_option("--log-file", margs.log.file, "append the daemon's log to this file");

  std::string umount_point;
  double umount_timeout = 30;
  auto* umount =
      app.add_subcommand("umount", "Unmount a nemofs mount and wait for its daemon to exit");
  umount->add_option("MOUNTPOINT", umount_point)->required();
  umount->add_option("--timeout", umount_timeout, "seconds to wait for the daemon")
      ->capture_default_str();

  std::string info_source;
  CacheArgs info_cache;
  bool info_json = false;
  auto* info = app.add_subcommand(
      "info", "Print what SOURCE is: format, config, tokenizer, weights, warnings");
  info->add_option("SOURCE", info_source)->required();
  info->add_flag("--json", info_json, "machine-readable output");
  AddCacheOptions(info, &info_cache, "as for mount");

  std::string repack_source, repack_out;
  CacheArgs repack_cache;
  bool repack_quiet = false;
  auto* repack = app.add_subcommand(
      "repack", "Rewrite a .nemo compactly and atomically: drop superseded members, gzip -> plain");
  repack->add_option("SOURCE", repack_source)->required();
  repack->add_option("-o,--output", repack_out, "write here instead of replacing SOURCE");
  repack->add_flag("-q,--quiet", repack_quiet, "no progress on stderr");
  AddCacheOptions(repack, &repack_cache, "as for mount");

  std::string verify_source;
  CacheArgs verify_cache;
  bool verify_quiet = false;
  auto* verify = app.add_subcommand(
      "verify",
      "Check SOURCE completely: structure, every tensor's bytes, zip CRCs; exit 1 on any problem");
  verify->add_option("SOURCE", verify_source)->required();
  verify->add_flag("-q,--quiet", verify_quiet, "no progress on stderr");
  AddCacheOptions(verify, &verify_cache, "as for mount");

  std::string ls_source, ls_glob;
  CacheArgs ls_cache;
  bool ls_all = false, ls_json = false;
  auto* ls =
      app.add_subcommand("ls", "List tensors of SOURCE: key, dtype, shape, bytes (no mount)");
  ls->add_option("SOURCE", ls_source)->required();
  ls->add_option("GLOB", ls_glob, "shell pattern on keys, e.g. 'model.decoder.layers.0.*'");
  ls->add_flag("-a,--all", ls_all, "also optimizer/ and ranks/ (matched on their tree paths)");
  ls->add_flag("--json", ls_json, "machine-readable output");
  AddCacheOptions(ls, &ls_cache, "as for mount");

  std::string cat_source, cat_path;
  CacheArgs cat_cache;
  auto* cat = app.add_subcommand("cat", "Print one file of the mounted tree without mounting");
  cat->add_option("SOURCE", cat_source)->required();
  cat->add_option("PATH", cat_path,
                  "path as in the mount, e.g. config.yaml or archive/model_weights.ckpt")
      ->required();
  AddCacheOptions(cat, &cat_cache, "as for mount");

  // `nemofs SOURCE MOUNTPOINT [-o OPTS]`: the form mount.fuse3 runs for
  // /etc/fstab and `mount -t fuse.nemofs` (as for sshfs). Anything else that
  // is not a command is named in the error.
  std::vector<std::string> args(argv, argv + argc);
  if (args.size() >= 2 && !args[1].empty() && args[1][0] != '-') {
    bool known = false;
    for (const auto* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      if (sub->get_name() == args[1]) known = true;
    }
    if (!known) {
      struct stat st {};
      if (args.size() >= 3 && args[2].rfind("-", 0) != 0 && ::stat(args[1].c_str(), &st) == 0) {
        args.insert(args.begin() + 1, "mount");
      } else {
        PrintError(fmt::format(
            "unknown command '{}' (commands: mount, umount, info, ls, cat, verify, repack; or "
            "SOURCE MOUNTPOINT as mount.fuse3 runs it). Run 'nemofs --help'.",
            args[1]));
        return kExitUsage;
      }
    }
  }
  try {
    std::vector<std::string> reversed(args.rbegin(), args.rend() - 1);
    app.parse(reversed);
  } catch (const CLI::Success& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  if (!mount->parsed()) {
    LogOptions quiet;
    quiet.level = "warn";
    SetupLogging(quiet, true, false);
  }
  if (mount->parsed()) return RunMount(margs);
  if (umount->parsed()) return RunUmount(umount_point, umount_timeout);
  if (info->parsed()) return RunInfo(info_source, info_cache, info_json);
  if (cat->parsed()) return RunCat(cat_source, cat_path, cat_cache);
  if (ls->parsed()) return RunLs(ls_source, ls_glob, ls_all, ls_json, ls_cache);
  if (verify->parsed()) return RunVerify(verify_source, verify_cache, verify_quiet);
  if (repack->parsed()) return RunRepack(repack_source, repack_out, repack_cache, repack_quiet);
  return kExitUsage;
}

}  // namespace nemofs::mountcmd

int main(int argc, char** argv) { return nemofs::mountcmd::Main(argc, argv); }
