// Recognition of what a source holds (FORMATS.md §0, DESIGN.md §1) and the
// pieces of the unified tree that come from the layout: the config file and
// the tokenizer files it refers to (FORMATS.md §1.2, §2.1).
//
// Rules, in order, for a directory or a tar (the same rules for both, so an
// extracted .nemo and the .nemo itself are recognised alike):
//   model_config.yaml at the root          NeMo 1 .nemo (or its extracted folder)
//   context/ with io.json or model.yaml    NeMo 2 (2.1+ when weights/ exists, else 2.0)
//   latest_checkpointed_iteration.txt      Megatron-LM checkpoint root
//   metadata.json                          Megatron-Core dist checkpoint (torch_dist | zarr)
//   .metadata                              PyTorch DCP folder
//   mp_rank_XX*/model_optim_rng.pt         Megatron-LM iteration folder (per-rank torch)
// and for a single file: zip magic -> torch.save; legacy pickle magic ->
// legacy torch.save. Anything else is an error naming the file.
#pragma once

#include <string>
#include <vector>

#include "nemofs/result.h"
#include "source/source.h"

namespace nemofs::checkpoint {

enum class Format {
  kNemo,            // .nemo tar (plain or compressed)
  kNemoFolder,      // extracted .nemo
  kNemo2,           // NeMo 2 checkpoint folder
  kMcoreDist,       // Megatron-Core distributed checkpoint (metadata.json)
  kDcp,             // plain PyTorch DCP (.metadata + .distcp)
  kMegatronLmRoot,  // Megatron-LM save dir with latest_checkpointed_iteration.txt
  kMegatronLmIter,  // one Megatron-LM iteration folder (per-rank torch files)
  kTorchSave,       // torch.save zip (.pt, .ckpt, model_weights.ckpt)
  kTorchSaveLegacy  // pre-1.6 torch.save pickle stream
};

// Stable identifier ("nemo", "nemo2", ...) used in index.json and info --json.
const char* FormatId(Format format);

struct TokenizerFile {
  std::string name;        // path under tokenizer/
  std::string entry_path;  // normalised path in the source
  std::string reference;   // the config value or layout rule that named it
};

// A torch.save file holding weights; per-rank files carry their ranks.
struct WeightFile {
  std::string path;  // entry path in the source
  int tp = 0;
  int pp = 0;
};

struct Layout {
  Format format = Format::kNemo;
  std::string description;  // human-readable, e.g. "NeMo 1 .nemo, tar (PAX)"
  std::string config_path;  // entry path of the model config, "" if none
  std::vector<TokenizerFile> tokenizer;
  std::string weights;                   // where weights live, human-readable
  std::vector<WeightFile> weight_files;  // torch.save weight files (not dist checkpoints)
  bool per_rank = false;                 // weight_files are TP/PP shards to merge
  // A distributed checkpoint: its folder in the source ("" = root) and
  // backend ("torch_dist", "zarr", or "dcp" for a plain PyTorch DCP folder).
  std::string dist_dir;
  std::string dist_backend;
  std::string cache_dir;  // where decoded chunks go (set by the caller, not by Recognize)
  std::vector<std::string> warnings;
};

Result<Layout> Recognize(source::Source& src);

// "3f2a…9c_tokenizer.model" -> "tokenizer.model" (NeMo's artifact prefix:
// exactly 32 lowercase hex digits and '_'); other names unchanged.
std::string StripArtifactPrefix(const std::string& name);

}  // namespace nemofs::checkpoint
