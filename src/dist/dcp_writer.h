// Structural edits of a PyTorch DCP / Megatron-Core torch_dist checkpoint
// folder (issue 11, scope 5 and 6; FORMATS.md §4.4): a tensor added,
// removed, renamed, or replaced by one of another dtype/shape, committed in
// O(changed bytes):
// 1. the new tensor items (each a torch.save zip, as DCP's FileSystemWriter
//    writes them, torch/tensor_save.h) go back to back into a NEW file
//    `__nemofs_<n>_0.distcp` (n = the first number no file of the folder and
//    no item of .metadata uses), which is fsynced, then the folder;
// 2. a new `.metadata` is written to `..metadata.nemofs-tmp.<pid>` in the
//    same folder, fsynced, and renamed over `.metadata`: that rename is the
//    single commit point; then the folder is fsynced.
// A crash before the rename leaves the old checkpoint as it was plus orphans
// (the new .distcp, the temp: ListDcpOrphans names them, RepackDcp removes
// them); after it, the new one. Superseded items stay in their old .distcp
// files until RepackDcp drops them.
//
// The new .metadata is the parsed pickle graph re-emitted at its own
// protocol (torch/pickle_writer.h; untouched parts byte-identical, a commit
// without edits gives the same bytes), with:
// * Remove(fqn): its state_dict_metadata entry and every storage_data entry
//   whose MetadataIndex.fqn is fqn dropped;
// * Rename(fqn, to): the key and those MetadataIndex.fqn fields changed;
// * SetTensor(fqn, t): a TensorStorageMetadata with one chunk covering the
//   whole shape (offsets 0, sizes = shape), TensorProperties of t's dtype,
//   and storage_data MetadataIndex(fqn, offset=(0, ...), index=0) ->
//   _StorageInfo(new file, offset, length); an existing entry of fqn (tensor
//   or bytes) is replaced and its storage_data entries dropped.
// New objects copy the form of the file's own: the class references (as
// the file spells them: torch 2.2 or 2.3+ module paths, MCoreMetadata roots),
// the dict key strings, the layout and memory-format values of an existing
// tensor entry; a file without a tensor entry gets the torch >= 2.3 paths.
// planner_data ({key: (key,)} flatten mappings) and Megatron's mcore_data
// ({key: {}}) follow the keys: dropped with them, renamed with them, and a
// new key gets (key,) / {} when the file has such a dict. Flattened
// distributed-optimizer tensors (mcore_data nd_reformulated_orig_global_shape)
// are never edited: any edit naming one is refused (EINVAL). Other fields
// (storage_meta, version, all_local_plans, ...) are kept as they are.
//
// Refused with EINVAL, nothing written: an unknown fqn for Remove/Rename,
// a rename onto an existing key, a byte count that is not numel * itemsize
// (the message names the fqn), quantized dtypes. ESTALE when .metadata is
// no longer the file that was loaded.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "dist/dcp.h"
#include "nemofs/result.h"
#include "torch/pickle.h"
#include "torch/torch_repack.h"

namespace nemofs::dist {

inline constexpr char kDcpMetadataName[] = ".metadata";
// The largest .metadata read (EFBIG past it): 1 GiB, far above a million
// chunks' worth.
inline constexpr uint64_t kMaxDcpMetadataBytes = 1ull << 30;
// The commit's temp of .metadata: kDcpMetadataTempPrefix + pid (a folder
// source hides it, write/orphans.h and ListDcpOrphans find it).
inline constexpr char kDcpMetadataTempPrefix[] = "..metadata.nemofs-tmp.";
// Files nemofs writes: kDcpFilePrefix + n + "_0.distcp".
inline constexpr char kDcpFilePrefix[] = "__nemofs_";

struct LoadedDcp {
  torch::Unpickled pickle;
  DcpMetadata md;
  std::string bytes;  // the .metadata file as read
  int protocol = 0;
  // Identity of the .metadata that was read (a commit checks it is unchanged).
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  int64_t mtime_ns = 0;
  mode_t mode = 0644;
  uid_t uid = 0;
  gid_t gid = 0;
};

// Reads and parses `.metadata` of the open folder `dir_fd`; `name` names
// the folder in messages.
Result<LoadedDcp> LoadDcpMetadata(int dir_fd, const std::string& name);

struct DcpEdit {
  enum class Op { kRemove, kRename, kSetTensor };
  Op op = Op::kRemove;
  std::string fqn;
  std::string to;           // kRename
  torch::NewTensor tensor;  // kSetTensor (its fd/bytes must outlive the commit)

