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

}  // namespace nemofs::checkpoint
