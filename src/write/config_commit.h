// Committing a new config text into the checkpoint (DESIGN.md §4), one way
// per kind of source:
//   plain tar        append the member (write/tar_append.h): O(config),
//                    crash-safe, superseded copies stay until `nemofs repack`;
//   compressed tar   rewrite the archive beside itself and rename it over
//                    (write/rewrite.h): O(archive), progress reported;
//   folder           write a temp file beside the config, fsync, rename
//                    over, fsync the directory: O(config).
// Before writing, the target's identity (device, inode, size, mtime) must
// still be what it was when the source was opened (or after our last
// commit); if anything else changed it, the commit is refused with ESTALE.
#pragma once

#include <sys/types.h>
#include <time.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "nemofs/result.h"
#include "util/fd.h"
#include "write/tar_append.h"

namespace nemofs::source {
class Source;
}

namespace nemofs::write {

struct FileIdentity {
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  int64_t mtime_sec = 0;
  int64_t mtime_nsec = 0;
  bool operator==(const FileIdentity&) const = default;
};

class ConfigCommitter {
 public:
  enum class Kind { kPlainTar, kCompressedTar, kFolder, kFile };

  // For the config at normalised path `config` of `src` ("" for a source
  // without one: only its stored bytes can be patched). `identity` is the
  // identity of the source path taken before `src` was opened (for folders
  // it is ignored: the config file's own identity is taken here). Fails
  // with EROFS when the source cannot be written (the reason in the message).
  static Result<std::unique_ptr<ConfigCommitter>> Create(const source::Source& src,
                                                         const std::string& config,
                                                         const FileIdentity& identity);
  ~ConfigCommitter();

  // Writes `text` as the config, with modification time `mtime`: the
  // appended member's (plain tar, whole seconds), the rewritten member's
  // (compressed tar, whole seconds) or the file's (folder, futimens).
  // Progress (done, total bytes) is reported for the O(archive) rewrite
  // only. On failure the source is unchanged.
  Status Commit(const std::string& text, const struct timespec& mtime,
                const std::function<void(uint64_t, uint64_t)>& progress);

  // A file the user created, to store in the checkpoint (issue 16 §5).
  struct NewFile {
    std::string path;  // normalised, relative to the checkpoint's root ("notes.txt")
    std::string_view data;  // the caller's bytes, for the call's length
    uint32_t mode = 0644;
    int64_t mtime_sec = 0;
    uint32_t mtime_nsec = 0;
    bool stored_before = false;  // an update of a file an earlier store wrote
    // Plain tar only: the bytes are written in place by this call instead
    // of coming from `data` (write/tar_append.h NewMember::writer).
    std::function<Result<uint64_t>(int fd, uint64_t offset)> writer;
  };
  // Whether StoreFiles takes NewFile::writer (a plain tar).
  bool StreamsNewFiles() const { return kind_ == Kind::kPlainTar; }
  // Stores every file of `files` in one commit, with the same crash rules
  // as a config commit: plain tar, one append of all of them (an update
  // is a new copy that supersedes the old); compressed tar, one rewrite;
  // folder, each file written beside its place, fsynced and renamed over
  // (a file there that an earlier store did not write is EEXIST).
  Status StoreFiles(const std::vector<NewFile>& files,
                    const std::function<void(uint64_t, uint64_t)>& progress);

  // A tar (plain or compressed) rewritten whole (write/rewrite.h) with the
  // members at or beneath the paths of `drop` left out and `files` added
  // or replacing their members: what an append cannot express (a deletion).
  // The atomic-replace rule (temp beside, fsync, rename over) and
  // `progress`; ESTALE when the archive changed behind the mount; on failure
  // it is as it was. A plain tar stays uncompressed, and later appends go
  // after the rewritten archive's end.
  Status RewriteArchive(const std::vector<NewFile>& files, const std::vector<std::string>& drop,
                        const std::function<void(uint64_t, uint64_t)>& progress);

  // A single-file source (kFile: a Lightning .ckpt, a .pt) given new
  // content whole (a structural tensor write repacks it): a temp file
  // beside it, fsync, rename over, fsync the folder; mode and owner kept.
  // ESTALE when the file changed behind the mount; on failure it is as it
  // was.
  Status ReplaceSingleFile(std::string_view data,
                           const std::function<void(uint64_t, uint64_t)>& progress);

