#include "write/tar_append.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "util/io.h"
#include "write/fault.h"

namespace nemofs::write {
namespace {

constexpr uint64_t kBlock = 512;
constexpr uint64_t kRecord = 10240;

void PutOctal(char* field, size_t len, uint64_t value) {
  std::memset(field, '0', len - 1);
  for (size_t i = len - 1; i-- > 0 && value;) {
    field[i] = static_cast<char>('0' + (value & 7));
    value >>= 3;
  }
  field[len - 1] = '\0';
}

std::string Header(const std::string& name, char type, uint64_t size, int64_t mtime,
                   uint32_t mode) {
  std::string b(kBlock, '\0');
  std::memcpy(b.data(), name.data(), std::min<size_t>(name.size(), 100));
  PutOctal(b.data() + 100, 8, mode & 07777);
  PutOctal(b.data() + 108, 8, 0);
  PutOctal(b.data() + 116, 8, 0);
  PutOctal(b.data() + 124, 12, size);
  PutOctal(b.data() + 136, 12, static_cast<uint64_t>(std::max<int64_t>(mtime, 0)));
  b[156] = type;
  std::memcpy(b.data() + 257,
              "ustar\0"
              "00",
              8);
  std::memset(b.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : b) sum += c;
  PutOctal(b.data() + 148, 7, sum);
  b[155] = ' ';
  return b;
}

std::string PaxRecord(const std::string& key, const std::string& value) {
  std::string body = " " + key + "=" + value + "\n";
  size_t len = body.size() + 1;
  while (std::to_string(len).size() + body.size() != len) ++len;
  return std::to_string(len) + body;
}

void Pad(std::string* s, uint64_t to) { s->append((to - s->size() % to) % to, '\0'); }

Status PwriteFull(int fd, const std::string& bytes, uint64_t offset, const std::string& what) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n =
        ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      return Err(e, "{}: write at offset {} failed: {}", what, offset + done, std::strerror(e));
    }
    done += static_cast<size_t>(n);
  }
  return Ok();
}

Status Sync(int fd, const std::string& what) {
  if (::fsync(fd) != 0) {
    int e = errno;
    return Err(e, "{}: fsync failed: {}", what, std::strerror(e));
  }
  return Ok();
}

}  // namespace

Result<AppendResult> AppendTarMember(int fd, uint64_t end, const std::string& name,
                                     const std::string& data, int64_t mtime, uint32_t mode,
                                     const std::string& what) {
  char marker[2 * kBlock];
  NEMOFS_RETURN_IF_ERROR(PreadFull(fd, marker, sizeof marker, end, what));
  if (std::any_of(marker, marker + sizeof marker, [](char c) { return c != 0; })) {
    return Err(EINVAL, "{}: no end-of-archive marker at offset {} (changed since it was indexed?)",
               what, end);
  }
  MaybeCrash("tar-append:before");

  std::string tail;
  if (name.size() > 100) {  // the name needs a PAX path record
    std::string records = PaxRecord("path", name);
    tail += Header("././@PaxHeader", 'x', records.size(), mtime, 0644);
    tail += records;
    Pad(&tail, kBlock);
  }
  tail += Header(name, '0', data.size(), mtime, mode);
  AppendResult r;
  r.data_offset = end + 2 * kBlock + tail.size();
  tail += data;
  Pad(&tail, kBlock);
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

}  // namespace nemofs::write
