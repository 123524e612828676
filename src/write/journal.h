// Crash-safe same-size patches of files in place, SQLite's rollback-journal
// model (DESIGN.md §4): the old bytes of every region go into a journal
// file first, durably; only then are the files patched; the journal is
// deleted when the patch is durable. A crash at any instant leaves the
// files old, or new, or half-patched with a complete journal beside them
// ("hot"), which the next open of the source rolls back
// (RollBackHotJournal): the files are then exactly the old ones.
//
// Journal format (little-endian):
//   header  "NEMOFSJ2", u64 region count
//   record  u32 name length, name (the file, relative to the folder),
//           u64 offset, u64 length, u32 CRC-32 of the old bytes,
//           u8 flags (1: the old bytes ran to the end of the file, which a
//           rollback truncates after them), old bytes
// ("NEMOFSJ1" journals, of records without the flags byte, are read too.)
//   trailer "NEMOFSJE", u64 region count, u32 CRC-32 of everything before
// A journal without a valid trailer was cut off before its fsync: no file
// was patched yet (patching starts after the fsync), so it is just removed.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"

namespace nemofs::write {

// Views, not copies (a region may be a whole tensor): the bytes live in
// the caller's buffers, or in the journal ParseJournal parsed.
struct Region {
  std::string file;  // relative to the folder: "x.nemo", "weights/__0_0.distcp"
  uint64_t offset = 0;
  std::string_view bytes;  // new bytes (ApplyPatch) or old ones (a parsed journal)
  // ApplyPatch: the bytes there now, when the caller has read them already
  // (same size as `bytes`, or for `to_end` the rest of the file); empty:
  // ApplyPatch reads them.
  std::string_view old;
  // The region runs to the end of the file, whose size may change: `bytes`
  // become the file's content from `offset` on, and a rollback puts back
  // the old content from there to the old end (a re-encoded zarr chunk).
  bool to_end = false;
};

struct PatchRoot {
  int dir_fd = -1;           // the folder holding the files and the journal
  std::string shown_dir;     // for messages
  std::string journal_name;  // a plain name in that folder
};

// Patches `data`, then `meta` (CRC fields), under the journal. Regions must
// lie inside their files (regular files beneath the folder, reached without
// following a symbolic link; a `to_end` region starts inside it, and is the
// last of its file) and not overlap: EINVAL otherwise, nothing written.
// `progress(done, total)` counts the data bytes patched (may be null). A failure after the journal was written rolls back at once; if
// that fails too the journal stays (the next open rolls back) and the
// error says so. Crash points (NEMOFS_FAULT, write/fault.h):
// journal:before-fsync, patch:half, patch:before-meta, patch:before-delete.
Status ApplyPatch(const PatchRoot& root, const std::vector<Region>& data,
                  const std::vector<Region>& meta,
                  const std::function<void(uint64_t, uint64_t)>& progress = nullptr);

// Whether the folder holds the journal (a patch was interrupted).
Result<bool> HasHotJournal(const PatchRoot& root);

// Rolls a hot journal back and removes it; returns what it did, for the log
// ("" when there was none). A complete journal naming a missing or too
// short file, or with a record whose checksum is wrong, is EIO and stays.
// Idempotent: a crash during it (crash point rollback:half) and another
// run give the old bytes.
Result<std::string> RollBackHotJournal(const PatchRoot& root);

struct ParsedJournal {
  bool complete = false;
  std::vector<Region> regions;  // old bytes (views into the input); only when complete
};
// Parses journal bytes (untrusted: every length checked against the input);
// the regions view into `bytes`, which must outlive them.
Result<ParsedJournal> ParseJournal(std::string_view bytes, const std::string& shown_name);

}  // namespace nemofs::write
