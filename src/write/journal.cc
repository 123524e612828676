#include "write/journal.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <set>

#include "util/atomic_replace.h"
#include "util/fd.h"
#include "util/io.h"
#include "write/fault.h"
#include "write/tar_writer.h"

namespace nemofs::write {
namespace {

constexpr std::string_view kMagic = "NEMOFSJ2";
constexpr std::string_view kMagicV1 = "NEMOFSJ1";  // records without the flags byte
constexpr uint8_t kToEnd = 1;
constexpr std::string_view kTrailer = "NEMOFSJE";
constexpr size_t kTrailerSize = 8 + 8 + 4;

void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetLe(std::string_view b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = n; i-- > 0;) v = v << 8 | static_cast<unsigned char>(b[at + i]);
  return v;
}
uint32_t Crc(std::string_view b, uint32_t crc = 0) {
  uLong c = crc;
  for (size_t p = 0; p < b.size();) {
    size_t n = std::min<size_t>(b.size() - p, 1u << 30);
    c = crc32(c, reinterpret_cast<const Bytef*>(b.data() + p), static_cast<uInt>(n));
    p += n;
  }
  return static_cast<uint32_t>(c);
}

bool ValidName(std::string_view name) {
  if (name.empty() || name.front() == '/' || name.back() == '/') return false;
  size_t start = 0;
  while (start <= name.size()) {
    size_t slash = name.find('/', start);
    if (slash == std::string_view::npos) slash = name.size();
    std::string_view part = name.substr(start, slash - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = slash + 1;
  }
  return true;
}

// The files of a patch, opened beneath the folder without following links.
class Files {
 public:
  explicit Files(const PatchRoot& root) : root_(root) {}
  Result<int> Get(const std::string& name) {
    auto it = fds_.find(name);
    if (it != fds_.end()) return it->second.fd.get();
    if (!ValidName(name)) return Err(EINVAL, "{}: bad file name '{}' in a patch", root_.shown_dir, name);
    const auto slash = name.rfind('/');
    const std::string parent = slash == std::string::npos ? "" : name.substr(0, slash);
    const std::string base = slash == std::string::npos ? name : name.substr(slash + 1);
    NEMOFS_ASSIGN_OR_RETURN(UniqueFd dir, OpenFolderBeneath(root_.dir_fd, root_.shown_dir, parent,
                                                            false, 0755, std::nullopt));
    UniqueFd fd(::openat(dir.get(), base.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC));
    if (!fd.valid()) {
      int e = errno;
      return Err(e == ELOOP ? ELOOP : e, "{}/{}: cannot open for patching: {}", root_.shown_dir,
                 name, std::strerror(e));
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
      return Err(EINVAL, "{}/{}: not a regular file", root_.shown_dir, name);
    }
    int raw = fd.get();
    fds_.emplace(name, Open{std::move(fd), static_cast<uint64_t>(st.st_size)});
    return raw;
  }
  uint64_t Size(const std::string& name) const { return fds_.at(name).size; }
  Status SyncAll() {
    for (auto& [name, f] : fds_) {
      if (::fsync(f.fd.get()) != 0) {
        return Err(errno, "{}/{}: fsync: {}", root_.shown_dir, name, std::strerror(errno));
      }
    }
    return Ok();
  }

 private:
  struct Open {
    UniqueFd fd;
    uint64_t size = 0;
  };
  const PatchRoot& root_;
  std::map<std::string, Open> fds_;
};

Status SyncDir(const PatchRoot& root) {
  if (::fsync(root.dir_fd) != 0) {
    return Err(errno, "{}: fsync of the folder: {}", root.shown_dir, std::strerror(errno));
  }
  return Ok();
}

Status Unlink(const PatchRoot& root) {
  if (::unlinkat(root.dir_fd, root.journal_name.c_str(), 0) != 0 && errno != ENOENT) {
    return Err(errno, "{}/{}: cannot remove the journal: {}", root.shown_dir, root.journal_name,
               std::strerror(errno));
  }
  return SyncDir(root);
}

// Writes the regions' bytes into their files; `half_step` is the crash
// point halfway (of the regions, or of the one region's bytes).
Status WriteRegions(Files& files, const std::vector<Region>& regions, const PatchRoot& root,
                    const char* half_step,
                    const std::function<void(uint64_t, uint64_t)>& progress = nullptr) {
  uint64_t total = 0, done = 0;
  for (const auto& r : regions) total += r.bytes.size();
  for (size_t i = 0; i < regions.size(); ++i) {
    if (half_step && i == regions.size() / 2 && i > 0) MaybeCrash(half_step);
    const Region& r = regions[i];
    NEMOFS_ASSIGN_OR_RETURN(int fd, files.Get(r.file));
    const std::string shown = root.shown_dir + "/" + r.file;
    std::string_view bytes(r.bytes);
    if (half_step && regions.size() == 1 && bytes.size() > 1) {
      const size_t half = bytes.size() / 2;
      NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, bytes.substr(0, half), r.offset, shown));
      MaybeCrash(half_step);
      NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, bytes.substr(half), r.offset + half, shown));
    } else {
      NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, bytes, r.offset, shown));
    }
    if (r.to_end && ::ftruncate(fd, static_cast<off_t>(r.offset + bytes.size())) != 0) {
      return Err(errno, "{}: cannot set its size to {}: {}", shown, r.offset + bytes.size(),
                 std::strerror(errno));
    }
    done += bytes.size();
    if (progress) progress(done, total);
  }
  return Ok();
}

