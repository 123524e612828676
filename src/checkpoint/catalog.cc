#include "checkpoint/catalog.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_set>

#include "checkpoint/dist_catalog.h"
#include "checkpoint/merge.h"
#include "torch/torch_file.h"
#include "util/json_util.h"

namespace nemofs::checkpoint {
namespace {

using torch::Kind;
using torch::StoredTensor;
using torch::TorchFile;
using torch::Value;

constexpr int kMaxDepth = 200;

std::string KeyText(const Value* k) {
  switch (k->kind) {
    case Kind::kString:
      return k->str;
    case Kind::kInt:
      return std::to_string(k->integer);
    case Kind::kBigInt:
      return k->str;
    case Kind::kBool:
      return k->boolean ? "True" : "False";
    case Kind::kNone:
      return "None";
    default:
      return torch::ToDebugString(k, 3);
  }
}

std::string Join(const std::string& path, const std::string& part) {
  return path.empty() ? part : path + "." + part;
}

// Calls fn(path, value) for every tensor (good or bad) reachable from `v`
// through dicts, lists and tuples; FlattenIn also gives the container that
// holds it and, for a dict, the entry's key (nullptr in a list or tuple).
template <typename Fn>
void FlattenIn(const TorchFile& f, const Value* v, const std::string& path, int depth,
               std::unordered_set<const Value*>& active, const Value* parent, const Value* key,
               Fn&& fn) {
  if (!v || depth > kMaxDepth || active.count(v)) return;
  if (f.tensors.count(v) || f.bad_tensors.count(v)) {
    fn(path, v, parent, key);
    return;
  }
  active.insert(v);
  if (v->Is(Kind::kDict)) {
    for (const auto& [k, val] : v->entries)
      FlattenIn(f, val, Join(path, KeyText(k)), depth + 1, active, v, k, fn);
  } else if (v->Is(Kind::kList) || v->Is(Kind::kTuple)) {
    for (size_t i = 0; i < v->items.size(); ++i) {
      FlattenIn(f, v->items[i], Join(path, std::to_string(i)), depth + 1, active, v, nullptr, fn);
    }
  }
  active.erase(v);
}
template <typename Fn>
void Flatten(const TorchFile& f, const Value* v, const std::string& path, int depth,
             std::unordered_set<const Value*>& active, Fn&& fn) {
  FlattenIn(f, v, path, depth, active, nullptr, nullptr,
            [&](const std::string& p, const Value* t, const Value*, const Value*) { fn(p, t); });
}

Tensor FromStored(const std::string& key, const StoredTensor& s, uint32_t blob) {
  Tensor t;
  t.key = key;
  t.dtype = s.dtype;
  t.shape = s.shape;
  Chunk c;
  c.offsets.assign(s.shape.size(), 0);
  c.sizes = s.shape;
  c.blob = blob;
  c.byte_offset = s.data_start();
  c.record = s.record;
  if (!s.contiguous()) c.strides = s.strides;
  t.chunks.push_back(std::move(c));
  return t;
}

// JSON of a pickled object; tensors become {"tensor": path} via `where`.
class JsonRenderer {
 public:
  JsonRenderer(const TorchFile& f, const std::map<std::string, std::string>& where,
               const std::map<std::string, std::string>& bad)
      : f_(f), where_(where), bad_(bad) {}

  Json Render(const Value* v, const std::string& path, int depth = 0) {
    if (!v) return nullptr;
    if (f_.tensors.count(v) || f_.bad_tensors.count(v)) {
      Json j;
      auto it = where_.find(path);
      j["tensor"] = it == where_.end() ? Json() : Json(it->second);
      if (auto b = bad_.find(path); b != bad_.end()) j["error"] = b->second;
      return j;
    }
    if (depth > kMaxDepth || active_.count(v)) return "...";
    active_.insert(v);
    Json j = RenderInner(v, path, depth);
    active_.erase(v);
    return j;
  }

