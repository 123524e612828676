// Crash-safe append of a member to an uncompressed tar (DESIGN.md §4: a
// config edit in a plain .nemo costs O(config), never O(archive)).
//
// Layout before:  ... last member | Z Z (end marker at `end`) | padding
// Step 1: write   [PAX path header if the name needs one] [ustar header]
//                 [data, padded] [Z Z] [padding to 10240]  at end + 1024, fsync.
//                 Readers still stop at the end marker at `end`: the
//                 archive is the old one (Python tarfile and GNU tar agree).
// Step 2: write one 512-byte block at `end`: a PAX 'x' header of size 512
//                 whose data is the (all-zero, so record-less) block at
//                 end + 512. One sector write; fsync. Now the new member
//                 follows, and as the last member of its name it wins (as
//                 in tarfile, tar -x and NeMo's restore).
// A crash before step 2 completes leaves the old archive; after, the new one.
// A member of 8 GiB or more (past the ustar size field) gets its size in a
// PAX 'size' record, as GNU tar and Python's tarfile write and read it.
// Superseded copies stay until `nemofs repack`.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"

namespace nemofs::write {

struct AppendResult {
  uint64_t data_offset = 0;  // of the new member's data
  uint64_t new_end = 0;      // offset of the new end-of-archive marker
};

// `fd` is the tar opened read-write; `end` its end-of-archive marker offset
// (TarIndex::end_offset, with has_end_marker). The 1024 bytes at `end` must
// be zero (else EINVAL: the archive changed since it was indexed). Crash
// points for tests: "tar-append:before", "tar-append:data-written",
// "tar-append:committed". `owner_from`, if a ustar header, gives the new
// member its owner (uid, gid, names): that of the copy it supersedes.
// One member to append (or to add in a rewrite, write/rewrite.h).
struct NewMember {
  std::string name;  // as stored ("./notes.txt")
  std::string_view data;  // the caller's bytes, for the call's length
  int64_t mtime = 0;
  uint32_t mode = 0644;
  std::string owner_from;  // a ustar header to copy the owner from, or ""
  // Set: the data is not in `data` but written by this call into the tar
  // itself, at (fd, offset) right after the member's headers; it returns
  // how many bytes it wrote. (A repacked weight file is written once, in
  // place, instead of to a temp file and then copied.) Its size goes in a
  // PAX 'size' record of fixed width, rewritten once the data is there.
  std::function<Result<uint64_t>(int fd, uint64_t offset)> writer;
};

// Appends every member of `members` in one commit (the same two steps as
// one member: a crash leaves the archive without any of them or with all).
// The result's data_offset is the first member's.
Result<AppendResult> AppendTarMembers(int fd, uint64_t end, const std::vector<NewMember>& members,
                                      const std::string& what);

Result<AppendResult> AppendTarMember(int fd, uint64_t end, const std::string& name,
                                     std::string_view data, int64_t mtime, uint32_t mode,
                                     const std::string& what, const std::string& owner_from = "");

}  // namespace nemofs::write
