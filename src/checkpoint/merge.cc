#include "checkpoint/merge.h"

#include <algorithm>
#include <cctype>

namespace nemofs::checkpoint {
namespace {

enum class Split { kReplicated, kDim0, kDim1, kUnknown, kPerRank };

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

Split SplitOf(std::string_view key) {
  if (key.find("_extra_state") != std::string_view::npos) return Split::kPerRank;
  static constexpr std::string_view kDim0[] = {
      "word_embeddings.weight", "linear_qkv.weight",    "linear_qkv.bias",
      "linear_fc1.weight",      "linear_fc1.bias",      "output_layer.weight",
      "query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight",
      "dense_h_to_4h.bias",     "linear_q.weight",      "linear_kv.weight"};
  static constexpr std::string_view kDim1[] = {"linear_proj.weight", "linear_fc2.weight",
                                               "self_attention.dense.weight",
                                               "dense_4h_to_h.weight"};
  static constexpr std::string_view kReplicated[] = {"layer_norm_weight",
                                                     "layer_norm_bias",
                                                     "final_layernorm.weight",
                                                     "final_layernorm.bias",
                                                     "position_embeddings.weight",
                                                     "input_layernorm.weight",
                                                     "input_layernorm.bias",
                                                     "post_attention_layernorm.weight",
                                                     "post_attention_layernorm.bias",
                                                     "linear_proj.bias",
                                                     "linear_fc2.bias",
                                                     "self_attention.dense.bias",
                                                     "dense_4h_to_h.bias",
                                                     "q_layernorm.weight",
                                                     "k_layernorm.weight",
                                                     "pre_mlp_layernorm.weight",
                                                     "pre_mlp_layernorm.bias"};
  for (auto s : kDim0) {
    if (EndsWith(key, s)) return Split::kDim0;
  }
  for (auto s : kDim1) {
    if (EndsWith(key, s)) return Split::kDim1;
  }
  for (auto s : kReplicated) {
    if (EndsWith(key, s)) return Split::kReplicated;
  }
  return Split::kUnknown;
}

bool IsGatedFc1(std::string_view key) {
  return EndsWith(key, "linear_fc1.weight") || EndsWith(key, "linear_fc1.bias") ||
         EndsWith(key, "dense_h_to_4h.weight") || EndsWith(key, "dense_h_to_4h.bias");
}

// "…layers.<n>.…" -> position of n and its value; npos if none.
size_t LayerIndex(const std::string& key, int64_t* value, size_t* len) {
  for (size_t pos = key.find("layers."); pos != std::string::npos;
       pos = key.find("layers.", pos + 1)) {
    if (pos > 0 && key[pos - 1] != '.') continue;
    size_t start = pos + 7;
    size_t end = start;
    while (end < key.size() && std::isdigit(static_cast<unsigned char>(key[end]))) ++end;
    if (end == start || end - start > 9 || (end < key.size() && key[end] != '.')) continue;
    *value = std::stoll(key.substr(start, end - start));
    *len = end - start;
    return start;
  }
  return std::string::npos;
}

bool SingleContiguousChunk(const Tensor& t) {
  return t.chunks.size() == 1 && t.chunks[0].strides.empty() && t.chunks[0].blob != source::kNoBlob;
}

uint64_t RowBytes(const Tensor& t, size_t dim) {
  uint64_t n = torch::Info(t.dtype).itemsize;
  for (size_t d = dim + 1; d < t.shape.size(); ++d) n *= static_cast<uint64_t>(t.shape[d]);
  return n;
}

}  // namespace

MergeResult MergeRanks(const std::vector<RankTensor>& shards, const MergeConfig& cfg) {
  MergeResult out;
  // 1. Global keys (PP renumbering).
  struct Placed {
    const RankTensor* shard;
    std::string key;
  };
  std::map<std::string, std::vector<Placed>> groups;
  const int64_t per_stage = cfg.pp_size > 0 ? cfg.num_layers / cfg.pp_size : 0;
  for (const auto& s : shards) {
    std::string key = s.tensor.key;
    int64_t layer = 0;
    size_t len = 0;
    size_t at = LayerIndex(key, &layer, &len);
    if (at != std::string::npos && cfg.pp_size > 1) {
      if (cfg.num_layers <= 0 || cfg.num_layers % cfg.pp_size != 0 || layer >= per_stage) {
        out.unmerged[fmt::format("tp{}_pp{}/{}", s.tp, s.pp, key)] = fmt::format(
            "cannot place layer {} of PP stage {}: num_layers {} is unknown or not split evenly "
            "over {} stages",
            layer, s.pp, cfg.num_layers, cfg.pp_size);
        continue;
      }
      key = key.substr(0, at) + std::to_string(s.pp * per_stage + layer) + key.substr(at + len);
    }
    groups[key].push_back({&s, key});
  }

  // 2. TP merge per global key, from the first PP stage that holds it.
  for (auto& group : groups) {
    const std::string& key = group.first;  // (not a structured binding: lambdas capture it)
    const std::vector<Placed>& placed = group.second;
    int stage = INT32_MAX;
    for (const auto& p : placed) stage = std::min(stage, p.shard->pp);
    std::vector<const Tensor*> by_tp(cfg.tp_size, nullptr);
    bool duplicate = false;
    for (const auto& p : placed) {
      if (p.shard->pp != stage) continue;
      if (p.shard->tp < 0 || p.shard->tp >= cfg.tp_size) continue;
      if (by_tp[p.shard->tp]) duplicate = true;
      by_tp[p.shard->tp] = &p.shard->tensor;
    }
    auto refuse = [&](std::string why) { out.unmerged[key] = std::move(why); };
    if (duplicate) {
      refuse("two shards claim the same TP rank");
      continue;
    }
    auto missing = std::find(by_tp.begin(), by_tp.end(), nullptr);
    if (missing != by_tp.end()) {
      refuse(fmt::format("TP rank {} has no shard of it", missing - by_tp.begin()));
      continue;
    }
    const Tensor& first = *by_tp[0];
    if (cfg.tp_size == 1) {
      Tensor t = first;
      t.key = key;
      out.merged.push_back(std::move(t));
      continue;
    }
    Split split = SplitOf(key);
    if (split == Split::kPerRank) {
      refuse("per-rank state (Transformer Engine _extra_state): not mergeable");
      continue;
    }
    if (split == Split::kUnknown) {
      refuse("no known tensor-parallel split for this parameter name");
      continue;
    }
    bool consistent = true;
    for (const Tensor* t : by_tp) {
      consistent &= t->dtype == first.dtype && t->shape.size() == first.shape.size();
    }
    if (!consistent) {
      refuse("shards differ in dtype or number of dimensions");
      continue;
    }
    if (split == Split::kReplicated) {
      bool same = std::all_of(by_tp.begin(), by_tp.end(),
                              [&](const Tensor* t) { return t->shape == first.shape; });
      if (!same) {
        refuse("replicated parameter with different shapes on different ranks");
        continue;
      }
      Tensor t = first;
      t.key = key;
      out.merged.push_back(std::move(t));
      continue;
    }
    size_t dim = split == Split::kDim0 ? 0 : 1;
    if (first.shape.size() <= dim) {
      refuse(fmt::format("split along dim {} but the shard has {} dims", dim, first.shape.size()));
      continue;
    }
    bool ok = true;
    for (const Tensor* t : by_tp) {
      ok &= SingleContiguousChunk(*t);
      for (size_t d = 0; d < first.shape.size(); ++d) {
        if (d != dim && t->shape[d] != first.shape[d]) ok = false;
      }
    }
    if (!ok) {
      refuse("shards are non-contiguous or their non-split dimensions differ");
      continue;
    }
    Tensor merged;
    merged.key = key;
    merged.dtype = first.dtype;
    merged.shape = first.shape;
    merged.shape[dim] = 0;
    for (const Tensor* t : by_tp) merged.shape[dim] += t->shape[dim];
    const bool gated = cfg.gated_mlp && dim == 0 && IsGatedFc1(key);
    if (gated && std::any_of(by_tp.begin(), by_tp.end(),
                             [](const Tensor* t) { return t->shape[0] % 2 != 0; })) {
      refuse("gated MLP shard with an odd number of rows");
      continue;
    }
    int64_t at = 0;
    int64_t up_base = merged.shape[0] / 2;
    int64_t up_at = 0;
    for (const Tensor* t : by_tp) {
      Chunk c = t->chunks[0];
      c.offsets.assign(first.shape.size(), 0);
      c.sizes = t->shape;
      if (gated) {
        int64_t half = t->shape[0] / 2;
        Chunk gate = c;
        gate.sizes[0] = half;
        gate.offsets[0] = at;
        Chunk up = c;
        up.sizes[0] = half;
        up.offsets[0] = up_base + up_at;
        up.byte_offset += static_cast<uint64_t>(half) * RowBytes(*t, 0);
        merged.chunks.push_back(std::move(gate));
        merged.chunks.push_back(std::move(up));
        at += half;
        up_at += half;
      } else {
        c.offsets[dim] = at;
        at += t->shape[dim];
        merged.chunks.push_back(std::move(c));
      }
    }
    if (auto st = ValidateChunks(merged); !st.ok()) {
      refuse(st.error().message());
      continue;
    }
    out.merged.push_back(std::move(merged));
  }
  return out;
}

Result<std::pair<std::string, int>> RankKeyOf(const std::string& key, const MergeConfig& cfg) {
  int64_t layer = 0;
  size_t len = 0;
  const size_t at = LayerIndex(key, &layer, &len);
  if (at == std::string::npos || cfg.pp_size <= 1) return std::make_pair(key, -1);
  if (cfg.num_layers <= 0 || cfg.num_layers % cfg.pp_size != 0) {
    return Err(EINVAL, "{}: num_layers ({}) is unknown or not split evenly over {} pipeline "
               "stages, so the stage of layer {} is unknown",
               key, cfg.num_layers, cfg.pp_size, layer);
  }
  if (layer >= cfg.num_layers) {
    return Err(EINVAL, "{}: layer {} is past num_layers {} of the config", key, layer,
               cfg.num_layers);
  }
  const int64_t per_stage = cfg.num_layers / cfg.pp_size;
  return std::make_pair(key.substr(0, at) + std::to_string(layer % per_stage) + key.substr(at + len),
                        static_cast<int>(layer / per_stage));
}

Result<std::vector<RankSlice>> SplitForRanks(const std::string& key,
                                             const std::vector<int64_t>& shape,
                                             const MergeConfig& cfg,
                                             const std::vector<int>& stages) {
  NEMOFS_ASSIGN_OR_RETURN(auto placed, RankKeyOf(key, cfg));
  std::vector<int> pps;
  if (placed.second >= 0) {
    pps.push_back(placed.second);
  } else if (!stages.empty()) {
    pps = stages;
  } else {
    for (int p = 0; p < std::max(1, cfg.pp_size); ++p) pps.push_back(p);
  }
  // The TP rule of the name.
  const int tp = std::max(1, cfg.tp_size);
  size_t dim = 0;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> by_tp(tp);
  std::vector<int64_t> local = shape;
  const int64_t whole = shape.empty() ? 1 : shape[0];
  if (tp == 1) {
    by_tp[0] = {{0, whole}};
  } else {
    const Split split = SplitOf(key);
    if (split == Split::kPerRank) {
      return Err(EINVAL, "{}: per-rank state (_extra_state) cannot be written as one tensor", key);
    }
    if (split == Split::kUnknown) {
      return Err(EINVAL, "{}: with tensor parallelism {} a tensor needs a name whose split is "
                 "known (a column-parallel *.linear_qkv/linear_fc1/word_embeddings/"
                 "output_layer weight, a row-parallel *.linear_proj/linear_fc2 weight, or a "
                 "replicated norm or bias; see README \"Per-rank checkpoints\"): reads could "
                 "not merge it back",
                 key, tp);
    }
    if (split == Split::kReplicated) {
      for (auto& r : by_tp) r = {{0, whole}};
    } else {
      dim = split == Split::kDim0 ? 0 : 1;
      if (shape.size() <= dim) {
        return Err(EINVAL, "{}: split along dim {} over {} TP ranks, but it has {} dims", key, dim,
                   tp, shape.size());
      }
      const bool gated = cfg.gated_mlp && dim == 0 && IsGatedFc1(key);
      const int64_t parts = gated ? 2 * tp : tp;
      if (shape[dim] % parts != 0) {
        return Err(EINVAL, "{}: dim {} ({}) cannot be split evenly over {} TP ranks{}", key, dim,
                   shape[dim], tp, gated ? " as gate and up halves (SwiGLU)" : "");
      }
      const int64_t n = shape[dim] / parts;
      local[dim] = gated ? 2 * n : n;
      for (int r = 0; r < tp; ++r) {
        by_tp[r] = {{r * n, (r + 1) * n}};
        if (gated) by_tp[r].push_back({shape[0] / 2 + r * n, shape[0] / 2 + (r + 1) * n});
      }
    }
  }
  std::vector<RankSlice> out;
  for (int p : pps) {
    for (int r = 0; r < tp; ++r) {
      RankSlice s;
      s.tp = r;
      s.pp = p;
      s.key = placed.first;
      s.shape = local;
      s.dim = dim;
      s.ranges = by_tp[r];
      out.push_back(std::move(s));
    }
  }
  return out;
}

}  // namespace nemofs::checkpoint
