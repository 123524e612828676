// `nemofs repack`: rewrite an archive compactly and atomically (DESIGN.md §4).
//
// Reads SOURCE (a plain or compressed tar) as nemofs sees it — the last copy
// of each name, unsafe members left out — and writes an uncompressed tar the
// way NeMo packs one (`./` first, then `./<path>` in sorted order; PAX
// records for long names, sizes >= 8 GiB, sub-second mtimes, and owner ids
// and names ustar cannot hold; every member keeps its stored uid, gid, user
// and group name, the root `./` entry too) to a
// temporary file beside OUT, fsyncs it, and renames it over OUT (default:
// SOURCE itself). A crash at any point leaves OUT as it was. File data is
// copied in the kernel (copy_file_range) where it can be.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "nemofs/filesystem.h"  // kDefaultCacheMax
#include "nemofs/result.h"

namespace nemofs::write {

struct RepackStats {
  uint64_t members = 0;  // members written (superseded and unsafe ones are not)
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  // Files interrupted commits left (write/orphans.h), removed.
  uint64_t orphans = 0;
  uint64_t orphan_bytes = 0;
  // DCP / torch_dist folders: superseded items dropped (their live items
  // copied into a fresh .distcp, dist/dcp_writer.h RepackDcp).
  uint64_t dcp_folders = 0;
  uint64_t dcp_reclaimed = 0;
};

// A folder or single-file source (no archive to rewrite: its commits replace
// files whole) gets only its orphans removed, in place (EINVAL with a
// different OUT). Orphans beside an archive are removed after its rewrite.
// Crash points for tests: "repack:written" (temp file complete, not renamed).
Result<RepackStats> Repack(const std::string& source, const std::string& out,
                           const std::string& cache_dir,
                           const std::function<void(uint64_t done, uint64_t total)>& progress,
                           uint64_t cache_max = kDefaultCacheMax);

}  // namespace nemofs::write