// A journal's bytes, mapped (as large as the regions it saved: never read
// into the heap).
struct MappedJournal {
  std::string_view bytes;
  void* addr = nullptr;
  MappedJournal() = default;
  MappedJournal(const MappedJournal&) = delete;
  MappedJournal& operator=(const MappedJournal&) = delete;
  ~MappedJournal() {
    if (addr) ::munmap(addr, bytes.size());
  }
};

Status ReadJournal(const PatchRoot& root, MappedJournal* out) {
  UniqueFd fd(::openat(root.dir_fd, root.journal_name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid()) {
    return Err(errno, "{}/{}: {}", root.shown_dir, root.journal_name, std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return Err(EIO, "{}/{}: not a regular file", root.shown_dir, root.journal_name);
  }
  if (st.st_size == 0) return Ok();
  void* addr = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED) {
    return Err(errno, "{}/{}: cannot map it: {}", root.shown_dir, root.journal_name,
               std::strerror(errno));
  }
  out->addr = addr;
  out->bytes = std::string_view(static_cast<const char*>(addr), static_cast<size_t>(st.st_size));
  return Ok();
}

}  // namespace

Result<ParsedJournal> ParseJournal(std::string_view b, const std::string& shown) {
  ParsedJournal out;
  if (b.size() < kMagic.size() + 8 + kTrailerSize) {
    return out;  // cut off before its header or trailer: incomplete
  }
  const bool v1 = b.substr(0, kMagicV1.size()) == kMagicV1;
  if (!v1 && b.substr(0, kMagic.size()) != kMagic) {
    // Whole but not a journal of any version: a crash cannot make that.
    if (b.substr(0, 6) == kMagic.substr(0, 6) && b.substr(b.size() - kTrailerSize, 8) == kTrailer) {
      return Err(EIO, "{}: a journal of an unknown version ({}); left in place", shown,
                 b.substr(0, kMagic.size()));
    }
    return out;
  }
  const size_t flags_size = v1 ? 0 : 1;
  const size_t tail = b.size() - kTrailerSize;
  if (b.substr(tail, kTrailer.size()) != kTrailer) return out;
  const uint64_t count = GetLe(b, kMagic.size(), 8);
  if (GetLe(b, tail + 8, 8) != count ||
      static_cast<uint32_t>(GetLe(b, tail + 16, 4)) != Crc(b.substr(0, tail))) {
    return out;
  }
  size_t p = kMagic.size() + 8;
  for (uint64_t i = 0; i < count; ++i) {
    if (tail - p < 4) return Err(EIO, "{}: record {} is truncated", shown, i);
    const uint64_t name_len = GetLe(b, p, 4);
    p += 4;
    if (tail - p < name_len + 20 + flags_size) {
      return Err(EIO, "{}: record {} is truncated", shown, i);
    }
    Region r;
    r.file.assign(b.substr(p, name_len));
    p += name_len;
    r.offset = GetLe(b, p, 8);
    const uint64_t len = GetLe(b, p + 8, 8);
    const uint32_t crc = static_cast<uint32_t>(GetLe(b, p + 16, 4));
    p += 20;
    if (!v1) {
      const auto flags = static_cast<uint8_t>(b[p]);
      if (flags & ~kToEnd) return Err(EIO, "{}: record {} has unknown flags {}", shown, i, flags);
      r.to_end = flags & kToEnd;
      p += 1;
    }
    if (!ValidName(r.file)) return Err(EIO, "{}: record {} names a bad file", shown, i);
    if (tail - p < len) return Err(EIO, "{}: record {} is truncated", shown, i);
    r.bytes = b.substr(p, len);
    p += len;
    if (Crc(r.bytes) != crc) return Err(EIO, "{}: record {} has a bad checksum", shown, i);
    if (r.offset + len < r.offset) return Err(EIO, "{}: record {} overflows", shown, i);
    out.regions.push_back(std::move(r));
  }
  if (p != tail) return Err(EIO, "{}: {} stray bytes after the records", shown, tail - p);
  out.complete = true;
  return out;
}

