// Merging per-rank (legacy, non-distributed) tensor-parallel / pipeline-
// parallel shards into global tensors (FORMATS.md §6).
//
// Rules: PP stages hold consecutive layers with local indices restarting at
// 0, so layer i of stage p is global layer p * (num_layers / pp) + i
// (uniform split only). TP shards are concatenated along the parameter's
// split axis: dim 0 for column-parallel weights (word_embeddings, linear_qkv,
// linear_fc1, output_layer and their legacy names), dim 1 for row-parallel
// ones (linear_proj, linear_fc2, dense, dense_4h_to_h); norms, position
// embeddings and row-parallel biases are replicated (rank 0's copy is used).
// Gated MLPs (activation swiglu / fast-swiglu, or Megatron-LM --swiglu)
// store [gate_r; up_r] per rank: the global fc1 is [gate_0..gate_n-1;
// up_0..up_n-1]. QKV keeps Megatron's group-interleaved row order, which
// plain concatenation yields.
//
// Anything that cannot be merged with certainty (unknown parameter names
// with TP > 1, _extra_state, missing ranks, mismatched shapes, non-uniform
// PP, non-contiguous shards) is left out of the merged set, with the reason.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "checkpoint/tensor.h"
#include "nemofs/result.h"

namespace nemofs::checkpoint {

struct RankTensor {
  int tp = 0;
  int pp = 0;
  Tensor tensor;  // as stored by that rank: key = the rank's own key
};

struct MergeConfig {
  int tp_size = 1;
  int pp_size = 1;
  int64_t num_layers = 0;  // 0 = unknown
  bool gated_mlp = false;
};

struct MergeResult {
  std::vector<Tensor> merged;                   // global keys, global shapes
  std::map<std::string, std::string> unmerged;  // global (or stored) key -> why
};

MergeResult MergeRanks(const std::vector<RankTensor>& shards, const MergeConfig& config);

// The way back (issue 11, structural writes of per-rank checkpoints): where
// the bytes of global tensor `key` (of `shape`) go, by the rules above. One
// slice per rank file that holds it: the PP stage of its layer (a key
// without a layer index: each of `stages`, the stages that hold it now, or
// every stage for a new key when `stages` is empty), times every TP rank.
// A slice's C-order bytes are, in order, the given ranges of global dim
// `dim` (every index of the other dims): one range for a TP shard, two for
// the halves of a gated fc1, the whole dim for a replicated tensor.
// EINVAL with the reason when the rules cannot place it: a split dim that
// TP does not divide (twice TP for a gated fc1), a name without a known TP
// split while TP > 1 (reads could not merge it back), per-rank
// _extra_state, a layer index past num_layers or num_layers unknown.
struct RankSlice {
  int tp = 0;
  int pp = 0;
  std::string key;             // the rank's own key
  std::vector<int64_t> shape;  // the rank's shape
  size_t dim = 0;
  std::vector<std::pair<int64_t, int64_t>> ranges;  // [begin, end) of global dim `dim`
};
Result<std::vector<RankSlice>> SplitForRanks(const std::string& key,
                                             const std::vector<int64_t>& shape,
                                             const MergeConfig& config,
                                             const std::vector<int>& stages);

// The rank's key of global `key` (PP renumbering undone) and its stage;
// the key itself and stage -1 when it has no layer index (or PP is 1).
// EINVAL when the layer cannot be placed.
Result<std::pair<std::string, int>> RankKeyOf(const std::string& key, const MergeConfig& config);

}  // namespace nemofs::checkpoint
