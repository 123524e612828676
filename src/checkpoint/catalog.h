// The tensor catalog of a checkpoint (DESIGN.md §2, FORMATS.md §1.5, §2.2,
// §5, §6): which tensors the tree shows, where their bytes are, and the
// non-tensor state rendered as JSON.
//
//   tensors/    model weights: the state dict of model_weights.ckpt,
//               Lightning's `state_dict`, Megatron-LM's `model`; for any
//               other torch.save file every tensor, by its dotted path.
//               Per-rank checkpoints: the merged global tensors.
//   optimizer/  Lightning `optimizer_states`, Megatron-LM `optimizer` (of
//               unsharded files), by dotted path ("0.state.12.exp_avg").
//   ranks/      per-rank tensors exactly as stored (per-rank checkpoints).
//   checkpoint.json  every non-tensor object as JSON; tensors replaced by
//               {"tensor": "<path in the tree>"}.
// Tensors other than model/optimizer state (RNG states, ...) go to tensors/
// under their full dotted path.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/layout.h"
#include "checkpoint/merge.h"
#include "checkpoint/tensor.h"
#include "nemofs/result.h"
#include "source/source.h"
#include "torch/torch_file.h"

namespace nemofs::checkpoint {

struct RankDir {
  std::string name;  // "tp0_pp1"
  std::vector<Tensor> tensors;
};

struct Catalog {
  std::vector<Tensor> tensors;
  std::vector<Tensor> optimizer;
  std::vector<RankDir> ranks;
  std::map<std::string, std::string> unmerged;  // key -> why it is only in ranks/
  std::map<std::string, std::string> bad;       // key -> why it is not shown at all
  std::string checkpoint_json;                  // "" when there is no torch.save state
  std::vector<std::string> errors;              // weight files that could not be read at all
  std::vector<std::string> warnings;
  // Per-rank checkpoints whose tensors/ was merged: the rules it was merged
  // by (structural writes split changes back by the same ones).
  std::optional<MergeConfig> merge;
};

// Reads the weight files the layout names (metadata only) and builds the
// catalog. A weight file that cannot be read is a warning, not a failure:
// the rest of the checkpoint still mounts.
Catalog BuildCatalog(source::Source& src, const Layout& layout);

// Where tensor `key` of tensors/ (or, with `optimizer`, of optimizer/) is
// in the pickle of a single torch.save weight file, by the catalog's own
// key rules: the dict holding it, the entry's key and the tree key's part
// before that entry's (its `prefix`: "" for a flat state dict). For a key
// the file does not have: the dict a new tensor goes into (`key` and
// `value` null). EINVAL naming `name` where there is none (a tensor in a
// list, a file whose top level is not a dict, a new optimizer tensor).
struct TensorPlace {
  const torch::Value* dict = nullptr;
  const torch::Value* key = nullptr;
  const torch::Value* value = nullptr;
  std::string prefix;
};
Result<TensorPlace> LocateTensorKey(const torch::TorchFile& file, bool optimizer,
                                    std::string_view key, const std::string& name);

// File name of a key: '/' -> "%2F", '%' -> "%25" (DESIGN.md §2); the keys
// "", "." and ".." become "%00", "%2E" and "%2E%2E".
std::string EscapeKey(std::string_view key);
// The key of a file name: EscapeKey undone ("%2F" -> '/', "%25" -> '%',
// "%00" -> "", "%2E" -> "."); other text unchanged.
std::string UnescapeKey(std::string_view name);

}  // namespace nemofs::checkpoint
