// One-pass header index of an uncompressed tar archive (FORMATS.md §1.1).
//
// Accepted layout: 512-byte header blocks; ustar/POSIX fields name 0:100,
// mode 100:8, size 124:12, mtime 136:12, chksum 148:8, typeflag 156,
// linkname 157:100, magic 257:6, prefix 345:155 (ustar only). Numbers are
// octal ASCII, or GNU base-256 when the first byte has bit 0x80 set. The
// checksum is the sum of the header bytes with the checksum field read as
// eight spaces (unsigned, or signed as some old writers did). Extended
// headers: PAX 'x' (applies to the next member) and 'g' (to all following
// members) with records "<len> <key>=<value>\n" (path, linkpath, size,
// mtime, uid, gid, uname, gname); GNU 'L' (long name) and 'K' (long link name). Member data starts
// at the block after its header and is padded to 512 bytes. The archive
// ends at the first all-zero block, or at the end of the file when a writer
// left no end marker (as Python's tarfile accepts).
//
// Every size, offset and length read from the file is checked before use; a
// malformed archive yields an EINVAL error naming the offset and problem.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nemofs/result.h"

namespace nemofs::source {

struct TarMember {
  std::string name;            // as stored (PAX/GNU long name applied), not normalised
  char type = '0';             // ustar typeflag of the member header
  uint64_t header_offset = 0;  // offset of the first header block (incl. extended headers)
  uint64_t data_offset = 0;
  uint64_t size = 0;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
  uint32_t mode = 0;
  std::string link_name;
  // Owner as stored (uid 108:8, gid 116:8, uname 265:32, gname 297:32; PAX
  // uid/gid/uname/gname override them).
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::string uname;
  std::string gname;
};

struct TarIndex {
  std::vector<TarMember> members;  // in archive order, duplicates kept
  uint64_t end_offset = 0;         // offset of the end-of-archive marker (or file end)
  bool has_end_marker = false;
  bool pax = false;  // at least one PAX header seen
  bool gnu = false;  // GNU magic or GNU long-name records seen
};

// Indexes the tar at [base, base+length) of `fd`. `name` is used in errors.
Result<TarIndex> IndexTar(int fd, uint64_t base, uint64_t length, const std::string& name);

// True when `block` (512 bytes) carries the ustar magic at offset 257.
bool HasUstarMagic(const unsigned char* block);

}  // namespace nemofs::source