Result<bool> HasHotJournal(const PatchRoot& root) {
  struct stat st {};
  if (::fstatat(root.dir_fd, root.journal_name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    return true;
  }
  if (errno == ENOENT) return false;
  return Err(errno, "{}/{}: {}", root.shown_dir, root.journal_name, std::strerror(errno));
}

Status ApplyPatch(const PatchRoot& root, const std::vector<Region>& data,
                  const std::vector<Region>& meta,
                  const std::function<void(uint64_t, uint64_t)>& progress) {
  if (data.empty() && meta.empty()) return Ok();
  const std::string journal = root.shown_dir + "/" + root.journal_name;
  Files files(root);
  // Check every region and read its old bytes before writing anything.
  std::vector<const Region*> all;
  for (const auto& r : data) all.push_back(&r);
  for (const auto& r : meta) all.push_back(&r);
  std::map<std::string, std::vector<std::pair<uint64_t, uint64_t>>> spans;
  std::vector<std::string_view> old(all.size());
  std::vector<std::string> read(all.size());  // the old bytes the caller did not give
  for (size_t i = 0; i < all.size(); ++i) {
    const Region& r = *all[i];
    NEMOFS_ASSIGN_OR_RETURN(int fd, files.Get(r.file));
    const uint64_t size = files.Size(r.file);
    if (r.to_end ? r.offset > size
                 : r.offset + r.bytes.size() < r.offset || r.offset + r.bytes.size() > size) {
      return Err(EINVAL, "{}/{}: a patch of bytes {}..{} is past its end ({} bytes)",
                 root.shown_dir, r.file, r.offset, r.offset + r.bytes.size(), size);
    }
    // A to_end region spans the rest of the file, new end or old.
    spans[r.file].emplace_back(
        r.offset, r.to_end ? std::numeric_limits<uint64_t>::max() : r.offset + r.bytes.size());
    const uint64_t old_size = r.to_end ? size - r.offset : r.bytes.size();
    if (r.old.size() == old_size && (old_size > 0 || r.to_end)) {
      old[i] = r.old;
      continue;
    }
    read[i].resize(old_size);
    NEMOFS_RETURN_IF_ERROR(
        PreadFull(fd, read[i].data(), read[i].size(), r.offset, root.shown_dir + "/" + r.file));
    old[i] = read[i];
  }
  for (auto& [file, s] : spans) {
    std::sort(s.begin(), s.end());
    for (size_t i = 1; i < s.size(); ++i) {
      if (s[i].first < s[i - 1].second) {
        return Err(EINVAL, "{}/{}: regions of one patch overlap", root.shown_dir, file);
      }
    }
  }
  // 1. The journal, durably.
  {
    UniqueFd fd(::openat(root.dir_fd, root.journal_name.c_str(),
                         O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (!fd.valid()) {
      int e = errno;
      return Err(e, "{}: cannot create the rollback journal: {}{}", journal, std::strerror(e),
                 e == EEXIST ? " (an interrupted write was not rolled back: remount)" : "");
    }
    std::string head(kMagic);
    PutU64(&head, all.size());
    uint32_t crc = Crc(head);
    uint64_t at = 0;
    auto put = [&](std::string_view bytes, bool checksum = true) -> Status {
      if (checksum) crc = Crc(bytes, crc);
      Status st = PwriteFull(fd.get(), bytes, at, journal);
      at += bytes.size();
      return st;
    };
    Status st = put(head, false);
    for (size_t i = 0; st.ok() && i < all.size(); ++i) {
      std::string rec;
      PutU32(&rec, static_cast<uint32_t>(all[i]->file.size()));
      rec += all[i]->file;
      PutU64(&rec, all[i]->offset);
      PutU64(&rec, old[i].size());
      const uint32_t old_crc = Crc(old[i]);
      PutU32(&rec, old_crc);
      rec.push_back(static_cast<char>(all[i]->to_end ? kToEnd : 0));
      st = put(rec);
      // Into the running checksum without a second pass over them.
      if (st.ok()) st = put(old[i], false);
      crc = static_cast<uint32_t>(
          crc32_combine64(crc, old_crc, static_cast<z_off64_t>(old[i].size())));
    }
    if (st.ok()) {
      std::string trailer(kTrailer);
      PutU64(&trailer, all.size());
      PutU32(&trailer, crc);
      st = put(trailer, false);
    }
    MaybeCrash("journal:before-fsync");
    if (st.ok() && ::fsync(fd.get()) != 0) {
      st = Err(errno, "{}: fsync: {}", journal, std::strerror(errno));
    }
    if (st.ok()) st = SyncDir(root);
    if (!st.ok()) {
      // No file was touched: the journal goes, the error stays (ENOSPC...).
      ::unlinkat(root.dir_fd, root.journal_name.c_str(), 0);
      return st;
    }
  }
  // 2. The patch: data, then the CRC fields; durable before the journal goes.
  Status st = WriteRegions(files, data, root, "patch:half", progress);
  if (st.ok()) {
    MaybeCrash("patch:before-meta");
    st = WriteRegions(files, meta, root, nullptr);
  }
  if (st.ok()) st = files.SyncAll();
  if (st.ok()) {
    MaybeCrash("patch:before-delete");
    return Unlink(root);
  }
  // Undo now what was written; the journal stays if even that fails.
  auto undone = RollBackHotJournal(root);
  if (!undone) {
    return Err(st.error().code(), "{}; rolling back failed too ({}): the next open of the source "
               "rolls back from {}",
               st.error().message(), undone.error().message(), journal);
  }
  return st;
}

Result<std::string> RollBackHotJournal(const PatchRoot& root) {
  NEMOFS_ASSIGN_OR_RETURN(bool hot, HasHotJournal(root));
  if (!hot) return std::string();
  const std::string journal = root.shown_dir + "/" + root.journal_name;
  MappedJournal mapped;
  NEMOFS_RETURN_IF_ERROR(ReadJournal(root, &mapped));
  NEMOFS_ASSIGN_OR_RETURN(ParsedJournal parsed, ParseJournal(mapped.bytes, journal));
  if (!parsed.complete) {
    NEMOFS_RETURN_IF_ERROR(Unlink(root));
    return std::string("removed an incomplete journal (the write had not begun: no file was changed)");
  }
  Files files(root);
  std::set<std::string> names;
  for (const auto& r : parsed.regions) {
    auto fd = files.Get(r.file);
    if (!fd) {
      return Err(EIO, "{}: cannot roll back into {}/{} ({}); left in place", journal,
                 root.shown_dir, r.file, fd.error().message());
    }
    if (r.to_end ? r.offset > files.Size(r.file) : r.offset + r.bytes.size() > files.Size(r.file)) {
      return Err(EIO, "{}: names bytes {}..{} of {}/{}, which has {}; left in place", journal,
                 r.offset, r.offset + r.bytes.size(), root.shown_dir, r.file, files.Size(r.file));
    }
    names.insert(r.file);
  }
  NEMOFS_RETURN_IF_ERROR(WriteRegions(files, parsed.regions, root, "rollback:half"));
  NEMOFS_RETURN_IF_ERROR(files.SyncAll());
  NEMOFS_RETURN_IF_ERROR(Unlink(root));
  uint64_t total = 0;
  for (const auto& r : parsed.regions) total += r.bytes.size();
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
  return fmt::format("restored {} region(s), {} bytes, of {}", parsed.regions.size(), total, list);
}

}  // namespace nemofs::write