 private:
  static std::string GlobalName(const Value* g) {
    if (!g) return "?";
    if (g->Is(Kind::kGlobal)) return g->str + "." + g->name;
    return torch::ToDebugString(g, 3);
  }

  Json RenderDict(const Value* v, const std::string& path, int depth) {
    ObjectBuilder j;
    for (const auto& [k, val] : v->entries) {
      std::string key = KeyText(k);
      j.Set(key, Render(val, Join(path, key), depth + 1));
    }
    return std::move(j).Build();
  }

  Json RenderInner(const Value* v, const std::string& path, int depth) {
    switch (v->kind) {
      case Kind::kNone:
        return nullptr;
      case Kind::kBool:
        return v->boolean;
      case Kind::kInt:
        return v->integer;
      case Kind::kBigInt:
        return v->str;
      case Kind::kFloat:
        if (std::isfinite(v->real)) return v->real;
        return std::isnan(v->real) ? "nan" : (v->real > 0 ? "inf" : "-inf");
      case Kind::kString:
        return v->str;
      case Kind::kBytes:
        return Json{{"bytes", v->str.size()}};
      case Kind::kList:
      case Kind::kTuple:
      case Kind::kSet: {
        Json a = Json::array();
        for (size_t i = 0; i < v->items.size(); ++i) {
          a.push_back(Render(v->items[i], Join(path, std::to_string(i)), depth + 1));
        }
        return a;
      }
      case Kind::kDict:
        return RenderDict(v, path, depth);
      case Kind::kGlobal:
        return GlobalName(v);
      case Kind::kPersistentId:
        return Json{{"persistent_id", torch::ToDebugString(v->args, 4)}};
      case Kind::kCall:
      case Kind::kObject:
        return RenderObject(v, path, depth);
    }
    return nullptr;
  }

  Json RenderObject(const Value* v, const std::string& path, int depth) {
    const std::string cls = GlobalName(v->callable);
    const Value* state = v->state;
    // OmegaConf containers and nodes: the values, not the machinery.
    if (cls.rfind("omegaconf.", 0) == 0 && state && state->Is(Kind::kDict)) {
      if (const Value* content = state->Get("_content")) return Render(content, path, depth + 1);
      if (const Value* val = state->Get("_val")) return Render(val, path, depth + 1);
    }
    if (cls == "torch.Size" && v->args && !v->args->items.empty()) {
      return Render(v->args->items[0], path, depth + 1);
    }
    if (cls == "torch.device" && v->args) {
      std::string dev;
      for (const Value* a : v->args->items) {
        dev += (dev.empty() ? "" : ":") + (a->Is(Kind::kString) ? a->str : KeyText(a));
      }
      return dev;
    }
    if (cls == "argparse.Namespace" && state && state->Is(Kind::kDict)) {
      return RenderDict(state, path, depth);
    }
    Json j = Json::object();
    j[v->Is(Kind::kCall) ? "__call__" : "__class__"] = cls;
    if (v->args && !v->args->items.empty()) j["args"] = Render(v->args, path, depth + 1);
    if (state) j["state"] = Render(state, path, depth + 1);
    if (!v->entries.empty()) {
      ObjectBuilder items;
      for (const auto& [k, val] : v->entries) {
        items.Set(KeyText(k), Render(val, Join(path, KeyText(k)), depth + 1));
      }
      j["items"] = std::move(items).Build();
    }
    return j;
  }

