#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "source/sources_internal.h"
#include "util/atomic_replace.h"
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

// What of a streamed member a torch.save zip parser needs: the head (the
// first record is data.pkl), the tail (central directory, end records) and
// every local header. Returns null when the member is not a zip, or its
// directory or data.pkl do not fit the budget (reads then extract it).
constexpr uint64_t kCaptureHead = 16 << 20;
constexpr uint64_t kCaptureTail = 16 << 20;
constexpr size_t kMaxLocalHeaders = 1 << 20;

std::shared_ptr<const SparseReader> CaptureZipMetadata(archive* a, uint64_t size) {
  std::string head;
  std::string tail;  // the last bytes streamed (kept between kCaptureTail and 2x)
  uint64_t tail_start = 0;
  std::vector<SparseReader::Region> headers;
  std::string carry;  // last bytes of the previous block, for headers crossing blocks
  uint64_t carry_start = 0;
  uint64_t pos = 0;
  bool zip = false;
  bool overflow = false;
  for (;;) {
    const void* buf = nullptr;
    size_t n = 0;
    la_int64_t off = 0;
    int r = archive_read_data_block(a, &buf, &n, &off);
    if (r == ARCHIVE_EOF) break;
    if (r != ARCHIVE_OK && r != ARCHIVE_WARN) return nullptr;  // the listing reports it
    if (static_cast<uint64_t>(off) != pos) return nullptr;     // sparse entry: not a torch file
    std::string_view block(static_cast<const char*>(buf), n);
    if (pos == 0) {
      zip = block.size() >= 4 && block.substr(0, 4) == "PK\x03\x04";
      if (!zip) {
        archive_read_data_skip(a);
        return nullptr;
      }
    }
    if (head.size() < kCaptureHead) head.append(block.substr(0, kCaptureHead - head.size()));
    tail.append(block);
    if (tail.size() > 2 * kCaptureTail) {
      uint64_t drop = tail.size() - kCaptureTail;
      tail.erase(0, drop);
      tail_start += drop;
    }
    // Local headers: "PK\3\4" + 26 bytes + name + extra.
    std::string window = carry + std::string(block);
    for (size_t at = window.find("PK\x03\x04"); at != std::string::npos && !overflow;
         at = window.find("PK\x03\x04", at + 1)) {
      if (window.size() - at < 30) break;  // completed with the next block
      auto u16 = [&](size_t i) {
        return static_cast<size_t>(static_cast<unsigned char>(window[i]) |
                                   (static_cast<unsigned char>(window[i + 1]) << 8));
      };
      size_t len = 30 + u16(at + 26) + u16(at + 28);
      if (window.size() - at < len) break;
      uint64_t abs = carry_start + at;
      if (headers.empty() || headers.back().offset != abs) {
        headers.push_back({abs, window.substr(at, len)});
        overflow = headers.size() > kMaxLocalHeaders;
      }
    }
    // Keep enough to complete a header that straddles the boundary.
    size_t keep = std::min<size_t>(window.size(), 30 + 65535 * 2);
    carry = window.substr(window.size() - keep);
    carry_start = pos + n - keep;
    pos += n;
  }
  if (!zip || overflow || pos != size) return nullptr;
  // Keep only what a zip reader needs, so a mount does not hold megabytes per
  // member: the head up to the second record (data.pkl is the first), and the
  // tail from the central directory on (found through the end records).
  if (headers.size() > 1 && headers[1].offset < head.size()) head.resize(headers[1].offset);
  auto u32 = [](const char* p) {
    const auto* u = reinterpret_cast<const unsigned char*>(p);
    return uint64_t{u[0]} | (uint64_t{u[1]} << 8) | (uint64_t{u[2]} << 16) | (uint64_t{u[3]} << 24);
  };
  size_t eocd = tail.rfind("PK\x05\x06");
  if (eocd != std::string::npos && tail.size() - eocd >= 22) {
    uint64_t cd_offset = u32(tail.data() + eocd + 16);
    if (eocd >= 20 && tail.compare(eocd - 20, 4, "PK\x06\x07") == 0) {
      uint64_t z64 = u32(tail.data() + eocd - 12) | (u32(tail.data() + eocd - 8) << 32);
      if (z64 >= tail_start && z64 - tail_start + 56 <= tail.size()) {
        const char* rec = tail.data() + (z64 - tail_start);
        cd_offset = u32(rec + 48) | (u32(rec + 52) << 32);
      }
    }
    if (cd_offset >= tail_start && cd_offset - tail_start < tail.size()) {
      tail.erase(0, cd_offset - tail_start);
      tail_start = cd_offset;
    }
  }
  std::vector<SparseReader::Region> regions = std::move(headers);
  regions.push_back({0, std::move(head)});
  regions.push_back({tail_start, std::move(tail)});
  return std::make_shared<SparseReader>(size, std::move(regions));
}

}  // namespace

