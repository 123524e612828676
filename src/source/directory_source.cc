#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <vector>
#include <filesystem>

#include "source/sources_internal.h"
#include "util/io.h"

namespace nemofs::source {

namespace fs = std::filesystem;

LazyFds::~LazyFds() {
  for (auto& fd : fds_) UniqueFd(fd.exchange(-1));
}

int LazyFds::Install(size_t i, UniqueFd fd) {
  int expected = -1;
  if (fds_[i].compare_exchange_strong(expected, fd.get(), std::memory_order_acq_rel)) {
    return fd.Release();
  }
  return expected;  // another thread won; `fd` closes ours
}

namespace {

// What openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) does, for kernels
// without it (ENOSYS) or a seccomp filter refusing it (EPERM): one component
// at a time beneath `root_fd`, never following a link blindly; a relative
// link is resolved by hand and may not climb above the root, an absolute one
// is refused (as RESOLVE_BENEATH refuses it). -1 with errno set on failure.
int OpenBeneathByWalk(int root_fd, const std::string& rel, int flags) {
  std::deque<std::string> todo;
  auto push_front = [&todo](const std::string& path) {
    std::vector<std::string> parts;
    for (size_t start = 0; start <= path.size();) {
      size_t slash = path.find('/', start);
      if (slash == std::string::npos) slash = path.size();
      std::string part = path.substr(start, slash - start);
      if (!part.empty() && part != ".") parts.push_back(std::move(part));
      start = slash + 1;
    }
    todo.insert(todo.begin(), parts.begin(), parts.end());
  };
  if (!rel.empty() && rel[0] == '/') return errno = EXDEV, -1;
  push_front(rel);
  std::vector<UniqueFd> dirs;  // the folders below the root walked into
  auto top = [&] { return dirs.empty() ? root_fd : dirs.back().get(); };
  int links = 0;
  while (!todo.empty()) {
    std::string part = std::move(todo.front());
    todo.pop_front();
    if (part == "..") {
      if (dirs.empty()) return errno = EXDEV, -1;
      dirs.pop_back();
      if (todo.empty()) return ::openat(top(), ".", flags);
      continue;
    }
    struct stat st {};
    if (::fstatat(top(), part.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return -1;
    if (S_ISLNK(st.st_mode)) {
      if (++links > 40) return errno = ELOOP, -1;
      std::string target(static_cast<size_t>(st.st_size) + 1, '\0');
      ssize_t n = ::readlinkat(top(), part.c_str(), target.data(), target.size());
      if (n < 0) return -1;
      if (static_cast<size_t>(n) >= target.size()) return errno = ELOOP, -1;  // changed under us
      target.resize(static_cast<size_t>(n));
      if (target.empty()) return errno = ENOENT, -1;
      if (target[0] == '/') return errno = EXDEV, -1;
      push_front(target);
      continue;
    }
    if (todo.empty()) return ::openat(top(), part.c_str(), flags | O_NOFOLLOW);
    UniqueFd next(::openat(top(), part.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!next.valid()) return -1;
    dirs.push_back(std::move(next));
  }
  return ::openat(top(), ".", flags);  // "", or a walk that ended on a folder
}

}  // namespace

Result<UniqueFd> DirectorySource::OpenBeneath(const std::string& rel) const {
  struct open_how how {};
  how.flags = O_RDONLY | O_CLOEXEC | O_NOCTTY;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  for (;;) {
    long fd = ::syscall(SYS_openat2, root_fd_.get(), rel.c_str(), &how, sizeof how);
    if (fd < 0 && (errno == ENOSYS || errno == EPERM)) {
      // No openat2 here (kernel < 5.6, or a seccomp filter): the same walk by hand.
      fd = OpenBeneathByWalk(root_fd_.get(), rel, static_cast<int>(how.flags));
    }
    if (fd >= 0) return UniqueFd(static_cast<int>(fd));
    if (errno == EINTR || errno == EAGAIN) continue;
    int e = errno;
    if (e == EXDEV) return Err(EACCES, "{}/{}: resolves outside the source folder", path(), rel);
    return Err(e, "{}/{}: {}", path(), rel, std::strerror(e));
  }
}

Result<std::unique_ptr<Source>> DirectorySource::Open(const std::string& path) {
  std::unique_ptr<DirectorySource> src(new DirectorySource(path));
  src->root_fd_ = UniqueFd(::open(path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!src->root_fd_.valid()) return Err(errno, "{}: {}", path, std::strerror(errno));
  char* real_root_c = ::realpath(path.c_str(), nullptr);
  if (!real_root_c) return Err(errno, "{}: {}", path, std::strerror(errno));
  const std::string real_root(real_root_c);
  std::free(real_root_c);
  auto beneath = [&](const std::string& target) {
    return target == real_root ||
           (target.size() > real_root.size() && target.compare(0, real_root.size(), real_root) == 0 &&
            (real_root == "/" || target[real_root.size()] == '/'));
  };
  std::vector<Entry> raw;
  std::vector<std::string> warnings;
  // An entry not shown: warned about, and its name kept (Source::Taken).
  auto skip = [&](const std::string& rel, std::string_view why) {
    warnings.push_back(fmt::format("skipped '{}': {}", rel, why));
    src->AddHidden(rel);
  };
  NEMOFS_ASSIGN_OR_RETURN(struct stat root_st, Stat(path));
  Entry root;
  root.type = EntryType::kDirectory;
  root.mode = root_st.st_mode & 07777;
  root.uid = root_st.st_uid;
  root.gid = root_st.st_gid;
  root.mtime_sec = root_st.st_mtim.tv_sec;
  root.mtime_nsec = static_cast<uint32_t>(root_st.st_mtim.tv_nsec);
  raw.push_back(root);

  std::error_code ec;
  const size_t prefix_len = path.size() + (path.back() == '/' ? 0 : 1);
  fs::recursive_directory_iterator it(path, fs::directory_options::none, ec);
  if (ec) return Err(ec.value(), "{}: cannot list directory: {}", path, ec.message());
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) return Err(ec.value(), "{}: cannot list directory: {}", path, ec.message());
    const fs::path& p = it->path();
    // The iterator builds every path as `path` + "/" + rest: strip the prefix
    // (fs::relative would canonicalise, costing stats per component).
    std::string rel = p.generic_string().substr(prefix_len);
    // A config commit's temp file that a crash left behind (see
    // write/config_commit.h): never part of the checkpoint.
    if (IsCommitTempName(p.filename().native())) {
      std::error_code dir_ec;
      if (it->is_directory(dir_ec) && !it->is_symlink(dir_ec)) it.disable_recursion_pending();
      continue;
    }
    // The rollback journal of a patch in progress (rolled back before any
    // open, so only a live mount's own) and a folder commit's journal
    // (finished before any open): not part of the checkpoint either.
    if (rel == kFolderJournalName || rel == kFolderCommitJournalName) continue;
    struct stat lst {};
    if (::lstat(p.c_str(), &lst) != 0) {
      skip(rel, std::strerror(errno));
      continue;
    }
    struct stat st = lst;
    if (S_ISLNK(lst.st_mode)) {
      // Never follow a link out of the folder (allow_other: /etc/shadow).
      char* target = ::realpath(p.c_str(), nullptr);
      bool inside = target && beneath(target);
      std::string shown = target ? target : "";
      std::free(target);
      if (target && !inside) {
        skip(rel, fmt::format("symbolic link to '{}' leaves the source folder", shown));
        continue;
      }
      if (::stat(p.c_str(), &st) != 0) {
        skip(rel, "dangling symbolic link");
        continue;
      }
      if (S_ISDIR(st.st_mode)) {
        skip(rel, "symbolic link to a directory");
        continue;
      }
    }
    Entry e;
    e.path = rel;
    e.mode = st.st_mode & 07777;
    e.uid = st.st_uid;
    e.gid = st.st_gid;
    e.mtime_sec = st.st_mtim.tv_sec;
    e.mtime_nsec = static_cast<uint32_t>(st.st_mtim.tv_nsec);
    if (S_ISDIR(st.st_mode)) {
      e.type = EntryType::kDirectory;
    } else if (S_ISREG(st.st_mode)) {
      e.type = EntryType::kFile;
      e.size = static_cast<uint64_t>(st.st_size);
      e.blob = static_cast<uint32_t>(src->files_.size());
      src->files_.push_back(rel);
      src->sizes_.push_back(e.size);
    } else {
      skip(rel, "not a regular file or directory");
      continue;
    }
    raw.push_back(std::move(e));
  }
  src->fds_ = std::make_unique<LazyFds>(src->files_.size());
  src->SetEntries(std::move(raw), std::move(warnings));
  return std::unique_ptr<Source>(std::move(src));
}

Result<ReadPlan> DirectorySource::Plan(uint32_t blob, uint64_t offset, uint64_t length) {
  if (blob >= files_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob);
  NEMOFS_ASSIGN_OR_RETURN(int fd, fds_->Get(blob, [&] { return OpenBeneath(files_[blob]); }));
  ReadPlan plan;
  plan.AddFd(fd, offset, length);
  return plan;
}

Result<FileRange> DirectorySource::Locate(uint32_t blob) {
  if (blob >= files_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob);
  NEMOFS_ASSIGN_OR_RETURN(int fd, fds_->Get(blob, [&] { return OpenBeneath(files_[blob]); }));
  return FileRange{fd, 0, sizes_[blob]};
}

Result<std::unique_ptr<Source>> FileSource::Open(const std::string& path, UniqueFd fd,
                                                 const struct stat& st) {
  std::unique_ptr<FileSource> src(new FileSource(path));
  src->fd_ = std::move(fd);
  src->size_ = static_cast<uint64_t>(st.st_size);
  Entry e;
  e.path = fs::path(path).filename().string();
  e.type = EntryType::kFile;
  e.size = static_cast<uint64_t>(st.st_size);
  e.mode = st.st_mode & 07777;
  e.mtime_sec = st.st_mtim.tv_sec;
  e.mtime_nsec = static_cast<uint32_t>(st.st_mtim.tv_nsec);
  e.blob = 0;
  Entry root;
  root.type = EntryType::kDirectory;
  root.mode = 0755;
  root.mtime_sec = e.mtime_sec;
  root.mtime_nsec = e.mtime_nsec;
  src->SetEntries({root, e}, {});
  return std::unique_ptr<Source>(std::move(src));
}

Result<ReadPlan> FileSource::Plan(uint32_t blob, uint64_t offset, uint64_t length) {
  if (blob != 0) return Err(EINVAL, "{}: no blob {}", path(), blob);
  ReadPlan plan;
  plan.AddFd(fd_.get(), offset, length);
  return plan;
}

}  // namespace nemofs::source

namespace nemofs::source {

Result<FileRange> FileSource::Locate(uint32_t blob) {
  if (blob != 0) return Err(EINVAL, "{}: no blob {}", path(), blob);
  return FileRange{fd_.get(), 0, size_};
}

}  // namespace nemofs::source

namespace nemofs::source {

Result<StoredPlace> DirectorySource::PlaceOf(uint32_t blob) const {
  if (blob >= files_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob);
  return StoredPlace{files_[blob], 0};
}

Result<StoredPlace> FileSource::PlaceOf(uint32_t blob) const {
  if (blob != 0) return Err(EINVAL, "{}: no blob {}", path(), blob);
  return StoredPlace{"", 0};
}

}  // namespace nemofs::source
