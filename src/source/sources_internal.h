// Concrete sources; created by OpenSource (open_source.cc).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "source/cache.h"
#include "source/source.h"
#include "source/tar_index.h"
#include "util/fd.h"

namespace nemofs::source {

// A lazily opened descriptor per blob, shared by all readers without a lock.
class LazyFds {
 public:
  explicit LazyFds(size_t n) : fds_(n) {
    for (auto& fd : fds_) fd.store(-1);
  }
  ~LazyFds();
  // Returns the descriptor for slot `i`, opening it with `open` on first use.
  template <typename Open>
  Result<int> Get(size_t i, Open&& open) {
    int fd = Peek(i);
    if (fd >= 0) return fd;
    NEMOFS_ASSIGN_OR_RETURN(UniqueFd fresh, open());
    return Install(i, std::move(fresh));
  }
  // Installs an already open descriptor (takes ownership).
  int Install(size_t i, UniqueFd fd);
  int Peek(size_t i) const { return fds_[i].load(std::memory_order_acquire); }

 private:
  std::vector<std::atomic<int>> fds_;
};

// A directory tree (NeMo 2 folders, dist checkpoints, extracted .nemo).
// Symbolic links to files inside the folder are followed; links that
// resolve outside it are hidden (with a warning), and so are links to
// directories (so the walk can never loop). Files are opened relative to
// the folder with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS): a link
// swapped in after the listing still cannot lead outside the folder.
class DirectorySource final : public Source {
 public:
  static Result<std::unique_ptr<Source>> Open(const std::string& path);
  std::string Kind() const override { return "directory"; }
  Storage storage() const override { return Storage::kFolder; }
  Result<StoredPlace> PlaceOf(uint32_t blob) const override;
  Result<ReadPlan> Plan(uint32_t blob, uint64_t offset, uint64_t length) override;
  Result<FileRange> Locate(uint32_t blob) override;
  // The folder's O_PATH descriptor, opened with the source: writes into the
  // folder resolve beneath it (util/atomic_replace.h OpenFolderBeneath).
  int folder_fd() const override { return root_fd_.get(); }

 private:
  explicit DirectorySource(std::string path) : Source(std::move(path)) {}
  Result<UniqueFd> OpenBeneath(const std::string& rel) const;
  UniqueFd root_fd_;                // O_PATH descriptor of the folder
  std::vector<std::string> files_;  // path relative to the folder, per blob
  std::vector<uint64_t> sizes_;     // size per blob at open
  std::unique_ptr<LazyFds> fds_;
};

// An uncompressed tar: members are byte ranges of the one archive descriptor.
class TarSource final : public Source {
 public:
  static Result<std::unique_ptr<Source>> Open(const std::string& path, UniqueFd fd, uint64_t size);
  std::string Kind() const override;
  Storage storage() const override { return Storage::kPlainTar; }
  Result<StoredPlace> PlaceOf(uint32_t blob) const override;
  Result<ReadPlan> Plan(uint32_t blob, uint64_t offset, uint64_t length) override;
  Result<FileRange> Locate(uint32_t blob) override;
  const TarIndex* tar_index() const override { return &index_; }

 private:
  explicit TarSource(std::string path) : Source(std::move(path)) {}
  UniqueFd fd_;
  TarIndex index_;
  std::vector<uint32_t> blob_member_;  // blob -> index_.members
};

// A compressed tar read through libarchive. Listing is one decompression
// pass; small YAML/JSON members are kept in memory from that pass, every
// other member is extracted into the cache directory when first read.
class ArchiveSource final : public Source {
 public:
  static Result<std::unique_ptr<Source>> Open(const std::string& path, const std::string& filter,
                                              const struct stat& st, const std::string& cache_dir,
                                              uint64_t cache_max);
  std::string Kind() const override { return "tar (" + filter_ + ")"; }
  Storage storage() const override { return Storage::kCompressedTar; }
  Result<StoredPlace> PlaceOf(uint32_t blob) const override;
  Status PatchExtracted(uint32_t blob, uint64_t offset, std::string_view bytes) override;
  Result<ReadPlan> Plan(uint32_t blob, uint64_t offset, uint64_t length) override;
  Result<FileRange> Locate(uint32_t blob) override;
  Result<std::shared_ptr<const ByteReader>> MetadataReader(uint32_t blob) override;
  // True when the listing came from the index cached by an earlier open.
  bool index_from_cache() const { return index_from_cache_; }

 private:
  struct Blob {
    uint64_t ordinal = 0;  // position of the member's header in the archive
    uint64_t size = 0;
    std::shared_ptr<const std::string> data;  // kept from the listing pass
    // For zip members (torch.save files): the head, the tail and every local
    // header seen in the listing pass, enough to read the zip's directory
    // and data.pkl without extracting the member.
    std::shared_ptr<const SparseReader> captured;
  };
  explicit ArchiveSource(std::string path) : Source(std::move(path)) {}
  Result<int> Extract(uint32_t blob);
  // The listing (entries, blobs, captured metadata) saved in the cache
  // directory, so that a remount skips the decompression pass.
  bool LoadIndex(std::vector<Entry>* raw, std::vector<std::string>* warnings);
  void SaveIndex(const std::vector<Entry>& raw, const std::vector<std::string>& warnings) const;
  bool index_from_cache_ = false;
  // Removes superseded and vanished entries, then evicts down to the cap.
  void Sweep() const;

  std::string filter_;
  std::string cache_root_;  // the user's cache dir
  uint64_t cache_max_ = 0;  // its cap (0: none)
  std::string cache_dir_;   // per-source directory under the user's cache dir
  CacheEntry entry_;        // holds cache_dir_ in use (invalid if it could not be made); set in
                            // Open, then only Touch()ed (futimens: safe from any thread)
  std::vector<Blob> blobs_;
  // PatchExtracted: a writable descriptor of each extracted copy patched
  // (by its read-only descriptor), opened once, not per region.
  std::mutex patch_fds_mu_;
  std::map<int, UniqueFd> patch_fds_;
  // blob -> an entry showing it (its index in entries()), for PlaceOf's
  // member name; made once after the listing.
  std::vector<size_t> blob_entry_;
  void IndexBlobEntries();
  std::unique_ptr<LazyFds> fds_;
  std::mutex extract_mutex_;  // guards extraction; taken only on a cache miss
};

// Any other single file (torch.save, legacy pickle): one entry, its basename.
class FileSource final : public Source {
 public:
  static Result<std::unique_ptr<Source>> Open(const std::string& path, UniqueFd fd,
                                              const struct stat& st);
  std::string Kind() const override { return "file"; }
  Storage storage() const override { return Storage::kFile; }
  Result<StoredPlace> PlaceOf(uint32_t blob) const override;
  Result<ReadPlan> Plan(uint32_t blob, uint64_t offset, uint64_t length) override;
  Result<FileRange> Locate(uint32_t blob) override;

 private:
  explicit FileSource(std::string path) : Source(std::move(path)) {}
  UniqueFd fd_;
  uint64_t size_ = 0;
};

}  // namespace nemofs::source
