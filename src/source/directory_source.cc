#include <fcntl.h>
#include <sys/stat.h>

#include <cstring>
#include <filesystem>

#include "source/sources_internal.h"
#include "util/io.h"

namespace nemofs::source {

namespace fs = std::filesystem;

LazyFds::~LazyFds() {
  for (auto& fd : fds_) UniqueFd(fd.exchange(-1));
}

Result<int> LazyFds::Get(size_t i, const std::string& path) {
  int fd = fds_[i].load(std::memory_order_acquire);
  if (fd >= 0) return fd;
  NEMOFS_ASSIGN_OR_RETURN(UniqueFd fresh, OpenReadOnly(path));
  return Install(i, std::move(fresh));
}

int LazyFds::Install(size_t i, UniqueFd fd) {
  int expected = -1;
  if (fds_[i].compare_exchange_strong(expected, fd.get(), std::memory_order_acq_rel)) {
    return fd.Release();
  }
  return expected;  // another thread won; `fd` closes ours
}

Result<std::unique_ptr<Source>> DirectorySource::Open(const std::string& path) {
  std::unique_ptr<DirectorySource> src(new DirectorySource(path));
  std::vector<Entry> raw;
  std::vector<std::string> warnings;
  NEMOFS_ASSIGN_OR_RETURN(struct stat root_st, Stat(path));
  Entry root;
  root.type = EntryType::kDirectory;
  root.mode = root_st.st_mode & 07777;
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
    if (IsCommitTempName(p.filename().native())) continue;
    struct stat lst {};
    if (::lstat(p.c_str(), &lst) != 0) {
      warnings.push_back(fmt::format("skipped '{}': {}", rel, std::strerror(errno)));
      continue;
    }
    struct stat st = lst;
    if (S_ISLNK(lst.st_mode)) {
      if (::stat(p.c_str(), &st) != 0) {
        warnings.push_back(fmt::format("skipped '{}': dangling symbolic link", rel));
        continue;
      }
      if (S_ISDIR(st.st_mode)) {
        warnings.push_back(fmt::format("skipped '{}': symbolic link to a directory", rel));
        continue;
      }
    }
    Entry e;
    e.path = rel;
    e.mode = st.st_mode & 07777;
    e.mtime_sec = st.st_mtim.tv_sec;
    e.mtime_nsec = static_cast<uint32_t>(st.st_mtim.tv_nsec);
    if (S_ISDIR(st.st_mode)) {
      e.type = EntryType::kDirectory;
    } else if (S_ISREG(st.st_mode)) {
      e.type = EntryType::kFile;
      e.size = static_cast<uint64_t>(st.st_size);
      e.blob = static_cast<uint32_t>(src->files_.size());
      src->files_.push_back(p.string());
      src->sizes_.push_back(e.size);
    } else {
      warnings.push_back(fmt::format("skipped '{}': not a regular file or directory", rel));
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
  NEMOFS_ASSIGN_OR_RETURN(int fd, fds_->Get(blob, files_[blob]));
  ReadPlan plan;
  plan.AddFd(fd, offset, length);
  return plan;
}

Result<FileRange> DirectorySource::Locate(uint32_t blob) {
  if (blob >= files_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob);
  NEMOFS_ASSIGN_OR_RETURN(int fd, fds_->Get(blob, files_[blob]));
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
