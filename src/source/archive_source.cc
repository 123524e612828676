#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <map>

#include "source/sources_internal.h"
#include "util/io.h"

namespace nemofs::source {
namespace {

// Members kept in memory from the listing pass: configs and small metadata,
// so that recognising the checkpoint never needs an extraction.
constexpr uint64_t kKeepInMemoryMax = 4 << 20;

bool KeepInMemory(const std::string& name, uint64_t size) {
  if (size > kKeepInMemoryMax) return false;
  for (const char* ext : {".yaml", ".yml", ".json"}) {
    size_t n = std::strlen(ext);
    if (name.size() >= n && name.compare(name.size() - n, n, ext) == 0) return true;
  }
  return false;
}

struct ArchiveFree {
  void operator()(archive* a) const { archive_read_free(a); }
};
using ArchivePtr = std::unique_ptr<archive, ArchiveFree>;

Result<ArchivePtr> OpenReader(const std::string& path) {
  ArchivePtr a(archive_read_new());
  if (!a) return Err(ENOMEM, "{}: cannot allocate an archive reader", path);
  archive_read_support_filter_all(a.get());
  archive_read_support_format_tar(a.get());
  if (archive_read_open_filename(a.get(), path.c_str(), 1 << 20) != ARCHIVE_OK) {
    return Err(EINVAL, "{}: {}", path, archive_error_string(a.get()));
  }
  return a;
}

std::string ArchiveError(archive* a, const std::string& path, std::string_view what) {
  const char* msg = archive_error_string(a);
  return fmt::format("{}: {}: {}", path, what, msg ? msg : "unknown libarchive error");
}

uint64_t Fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

Result<std::unique_ptr<Source>> ArchiveSource::Open(const std::string& path,
                                                    const std::string& filter,
                                                    const struct stat& st,
                                                    const std::string& cache_dir) {
  std::unique_ptr<ArchiveSource> src(new ArchiveSource(path));
  src->filter_ = filter;
  char* real = ::realpath(path.c_str(), nullptr);
  std::string identity = fmt::format("{}:{}:{}:{}.{:09}:{}", st.st_dev, st.st_ino, st.st_size,
                                     st.st_mtim.tv_sec, st.st_mtim.tv_nsec, real ? real : path);
  std::free(real);
  src->cache_dir_ = fmt::format("{}/{:016x}", cache_dir, Fnv1a(identity));

  NEMOFS_ASSIGN_OR_RETURN(ArchivePtr a, OpenReader(path));
  std::vector<Entry> raw;
  std::vector<std::string> warnings;
  std::map<std::string, uint32_t> file_blob;
  archive_entry* ent = nullptr;
  uint64_t ordinal = 0;
  int r;
  while ((r = archive_read_next_header(a.get(), &ent)) == ARCHIVE_OK || r == ARCHIVE_WARN) {
    const char* name_c = archive_entry_pathname(ent);
    std::string name = name_c ? name_c : "";
    Entry e;
    e.path = name;
    e.mode = archive_entry_perm(ent) & 07777;
    e.mtime_sec = archive_entry_mtime(ent);
    e.mtime_nsec = static_cast<uint32_t>(archive_entry_mtime_nsec(ent));
    const char* hardlink = archive_entry_hardlink(ent);
    auto type = archive_entry_filetype(ent);
    std::string norm;
    bool normal = NormalizePath(name, &norm);
    if (hardlink) {
      std::string target;
      auto it = NormalizePath(hardlink, &target) ? file_blob.find(target) : file_blob.end();
      if (it == file_blob.end()) {
        warnings.push_back(fmt::format(
            "hidden '{}': hard link to '{}', which is not an earlier file of the archive", name,
            hardlink));
      } else {
        e.type = EntryType::kFile;
        e.blob = it->second;
        e.size = src->blobs_[it->second].size;
        raw.push_back(std::move(e));
      }
    } else if (type == AE_IFDIR) {
      e.type = EntryType::kDirectory;
      raw.push_back(std::move(e));
    } else if (type == AE_IFLNK) {
      e.type = EntryType::kSymlink;
      const char* target = archive_entry_symlink(ent);
      e.link_target = target ? target : "";
      e.size = e.link_target.size();
      raw.push_back(std::move(e));
    } else if (type == AE_IFREG) {
      Blob blob;
      blob.ordinal = ordinal;
      blob.size =
          archive_entry_size_is_set(ent) ? static_cast<uint64_t>(archive_entry_size(ent)) : 0;
      if (KeepInMemory(name, blob.size)) {
        auto data = std::make_shared<std::string>(blob.size, '\0');
        la_ssize_t n = archive_read_data(a.get(), data->data(), data->size());
        if (n < 0 || static_cast<uint64_t>(n) != blob.size) {
          return Err(EIO, "{}", ArchiveError(a.get(), path, fmt::format("reading '{}'", name)));
        }
        blob.data = std::move(data);
      }
      e.type = EntryType::kFile;
      e.size = blob.size;
      e.blob = static_cast<uint32_t>(src->blobs_.size());
      src->blobs_.push_back(std::move(blob));
      if (normal) file_blob[norm] = e.blob;
      raw.push_back(std::move(e));
    } else {
      warnings.push_back(fmt::format("hidden '{}': device or FIFO member", name));
    }
    ++ordinal;
  }
  if (r != ARCHIVE_EOF) {
    return Err(EINVAL, "{}", ArchiveError(a.get(), path, "not a readable compressed tar"));
  }
  if (ordinal == 0) return Err(EINVAL, "{}: compressed archive holds no tar members", path);
  src->fds_ = std::make_unique<LazyFds>(src->blobs_.size());
  src->SetEntries(std::move(raw), std::move(warnings));
  return std::unique_ptr<Source>(std::move(src));
}

Result<int> ArchiveSource::Extract(uint32_t blob_index) {
  std::lock_guard<std::mutex> lock(extract_mutex_);
  if (int fd = fds_->Peek(blob_index); fd >= 0) return fd;
  const Blob& blob = blobs_[blob_index];
  std::string final_path = fmt::format("{}/m{}", cache_dir_, blob.ordinal);

  // A previous mount of the same source (same identity) may have left it.
  struct stat st {};
  if (::stat(final_path.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) == blob.size) {
    NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenReadOnly(final_path));
    return fds_->Install(blob_index, std::move(fd));
  }
  NEMOFS_RETURN_IF_ERROR(MakeDirs(cache_dir_));
  std::string tmp_path = fmt::format("{}.tmp.{}", final_path, ::getpid());
  UniqueFd out(::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!out.valid()) {
    int e = errno;
    return Err(e, "{}: cannot create cache file: {}", tmp_path, std::strerror(e));
  }
  auto fail = [&](Error error) -> Result<int> {
    ::unlink(tmp_path.c_str());
    return error;
  };

