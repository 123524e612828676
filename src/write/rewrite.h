// Rewriting a compressed tar with one member's content replaced (DESIGN.md §4:
// "config in a gzip tar or any compressed source: rewrite the archive to a temp
// file in the same directory, fsync, rename over the original; show progress").
//
// A compressed stream cannot be patched in place, so the whole archive is
// streamed through libarchive: decompress, copy every member (headers from the
// reader's entries, bytes from its data blocks), recompress with the input's
// filter chain. The output is pax: entries that ustar can hold get plain ustar
// headers, the others (long names, sub-second mtimes, atime/ctime, xattrs)
// keep them in PAX records. Only what tar headers carry survives; the bytes of
// the compressed stream (compression level, gzip header name) do not.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "nemofs/result.h"
#include "write/tar_append.h"  // NewMember

namespace nemofs::write {

struct RewriteResult {
  uint64_t members = 0;    // members of the input (the dropped ones included)
  uint64_t replaced = 0;   // members whose content was replaced
  uint64_t bytes_out = 0;  // size of the new archive
  uint64_t dropped = 0;    // members left out (`drop`)
};

// Streams the compressed tar at `path` through libarchive into
// `<path>.nemofs-rewrite.<pid>` in the same directory, with the same
// compression filter(s) as the input (gzip stays gzip, xz stays xz, zstd,
// bzip2...; nested filters keep their order), every member in the same order
// with the same header fields and the same bytes, except every regular-file
// member (not a hard link) whose normalised path (source::NormalizePath:
// "./a/b" -> "a/b") equals `member`: its data becomes `data` (size updated,
// mtime set to `mtime`, whole seconds). The temp file gets the original's
// mode (and owner when possible), is fsynced, then crash step
// "rewrite:written", rename over `path`, fsync of the directory, crash step
// "rewrite:renamed".
//
// On any failure the temp file is removed and `path` is untouched; errors name
// the file and keep the errno (ENOSPC stays ENOSPC). EINVAL (naming the
// member) if no member matched; EINVAL if the input is not a readable
// compressed tar (an uncompressed tar included: it is patched in place by the
// append path instead). `progress(done, total)`: compressed input bytes
// consumed so far out of the file size (done <= total); may be null.
//
// `path` is replaced by a regular file: pass the real path, not a symlink.
// Single-threaded; the libarchive handles live only inside the call.
// Same-size changes of a member's bytes (tensor writes into a compressed
// .nemo): `bytes` at `offset` of the member at position `index` among the
// archive's headers (0 = the first; source::StoredPlace::member_index),
// which must be a regular file; `member` names it in messages.
struct MemberPatch {
  uint64_t index = 0;
  std::string member;
  uint64_t offset = 0;
  std::string_view bytes;  // the caller's buffer, for the call's length
};

Result<RewriteResult> RewriteCompressedTar(const std::string& path, const std::string& member,
                                           const std::string& data, int64_t mtime,
                                           const std::function<void(uint64_t, uint64_t)>& progress,
                                           const std::vector<NewMember>& add = {},
                                           const std::vector<MemberPatch>& patches = {},
                                           const std::vector<std::string>& drop = {});
// With `add`: every member of `add` (NewMember::name normalised as above)
// that names an existing regular member replaces its content (and mtime,
// mode); the others are added at the end of the archive, in order, owned
// like `member`. `member` may then be "" (nothing else replaced).
// With `patches`: the members they name are copied with those bytes
// changed (header, size and mtime kept); EINVAL naming the member when it
// is not a regular member (not a hard link) of the archive or a patch goes
// past its end. Patches of one member must not overlap.
// With `drop`: every member whose normalised path is one of `drop` or lies
// beneath one ("a/b" drops "a/b" and "a/b/..."; every copy of it) is left
// out. Members cannot express a deletion by appending, so with `drop` a
// plain (uncompressed) tar is rewritten too, uncompressed.

}  // namespace nemofs::write
