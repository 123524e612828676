#include "write/tar_writer.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace nemofs::write {

namespace {

void PutOctal(char* field, size_t len, uint64_t value) {
  std::memset(field, '0', len - 1);
  for (size_t i = len - 1; i-- > 0 && value;) {
    field[i] = static_cast<char>('0' + (value & 7));
    value >>= 3;
  }
  field[len - 1] = '\0';
}

}  // namespace

std::string Header(const std::string& name, char type, uint64_t size, int64_t mtime, uint32_t mode,
                   const std::string& link) {
  std::string b(kBlock, '\0');
  std::memcpy(b.data(), name.data(), std::min<size_t>(name.size(), 100));
  PutOctal(b.data() + 100, 8, mode & 07777);
  PutOctal(b.data() + 108, 8, 0);
  PutOctal(b.data() + 116, 8, 0);
  PutOctal(b.data() + 124, 12, size);
  PutOctal(b.data() + 136, 12, static_cast<uint64_t>(std::max<int64_t>(mtime, 0)));
  b[156] = type;
  std::memcpy(b.data() + 157, link.data(), std::min<size_t>(link.size(), 100));
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

void CopyOwner(const std::string& from, std::string* header) {
  if (from.size() != kBlock || header->size() != kBlock || from.compare(257, 5, "ustar") != 0) {
    return;
  }
  std::memcpy(header->data() + 108, from.data() + 108, 16);   // uid, gid
  std::memcpy(header->data() + 265, from.data() + 265, 64);   // uname, gname
  std::memset(header->data() + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : *header) sum += c;
  PutOctal(header->data() + 148, 7, sum);
  (*header)[155] = ' ';
}

void SetOwner(const TarOwner& owner, std::string* header) {
  if (header->size() != kBlock) return;
  char* b = header->data();
  PutOctal(b + 108, 8, owner.uid <= kMaxUstarId ? owner.uid : 0);
  PutOctal(b + 116, 8, owner.gid <= kMaxUstarId ? owner.gid : 0);
  std::memset(b + 265, 0, 64);
  std::memcpy(b + 265, owner.uname.data(), std::min(owner.uname.size(), kMaxUstarOwnerName));
  std::memcpy(b + 297, owner.gname.data(), std::min(owner.gname.size(), kMaxUstarOwnerName));
  std::memset(b + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : *header) sum += c;
  PutOctal(b + 148, 7, sum);
  (*header)[155] = ' ';
}

std::string PaxRecord(const std::string& key, const std::string& value) {
  std::string body = " " + key + "=" + value + "\n";
  size_t len = body.size() + 1;
  while (std::to_string(len).size() + body.size() != len) ++len;
  return std::to_string(len) + body;
}

void Pad(std::string* s, uint64_t to) { s->append((to - s->size() % to) % to, '\0'); }

Status Sync(int fd, const std::string& what) {
  if (::fsync(fd) != 0) {
    int e = errno;
    return Err(e, "{}: fsync failed: {}", what, std::strerror(e));
  }
  return Ok();
}

}  // namespace nemofs::write
