// Files an interrupted commit leaves behind (DESIGN.md §4: every commit has
// one commit point; what it wrote before it is an orphan until removed):
// a folder commit's temp ".<name>.nemofs-tmp.<pid>" (write/config_commit.h,
// anywhere in a folder source, or beside a single-file source) and a
// compressed archive's rewrite "<archive>.nemofs-rewrite.<pid>" beside it.
// `nemofs verify` reports them, `nemofs repack` removes them. Files whose
// process is alive (a commit running now) are not orphans.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nemofs/result.h"

namespace nemofs::write {

struct Orphan {
  std::string path;
  uint64_t bytes = 0;
};

// The orphans of source `path` (a folder, or a file and its folder's
// entries named after it). Unreadable folders are skipped.
std::vector<Orphan> FindOrphans(const std::string& path);

// The folders of `path` (itself included) that hold a DCP .metadata.
std::vector<std::string> DcpFolders(const std::string& path);

// Removes them; the first failure is returned (the rest are still tried).
Status RemoveOrphans(const std::vector<Orphan>& orphans);

}  // namespace nemofs::write