  static DcpEdit Remove(std::string fqn);
  static DcpEdit Rename(std::string fqn, std::string to);
  static DcpEdit SetTensor(std::string fqn, torch::NewTensor t);
};

struct DcpCommitResult {
  std::string distcp_file;     // the new .distcp ("" when no tensor was written)
  uint64_t bytes_written = 0;  // of the new .distcp and the new .metadata
  std::vector<std::string> notes;
};

// Applies `edits` in order (a later edit sees the earlier ones) to the
// checkpoint `loaded` was read from and commits them as described above.
Result<DcpCommitResult> CommitDcpEdits(int dir_fd, const std::string& name, const LoadedDcp& loaded,
                                       const std::vector<DcpEdit>& edits);

// The same edits for a checkpoint that is not a folder of its own (a DCP
// folder inside a .nemo archive): the caller stores the new .distcp and
// .metadata, as one commit of its container. PlanDcpEdits applies `edits`
// (refusals as CommitDcpEdits'); then, when has_items(), SetNewFile names the
// new .distcp (FreeDistcpName) and WriteItems writes its items back to back
// into `fd` from `offset` (the file's byte 0); Metadata() is the new
// .metadata after that.
class DcpCommitPlan {
 public:
  ~DcpCommitPlan();
  bool has_items() const;
  void SetNewFile(const std::string& file);
  Result<uint64_t> WriteItems(int fd, uint64_t offset, const std::string& shown);
  Result<std::string> Metadata(const std::string& shown);
  std::vector<std::string>& notes();

 private:
  friend Result<std::unique_ptr<DcpCommitPlan>> PlanDcpEdits(const LoadedDcp&, const std::string&,
                                                             const std::vector<DcpEdit>&);
  DcpCommitPlan();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};
Result<std::unique_ptr<DcpCommitPlan>> PlanDcpEdits(const LoadedDcp& loaded,
                                                    const std::string& name,
                                                    const std::vector<DcpEdit>& edits);
// `.metadata` bytes read from anywhere (an archive member), parsed as
// LoadDcpMetadata parses the file (no identity: dev/ino/mtime are 0).
Result<LoadedDcp> ParseDcpMetadataBytes(std::string bytes, const std::string& what);
// The first `__nemofs_<n>_0.distcp` that neither an item of `loaded` nor
// one of `files` (the folder's file names) uses.
std::string FreeDistcpName(const LoadedDcp& loaded, const std::set<std::string>& files);

// Names (in the folder) of what interrupted commits left: `__nemofs_*.distcp`
// files no item of `loaded` references, and .metadata temps of processes
// that are gone. Sorted.
std::vector<std::string> ListDcpOrphans(int dir_fd, const LoadedDcp& loaded);

// Reclaims dead space: every .distcp file of the folder whose bytes not
// referenced by .metadata ("dead") are >= min_dead_bytes (and > 0) has its
// live items copied, in file order, into a fresh `__nemofs_<n>_0.distcp`
// (fsynced), the new .metadata (items pointing there) is committed as
// above, then those files and the orphans are unlinked. Returns the bytes
// freed (sizes unlinked minus the new file's). A crash at any point leaves
// a loadable checkpoint (old or new) plus orphans the next repack removes.
Result<uint64_t> RepackDcp(int dir_fd, const std::string& name, uint64_t min_dead_bytes);

}  // namespace nemofs::dist