// Reads what the listing pass captured; anything else extracts the member
// (once) and reads it from the cache, so callers never see ENODATA.
class CapturedOrExtracted final : public ByteReader {
 public:
  CapturedOrExtracted(std::shared_ptr<const SparseReader> captured, Source* src, uint32_t blob)
      : captured_(std::move(captured)), src_(src), blob_(blob) {}
  uint64_t size() const override { return captured_->size(); }
  Status Read(uint64_t offset, void* buf, size_t len, std::string_view what) const override {
    Status st = captured_->Read(offset, buf, len, what);
    if (st.ok() || st.error().code() != ENODATA) return st;
    NEMOFS_ASSIGN_OR_RETURN(FileRange r, src_->Locate(blob_));
    return FdReader(r.fd, r.offset, r.length).Read(offset, buf, len, what);
  }

 private:
  std::shared_ptr<const SparseReader> captured_;
  Source* src_;
  uint32_t blob_;
};

Result<std::shared_ptr<const ByteReader>> ArchiveSource::MetadataReader(uint32_t blob_index) {
  if (blob_index < blobs_.size() && blobs_[blob_index].captured && fds_->Peek(blob_index) < 0) {
    return std::shared_ptr<const ByteReader>(
        std::make_shared<CapturedOrExtracted>(blobs_[blob_index].captured, this, blob_index));
  }
  return Source::MetadataReader(blob_index);
}

