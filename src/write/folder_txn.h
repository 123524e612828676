// A change of several paths of a folder source with ONE commit point
// (DESIGN.md §4; issue 11): zarr arrays added, removed, renamed or replaced
// (each a folder of chunk files), several rank files replaced at once.
// Renames of each path one by one would leave a mix of old and new after a
// crash; instead:
// 1. everything new is written into a stage folder in the source root,
//    `.commit.nemofs-tmp.<pid>/new/<n>` (files fsynced, then folders);
// 2. a roll-forward journal `.nemofs-commit` (JSON: the stage, the paths to
//    move out of the way, the paths to move in) is written to a temp,
//    fsynced and renamed into the root: that rename is the commit point;
// 3. it is applied: phase 1 moves every path that goes away (removed,
//    renamed from, replaced) to `<stage>/old/<n>`; a marker `<stage>/in`
//    records that phase 1 is complete; phase 2 renames `<stage>/new/<n>`
//    and `<stage>/old/<n>` (renamed paths) into their places; each step is
//    skipped when already done, so applying again after a crash anywhere
//    is harmless;
// 4. the journal is unlinked (the commit is complete), then the stage with
//    the old content removed.
// A crash before 2 leaves the old checkpoint plus the stage (an orphan:
// `nemofs verify` names it, `nemofs repack` removes it); after 2, every open
// of the source (write/config_commit.h RollBackInterruptedPatch) finishes
// the commit first: the new checkpoint. Nothing is ever resolved by path:
// every folder is opened beneath the root (util/atomic_replace.h), and a
// journal naming anything outside the root, or not in this form, is refused.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <utility>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"
#include "util/fd.h"

namespace nemofs::write {

inline constexpr char kFolderCommitJournal[] = ".nemofs-commit";
inline constexpr char kFolderCommitStagePrefix[] = ".commit.nemofs-tmp.";

class FolderTransaction {
 public:
  // A transaction in the open source folder `root_fd` (`shown` names it in
  // messages): makes the stage folder (ENOSPC, EACCES as errors).
  static Result<std::unique_ptr<FolderTransaction>> Begin(int root_fd, std::string shown);
  // Not committed: the stage is removed.
  ~FolderTransaction();

  // A new folder to be put at `rel` (relative to the root; what is there is
  // replaced): returns it open, for the caller to fill (and fsync its files).
  Result<UniqueFd> NewFolder(const std::string& rel, mode_t mode = 0755);
  // A new file at `rel` with `data` (written and fsynced here), given `owner`
  // when set (best effort: only root can give a file away).
  Status NewFile(const std::string& rel, std::string_view data, mode_t mode = 0644,
                 std::optional<std::pair<uid_t, gid_t>> owner = std::nullopt);
  // `rel` is removed (file or folder).
  Status Remove(const std::string& rel);
  // `from` is renamed to `to` (what is at `to` is replaced).
  Status Move(const std::string& from, const std::string& to);

  // Commits: the journal, its rename (the commit point), then applies it.
  // On an error before the commit point the source is unchanged; after it,
  // the error says the next open finishes it.
  Status Commit();

 private:
  FolderTransaction() = default;
  // The next free name in <stage>/new.
  std::string Slot() { return std::to_string(next_++); }
  Status CheckRel(const std::string& rel) const;

  int root_fd_ = -1;
  std::string shown_;
  std::string stage_;  // its name in the root
  UniqueFd stage_fd_;
  UniqueFd new_fd_;
  int next_ = 0;
  bool committed_ = false;
  std::vector<std::string> out_;                            // paths moved out (removed/replaced/renamed)
  std::vector<std::pair<std::string, std::string>> moves_;  // (from, to) renames
  std::vector<std::pair<std::string, std::string>> news_;   // (stage slot, to)
};

// The hook of every open: when the open folder `root_fd` (`shown`) holds a
// `.nemofs-commit` journal, the commit it records is finished (applied,
// the journal and stage removed) and a message saying so is returned; ""
// when there is none. A journal that is not one nemofs writes is EIO,
// naming it.
Result<std::string> FinishFolderCommit(int root_fd, const std::string& shown);

// Parses and checks a journal's text as FinishFolderCommit does (EIO
// naming `shown` when it is not one nemofs writes); for fuzzing.
Status CheckFolderCommitJournal(const std::string& text, const std::string& shown);

// Whether the folder source `root` holds a journal (a commit to finish).
bool HasFolderCommitJournal(int root_fd);

}  // namespace nemofs::write
