// Sources: where checkpoint bytes live. A Source presents the checkpoint as
// stored (a directory, the members of a tar, one file) as a flat list of
// entries with normalised relative paths, and answers reads of its files as
// read plans over file descriptors.
//
// Path rules (shared by every source, see NormalizeEntries): paths are
// relative, '/'-separated, without "./" prefixes or trailing slashes; the
// root is "". Entries NeMo's restore would refuse (absolute paths, ".."
// components, links leaving the tree) are dropped with a warning; when a
// name occurs twice the last one wins, as in Python's tarfile.
//
// Concurrency: entries() and warnings() are immutable after Open; Plan() is
// thread-safe.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "nemofs/read_plan.h"
#include "nemofs/result.h"
#include "util/byte_reader.h"

namespace nemofs::source {

inline constexpr uint32_t kNoBlob = UINT32_MAX;

struct FileRange {
  int fd = -1;
  uint64_t offset = 0;
  uint64_t length = 0;
};

enum class EntryType { kFile, kDirectory, kSymlink };

// What kind of storage a source is, for the writer (write/config_commit.h):
// how a change of its bytes is committed.
enum class Storage {
  kPlainTar,       // members are byte ranges of one uncompressed tar: patched in place
  kCompressedTar,  // gzip/xz/zstd/bzip2 tar: members have no fixed place; rewrite
  kFolder,         // a directory of files: each patched in place or replaced
  kFile,           // one file (a torch.save .ckpt/.pt): patched in place
};

// Where a blob's bytes are stored, for patching them in place: `file`,
// relative to the source folder (kFolder; "" for the source file itself:
// kPlainTar, kFile), from byte `offset` on.
// kCompressedTar: `member` is the member holding the blob, and
// `member_index` its position among the archive's headers (0 = first);
// offsets are within the member, which a rewrite of the archive patches.
struct StoredPlace {
  std::string file;
  uint64_t offset = 0;
  std::string member;
  uint64_t member_index = 0;
};

struct TarIndex;

struct Entry {
  std::string path;  // normalised, "" = root
  EntryType type = EntryType::kFile;
  uint64_t size = 0;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
  uint32_t mode = 0644;     // permission bits as stored
  // Owner and group: a folder's from stat, an archive member's as stored
  // (the tree gives archive members the archive file's, see tree/access.h;
  // repack keeps the stored ones, with the names).
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::string uname;  // archives only; "" when not stored
  std::string gname;
  std::string link_target;  // kSymlink: the target as stored
  uint32_t blob = kNoBlob;  // kFile: the source's handle for its bytes
};

class Source {
 public:
  virtual ~Source() = default;

  // "directory", "tar", "tar (gzip)", "file", ... (for messages; decisions
  // use storage()).
  virtual std::string Kind() const = 0;
  virtual Storage storage() const = 0;
  // Where blob `blob` lies, to patch it in place; EROFS naming the source
  // for storage that has no fixed place for its bytes (a compressed tar).
  virtual Result<StoredPlace> PlaceOf(uint32_t blob) const = 0;
  // kCompressedTar: a rewrite of the archive (write/rewrite.h) changed
  // bytes of blob `blob` at `offset`; the copy reads come from (the member
  // extracted into the cache) is given them too. Other storage reads the
  // patched file itself: nothing to do.
  virtual Status PatchExtracted(uint32_t blob, uint64_t offset, std::string_view bytes) {
    (void)blob, (void)offset, (void)bytes;
    return Ok();
  }
  // kPlainTar: the tar's member index; nullptr otherwise.
  virtual const TarIndex* tar_index() const { return nullptr; }
  // kFolder: the folder's O_PATH descriptor, opened with the source; -1
  // otherwise. Writes into the folder resolve beneath it.
  virtual int folder_fd() const { return -1; }
  // The path the source was opened from.
  const std::string& path() const { return path_; }

