#include "util/spill.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "util/fd.h"
#include "util/io.h"

namespace nemofs {

struct SpillBytes::Storage {
  explicit Storage(std::shared_ptr<SpillPool> p) : pool(std::move(p)) {}
  ~Storage() {
    if (fd.valid()) {
      pool->files.fetch_sub(1);
    } else {
      pool->memory.fetch_sub(mem.size());
    }
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  // Resizes the memory, keeping the pool's count.
  void ResizeMemory(uint64_t n) {
    pool->memory.fetch_add(n);
    pool->memory.fetch_sub(mem.size());
    mem.resize(n, '\0');
  }

  std::shared_ptr<SpillPool> pool;
  std::string mem;  // the bytes, while there is no file
  UniqueFd fd;      // the spill file, once there is one
  std::string shown;  // the spill folder, for messages
  uint64_t size = 0;
};

namespace {

std::string SpillDir(const SpillPool& pool) {
  if (!pool.dir.empty()) return pool.dir;
  std::error_code ec;
  auto tmp = std::filesystem::temp_directory_path(ec);
  return ec ? std::string("/tmp") : tmp.string();
}

// An unlinked file in the pool's folder (made if missing).
Result<UniqueFd> OpenSpillFile(SpillPool& pool, std::string* shown) {
  *shown = SpillDir(pool);
  if (!std::filesystem::is_directory(*shown)) NEMOFS_RETURN_IF_ERROR(MakeDirs(*shown));
  UniqueFd fd(::open(shown->c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  if (!fd.valid() && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    // No O_TMPFILE there: a named temp file, unlinked at once.
    std::string name = *shown + "/.nemofs-spill.XXXXXX";
    int raw = ::mkostemp(name.data(), O_CLOEXEC);
    if (raw >= 0) {
      fd.Reset(raw);
      ::unlink(name.c_str());
    }
  }
  if (!fd.valid()) {
    int e = errno;
    return Err(e == ENOENT ? ENOSPC : e,
               "cannot make a spill file in {} (where files written through the mount are kept "
               "until they are stored): {}",
               *shown, std::strerror(e));
  }
  pool.files.fetch_add(1);
  return fd;
}

// Copies `length` bytes from `in` at `from` to `out` at `to`: the kernel's
// copy where it can, else through a buffer.
Status CopyRange(int in, uint64_t from, int out, uint64_t to, uint64_t length,
                 std::string_view what) {
  while (length > 0) {
    auto off_in = static_cast<loff_t>(from);
    auto off_out = static_cast<loff_t>(to);
    ssize_t n = ::copy_file_range(in, &off_in, out, &off_out,
                                  std::min<uint64_t>(length, 1ull << 30), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP ||
                  errno == EBADF)) {
      std::string buf(std::min<uint64_t>(length, 1u << 20), '\0');
      while (length > 0) {
        size_t k = std::min<uint64_t>(length, buf.size());
        NEMOFS_RETURN_IF_ERROR(PreadFull(in, buf.data(), k, from, what));
        NEMOFS_RETURN_IF_ERROR(PwriteFull(out, std::string_view(buf.data(), k), to, what));
        from += k;
        to += k;
        length -= k;
      }
      return Ok();
    }
    if (n < 0) {
      int e = errno;
      return Err(e, "{}: copy failed: {}", what, std::strerror(e));
    }
    if (n == 0) return Err(EIO, "{}: the file ended {} bytes early", what, length);
    from += static_cast<uint64_t>(n);
    to += static_cast<uint64_t>(n);
    length -= static_cast<uint64_t>(n);
  }
  return Ok();
}

Status Truncate(int fd, uint64_t size, const std::string& shown) {
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    int e = errno;
    return Err(e, "spill file in {}: cannot resize to {} bytes: {}", shown, size,
               std::strerror(e));
  }
  return Ok();
}

struct Mapping {
  std::shared_ptr<const void> storage;
  void* addr = nullptr;
  size_t length = 0;
  ~Mapping() {
    if (addr) ::munmap(addr, length);
  }
};

}  // namespace

SpillBytes::SpillBytes(std::shared_ptr<SpillPool> pool) : pool_(std::move(pool)) {}
SpillBytes::~SpillBytes() = default;

uint64_t SpillBytes::size() const { return storage_ ? storage_->size : 0; }
bool SpillBytes::in_file() const { return storage_ && storage_->fd.valid(); }

Status SpillBytes::Prepare(uint64_t grow_to) {
  if (!storage_) storage_ = std::make_shared<Storage>(pool_);
  if (storage_.use_count() > 1) {
    // A snapshot holds it: the copy is ours to change.
    const Storage& old = *storage_;
    auto copy = std::make_shared<Storage>(pool_);
    if (!old.fd.valid()) {
      copy->ResizeMemory(old.size);
      std::memcpy(copy->mem.data(), old.mem.data(), old.size);
      copy->size = old.size;
    } else {
      NEMOFS_ASSIGN_OR_RETURN(copy->fd, OpenSpillFile(*pool_, &copy->shown));
      NEMOFS_RETURN_IF_ERROR(Truncate(copy->fd.get(), old.size, copy->shown));
      // Only what holds data (a staged tensor's file is mostly a hole).
      const std::string what = "spill file in " + copy->shown;
      off_t pos = 0;
      const auto end = static_cast<off_t>(old.size);
      while (pos < end) {
        off_t data = ::lseek(old.fd.get(), pos, SEEK_DATA);
        if (data < 0 || data >= end) break;  // ENXIO: only a hole is left
        off_t hole = ::lseek(old.fd.get(), data, SEEK_HOLE);
        if (hole < 0 || hole > end) hole = end;
        NEMOFS_RETURN_IF_ERROR(CopyRange(old.fd.get(), static_cast<uint64_t>(data),
                                         copy->fd.get(), static_cast<uint64_t>(data),
                                         static_cast<uint64_t>(hole - data), what));
        pos = hole;
      }
      copy->size = old.size;
    }
    storage_ = std::move(copy);
  }
  Storage& s = *storage_;
  if (!s.fd.valid() && grow_to > s.mem.size()) {
    const uint64_t growth = grow_to - s.mem.size();
    if (grow_to > pool_->file_above || pool_->memory.load() + growth > pool_->memory_budget) {
      std::string shown;
      NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenSpillFile(*pool_, &shown));
      NEMOFS_RETURN_IF_ERROR(PwriteFull(fd.get(), s.mem, 0, "spill file in " + shown));
      s.ResizeMemory(0);
      s.mem.shrink_to_fit();
      s.fd = std::move(fd);
      s.shown = std::move(shown);
    }
  }
  return Ok();
}

Status SpillBytes::Write(uint64_t offset, std::string_view data) {
  uint64_t end;
  if (AddOverflows(offset, data.size(), &end) || end > (uint64_t{1} << 62)) {
    return Err(EFBIG, "a write up to byte {} is past any file size", offset);
  }
  if (data.empty()) return Ok();
  NEMOFS_RETURN_IF_ERROR(Prepare(std::max(size(), end)));
  Storage& s = *storage_;
  if (!s.fd.valid()) {
    if (end > s.mem.size()) s.ResizeMemory(end);
    std::memcpy(s.mem.data() + offset, data.data(), data.size());
  } else {
    Status st = PwriteFull(s.fd.get(), data, offset, "spill file in " + s.shown);
    if (!st.ok()) {
      (void)::ftruncate(s.fd.get(), static_cast<off_t>(s.size));  // what a short write added
      return st;
    }
  }
  s.size = std::max(s.size, end);
  return Ok();
}

Status SpillBytes::Resize(uint64_t n) {
  if (n == size()) return Ok();
  if (n == 0) {  // emptied (O_TRUNC): back to memory
    storage_ = std::make_shared<Storage>(pool_);
    return Ok();
  }
  if (n > (uint64_t{1} << 62)) return Err(EFBIG, "{} bytes is past any file size", n);
  NEMOFS_RETURN_IF_ERROR(Prepare(n));
  Storage& s = *storage_;
  if (!s.fd.valid()) {
    s.ResizeMemory(n);
  } else {
    NEMOFS_RETURN_IF_ERROR(Truncate(s.fd.get(), n, s.shown));
  }
  s.size = n;
  return Ok();
}

Status SpillBytes::Assign(std::string_view data) {
  NEMOFS_RETURN_IF_ERROR(Resize(0));
  return Write(0, data);
}

Status SpillBytes::CopyFrom(int fd, uint64_t offset, uint64_t length, uint64_t at,
                            std::string_view what) {
  uint64_t end;
  if (AddOverflows(at, length, &end)) return Err(EFBIG, "{}: too large", what);
  if (length == 0) return Ok();
  NEMOFS_RETURN_IF_ERROR(Prepare(std::max(size(), end)));
  Storage& s = *storage_;
  if (!s.fd.valid()) {
    if (end > s.mem.size()) s.ResizeMemory(end);
    Status st = PreadFull(fd, s.mem.data() + at, length, offset, what);
    if (!st.ok()) {
      s.ResizeMemory(s.size);
      return st;
    }
  } else {
    Status st = CopyRange(fd, offset, s.fd.get(), at, length, what);
    if (!st.ok()) {
      (void)::ftruncate(s.fd.get(), static_cast<off_t>(s.size));
      return st;
    }
  }
  s.size = std::max(s.size, end);
  return Ok();
}

Result<std::string> SpillBytes::Read(uint64_t offset, uint64_t n) const {
  const uint64_t total = size();
  if (offset >= total) return std::string();
  n = std::min(n, total - offset);
  const Storage& s = *storage_;
  if (!s.fd.valid()) return s.mem.substr(offset, n);
  std::string out(n, '\0');
  NEMOFS_RETURN_IF_ERROR(PreadFull(s.fd.get(), out.data(), n, offset, "spill file in " + s.shown));
  return out;
}

Result<SpillBytes::View> SpillBytes::Snapshot() const {
  if (size() == 0) return View{};
  const Storage& s = *storage_;
  if (!s.fd.valid()) {
    // Shared: the next write copies it first (Prepare).
    return View{std::string_view(s.mem.data(), s.size), storage_};
  }
  void* addr = ::mmap(nullptr, s.size, PROT_READ, MAP_SHARED, s.fd.get(), 0);
  if (addr == MAP_FAILED) {
    int e = errno;
    return Err(e, "spill file in {}: cannot map {} bytes: {}", s.shown, s.size, std::strerror(e));
  }
  auto m = std::make_shared<Mapping>();
  m->storage = storage_;
  m->addr = addr;
  m->length = s.size;
  ::madvise(addr, s.size, MADV_SEQUENTIAL);
  return View{std::string_view(static_cast<const char*>(addr), s.size), std::move(m)};
}

}  // namespace nemofs
