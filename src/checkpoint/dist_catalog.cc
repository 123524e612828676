// Distributed checkpoints in the catalog (FORMATS.md §4): DCP `.metadata` +
// `.distcp` items (torch_dist and plain DCP) and zarr arrays, stitched into
// global tensors (checkpoint/tensor.h does the stitching at read time).
#include "checkpoint/dist_catalog.h"

#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

#include "dist/dcp.h"
#include "nemofs/strings.h"
#include "torch/torch_file.h"
#include "util/json_util.h"

namespace nemofs::checkpoint {
namespace {

std::string Dims(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// Decomposes the flat range [start, end) of a C-order block of `shape` into
// boxes that are each a contiguous run of that range. Appends (offsets,
// sizes, flat start) triples.
void FlatRangeToBoxes(
    int64_t start, int64_t end, const std::vector<int64_t>& shape, size_t dim,
    std::vector<int64_t> prefix,
    std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>>* out,
    int64_t flat_base) {
  if (start >= end) return;
  const size_t nd = shape.size();
  int64_t inner = 1;
  for (size_t d = dim + 1; d < nd; ++d) inner *= shape[d];
  auto box = [&](int64_t first, int64_t count) {  // whole sub-blocks first..first+count of dim
    std::vector<int64_t> off = prefix, sz(prefix.size(), 1);
    off.push_back(first);
    sz.push_back(count);
    for (size_t d = dim + 1; d < nd; ++d) {
      off.push_back(0);
      sz.push_back(shape[d]);
    }
    out->emplace_back(off, sz, flat_base + first * inner);
  };
  if (dim + 1 == nd) {
    box(start, end - start);
    return;
  }
  int64_t first = start / inner, last = (end - 1) / inner;
  auto recurse = [&](int64_t row, int64_t s, int64_t e) {
    std::vector<int64_t> p = prefix;
    p.push_back(row);
    FlatRangeToBoxes(s, e, shape, dim + 1, p, out, flat_base + row * inner);
  };
  if (first == last) {
    recurse(first, start - first * inner, end - first * inner);
    return;
  }
  int64_t full_from = first, full_to = last + 1;
  if (start % inner != 0) {
    recurse(first, start % inner, inner);
    full_from = first + 1;
  }
  if (end % inner != 0) {
    full_to = last;
  }
  if (full_to > full_from) box(full_from, full_to - full_from);
  if (end % inner != 0) recurse(last, 0, end - last * inner);
}

class DistCatalogBuilder {
 public:
  DistCatalogBuilder(source::Source& src, const Layout& layout, Catalog* cat)
      : src_(src), layout_(layout), cat_(cat) {}

  void Run() {
    if (layout_.dist_backend == "zarr") {
      AddZarr(src_, layout_, cat_);
    } else {
      AddDcp();
    }
    AddCommon();
  }

 private:
  std::string Where(const std::string& rel) const {
    return src_.path() + ":" + JoinPath(layout_.dist_dir, rel);
  }

  void Bad(const std::string& key, std::string why) {
    cat_->warnings.push_back(
        fmt::format("{}: tensor {} is not shown: {}", Where(".metadata"), key, why));
    cat_->bad[key] = std::move(why);
  }

  // The file holding an item, with a reader over the whole file.
  struct File {
    uint32_t blob = source::kNoBlob;
    uint64_t size = 0;
    std::shared_ptr<const ByteReader> reader;
    std::string error;
  };
  File& Open(const std::string& rel) {
    auto it = files_.find(rel);
    if (it != files_.end()) return it->second;
    File f;
    const source::Entry* e = src_.Find(JoinPath(layout_.dist_dir, rel));
    if (!e || e->type != source::EntryType::kFile) {
      f.error = fmt::format("{} is missing", Where(rel));
    } else {
      f.blob = e->blob;
      f.size = e->size;
      auto r = src_.MetadataReader(e->blob);
      if (r) {
        f.reader = *r;
      } else {
        f.error = r.error().message();
      }
    }
    return files_.emplace(rel, std::move(f)).first->second;
  }

  void AddDcp() {
    const std::string md_path = JoinPath(layout_.dist_dir, ".metadata");
    const source::Entry* e = src_.Find(md_path);
    if (!e) {
      cat_->errors.push_back(fmt::format("{}: no .metadata", Where("")));
      return;
    }
    auto text = src_.ReadAll(*e, 1ull << 30);
    if (!text) {
      cat_->errors.push_back(text.error().message());
      return;
    }
    auto pickle = torch::Unpickle(*text, Where(".metadata"));
    if (!pickle) {
      cat_->errors.push_back(pickle.error().message());
      return;
    }
    auto md = dist::ParseDcpMetadata(*pickle, Where(".metadata"));
    if (!md) {
      cat_->errors.push_back(md.error().message());
      return;
    }
    for (auto& dt : md->tensors) AddDcpTensor(dt);
    for (auto& b : md->bytes) bytes_.push_back(b);
  }

  void AddDcpTensor(const dist::DcpTensor& dt) {
    if (!dt.dtype) return Bad(dt.key, fmt::format("unknown dtype '{}'", dt.dtype_name));
    Tensor t;
    t.key = dt.key;
    t.dtype = *dt.dtype;
    t.shape = dt.shape;
    const uint32_t item = torch::Info(t.dtype).itemsize;
    for (const auto& dc : dt.chunks) {
      Chunk c;
      c.offsets = dc.offsets;
      c.sizes = dc.sizes;
      std::string why;
      if (!dc.storage) {
        why = fmt::format("chunk at {} has no storage_data entry", Dims(dc.offsets));
      } else if (dc.storage->transformed) {
        why = fmt::format(
            "chunk at {} is stored with stream transforms (compression), which nemofs "
            "does not read",
            Dims(dc.offsets));
      } else {
        File& f = Open(dc.storage->relative_path);
        if (!f.error.empty()) {
          why = fmt::format("chunk at {} is in {}", Dims(dc.offsets), f.error);
        } else if (dc.storage->offset > f.size ||
                   dc.storage->length > f.size - dc.storage->offset) {
          why = fmt::format("chunk at {}: item [{}, +{}) lies outside {} ({} bytes)",
                            Dims(dc.offsets), dc.storage->offset, dc.storage->length,
                            Where(dc.storage->relative_path), f.size);
        } else {
          SubReader sub(*f.reader, dc.storage->offset, dc.storage->length);
          std::string name =
              fmt::format("{}@{}", Where(dc.storage->relative_path), dc.storage->offset);
          auto tf = torch::LoadTorchFile(sub, name);
          if (!tf) {
            why = tf.error().message();
          } else if (tf->tensors.size() != 1) {
            why = fmt::format("item {} holds {} tensors, expected 1", name, tf->tensors.size());
          } else {
            const torch::StoredTensor& st = tf->tensors.begin()->second;
            uint64_t want = 1;
            for (int64_t s : dc.sizes) want *= static_cast<uint64_t>(s);
            if (st.numel() != want || torch::Info(st.dtype).itemsize != item) {
              why = fmt::format("item {} holds {} elements of {}, the chunk needs {} of {}", name,
                                st.numel(), torch::Info(st.dtype).name, want,
                                torch::Info(t.dtype).name);
            } else {
              c.blob = f.blob;
              c.byte_offset = dc.storage->offset + st.data_start();
              c.record = st.record.Shifted(dc.storage->offset);
              if (!st.contiguous()) {
                if (st.shape == dc.sizes) {
                  c.strides = st.strides;
                } else {
                  why = fmt::format("item {} is a non-contiguous view of another shape", name);
                }
              }
            }
          }
        }
      }
      if (!why.empty()) {
        c.blob = source::kNoBlob;
        c.missing = why;
        // One warning per cause (a missing file explains many chunks).
        std::string cause = dc.storage ? Open(dc.storage->relative_path).error : "";
        auto& [count, keys, first] = missing_[cause.empty() ? why : cause];
        if (count++ == 0) first = why;
        keys.insert(dt.key);
      }
      t.chunks.push_back(std::move(c));
    }
    if (!dt.original_shape.empty()) {
      auto flat = Unflatten(t, dt.original_shape);
      if (!flat) return Bad(dt.key, flat.error().message());
      t = std::move(flat).value();
    }
    if (auto st = ValidateChunks(t); !st.ok()) return Bad(dt.key, st.error().message());
    bool opt = t.key.rfind("optimizer.", 0) == 0;
    (opt ? cat_->optimizer : cat_->tensors).push_back(std::move(t));
  }

  // Megatron's flattened distributed-optimizer layout (FORMATS.md §4.4.5):
  // shape = fragmentations + (prod(local_shape),); each chunk (1,...,1,n) at
  // (i_0, ..., i_{d-1}, s) holds flat elements [s, s+n) of local block i.
  Result<Tensor> Unflatten(const Tensor& t, const std::vector<int64_t>& orig) {
    const size_t d = orig.size();
    if (t.shape.size() != d + 1) {
      return Err(EINVAL, "flattened shape {} does not match original shape {}", Dims(t.shape),
                 Dims(orig));
    }
    std::vector<int64_t> local(d);
    int64_t local_numel = 1;
    for (size_t k = 0; k < d; ++k) {
      if (t.shape[k] <= 0 || orig[k] % t.shape[k] != 0) {
        return Err(EINVAL, "original dim {} ({}) is not a multiple of {}", k, orig[k], t.shape[k]);
      }
      local[k] = orig[k] / t.shape[k];
      local_numel *= local[k];
    }
    if (t.shape[d] != local_numel) {
      return Err(EINVAL, "flattened length {} != local block size {}", t.shape[d], local_numel);
    }
    Tensor out;
    out.key = t.key;
    out.dtype = t.dtype;
    out.shape = orig;
    const uint64_t item = torch::Info(t.dtype).itemsize;
    for (const Chunk& c : t.chunks) {
      for (size_t k = 0; k < d; ++k) {
        if (c.sizes[k] != 1) return Err(EINVAL, "flattened chunk spans more than one block");
      }
      int64_t s = c.offsets[d], n = c.sizes[d];
      std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t>> boxes;
      FlatRangeToBoxes(s, s + n, local, 0, {}, &boxes, 0);
      for (auto& [off, sz, flat] : boxes) {
        Chunk b;
        b.sizes = sz;
        b.offsets.resize(d);
        for (size_t k = 0; k < d; ++k) b.offsets[k] = c.offsets[k] * local[k] + off[k];
        b.blob = c.blob;
        b.missing = c.missing;
        b.record = c.record;
        b.byte_offset = c.byte_offset + static_cast<uint64_t>(flat - s) * item;
        out.chunks.push_back(std::move(b));
      }
    }
    return out;
  }

  void AddCommon() {
    ObjectBuilder json;
    const std::string common = JoinPath(layout_.dist_dir, "common.pt");
    if (const source::Entry* e = src_.Find(common); e && e->type == source::EntryType::kFile) {
      auto reader = src_.MetadataReader(e->blob);
      if (reader) {
        auto tf = torch::LoadTorchFile(**reader, Where("common.pt"));
        if (tf) {
          json.Set("common", RenderPickle(*tf));
        } else {
          cat_->warnings.push_back(tf.error().message());
        }
      }
    }
    ObjectBuilder objects;
    int zarr_objects = 0;
    for (const auto& b : bytes_) {
      Json j = Json::object();
      if (!b.storage) {
        j["error"] = "no storage_data entry";
      } else {
        File& f = Open(b.storage->relative_path);
        j["file"] = b.storage->relative_path;
        j["offset"] = b.storage->offset;
        j["length"] = b.storage->length;
        if (!f.error.empty()) {
          j["error"] = f.error;
        } else if (b.storage->offset <= f.size && b.storage->length <= f.size - b.storage->offset) {
          SubReader sub(*f.reader, b.storage->offset, b.storage->length);
          auto tf = torch::LoadTorchFile(sub, Where(b.storage->relative_path));
          if (tf) j["value"] = RenderPickle(*tf);
        } else {
          j["error"] = "item lies outside its file";
        }
      }
      objects.Set(b.key, std::move(j));
    }
    // zarr backend: ShardedObjects are torch.save files <dir>/<key>/shard_*.pt.
    if (layout_.dist_backend == "zarr") {
      const std::string prefix = layout_.dist_dir.empty() ? "" : layout_.dist_dir + "/";
      for (const auto& e : src_.entries()) {
        if (e.type != source::EntryType::kFile || e.path.compare(0, prefix.size(), prefix) != 0) {
          continue;
        }
        std::string rest = e.path.substr(prefix.size());
        auto slash = rest.find('/');
        if (slash == std::string::npos || rest.compare(slash + 1, 6, "shard_") != 0 ||
            rest.size() < 3 || rest.compare(rest.size() - 3, 3, ".pt") != 0) {
          continue;
        }
        Json j = Json::object();
        j["file"] = rest;
        auto range = src_.Locate(e.blob);
        if (range) {
          auto tf = torch::LoadTorchFile(range->fd, range->offset, range->length, Where(rest));
          if (tf) {
            j["value"] = RenderPickle(*tf);
          } else {
            j["error"] = tf.error().message();
          }
        }
        objects.Set(rest.substr(0, rest.size() - 3), std::move(j));
        ++zarr_objects;
      }
    }
    if (!bytes_.empty() || zarr_objects > 0) {
      json.Set("sharded_objects", std::move(objects).Build());
    }
    Json built = std::move(json).Build();
    if (!built.empty()) cat_->checkpoint_json = built.dump(2) + "\n";
    for (const auto& [cause, m] : missing_) {
      const auto& [count, keys, first] = m;
      cat_->warnings.push_back(
          count == 1
              ? fmt::format("{}: {}", *keys.begin(), first)
              : fmt::format("{} chunks of {} tensors cannot be read: {} (reads of the affected "
                            "ranges fail with EIO)",
                            count, keys.size(), cause));
    }
  }

  source::Source& src_;
  const Layout& layout_;
  Catalog* cat_;
  std::map<std::string, File> files_;
  std::vector<dist::DcpBytes> bytes_;
  std::map<std::string, std::tuple<int, std::set<std::string>, std::string>> missing_;
};

}  // namespace

void AddDistCatalog(source::Source& src, const Layout& layout, Catalog* cat) {
  DistCatalogBuilder(src, layout, cat).Run();
}

}  // namespace nemofs::checkpoint
