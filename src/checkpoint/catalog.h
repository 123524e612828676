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
#include <string>
#include <vector>

#include "checkpoint/layout.h"
#include "checkpoint/tensor.h"
#include "nemofs/result.h"
#include "source/source.h"

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
};

// Reads the weight files the layout names (metadata only) and builds the
// catalog. A weight file that cannot be read is a warning, not a failure:
// the rest of the checkpoint still mounts.
Catalog BuildCatalog(source::Source& src, const Layout& layout);

// File name of a key: '/' -> "%2F", '%' -> "%25" (DESIGN.md §2); the keys
// "", "." and ".." become "%00", "%2E" and "%2E%2E".
std::string EscapeKey(std::string_view key);

}  // namespace nemofs::checkpoint
