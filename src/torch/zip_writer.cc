#include "torch/zip_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "util/io.h"

namespace nemofs::torch {
namespace {

constexpr uint64_t kMax32 = 0xFFFFFFFFull;  // miniz's MZ_UINT32_MAX: ">=" means ZIP64
constexpr uint64_t kAlignment = 64;         // inline_container.cc kFieldAlignment
constexpr size_t kCopyBuffer = 1 << 20;

void Put16(std::string* s, uint64_t v) {
  s->append({static_cast<char>(v), static_cast<char>(v >> 8)});
}
void Put32(std::string* s, uint64_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void Put64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint16_t Flags(uint64_t size) { return size ? 0x0808 : 0x0800; }  // bit 3 only with data
bool LocalZip64(const ZipWrittenRecord& r) { return r.size >= kMax32 || r.local_header >= kMax32; }

bool CopyUnsupported(int e) {
  return e == EXDEV || e == ENOSYS || e == EINVAL || e == EOPNOTSUPP || e == EBADF;
}

// Kernel copy of [from, from+length) of `in` to `to` of `out`; false in
// *unsupported when copy_file_range cannot do it (nothing copied then).
Status KernelCopy(int in, uint64_t from, int out, uint64_t to, uint64_t length,
                  std::string_view what, bool* unsupported) {
  *unsupported = false;
  bool first = true;
  while (length > 0) {
    auto off_in = static_cast<loff_t>(from);
    auto off_out = static_cast<loff_t>(to);
    ssize_t n =
        ::copy_file_range(in, &off_in, out, &off_out, std::min<uint64_t>(length, 1ull << 30), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && first && CopyUnsupported(errno)) {
      *unsupported = true;
      return Ok();
    }
    if (n < 0) {
      int e = errno;
      return Err(e, "{}: copy failed: {}", what, std::strerror(e));
    }
    if (n == 0) return Err(EIO, "{}: the source ended {} bytes early", what, length);
    first = false;
    from += static_cast<uint64_t>(n);
    to += static_cast<uint64_t>(n);
    length -= static_cast<uint64_t>(n);
  }
  return Ok();
}

Status BufferedCopy(int in, uint64_t from, int out, uint64_t to, uint64_t length,
                    std::string_view what, uint32_t* crc) {
  std::string buf(std::min<uint64_t>(length, kCopyBuffer), '\0');
  while (length > 0) {
    size_t k = std::min<uint64_t>(length, buf.size());
    NEMOFS_RETURN_IF_ERROR(PreadFull(in, buf.data(), k, from, what));
    if (crc) *crc = Crc32(std::string_view(buf.data(), k), *crc);
    NEMOFS_RETURN_IF_ERROR(PwriteFull(out, std::string_view(buf.data(), k), to, what));
    from += k;
    to += k;
    length -= k;
  }
  return Ok();
}

}  // namespace

uint32_t Crc32(std::string_view bytes, uint32_t crc) {
  return static_cast<uint32_t>(
      crc32_z(crc, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size()));
}

ZipWriter::ZipWriter(int fd, uint64_t base, std::string what)
    : fd_(fd), base_(base), what_(std::move(what)) {}

Status ZipWriter::Put(std::string_view bytes) {
  NEMOFS_RETURN_IF_ERROR(PwriteFull(fd_, bytes, base_ + at_, what_));
  at_ += bytes.size();
  return Ok();
}

// The local header as mz_zip_writer_add_mem_ex_v2 writes it, with the FB
// padding of inline_container.cc getPadding.
Result<ZipWrittenRecord*> ZipWriter::Begin(std::string name, uint64_t size) {
  if (finished_) return Err(EINVAL, "{}: record '{}' added after the end", what_, name);
  if (name.empty() || name.size() > 0xFFFF) {
    return Err(EINVAL, "{}: record name of {} bytes", what_, name.size());
  }
  ZipWrittenRecord r;
  r.name = std::move(name);
  r.local_header = at_;
  r.size = size;
  std::string zip64;
  if (LocalZip64(r)) {
    std::string fields;
    if (size >= kMax32) {
      Put64(&fields, size);
      Put64(&fields, 0);  // PyTorch's files hold 0 for the compressed size here
    }
    if (r.local_header >= kMax32) Put64(&fields, r.local_header);
    Put16(&zip64, 0x0001);
    Put16(&zip64, fields.size());
    zip64 += fields;
  }
  uint64_t start = r.local_header + 30 + r.name.size() + zip64.size() + 4;
  uint64_t pad = (kAlignment - start % kAlignment) % kAlignment;
  std::string h;
  h.reserve(30 + r.name.size() + zip64.size() + 4 + pad);
  Put32(&h, 0x04034b50);
  Put16(&h, 0);  // version needed (miniz: 0 for stored)
  Put16(&h, Flags(size));
  Put16(&h, 0);  // stored
  Put32(&h, 0);  // time, date
  Put32(&h, 0);  // CRC: in the data descriptor
  Put32(&h, 0);
  Put32(&h, 0);
  Put16(&h, r.name.size());
  Put16(&h, zip64.size() + 4 + pad);
  h += r.name;
  h += zip64;
  h += "FB";
  Put16(&h, pad);
  h.append(pad, 'Z');
  NEMOFS_RETURN_IF_ERROR(Put(h));
  r.data = at_;
  records_.push_back(std::move(r));
  return &records_.back();
}

Status ZipWriter::End(ZipWrittenRecord* r, uint32_t crc) {
  r->crc32 = crc;
  at_ = r->data + r->size;
  if (r->size == 0) return Ok();
  std::string d;
  Put32(&d, 0x08074b50);
  Put32(&d, crc);
  if (LocalZip64(*r)) {
    Put64(&d, r->size);
    Put64(&d, r->size);
  } else {
    Put32(&d, r->size);
    Put32(&d, r->size);
  }
  return Put(d);
}

Status ZipWriter::Add(std::string name, std::string_view data) {
  NEMOFS_ASSIGN_OR_RETURN(ZipWrittenRecord * r, Begin(std::move(name), data.size()));
  NEMOFS_RETURN_IF_ERROR(Put(data));
  return End(r, Crc32(data));
}

Status ZipWriter::AddCopy(std::string name, uint64_t length, int src_fd, uint64_t offset,
                          std::optional<uint32_t> crc32) {
  NEMOFS_ASSIGN_OR_RETURN(ZipWrittenRecord * r, Begin(std::move(name), length));
  const uint64_t to = base_ + r->data;
  std::string what = fmt::format("{}: record {}", what_, r->name);
  struct stat src_st {};
  if (::fstat(src_fd, &src_st) == 0 && S_ISREG(src_st.st_mode) &&
      static_cast<uint64_t>(src_st.st_size) < offset + length) {
    return Err(EIO, "{}: the source has {} bytes, the record needs {} at offset {}", what,
               src_st.st_size, length, offset);
  }
  if (!crc32) {
    uint32_t crc = 0;
    NEMOFS_RETURN_IF_ERROR(BufferedCopy(src_fd, offset, fd_, to, length, what, &crc));
    return End(r, crc);
  }
  // Holes of the source may stay holes when the destination is past the end
  // of the output (it reads as zeros there already).
  struct stat st {};
  bool sparse_ok = ::fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) <= to;
  uint64_t done = 0;
  while (done < length) {
    uint64_t pos = offset + done;
    uint64_t stop = offset + length;
    if (sparse_ok) {
      off_t data = ::lseek(src_fd, static_cast<off_t>(pos), SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // only a hole is left
        sparse_ok = false;          // SEEK_DATA unsupported: copy everything
      } else {
        if (static_cast<uint64_t>(data) >= stop) break;
        pos = static_cast<uint64_t>(data);
        off_t hole = ::lseek(src_fd, data, SEEK_HOLE);
        if (hole > data) stop = std::min<uint64_t>(stop, static_cast<uint64_t>(hole));
      }
    }
    bool unsupported = false;
    NEMOFS_RETURN_IF_ERROR(
        KernelCopy(src_fd, pos, fd_, to + (pos - offset), stop - pos, what, &unsupported));
    if (unsupported) {
      NEMOFS_RETURN_IF_ERROR(
          BufferedCopy(src_fd, pos, fd_, to + (pos - offset), stop - pos, what, nullptr));
    }
    done = stop - offset;
  }
  return End(r, *crc32);
}

Status ZipWriter::AddCopy(std::string name, uint64_t length, const ByteReader& src, uint64_t offset,
                          std::optional<uint32_t> crc32) {
  NEMOFS_ASSIGN_OR_RETURN(ZipWrittenRecord * r, Begin(std::move(name), length));
  std::string what = fmt::format("{}: record {}", what_, r->name);
  uint32_t crc = 0;
  std::string buf(std::min<uint64_t>(length, kCopyBuffer), '\0');
  for (uint64_t done = 0; done < length;) {
    size_t k = std::min<uint64_t>(length - done, buf.size());
    NEMOFS_RETURN_IF_ERROR(src.Read(offset + done, buf.data(), k, what));
    if (!crc32) crc = Crc32(std::string_view(buf.data(), k), crc);
    NEMOFS_RETURN_IF_ERROR(
        PwriteFull(fd_, std::string_view(buf.data(), k), base_ + r->data + done, what));
    done += k;
  }
  return End(r, crc32 ? *crc32 : crc);
}

// mz_zip_writer_finalize_archive with m_zip64 set (inline_container.cc
// always sets MZ_ZIP_FLAG_WRITE_ZIP64).
Result<uint64_t> ZipWriter::Finish() {
  if (finished_) return Err(EINVAL, "{}: finished twice", what_);
  finished_ = true;
  const uint64_t cd_offset = at_;
  std::string cd;
  for (auto& r : records_) {
    r.central = cd_offset + cd.size();
    std::string extra;
    if (LocalZip64(r)) {
      std::string fields;
      if (r.size >= kMax32) {
        Put64(&fields, r.size);
        Put64(&fields, r.size);
      }
      if (r.local_header >= kMax32) Put64(&fields, r.local_header);
      if (!fields.empty()) {
        Put16(&extra, 0x0001);
        Put16(&extra, fields.size());
        extra += fields;
      }
    }
    Put32(&cd, 0x02014b50);
    Put16(&cd, 0);  // made by
    Put16(&cd, 0);  // needed
    Put16(&cd, Flags(r.size));
    Put16(&cd, 0);
    Put32(&cd, 0);  // time, date
    Put32(&cd, r.crc32);
    Put32(&cd, std::min(r.size, kMax32));
    Put32(&cd, std::min(r.size, kMax32));
    Put16(&cd, r.name.size());
    Put16(&cd, extra.size());
    Put16(&cd, 0);  // comment
    Put16(&cd, 0);  // disk
    Put16(&cd, 0);  // internal attributes
    Put32(&cd, 0);  // external attributes
    Put32(&cd, std::min(r.local_header, kMax32));
    cd += r.name;
    cd += extra;
    if (cd.size() >= kCopyBuffer) {  // keep memory flat for many records
      NEMOFS_RETURN_IF_ERROR(Put(cd));
      cd.clear();
    }
  }
  NEMOFS_RETURN_IF_ERROR(Put(cd));
  const uint64_t cd_size = at_ - cd_offset;
  const uint64_t n = records_.size();
  const uint64_t zip64_eocd = at_;
  std::string end;
  Put32(&end, 0x06064b50);
  Put64(&end, 44);
  Put16(&end, 0x031E);
  Put16(&end, 0x002D);
  Put32(&end, 0);
  Put32(&end, 0);
  Put64(&end, n);
  Put64(&end, n);
  Put64(&end, cd_size);
  Put64(&end, cd_offset);
  Put32(&end, 0x07064b50);
  Put32(&end, 0);
  Put64(&end, zip64_eocd);
  Put32(&end, 1);
  Put32(&end, 0x06054b50);
  Put16(&end, 0);
  Put16(&end, 0);
  Put16(&end, std::min<uint64_t>(n, 0xFFFF));
  Put16(&end, std::min<uint64_t>(n, 0xFFFF));
  Put32(&end, std::min(cd_size, kMax32));
  Put32(&end, std::min(cd_offset, kMax32));
  Put16(&end, 0);
  NEMOFS_RETURN_IF_ERROR(Put(end));
  return at_;
}

}  // namespace nemofs::torch
