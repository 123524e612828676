#include "write/tar_append.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "util/io.h"
#include "write/fault.h"
#include "write/tar_writer.h"

namespace nemofs::write {

Result<AppendResult> AppendTarMembers(int fd, uint64_t end, const std::vector<NewMember>& members,
                                      const std::string& what) {
  if (members.empty()) return Err(EINVAL, "{}: nothing to append", what);
  char marker[2 * kBlock];
  NEMOFS_RETURN_IF_ERROR(PreadFull(fd, marker, sizeof marker, end, what));
  if (std::any_of(marker, marker + sizeof marker, [](char c) { return c != 0; })) {
    return Err(EINVAL, "{}: no end-of-archive marker at offset {} (changed since it was indexed?)",
               what, end);
  }
  MaybeCrash("tar-append:before");
  const int64_t mtime = members.front().mtime;

  std::string tail;
  AppendResult r;
  for (size_t i = 0; i < members.size(); ++i) {
    const NewMember& m = members[i];
    if (m.name.size() > 100) {  // the name needs a PAX path record
      std::string records = PaxRecord("path", m.name);
      tail += Header("././@PaxHeader", 'x', records.size(), m.mtime, 0644);
      tail += records;
      Pad(&tail, kBlock);
    }
    std::string header = Header(m.name, '0', m.data.size(), m.mtime, m.mode);
    CopyOwner(m.owner_from, &header);
    tail += header;
    if (i == 0) r.data_offset = end + 2 * kBlock + tail.size();
    tail += m.data;
    Pad(&tail, kBlock);
  }
  r.new_end = end + 2 * kBlock + tail.size();
  tail.append(2 * kBlock, '\0');
  // Pad the whole archive to the 10240-byte record size, as tar writers do.
  uint64_t total = end + 2 * kBlock + tail.size();
  tail.append((kRecord - total % kRecord) % kRecord, '\0');

  NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, tail, end + 2 * kBlock, what));
  NEMOFS_RETURN_IF_ERROR(Sync(fd, what));
  MaybeCrash("tar-append:data-written");

  // The commit: one block turns the end marker into an empty PAX header.
  NEMOFS_RETURN_IF_ERROR(
      PwriteFull(fd, Header("././@PaxHeader", 'x', kBlock, mtime, 0644), end, what));
  NEMOFS_RETURN_IF_ERROR(Sync(fd, what));
  MaybeCrash("tar-append:committed");
  return r;
}

Result<AppendResult> AppendTarMember(int fd, uint64_t end, const std::string& name,
                                     const std::string& data, int64_t mtime, uint32_t mode,
                                     const std::string& what, const std::string& owner_from) {
  return AppendTarMembers(fd, end, {NewMember{name, data, mtime, mode, owner_from}}, what);
}

}  // namespace nemofs::write
