#include <map>

#include "source/sources_internal.h"
#include "util/io.h"

namespace nemofs::source {

std::string TarSource::Kind() const {
  if (index_.pax) return "tar (PAX)";
  if (index_.gnu) return "tar (GNU)";
  return "tar (ustar)";
}

Result<std::unique_ptr<Source>> TarSource::Open(const std::string& path, UniqueFd fd,
                                                uint64_t size) {
  std::unique_ptr<TarSource> src(new TarSource(path));
  NEMOFS_ASSIGN_OR_RETURN(src->index_, IndexTar(fd.get(), 0, size, path));
  src->fd_ = std::move(fd);

  std::vector<Entry> raw;
  std::vector<std::string> warnings;
  std::map<std::string, uint32_t> file_blob;  // normalised name -> blob, for hard links
  const auto& members = src->index_.members;
  for (uint32_t i = 0; i < members.size(); ++i) {
    const TarMember& m = members[i];
    Entry e;
    e.path = m.name;
    e.mode = m.mode;
    e.mtime_sec = m.mtime_sec;
    e.mtime_nsec = m.mtime_nsec;
    e.uid = m.uid;
    e.gid = m.gid;
    e.uname = m.uname;
    e.gname = m.gname;
    std::string norm;
    bool normal = NormalizePath(m.name, &norm);
    switch (m.type) {
      case '5':
        e.type = EntryType::kDirectory;
        break;
      case '2':
        e.type = EntryType::kSymlink;
        e.link_target = m.link_name;
        e.size = m.link_name.size();
        break;
      case '1': {
        std::string target;
        auto it = NormalizePath(m.link_name, &target) ? file_blob.find(target) : file_blob.end();
        if (it == file_blob.end()) {
          warnings.push_back(
              fmt::format("hidden '{}': hard link to '{}', which is not an earlier "
                          "file of the archive",
                          m.name, m.link_name));
          continue;
        }
        e.type = EntryType::kFile;
        e.blob = it->second;
        e.size = members[src->blob_member_[it->second]].size;
        break;
      }
      case '3':
      case '4':
      case '6':
        warnings.push_back(fmt::format("hidden '{}': device or FIFO member", m.name));
        continue;
      case 'S':
        warnings.push_back(
            fmt::format("hidden '{}': GNU sparse members are not supported", m.name));
        continue;
      default:  // regular, contiguous, and unknown types (read as regular, as tarfile does)
        e.type = EntryType::kFile;
        e.size = m.size;
        e.blob = static_cast<uint32_t>(src->blob_member_.size());
        src->blob_member_.push_back(i);
        if (normal) file_blob[norm] = e.blob;
        break;
    }
    raw.push_back(std::move(e));
  }
  src->SetEntries(std::move(raw), std::move(warnings));
  return std::unique_ptr<Source>(std::move(src));
}

Result<ReadPlan> TarSource::Plan(uint32_t blob, uint64_t offset, uint64_t length) {
  if (blob >= blob_member_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob);
  const TarMember& m = index_.members[blob_member_[blob]];
  ReadPlan plan;
  plan.AddFd(fd_.get(), m.data_offset + offset, length);
  return plan;
}

}  // namespace nemofs::source

namespace nemofs::source {

Result<FileRange> TarSource::Locate(uint32_t blob) {
  if (blob >= blob_member_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob);
  const TarMember& m = index_.members[blob_member_[blob]];
  return FileRange{fd_.get(), m.data_offset, m.size};
}

}  // namespace nemofs::source

namespace nemofs::source {

Result<StoredPlace> TarSource::PlaceOf(uint32_t blob) const {
  if (blob >= blob_member_.size()) return Err(EINVAL, "{}: no blob {}", path(), blob);
  return StoredPlace{"", index_.members[blob_member_[blob]].data_offset};
}

}  // namespace nemofs::source