  const TorchFile& f_;
  const std::map<std::string, std::string>& where_;
  const std::map<std::string, std::string>& bad_;
  std::unordered_set<const Value*> active_;
};

struct Loaded {
  const WeightFile* wf = nullptr;
  uint32_t blob = 0;
  std::string name;
  TorchFile file;
};

Result<Loaded> LoadWeightFile(source::Source& src, const WeightFile& wf) {
  const source::Entry* e = src.Find(wf.path);
  if (!e || e->type != source::EntryType::kFile) {
    return Err(ENOENT, "{}: weight file {} is missing", src.path(), wf.path);
  }
  Loaded l;
  l.wf = &wf;
  l.blob = e->blob;
  l.name = src.storage() == source::Storage::kFile ? src.path() : src.path() + ":" + wf.path;
  NEMOFS_ASSIGN_OR_RETURN(auto reader, src.MetadataReader(e->blob));
  NEMOFS_ASSIGN_OR_RETURN(l.file, torch::LoadTorchFile(*reader, l.name));
  return l;
}

// Which part of a torch.save dict is the model and which the optimizer.
struct Roles {
  std::string model;      // path prefix of model tensors ("" = everything)
  std::string optimizer;  // "" = none
};
Roles RolesOf(const Value* root) {
  if (root && root->Is(Kind::kDict)) {
    const Value* sd = root->Get("state_dict");
    if (sd && sd->Is(Kind::kDict)) return {"state_dict", "optimizer_states"};
    const Value* model = root->Get("model");
    if (model && model->Is(Kind::kDict) &&
        (root->Get("args") || root->Get("checkpoint_version") || root->Get("iteration"))) {
      return {"model", "optimizer"};
    }
  }
  return {"", ""};
}

bool Under(const std::string& path, const std::string& prefix, std::string* rest) {
  if (prefix.empty()) return false;
  if (path.size() > prefix.size() && path.compare(0, prefix.size(), prefix) == 0 &&
      path[prefix.size()] == '.') {
    *rest = path.substr(prefix.size() + 1);
    return true;
  }
  return false;
}

int64_t YamlInt(const YAML::Node& cfg, const char* key) {
  try {
    if (cfg[key] && cfg[key].IsScalar()) return cfg[key].as<int64_t>();
  } catch (const YAML::Exception&) {
  }
  return 0;
}

}  // namespace

std::string EscapeKey(std::string_view key) {
  // "", "." and ".." cannot be file names: escape their dots (and mark the empty key).
  if (key.empty()) return "%00";
  if (key == "." || key == "..") return key == "." ? "%2E" : "%2E%2E";
  std::string out;
  for (char c : key) {
    if (c == '%') {
      out += "%25";
    } else if (c == '/') {
      out += "%2F";
    } else {
      out += c;
    }
  }
  return out;
}

std::string UnescapeKey(std::string_view name) {
  if (name == "%00") return "";
  std::string out;
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] == '%' && i + 2 < name.size()) {
      std::string_view code = name.substr(i + 1, 2);
      if (code == "2F" || code == "2f") {
        out += '/';
        i += 2;
        continue;
      }
      if (code == "25") {
        out += '%';
        i += 2;
        continue;
      }
      if (code == "2E" || code == "2e") {
        out += '.';
        i += 2;
        continue;
      }
    }
    out += name[i];
  }
  return out;
}

Result<TensorPlace> LocateTensorKey(const TorchFile& file, bool optimizer, std::string_view key,
                                    const std::string& name) {
  const Value* root = file.pickle.root;
  Roles roles = RolesOf(root);
  TensorPlace place;
  std::unordered_set<const Value*> active;
  bool found = false;
  FlattenIn(file, root, "", 0, active, nullptr, nullptr,
            [&](const std::string& path, const Value* v, const Value* parent, const Value* k) {
              if (found) return;
              std::string rest;
              const bool is_opt = Under(path, roles.optimizer, &rest);
              if (is_opt != optimizer) return;
              std::string tree_key =
                  is_opt ? rest : (Under(path, roles.model, &rest) ? rest : path);
              if (tree_key != key) return;
              found = true;
              place.value = v;
              place.dict = parent;
              place.key = k;
              if (k) {
                const std::string last = KeyText(k);
                place.prefix = tree_key.size() > last.size()
                                   ? tree_key.substr(0, tree_key.size() - last.size() - 1)
                                   : "";
              }
            });
  if (found) {
    if (!place.dict || !place.dict->Is(Kind::kDict) || !place.key) {
      return Err(EINVAL, "{}: tensor {} is an item of a list or tuple, not of a dict: it cannot be "
                 "removed or renamed", name, key);
    }
    return place;
  }
  // Not there: where a new one goes, the dict of the role's tensors.
  if (optimizer) {
    return Err(EINVAL, "{}: new optimizer tensors cannot be added (optimizer/ keys are positions "
               "in the optimizer's state)", name);
  }
  const Value* dict = roles.model.empty() ? root : root ? root->Get(roles.model) : nullptr;
  if (!dict || !dict->Is(Kind::kDict)) {
    return Err(EINVAL, "{}: its {} is not a dict: a tensor cannot be added", name,
               roles.model.empty() ? "top-level object" : "'" + roles.model + "'");
  }
  place.dict = dict;
  return place;
}