  auto reader = OpenReader(path());
  if (!reader) return fail(reader.error());
  archive* a = reader->get();
  archive_entry* ent = nullptr;
  for (uint64_t i = 0;; ++i) {
    int r = archive_read_next_header(a, &ent);
    if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
      return fail(Err(EIO, "{}", ArchiveError(a, path(), "member vanished on re-read")));
    }
    if (i == blob.ordinal) break;
  }
  uint64_t written = 0;
  for (;;) {
    const void* buf = nullptr;
    size_t size = 0;
    la_int64_t off = 0;
    int r = archive_read_data_block(a, &buf, &size, &off);
    if (r == ARCHIVE_EOF) break;
    if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
      return fail(Err(EIO, "{}", ArchiveError(a, path(), "decompression failed")));
    }
    const char* p = static_cast<const char*>(buf);
    size_t left = size;
    while (left > 0) {
      ssize_t n = ::pwrite(out.get(), p, left, off);
      if (n < 0) {
        if (errno == EINTR) continue;
        int e = errno;
        return fail(Err(e, "{}: cannot write cache file: {}", tmp_path, std::strerror(e)));
      }
      p += n;
      left -= static_cast<size_t>(n);
      off += n;
    }
    written = std::max<uint64_t>(written, static_cast<uint64_t>(off));
  }
  if (::ftruncate(out.get(), static_cast<off_t>(blob.size)) != 0 || written > blob.size) {
    return fail(Err(EIO, "{}: member {} decompressed to {} bytes, expected {}", path(),
                    blob.ordinal, written, blob.size));
  }
  out.Reset();
  if (::rename(tmp_path.c_str(), final_path.c_str()) != 0) {
    int e = errno;
    return fail(Err(e, "{}: cannot rename cache file: {}", final_path, std::strerror(e)));
  }
  NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenReadOnly(final_path));
  return fds_->Install(blob_index, std::move(fd));
}

Result<ReadPlan> ArchiveSource::Plan(uint32_t blob_index, uint64_t offset, uint64_t length) {
  if (blob_index >= blobs_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob_index);
  const Blob& blob = blobs_[blob_index];
  ReadPlan plan;
  if (blob.data) {
    plan.AddMemory(blob.data->data() + offset, length);
    plan.keepalive.push_back(blob.data);
    return plan;
  }
  int fd = fds_->Peek(blob_index);
  if (fd < 0) {
    NEMOFS_ASSIGN_OR_RETURN(fd, Extract(blob_index));
  }
  plan.AddFd(fd, offset, length);
  return plan;
}

}  // namespace nemofs::source