Result<std::unique_ptr<Source>> ArchiveSource::Open(const std::string& path,
                                                    const std::string& filter,
                                                    const struct stat& st,
                                                    const std::string& cache_dir,
                                                    uint64_t cache_max) {
  std::unique_ptr<ArchiveSource> src(new ArchiveSource(path));
  src->filter_ = filter;
  char* real = ::realpath(path.c_str(), nullptr);
  SourceIdentity id = SourceIdentity::Of(real ? real : path, st);
  std::free(real);
  src->cache_root_ = cache_dir;
  src->cache_max_ = cache_max;
  src->cache_dir_ = cache_dir + "/" + CacheEntryName(id);
  // Not fatal without it (an unwritable cache directory): the listing is not
  // saved, and an extraction reports the directory's problem if one is needed.
  if (auto entry = CacheEntry::Acquire(cache_dir, id)) src->entry_ = std::move(entry).value();

  std::vector<Entry> raw;
  std::vector<std::string> warnings;
  if (src->LoadIndex(&raw, &warnings)) {
    src->index_from_cache_ = true;
    src->fds_ = std::make_unique<LazyFds>(src->blobs_.size());
    src->SetEntries(std::move(raw), std::move(warnings));
    src->IndexBlobEntries();
    src->Sweep();
    return std::unique_ptr<Source>(std::move(src));
  }
  NEMOFS_ASSIGN_OR_RETURN(ArchivePtr a, OpenReader(path));
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
    e.uid = static_cast<uint32_t>(archive_entry_uid(ent));
    e.gid = static_cast<uint32_t>(archive_entry_gid(ent));
    const char* uname = archive_entry_uname(ent);
    const char* gname = archive_entry_gname(ent);
    e.uname = uname ? uname : "";
    e.gname = gname ? gname : "";
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
      if (!KeepInMemory(name, blob.size)) {
        blob.captured = CaptureZipMetadata(a.get(), blob.size);
      } else {
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
  src->SaveIndex(raw, warnings);
  src->fds_ = std::make_unique<LazyFds>(src->blobs_.size());
  src->SetEntries(std::move(raw), std::move(warnings));
    src->IndexBlobEntries();
  src->Sweep();
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
    entry_.Touch();
    return fds_->Install(blob_index, std::move(fd));
  }
  NEMOFS_RETURN_IF_ERROR(MakeDirs(cache_dir_));
  // A cache file: replaced atomically (a reader never sees a partial
  // member) but not fsynced; a lost one only costs another extraction.
  ReplaceOptions options;
  options.temp_path = fmt::format("{}.tmp.{}", final_path, ::getpid());
  options.durable = false;
  const std::string& tmp_path = options.temp_path;
  NEMOFS_RETURN_IF_ERROR(ReplaceFile(final_path, options, [&](int out) -> Status {
    auto reader = OpenReader(path());
    if (!reader) return reader.error();
    archive* a = reader->get();
    archive_entry* ent = nullptr;
    for (uint64_t i = 0;; ++i) {
      int r = archive_read_next_header(a, &ent);
      if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
        return Err(EIO, "{}", ArchiveError(a, path(), "member vanished on re-read"));
      }
      if (i == blob.ordinal) break;
    }
    if (!archive_entry_size_is_set(ent) ||
        static_cast<uint64_t>(archive_entry_size(ent)) != blob.size) {
      return Err(EIO,
                 "{}: member {} is not the {} bytes the listing recorded (stale index in {}?)",
                 path(), blob.ordinal, blob.size, cache_dir_);
    }
    uint64_t written = 0;
    for (;;) {
      const void* buf = nullptr;
      size_t size = 0;
      la_int64_t off = 0;
      int r = archive_read_data_block(a, &buf, &size, &off);
      if (r == ARCHIVE_EOF) break;
      if (r != ARCHIVE_OK && r != ARCHIVE_WARN) {
        return Err(EIO, "{}", ArchiveError(a, path(), "decompression failed"));
      }
      const char* p = static_cast<const char*>(buf);
      size_t left = size;
      while (left > 0) {
        ssize_t n = ::pwrite(out, p, left, off);
        if (n < 0) {
          if (errno == EINTR) continue;
          int e = errno;
          return Err(e, "{}: cannot write cache file: {}", tmp_path, std::strerror(e));
        }
        p += n;
        left -= static_cast<size_t>(n);
        off += n;
      }
      written = std::max<uint64_t>(written, static_cast<uint64_t>(off));
    }
    if (::ftruncate(out, static_cast<off_t>(blob.size)) != 0 || written > blob.size) {
      return Err(EIO, "{}: member {} decompressed to {} bytes, expected {}", path(),
                 blob.ordinal, written, blob.size);
    }
    return Ok();
  }));
  NEMOFS_ASSIGN_OR_RETURN(UniqueFd fd, OpenReadOnly(final_path));
  entry_.Touch();
  Sweep();  // the entry grew: evict others if the cache is now over its cap
  return fds_->Install(blob_index, std::move(fd));
}

