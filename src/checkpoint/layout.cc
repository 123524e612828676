#include "checkpoint/layout.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "nemofs/strings.h"

namespace nemofs::checkpoint {
namespace {

using source::Entry;
using source::EntryType;
using source::Source;

constexpr uint64_t kMaxConfigBytes = 64 << 20;

const char kLegacyTorchMagic[] = "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";

bool IsDir(const Source& src, std::string_view path) {
  const Entry* e = src.Find(path);
  return e && e->type == EntryType::kDirectory;
}
bool IsFile(const Source& src, std::string_view path) {
  const Entry* e = src.Find(path);
  return e && e->type == EntryType::kFile;
}

// Direct children names of `dir`.
std::vector<std::string> Children(const Source& src, const std::string& dir) {
  std::vector<std::string> out;
  std::string prefix = dir.empty() ? "" : dir + "/";
  for (const auto& e : src.entries()) {
    if (e.path.empty() || e.path.compare(0, prefix.size(), prefix) != 0) continue;
    std::string rest = e.path.substr(prefix.size());
    if (!rest.empty() && rest.find('/') == std::string::npos) out.push_back(rest);
  }
  return out;
}

// Every file under `dir` (recursively), as paths relative to `dir`.
std::vector<std::string> FilesUnder(const Source& src, const std::string& dir) {
  std::vector<std::string> out;
  std::string prefix = dir + "/";
  for (const auto& e : src.entries()) {
    if (e.type == EntryType::kFile && e.path.compare(0, prefix.size(), prefix) == 0) {
      out.push_back(e.path.substr(prefix.size()));
    }
  }
  return out;
}

void AddTokenizerFile(Layout* layout, std::string name, std::string entry_path,
                      std::string reference) {
  for (const auto& t : layout->tokenizer) {
    if (t.entry_path == entry_path) return;  // referenced twice
  }
  for (const auto& t : layout->tokenizer) {
    if (t.name == name) {
      name = entry_path;  // two artifacts with one basename: keep the stored name
      break;
    }
  }
  layout->tokenizer.push_back({std::move(name), std::move(entry_path), std::move(reference)});
}

// Adds the artifact stored at `member` (a file or a directory) under `name`.
void AddArtifact(const Source& src, Layout* layout, const std::string& member,
                 const std::string& name, const std::string& reference) {
  if (IsFile(src, member)) {
    AddTokenizerFile(layout, name, member, reference);
  } else if (IsDir(src, member)) {
    for (const auto& rel : FilesUnder(src, member)) {
      AddTokenizerFile(layout, name + "/" + rel, member + "/" + rel, reference);
    }
  }
}

// NeMo 1: every string in the config's tokenizer section that names an
// archive member, as NeMo's register_artifact resolves it.
void ResolveNemoTokenizer(Source& src, Layout* layout, const std::string& base) {
  const Entry* config = src.Find(layout->config_path);
  auto text = src.ReadAll(*config, kMaxConfigBytes);
  if (!text) {
    layout->warnings.push_back(text.error().message());
    return;
  }
  YAML::Node root;
  try {
    root = YAML::Load(*text);
  } catch (const YAML::Exception& e) {
    layout->warnings.push_back(fmt::format("{} does not parse as YAML (line {}, column {}): {}",
                                           layout->config_path, e.mark.line + 1, e.mark.column + 1,
                                           e.msg));
    return;
  }
  if (!root.IsMap()) return;
  if (root["model"] && root["model"].IsMap()) root = root["model"];
  YAML::Node tokenizer = root["tokenizer"];
  if (!tokenizer || !tokenizer.IsMap()) return;

  std::vector<std::pair<std::string, std::string>> refs;  // (key path, value)
  std::function<void(const YAML::Node&, const std::string&)> walk = [&](const YAML::Node& node,
                                                                        const std::string& key) {
    if (node.IsScalar()) {
      refs.emplace_back(key, node.Scalar());
    } else if (node.IsMap()) {
      for (const auto& kv : node) walk(kv.second, key + "." + kv.first.as<std::string>(""));
    } else if (node.IsSequence()) {
      for (size_t i = 0; i < node.size(); ++i) walk(node[i], fmt::format("{}.{}", key, i));
    }
  };
  walk(tokenizer, "tokenizer");
  for (const auto& [key, value] : refs) {
    std::string reference = fmt::format("{}: {}", key, value);
    if (value.rfind("nemo:", 0) == 0) {
      std::string member;
      if (!source::NormalizePath(value.substr(5), &member) || member.empty()) continue;
      member = JoinPath(base, member);
      if (!src.Find(member)) {
        layout->warnings.push_back(
            fmt::format("config {} names a file that is not in the checkpoint", reference));
        continue;
      }
      auto slash = member.rfind('/');
      AddArtifact(
          src, layout, member,
          StripArtifactPrefix(slash == std::string::npos ? member : member.substr(slash + 1)),
          reference);
    } else if (value.find('/') != std::string::npos || value.find('.') != std::string::npos) {
      // NeMo's backward-compatibility branch: a plain path whose basename
      // exists in the extraction directory.
      auto slash = value.rfind('/');
      std::string basename = slash == std::string::npos ? value : value.substr(slash + 1);
      if (basename.empty()) continue;
      std::string member = JoinPath(base, basename);
      if (src.Find(member)) {
        AddArtifact(src, layout, member, StripArtifactPrefix(basename), reference);
      }
    }
  }
}

// "mp_rank_07" -> tp 7, pp 0; "tp_rank_01_pp_rank_002" -> tp 1, pp 2.
bool ParseRankDir(std::string_view name, int* tp, int* pp) {
  auto digits = [](std::string_view s, size_t n, int* out) {
    if (s.size() != n || !std::all_of(s.begin(), s.end(), ::isdigit)) return false;
    *out = std::stoi(std::string(s));
    return true;
  };
  if (name.rfind("mp_rank_", 0) == 0) {
    *pp = 0;
    return digits(name.substr(8), 2, tp);
  }
  if (name.rfind("tp_rank_", 0) == 0 && name.size() == 22 && name.substr(10, 9) == "_pp_rank_") {
    return digits(name.substr(8, 2), 2, tp) && digits(name.substr(19), 3, pp);
  }
  return false;
}

// Megatron-LM: mp_rank_XX, mp_rank_XX_YYY, mp_rank_XX_YYY_ZZZ (FORMATS.md §5).
bool IsMegatronRankDir(std::string_view name) {
  if (name.rfind("mp_rank_", 0) != 0) return false;
  std::string_view rest = name.substr(8);
  if (rest.size() != 2 && rest.size() != 6 && rest.size() != 10) return false;
  for (size_t i = 0; i < rest.size(); ++i) {
    bool sep = i == 2 || i == 6;
    if (sep ? rest[i] != '_' : !::isdigit(static_cast<unsigned char>(rest[i]))) return false;
  }
  return true;
}

std::string PerRankWeights(const Source& src, const std::string& base, Layout* layout) {
  std::set<int> tps;
  std::set<int> pps;
  for (const auto& name : Children(src, base)) {
    int tp = 0, pp = 0;
    std::string file = JoinPath(base, name + "/model_weights.ckpt");
    if (!IsFile(src, file)) continue;
    if (ParseRankDir(name, &tp, &pp)) {
      tps.insert(tp);
      pps.insert(pp);
      layout->weight_files.push_back({file, tp, pp});
    }
  }
  if (tps.empty()) return "";
  layout->per_rank = true;
  return fmt::format("per-rank model_weights.ckpt (TP={}, PP={})", tps.size(), pps.size());
}

Result<std::string> DistBackend(Source& src, const std::string& metadata_json) {
  const Entry* e = src.Find(metadata_json);
  NEMOFS_ASSIGN_OR_RETURN(std::string text, src.ReadAll(*e, 1 << 20));
  auto json = nlohmann::json::parse(text, nullptr, false);
  if (json.is_discarded() || !json.is_object()) {
    return Err(EINVAL, "{}/{}: not a JSON object", src.path(), metadata_json);
  }
  auto it = json.find("sharded_backend");
  if (it == json.end() || !it->is_string()) {
    return Err(EINVAL, "{}/{}: no \"sharded_backend\" string", src.path(), metadata_json);
  }
  std::string backend = it->get<std::string>();
  if (backend != "torch_dist" && backend != "zarr") {
    return Err(EINVAL, "{}/{}: unknown sharded_backend '{}' (nemofs reads torch_dist and zarr)",
               src.path(), metadata_json, backend);
  }
  return backend;
}

// Weights of a folder holding a dist checkpoint, per-rank files or a DCP.
Result<std::string> FolderWeights(Source& src, const std::string& dir, Layout* layout) {
  if (IsFile(src, JoinPath(dir, "metadata.json"))) {
    NEMOFS_ASSIGN_OR_RETURN(std::string backend, DistBackend(src, JoinPath(dir, "metadata.json")));
    layout->dist_dir = dir;
    layout->dist_backend = backend;
    return fmt::format("Megatron-Core dist checkpoint ({}) in {}/", backend,
                       dir.empty() ? "." : dir);
  }
  if (IsFile(src, JoinPath(dir, ".metadata"))) {
    layout->dist_dir = dir;
    layout->dist_backend = "dcp";
    return fmt::format("PyTorch DCP in {}/", dir.empty() ? "." : dir);
  }
  int ranks = 0;
  for (const auto& name : Children(src, dir)) {
    std::string file = JoinPath(dir, name + "/model_optim_rng.pt");
    if (IsMegatronRankDir(name) && IsFile(src, file)) {
      // mp_rank_TT[_PPP[_EEE]]: the second number is the PP rank (or, without
      // PP, the EP rank: the merge step checks args before trusting it).
      int tp = std::stoi(name.substr(8, 2));
      int pp = name.size() >= 14 ? std::stoi(name.substr(11, 3)) : 0;
      layout->weight_files.push_back({file, tp, pp});
      layout->per_rank = true;
      ++ranks;
    }
  }
  if (ranks > 0) return fmt::format("{} per-rank model_optim_rng.pt files", ranks);
  return std::string();
}

Status RecognizeFile(Source& src, Layout* layout) {
  const Entry& file = src.entries().back();
  char head[16] = {};
  uint64_t n = std::min<uint64_t>(sizeof head, file.size);
  NEMOFS_ASSIGN_OR_RETURN(ReadPlan plan, src.Plan(file.blob, 0, n));
  NEMOFS_RETURN_IF_ERROR(ExecuteReadPlan(plan, head));
  if (n >= 4 && std::memcmp(head, "PK\x03\x04", 4) == 0) {
    layout->format = Format::kTorchSave;
    layout->description = "torch.save file (zip)";
  } else if (n >= 14 && std::memcmp(head, kLegacyTorchMagic, 14) == 0) {
    layout->format = Format::kTorchSaveLegacy;
    layout->description = "torch.save file (legacy pre-1.6 pickle)";
  } else {
    std::string hex;
    for (uint64_t i = 0; i < std::min<uint64_t>(n, 8); ++i) {
      hex += fmt::format("{:02x} ", static_cast<unsigned char>(head[i]));
    }
    if (!hex.empty()) hex.pop_back();
    return Err(EINVAL,
               "{}: not a checkpoint: starts with bytes {}; expected a tar (.nemo), gzip, "
               "torch.save zip or legacy torch pickle",
               src.path(), hex);
  }
  layout->weights = file.path;
  layout->weight_files.push_back({file.path});
  return Ok();
}

}  // namespace

const char* FormatId(Format format) {
  switch (format) {
    case Format::kNemo:
      return "nemo";
    case Format::kNemoFolder:
      return "nemo-folder";
    case Format::kNemo2:
      return "nemo2";
    case Format::kMcoreDist:
      return "mcore-dist";
    case Format::kDcp:
      return "dcp";
    case Format::kMegatronLmRoot:
      return "megatron-lm";
    case Format::kMegatronLmIter:
      return "megatron-lm-iteration";
    case Format::kTorchSave:
      return "torch-save";
    case Format::kTorchSaveLegacy:
      return "torch-save-legacy";
  }
  return "unknown";
}

std::string StripArtifactPrefix(const std::string& name) {
  if (name.size() > 33 && name[32] == '_' &&
      std::all_of(name.begin(), name.begin() + 32,
                  [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); })) {
    return name.substr(33);
  }
  return name;
}