  // One same-size change of stored bytes (tensor writes): `bytes` at
  // `offset` of `file` (source::StoredPlace: relative to the source folder,
  // "" = the source file itself).
  struct Patch {
    std::string file;
    uint64_t offset = 0;
    std::string_view bytes;  // the caller's, for the call's length
    std::string_view old;    // the bytes there now, if already read ("" = read them)
    // A compressed tar: the member (StoredPlace::member, member_index);
    // `offset` is within it.
    std::string member;
    uint64_t member_index = 0;
    // `bytes` become the file's content from `offset` to its end, whatever
    // its size was (write/journal.h Region::to_end; folders only).
    bool to_end = false;
  };
  // Patches the stored files in place under a rollback journal
  // (write/journal.h): `data` first, then `meta` (the CRC-32 fields of the
  // zip records the data is in). A compressed tar has no place to patch:
  // it is rewritten with the members' bytes changed (write/rewrite.h),
  // O(archive), with `progress` (done, total bytes; may be null). Refused
  // with ESTALE when the source file changed behind the mount. On failure
  // the files are as before (or a hot journal is left that the next open
  // rolls back; the error says so).
  Status PatchInPlace(const std::vector<Patch>& data, const std::vector<Patch>& meta,
                      const std::function<void(uint64_t, uint64_t)>& progress = nullptr);
  // Whether the config can be committed (false for a source without one).
  bool has_config() const { return !config_.empty(); }

  Kind kind() const { return kind_; }
  // "append to plain tar", "rewrite of the gzip tar", "file replace in folder".
  std::string Describe() const;
  // The file that is written (the archive, or the folder's config file).
  const std::string& target() const { return target_; }

 private:
  ConfigCommitter() = default;
  Status CommitPlainTar(const std::string& text, int64_t mtime);
  // Appends `members` to the plain tar in one commit (write/tar_append.h),
  // putting the file back as it was when that fails.
  Status AppendToPlainTar(std::vector<NewMember> members);
  Status CommitFolder(const std::string& text, const struct timespec& mtime);
  // The one "temp file beside it, fsync, rename over, fsync the directory"
  // of the folder kind: writes `data` as `name` in the open folder `dirfd`
  // (`shown_dir` in errors), never resolving a path.
  static Status ReplaceFolderFile(int dirfd, const std::string& shown_dir, const std::string& name,
                                  std::string_view data, uint32_t mode, uid_t uid, gid_t gid,
                                  const struct timespec* mtime);
  // Folder: opens the folder `rel` beneath the source folder, never
  // following a symbolic link (ELOOP) or leaving it (EXDEV).
  Result<UniqueFd> OpenFolder(const std::string& rel, bool create) const;
  Status CheckIdentity(const FileIdentity& now) const;

  Kind kind_ = Kind::kPlainTar;
  std::string target_;
  std::string config_;       // normalised member path
  std::string member_name_;  // plain tar: the name as stored ("./model_config.yaml")
  uint32_t mode_ = 0644;
  uint64_t end_ = 0;  // plain tar: offset of the end-of-archive marker
  uint64_t member_header_ = 0;  // plain tar: offset of the replaced member's ustar header
  std::string filter_;
  std::string folder_root_;  // folder: the source folder's real path (for messages)
  UniqueFd folder_root_fd_;  // folder: the source folder, opened with the source
  std::string config_rel_;   // folder: the config file, relative to the folder
  FileIdentity identity_;
};

// The hook every open of a source runs first (mount, ls, cat, info,
// verify, repack): a hot journal beside/inside `source_path` (a crash
// interrupted an in-place patch) is rolled back and "" or a message saying
// what was done is returned (also logged); a folder commit interrupted past
// its commit point (write/folder_txn.h) is finished (logged only: the
// source is then the new checkpoint, whole). Without `may_write` (-o ro), or
// when the source cannot be written, a hot journal is EROFS with a message
// saying what to run.
// The rollback takes the source lock (nemofs/source_lock.h) unless
// `lock_held` (the caller, a writable mount, holds it); when a writable
// mount holds it, its own write may be in progress: nothing is done.
Result<std::string> RollBackInterruptedPatch(const std::string& source_path, bool may_write,
                                             bool lock_held);

// Why `path` cannot be written ("" if it can): no write permission bits
// (even for root: a 0444 checkpoint is read-only by intent), a read-only
// file system, or access(2) says no; its folder too with `need_dir`.
std::string WhyReadOnly(const std::string& path, bool need_dir);

// Identity of `path` (following symlinks).
Result<FileIdentity> IdentityOf(const std::string& path);

}  // namespace nemofs::write
