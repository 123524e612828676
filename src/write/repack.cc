#include "nemofs/repack.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "dist/dcp_writer.h"
#include "source/cache.h"
#include "source/source.h"
#include "source/tar_index.h"
#include "util/atomic_replace.h"
#include "util/fd.h"
#include "util/io.h"
#include "write/config_commit.h"
#include "write/fault.h"
#include "write/orphans.h"
#include "write/tar_writer.h"

namespace nemofs::write {
namespace {

// Headers (with PAX records when ustar cannot hold a field) for one entry.
// The member keeps its stored owner (ids and names); the PAX header block
// gets the same owner.
std::string EntryHeaders(const std::string& name, char type, uint64_t size, int64_t sec,
                         uint32_t nsec, uint32_t mode, const std::string& link,
                         const TarOwner& owner) {
  std::string records;
  if (name.size() > 100) records += PaxRecord("path", name);
  if (link.size() > 100) records += PaxRecord("linkpath", link);
  if (size >= (uint64_t{1} << 33)) records += PaxRecord("size", std::to_string(size));
  if (nsec != 0) records += PaxRecord("mtime", fmt::format("{}.{:09}", sec, nsec));
  if (owner.uid > kMaxUstarId) records += PaxRecord("uid", std::to_string(owner.uid));
  if (owner.gid > kMaxUstarId) records += PaxRecord("gid", std::to_string(owner.gid));
  if (owner.uname.size() > kMaxUstarOwnerName) records += PaxRecord("uname", owner.uname);
  if (owner.gname.size() > kMaxUstarOwnerName) records += PaxRecord("gname", owner.gname);
  std::string out;
  if (!records.empty()) {
    std::string pax = Header("././@PaxHeader", 'x', records.size(), sec, 0644);
    SetOwner(owner, &pax);
    out += pax;
    out += records;
    Pad(&out, kBlock);
  }
  std::string header = Header(name, type, size >= (uint64_t{1} << 33) ? 0 : size, sec, mode, link);
  SetOwner(owner, &header);
  out += header;
  return out;
}

}  // namespace

Result<RepackStats> Repack(const std::string& source, const std::string& out,
                           const std::string& cache_dir,
                           const std::function<void(uint64_t, uint64_t)>& progress,
                           uint64_t cache_max) {
  // The hot-journal hook (the caller, `nemofs repack`, holds the source lock).
  if (auto rolled = RollBackInterruptedPatch(source, true, true); !rolled) return rolled.error();
  source::OpenOptions so;
  so.cache_dir = cache_dir;
  so.cache_max = cache_max;
  NEMOFS_ASSIGN_OR_RETURN(auto src, source::OpenSource(source, so));
  RepackStats stats;
  auto orphans = [&]() -> Status {
    const auto found = FindOrphans(source);
    for (const auto& o : found) {
      ++stats.orphans;
      stats.orphan_bytes += o.bytes;
    }
    return RemoveOrphans(found);
  };
  if (src->storage() == source::Storage::kFolder || src->storage() == source::Storage::kFile) {
    if (out != source) {
      return Err(EINVAL, "{}: a {} is repacked in place only (its commits replace files whole: "
                 "only what interrupted ones left is removed); -o needs a tar archive",
                 source, src->Kind());
    }
    NEMOFS_ASSIGN_OR_RETURN(struct stat st, Stat(source));
    stats.bytes_in = stats.bytes_out = static_cast<uint64_t>(st.st_size);
    // What interrupted commits left first (not live items), then DCP
    // folders' items superseded by structural commits.
    NEMOFS_RETURN_IF_ERROR(orphans());
    if (src->storage() == source::Storage::kFolder) {
      for (const std::string& folder : DcpFolders(source)) {
        UniqueFd fd(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (!fd.valid()) return Err(errno, "{}: {}", folder, std::strerror(errno));
        NEMOFS_ASSIGN_OR_RETURN(uint64_t freed, dist::RepackDcp(fd.get(), folder, 1));
        ++stats.dcp_folders;
        stats.dcp_reclaimed += freed;
      }
    }
    return stats;
  }
  uint64_t total = 0;
  for (const auto& e : src->entries()) {
    if (e.type == source::EntryType::kFile) total += e.size;
  }
  NEMOFS_ASSIGN_OR_RETURN(struct stat in_st, Stat(source));
  stats.bytes_in = static_cast<uint64_t>(in_st.st_size);

  // In place, the archive keeps its mode and owner; a new file gets 0644
  // under the umask.
  ReplaceOptions options;
  options.temp_path = fmt::format("{}.nemofs-repack.{}", out, ::getpid());
  if (struct stat out_st {}; ::stat(out.c_str(), &out_st) == 0) {
    options.mode = out_st.st_mode & 07777;
    options.owner = std::make_pair(out_st.st_uid, out_st.st_gid);
  } else {
    mode_t mask = ::umask(0);
    ::umask(mask);
    options.mode = 0644 & ~mask;
  }
  options.on_written = [] { MaybeCrash("repack:written"); };
  const std::string& tmp = options.temp_path;
  NEMOFS_RETURN_IF_ERROR(ReplaceFile(out, options, [&](int fd) -> Status {
    uint64_t at = 0, done = 0;
    auto emit = [&](const std::string& bytes) -> Status {
      NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, bytes, at, tmp));
      at += bytes.size();
      return Ok();
    };
    for (const auto& e : src->entries()) {
      std::string name = e.path.empty() ? "./" : "./" + e.path;
      const TarOwner owner{e.uid, e.gid, e.uname, e.gname};
      Status st;
      if (e.type == source::EntryType::kDirectory) {
        st = emit(EntryHeaders(name, '5', 0, e.mtime_sec, e.mtime_nsec, e.mode, "", owner));
      } else if (e.type == source::EntryType::kSymlink) {
        st = emit(
            EntryHeaders(name, '2', 0, e.mtime_sec, e.mtime_nsec, e.mode, e.link_target, owner));
      } else {
        st = emit(EntryHeaders(name, '0', e.size, e.mtime_sec, e.mtime_nsec, e.mode, "", owner));
        // The data: copied in the kernel from the source's descriptor.
        auto range = src->Locate(e.blob);
        if (!range) return range.error();
        uint64_t copied = 0;
        while (st.ok() && copied < e.size) {
          loff_t in_off = static_cast<loff_t>(range->offset + copied);
          loff_t out_off = static_cast<loff_t>(at + copied);
          ssize_t n = ::copy_file_range(range->fd, &in_off, fd, &out_off,
                                        std::min<uint64_t>(e.size - copied, 1 << 30), 0);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            st = Err(err, "{}: copying '{}' failed: {}", tmp, e.path, std::strerror(err));
            break;
          }
          copied += static_cast<uint64_t>(n);
          done += static_cast<uint64_t>(n);
          if (progress) progress(done, total);
        }
        if (st.ok()) {
          at += e.size;
          std::string pad;
          pad.append((kBlock - e.size % kBlock) % kBlock, '\0');
          st = emit(pad);
        }
      }
      if (!st.ok()) return st;
      ++stats.members;
    }
    std::string end(2 * kBlock, '\0');
    end.append((kRecord - (at + end.size()) % kRecord) % kRecord, '\0');
    NEMOFS_RETURN_IF_ERROR(emit(end));
    stats.bytes_out = at;
    return Ok();
  }));
  // The cache entry of a compressed SOURCE replaced in place is superseded now.
  src.reset();
  source::SweepCache(cache_dir, cache_max);
  if (out == source) NEMOFS_RETURN_IF_ERROR(orphans());
  return stats;
}

}  // namespace nemofs::write