Result<Layout> Recognize(Source& src) {
  Layout layout;
  if (src.storage() == source::Storage::kFile) {
    NEMOFS_RETURN_IF_ERROR(RecognizeFile(src, &layout));
    return layout;
  }
  const bool is_dir = src.storage() == source::Storage::kFolder;

  if (IsFile(src, "model_config.yaml")) {
    layout.format = is_dir ? Format::kNemoFolder : Format::kNemo;
    layout.description =
        is_dir ? "extracted NeMo 1 .nemo folder" : fmt::format("NeMo 1 .nemo, {}", src.Kind());
    layout.config_path = "model_config.yaml";
    if (IsFile(src, "model_weights.ckpt")) {
      layout.weights = "model_weights.ckpt";
      layout.weight_files.push_back({"model_weights.ckpt"});
    } else if (IsDir(src, "model_weights")) {
      NEMOFS_ASSIGN_OR_RETURN(layout.weights, FolderWeights(src, "model_weights", &layout));
    } else {
      layout.weights = PerRankWeights(src, "", &layout);
    }
    ResolveNemoTokenizer(src, &layout, "");
  } else if (IsDir(src, "context") &&
             (IsFile(src, "context/io.json") || IsFile(src, "context/model.yaml"))) {
    layout.format = Format::kNemo2;
    bool v21 = IsDir(src, "weights");
    layout.description = fmt::format("NeMo 2 checkpoint ({} layout), {}",
                                     v21 ? "2.1+ weights/" : "2.0 root", src.Kind());
    if (IsFile(src, "context/model.yaml")) layout.config_path = "context/model.yaml";
    NEMOFS_ASSIGN_OR_RETURN(layout.weights, FolderWeights(src, v21 ? "weights" : "", &layout));
    for (const auto& rel : FilesUnder(src, "context/nemo_tokenizer")) {
      AddTokenizerFile(&layout, rel, "context/nemo_tokenizer/" + rel, "context/nemo_tokenizer/");
    }
    if (IsFile(src, "context/tokenizer.model")) {
      AddTokenizerFile(&layout, "tokenizer.model", "context/tokenizer.model",
                       "context/tokenizer.model");
    }
  } else if (IsFile(src, "latest_checkpointed_iteration.txt")) {
    layout.format = Format::kMegatronLmRoot;
    auto text = src.ReadAll(*src.Find("latest_checkpointed_iteration.txt"), 4096);
    if (!text) return text.error();
    std::string it = *text;
    it.erase(std::remove_if(it.begin(), it.end(), ::isspace), it.end());
    std::string dir;
    if (it == "release") {
      dir = "release";
    } else if (!it.empty() && std::all_of(it.begin(), it.end(), ::isdigit) && it.size() < 10) {
      dir = fmt::format("iter_{:07d}", std::stoul(it));
    } else {
      return Err(EINVAL, "{}/latest_checkpointed_iteration.txt: '{}' is not an iteration number",
                 src.path(), it);
    }
    layout.description = fmt::format("Megatron-LM checkpoint root (latest: {})", dir);
    if (!IsDir(src, dir)) {
      layout.warnings.push_back(fmt::format(
          "latest_checkpointed_iteration.txt names {}/, which is not in the checkpoint", dir));
    } else {
      NEMOFS_ASSIGN_OR_RETURN(layout.weights, FolderWeights(src, dir, &layout));
    }
  } else if (IsFile(src, "metadata.json")) {
    layout.format = Format::kMcoreDist;
    NEMOFS_ASSIGN_OR_RETURN(layout.weights, FolderWeights(src, "", &layout));
    layout.description = fmt::format("Megatron-Core dist checkpoint, {}", src.Kind());
  } else if (IsFile(src, ".metadata")) {
    layout.format = Format::kDcp;
    layout.weights = "PyTorch DCP in ./";
    layout.dist_dir = "";
    layout.dist_backend = "dcp";
    layout.description = fmt::format("PyTorch DCP checkpoint, {}", src.Kind());
  } else {
    auto weights = FolderWeights(src, "", &layout);
    if (weights && !weights->empty()) {
      layout.format = Format::kMegatronLmIter;
      layout.weights = *weights;
      layout.description = fmt::format("Megatron-LM iteration folder, {}", src.Kind());
    } else {
      return Err(EINVAL,
                 "{}: not a checkpoint: found none of model_config.yaml, context/, "
                 "latest_checkpointed_iteration.txt, metadata.json, .metadata, "
                 "mp_rank_*/model_optim_rng.pt",
                 src.path());
    }
  }
  if (layout.weights.empty()) layout.weights = "none found";
  return layout;
}

}  // namespace nemofs::checkpoint
