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

  // Written in place piece by piece (headers, then each member's bytes
  // straight from the caller's buffer: a multi-GB member is not copied).
  AppendResult r;
  uint64_t at = end + 2 * kBlock;
  std::string pending;  // headers and padding not written yet
  uint64_t pending_at = at;
  auto flush = [&]() -> Status {
    NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, pending, pending_at, what));
    pending_at += pending.size();
    pending.clear();
    return Ok();
  };
  for (size_t i = 0; i < members.size(); ++i) {
    const NewMember& m = members[i];
    // PAX records: the path past 100 bytes; the size past the ustar field
    // (8 GiB - 1), or not known yet (a writer: 20 digits, rewritten after).
    constexpr uint64_t kUstarMaxSize = 077777777777ull;
    const bool big = m.writer || m.data.size() > kUstarMaxSize;
    std::string records;
    if (m.name.size() > 100) records += PaxRecord("path", m.name);
    uint64_t size_record_at = 0;  // of the size digits, for a writer
    const size_t size_digits_from = records.size();
    if (big) records += PaxRecord("size", fmt::format("{:020}", m.writer ? 0 : m.data.size()));
    if (!records.empty()) {
      pending += Header("././@PaxHeader", 'x', records.size(), m.mtime, 0644);
      // "NN size=" precedes the digits.
      size_record_at = pending_at + pending.size() + size_digits_from +
                       records.substr(size_digits_from).find('=') + 1;
      pending += records;
      // (to the archive's block boundary: `pending` may start mid-block,
      // after the previous member's data)
      pending.append((kBlock - (pending_at + pending.size()) % kBlock) % kBlock, '\0');
    }
    std::string header = Header(m.name, '0', big ? 0 : m.data.size(), m.mtime, m.mode);
    CopyOwner(m.owner_from, &header);
    pending += header;
    const uint64_t data_at = pending_at + pending.size();
    if (i == 0) r.data_offset = data_at;
    if (m.writer) {
      NEMOFS_RETURN_IF_ERROR(flush());
      NEMOFS_ASSIGN_OR_RETURN(uint64_t written, m.writer(fd, data_at));
      NEMOFS_RETURN_IF_ERROR(
          PwriteFull(fd, fmt::format("{:020}", written), size_record_at, what));
      pending_at = data_at + written;
    } else if (m.data.size() <= (1u << 20)) {
      pending += m.data;
    } else {
      NEMOFS_RETURN_IF_ERROR(flush());
      NEMOFS_RETURN_IF_ERROR(PwriteFull(fd, m.data, data_at, what));
      pending_at = data_at + m.data.size();
    }
    pending.append((kBlock - (pending_at + pending.size()) % kBlock) % kBlock, '\0');
  }
  r.new_end = pending_at + pending.size();
  pending.append(2 * kBlock, '\0');
  // Pad the whole archive to the 10240-byte record size, as tar writers do.
  uint64_t total = pending_at + pending.size();
  pending.append((kRecord - total % kRecord) % kRecord, '\0');
  NEMOFS_RETURN_IF_ERROR(flush());
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
                                     std::string_view data, int64_t mtime, uint32_t mode,
                                     const std::string& what, const std::string& owner_from) {
  return AppendTarMembers(fd, end, {NewMember{name, data, mtime, mode, owner_from}}, what);
}

}  // namespace nemofs::write