Json RenderPickle(const TorchFile& file) {
  static const std::map<std::string, std::string> kNone;
  JsonRenderer r(file, kNone, kNone);
  return r.Render(file.pickle.root, "");
}

Catalog BuildCatalog(source::Source& src, const Layout& layout) {
  Catalog cat;
  if (!layout.dist_backend.empty()) {
    AddDistCatalog(src, layout, &cat);
    return cat;
  }
  if (layout.weight_files.empty()) return cat;

  std::vector<Loaded> files;
  for (const auto& wf : layout.weight_files) {
    auto l = LoadWeightFile(src, wf);
    if (!l) {
      cat.errors.push_back(l.error().message());
      cat.warnings.push_back(
          fmt::format("tensors of {} are not shown: {}", wf.path, l.error().message()));
      continue;
    }
    for (const auto& w : l->file.warnings) cat.warnings.push_back(w);
    files.push_back(std::move(l).value());
  }
  if (files.empty()) return cat;

  auto add_bad = [&](const Loaded& l, const std::string& key, const Value* v) {
    auto it = l.file.bad_tensors.find(v);
    if (it == l.file.bad_tensors.end()) return false;
    cat.bad[key] = it->second;
    cat.warnings.push_back(fmt::format("{}: tensor {} is not shown: {}", l.name, key, it->second));
    return true;
  };

  if (!layout.per_rank) {
    const Loaded& l = files[0];
    Roles roles = RolesOf(l.file.pickle.root);
    std::map<std::string, std::string> where;  // pickle path -> tree path
    std::map<std::string, std::string> bad_by_path;
    std::set<std::string> seen_model, seen_opt;
    std::unordered_set<const Value*> active;
    Flatten(l.file, l.file.pickle.root, "", 0, active,
            [&](const std::string& path, const Value* v) {
              std::string rest;
              bool is_opt = Under(path, roles.optimizer, &rest);
              std::string key = is_opt ? rest : (Under(path, roles.model, &rest) ? rest : path);
              if (add_bad(l, key, v)) {
                bad_by_path[path] = cat.bad[key];
                return;
              }
              auto& seen = is_opt ? seen_opt : seen_model;
              if (!seen.insert(key).second) {
                cat.warnings.push_back(
                    fmt::format("{}: duplicate tensor key {} (first one kept)", l.name, key));
                return;
              }
              Tensor t = FromStored(key, l.file.tensors.at(v), l.blob);
              where[path] = (is_opt ? "optimizer/" : "tensors/") + EscapeKey(key);
              (is_opt ? cat.optimizer : cat.tensors).push_back(std::move(t));
            });
    JsonRenderer r(l.file, where, bad_by_path);
    cat.checkpoint_json = r.Render(l.file.pickle.root, "").dump(2) + "\n";
    return cat;
  }

  // Per-rank checkpoints: ranks/ as stored, tensors/ merged.
  MergeConfig cfg;
  std::set<int> tps, pps;
  for (const auto& l : files) {
    tps.insert(l.wf->tp);
    pps.insert(l.wf->pp);
  }
  cfg.tp_size = static_cast<int>(tps.size());
  cfg.pp_size = static_cast<int>(pps.size());
  if (!layout.config_path.empty()) {
    if (const source::Entry* e = src.Find(layout.config_path)) {
      if (auto text = src.ReadAll(*e, 64 << 20)) {
        try {
          YAML::Node y = YAML::Load(*text);
          if (y["model"] && y["model"].IsMap()) y = y["model"];
          cfg.num_layers = YamlInt(y, "num_layers");
          std::string act = y["activation"] && y["activation"].IsScalar()
                                ? y["activation"].as<std::string>()
                                : "";
          cfg.gated_mlp = act == "swiglu" || act == "fast-swiglu";
        } catch (const YAML::Exception&) {
        }
      }
    }
  }
  bool expert_parallel = false;
  const Value* args = files[0].file.pickle.root ? files[0].file.pickle.root->Get("args") : nullptr;
  if (args && args->state && args->state->Is(Kind::kDict)) {  // Megatron-LM argparse.Namespace
    const Value* st = args->state;
    auto int_arg = [&](const char* k) -> int64_t {
      const Value* v = st->Get(k);
      return v && v->Is(Kind::kInt) ? v->integer : 0;
    };
    cfg.num_layers = int_arg("num_layers");
    const Value* swiglu = st->Get("swiglu");
    cfg.gated_mlp = swiglu && swiglu->Is(Kind::kBool) && swiglu->boolean;
    int64_t pp_arg = int_arg("pipeline_model_parallel_size");
    if (pp_arg > 0 && pp_arg != cfg.pp_size) expert_parallel = true;
  }

  std::vector<RankTensor> shards;
  ObjectBuilder ranks_json;
  for (const auto& l : files) {
    std::string dir = fmt::format("tp{}_pp{}", l.wf->tp, l.wf->pp);
    RankDir rank{dir, {}};
    Roles roles = RolesOf(l.file.pickle.root);
    std::map<std::string, std::string> where, bad_by_path;
    std::set<std::string> seen;
    std::unordered_set<const Value*> active;
    Flatten(l.file, l.file.pickle.root, "", 0, active,
            [&](const std::string& path, const Value* v) {
              std::string rest;
              bool is_model = roles.model.empty() || Under(path, roles.model, &rest);
              std::string key = roles.model.empty() ? path : (is_model ? rest : path);
              if (add_bad(l, dir + "/" + key, v)) {
                bad_by_path[path] = cat.bad[dir + "/" + key];
                return;
              }
              if (!seen.insert(key).second) return;
              Tensor t = FromStored(key, l.file.tensors.at(v), l.blob);
              where[path] = "ranks/" + dir + "/" + EscapeKey(key);
              if (is_model) shards.push_back({l.wf->tp, l.wf->pp, t});
              rank.tensors.push_back(std::move(t));
            });
    JsonRenderer r(l.file, where, bad_by_path);
    ranks_json.Set(dir, r.Render(l.file.pickle.root, ""));
    cat.ranks.push_back(std::move(rank));
  }
  cat.checkpoint_json = Json{{"ranks", std::move(ranks_json).Build()}}.dump(2) + "\n";
  if (expert_parallel) {
    cat.warnings.push_back(
        "per-rank folders carry a second rank number but args say PP=1 (expert parallelism?): "
        "tensors are shown per rank only");
    for (const auto& s : shards)
      cat.unmerged[s.tensor.key] = "expert-parallel shards are not merged";
    return cat;
  }
  MergeResult merged = MergeRanks(shards, cfg);
  cat.merge = cfg;
  cat.tensors = std::move(merged.merged);
  cat.unmerged = std::move(merged.unmerged);
  return cat;
}

}  // namespace nemofs::checkpoint