void ArchiveSource::Sweep() const {
  if (cache_root_.empty()) return;
  SweepStats s = SweepCache(cache_root_, cache_max_);
  if (s.superseded + s.vanished + s.evicted == 0) return;
  spdlog::info(
      "cache {}: removed {} entr{} of rewritten sources, {} of deleted sources, {} least "
      "recently used (cap {} bytes); {} bytes left, {} entr{} in use",
      cache_root_, s.superseded, s.superseded == 1 ? "y" : "ies", s.vanished, s.evicted, cache_max_,
      s.bytes, s.in_use, s.in_use == 1 ? "y" : "ies");
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

namespace nemofs::source {

Result<FileRange> ArchiveSource::Locate(uint32_t blob_index) {
  if (blob_index >= blobs_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob_index);
  int fd = fds_->Peek(blob_index);
  if (fd < 0) {
    NEMOFS_ASSIGN_OR_RETURN(fd, Extract(blob_index));
  }
  return FileRange{fd, 0, blobs_[blob_index].size};
}

}  // namespace nemofs::source

namespace nemofs::source {
namespace {

constexpr int kIndexVersion = 2;  // 2: entries carry uid, gid, uname, gname

nlohmann::json::binary_t Binary(const std::string& s) {
  return nlohmann::json::binary_t(std::vector<uint8_t>(s.begin(), s.end()));
}
std::string FromBinary(const nlohmann::json& j) {
  const auto& b = j.get_binary();
  return std::string(b.begin(), b.end());
}

}  // namespace

void ArchiveSource::SaveIndex(const std::vector<Entry>& raw,
                              const std::vector<std::string>& warnings) const {
  nlohmann::json j;
  j["version"] = kIndexVersion;
  j["source"] = path();
  auto& entries = j["entries"] = nlohmann::json::array();
  for (const auto& e : raw) {
    entries.push_back({e.path, static_cast<int>(e.type), e.size, e.mtime_sec, e.mtime_nsec, e.mode,
                       e.link_target, e.blob, e.uid, e.gid, e.uname, e.gname});
  }
  j["warnings"] = warnings;
  auto& blobs = j["blobs"] = nlohmann::json::array();
  for (const auto& b : blobs_) {
    nlohmann::json o = {{"o", b.ordinal}, {"s", b.size}};
    if (b.data) o["d"] = Binary(*b.data);
    if (b.captured) {
      auto& regions = o["r"] = nlohmann::json::array();
      for (const auto& r : b.captured->regions()) regions.push_back({r.offset, Binary(r.bytes)});
    }
    blobs.push_back(std::move(o));
  }
  std::vector<uint8_t> bytes = nlohmann::json::to_cbor(j);
  // Best effort: a cache that cannot be written only costs the next mount time.
  if (!MakeDirs(cache_dir_).ok()) return;
  std::string final_path = cache_dir_ + "/index.cbor";
  ReplaceOptions options;
  options.temp_path = fmt::format("{}.tmp.{}", final_path, ::getpid());
  options.durable = false;
  (void)ReplaceFile(final_path, options, [&](int fd) {
    return WriteFull(fd, bytes.data(), bytes.size(), options.temp_path);
  });
}

bool ArchiveSource::LoadIndex(std::vector<Entry>* raw, std::vector<std::string>* warnings) {
  auto bytes = ReadSmallFile(cache_dir_ + "/index.cbor", 1ull << 30);
  if (!bytes) return false;
  auto j = nlohmann::json::from_cbor(*bytes, true, false);
  if (j.is_discarded() || !j.is_object() || j.value("version", 0) != kIndexVersion ||
      j.value("source", "") != path()) {
    return false;  // stale or damaged: list again (and rewrite it)
  }
  try {
    std::vector<Blob> blobs;
    for (const auto& o : j.at("blobs")) {
      Blob b;
      b.ordinal = o.at("o").get<uint64_t>();
      b.size = o.at("s").get<uint64_t>();
      if (o.contains("d")) b.data = std::make_shared<const std::string>(FromBinary(o["d"]));
      if (o.contains("r")) {
        std::vector<SparseReader::Region> regions;
        for (const auto& r : o["r"])
          regions.push_back({r.at(0).get<uint64_t>(), FromBinary(r.at(1))});
        b.captured = std::make_shared<const SparseReader>(b.size, std::move(regions));
      }
      blobs.push_back(std::move(b));
    }
    std::vector<Entry> entries;
    for (const auto& a : j.at("entries")) {
      Entry e;
      e.path = a.at(0).get<std::string>();
      int type = a.at(1).get<int>();
      if (type < 0 || type > 2) return false;
      e.type = static_cast<EntryType>(type);
      e.size = a.at(2).get<uint64_t>();
      e.mtime_sec = a.at(3).get<int64_t>();
      e.mtime_nsec = a.at(4).get<uint32_t>();
      e.mode = a.at(5).get<uint32_t>();
      e.link_target = a.at(6).get<std::string>();
      e.blob = a.at(7).get<uint32_t>();
      e.uid = a.at(8).get<uint32_t>();
      e.gid = a.at(9).get<uint32_t>();
      e.uname = a.at(10).get<std::string>();
      e.gname = a.at(11).get<std::string>();
      if (e.type == EntryType::kFile && e.blob >= blobs.size()) return false;
      entries.push_back(std::move(e));
    }
    *warnings = j.at("warnings").get<std::vector<std::string>>();
    *raw = std::move(entries);
    blobs_ = std::move(blobs);
    return true;
  } catch (const nlohmann::json::exception&) {
    return false;
  }
}

}  // namespace nemofs::source

namespace nemofs::source {

Result<StoredPlace> ArchiveSource::PlaceOf(uint32_t blob_index) const {
  if (blob_index >= blobs_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob_index);
  const Blob& blob = blobs_[blob_index];
  StoredPlace place;
  place.member_index = blob.ordinal;
  // Its name, for messages (a hard link shows it under another one too).
  if (blob_index < blob_entry_.size() && blob_entry_[blob_index] < entries().size()) {
    place.member = entries()[blob_entry_[blob_index]].path;
  }
  if (blob.data) {
    // Kept from the listing pass (small YAML/JSON): reads never come from
    // an extracted copy, so a patch would not show until a remount.
    return Err(EROFS, "{}: member '{}' is served from memory and cannot be patched", path(),
               place.member);
  }
  return place;
}

void ArchiveSource::IndexBlobEntries() {
  blob_entry_.assign(blobs_.size(), SIZE_MAX);
  for (size_t i = 0; i < entries().size(); ++i) {
    const Entry& e = entries()[i];
    if (e.type == EntryType::kFile && e.blob < blob_entry_.size() && blob_entry_[e.blob] == SIZE_MAX) {
      blob_entry_[e.blob] = i;
    }
  }
}

Status ArchiveSource::PatchExtracted(uint32_t blob_index, uint64_t offset,
                                     std::string_view bytes) {
  if (blob_index >= blobs_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob_index);
  if (offset + bytes.size() > blobs_[blob_index].size) {
    return Err(EINVAL, "{}: a patch past the end of member #{}", path(), blobs_[blob_index].ordinal);
  }
  NEMOFS_ASSIGN_OR_RETURN(FileRange r, Locate(blob_index));
  const std::string what =
      fmt::format("{} (the extracted copy of member #{})", cache_dir_, blobs_[blob_index].ordinal);
  int fd = -1;
  {
    std::lock_guard<std::mutex> lock(patch_fds_mu_);
    UniqueFd& w = patch_fds_[r.fd];
    if (!w.valid()) {
      // Reopened for writing through /proc/self/fd: whatever became of its name.
      w.Reset(::open(("/proc/self/fd/" + std::to_string(r.fd)).c_str(), O_WRONLY | O_CLOEXEC));
      if (!w.valid()) {
        int e = errno;
        patch_fds_.erase(r.fd);
        return Err(e, "{}: cannot reopen for writing: {}", what, std::strerror(e));
      }
    }
    fd = w.get();
  }
  return PwriteFull(fd, bytes, r.offset + offset, what);
}

}  // namespace nemofs::source