  // All entries, parents before children, root first.
  const std::vector<Entry>& entries() const { return entries_; }
  // Problems that did not stop the source from opening (hidden members...).
  const std::vector<std::string>& warnings() const { return warnings_; }

  // Plan a read of [offset, offset+length) of a file's blob; the range must
  // lie inside the file (callers clamp). May block to extract a member of a
  // compressed archive into the cache.
  virtual Result<ReadPlan> Plan(uint32_t blob, uint64_t offset, uint64_t length) = 0;

  // Where a blob's bytes lie: `length` bytes at `offset` of descriptor `fd`
  // (the archive, the folder's file, or the extraction cache file). Parsers
  // of nested formats (a torch.save zip inside a .nemo) read through this.
  virtual Result<FileRange> Locate(uint32_t blob) = 0;

  // A reader for parsing a blob's metadata (a torch.save zip's directory and
  // data.pkl). Defaults to the bytes Locate gives; ArchiveSource answers from
  // what it captured in its listing pass and extracts the member only for
  // bytes it did not capture.
  virtual Result<std::shared_ptr<const ByteReader>> MetadataReader(uint32_t blob);

  // Finds an entry by normalised path; nullptr if absent.
  const Entry* Find(std::string_view path) const;
  // Whether `path` is taken in the stored source: shown (Find) or present
  // but hidden (a folder's symlink out of it, to a directory, a socket...).
  // A new file of that name could not be stored.
  bool Taken(std::string_view path) const {
    return Find(path) != nullptr || hidden_.count(std::string(path)) != 0;
  }

  // Reads a whole file entry into memory (configs, small metadata);
  // refuses files larger than `max_bytes`.
  Result<std::string> ReadAll(const Entry& entry, uint64_t max_bytes);

 protected:
  explicit Source(std::string path) : path_(std::move(path)) {}
  // Normalises `raw` (see the path rules above) into entries_ and warnings_.
  void SetEntries(std::vector<Entry> raw, std::vector<std::string> warnings);
  // Paths present in the source but not shown (see Taken).
  void AddHidden(std::string path) { hidden_.insert(std::move(path)); }

 private:
  std::string path_;
  std::vector<Entry> entries_;
  std::vector<std::string> warnings_;
  std::set<std::string> hidden_;
};

struct OpenOptions {
  std::string cache_dir;  // where members of compressed archives are extracted
  uint64_t cache_max = 0;  // cap of that cache in bytes (source/cache.h); 0 = none
};

// Opens `path`: a directory, a plain tar, a compressed tar, or any other
// single file (presented as a one-entry source). Errors name the path.
Result<std::unique_ptr<Source>> OpenSource(const std::string& path, const OpenOptions& options);

// Path normalisation used by every source: strips "./" and duplicate
// slashes; returns false (and leaves out untouched) for paths NeMo refuses
// (absolute, containing "..").
bool NormalizePath(std::string_view raw, std::string* out);

// ".<name>.nemofs-tmp.<pid>": the temp file a folder commit writes beside
// the config before renaming it over (write/config_commit.h). One left by a
// crash is not part of the checkpoint: folder sources skip it.
inline constexpr std::string_view kCommitTempMarker = ".nemofs-tmp.";
inline bool IsCommitTempName(std::string_view base) {
  return !base.empty() && base[0] == '.' && base.find(kCommitTempMarker) != std::string_view::npos;
}

// The rollback journal of an in-place patch (write/journal.h):
// "<file>.nemofs-journal" beside a file source, ".nemofs-journal" inside a
// folder source (which does not show it).
inline constexpr std::string_view kJournalSuffix = ".nemofs-journal";
inline constexpr std::string_view kFolderJournalName = ".nemofs-journal";
// The roll-forward journal of a folder's multi-path commit
// (write/folder_txn.h), finished before any open: not part of the
// checkpoint. Its stage folder is a commit temp (IsCommitTempName).
inline constexpr std::string_view kFolderCommitJournalName = ".nemofs-commit";

}  // namespace nemofs::source
