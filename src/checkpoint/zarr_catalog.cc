// The zarr backend of Megatron-Core dist checkpoints (FORMATS.md §4.5): one
// zarr v2 array per tensor key, `<dir>/<key>/.zarray` + chunk files.
//
// Accepted: zarr_format 2, order "C", filters null, compressor null (chunk
// files are raw C-order bytes, served in place) or zstd (decompressed into
// the cache directory on first read), dtype a little-endian numpy typestr or
// Megatron's literal "bfloat16", dimension_separator "." or "/". Chunks at
// the edge of the array are stored at full chunk shape (zarr pads them).
// A missing chunk file reads as fill_value (an error if fill_value is null).
#include <fcntl.h>
#include <unistd.h>
#include <zstd.h>

#include <cmath>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>

#include "checkpoint/dist_catalog.h"
#include "checkpoint/zarr.h"
#include "nemofs/strings.h"
#include "util/atomic_replace.h"
#include "util/fd.h"
#include "util/io.h"

namespace nemofs::checkpoint {
namespace {

// fill_value as the bytes of one element; "" when null.
std::string FillBytes(const nlohmann::json& v, torch::DType dt) {
  if (v.is_null()) return "";
  double d = 0;
  if (v.is_number()) {
    d = v.get<double>();
  } else if (v.is_boolean()) {
    d = v.get<bool>() ? 1 : 0;
  } else if (v.is_string()) {
    std::string s = v.get<std::string>();
    d = s == "NaN" ? NAN : s == "Infinity" ? INFINITY : s == "-Infinity" ? -INFINITY : 0;
  }
  std::string out(torch::Info(dt).itemsize, '\0');
  auto put = [&](auto x) { std::memcpy(out.data(), &x, sizeof x); };
  switch (dt) {
    case torch::DType::kFloat64:
      put(d);
      break;
    case torch::DType::kFloat32:
      put(static_cast<float>(d));
      break;
    case torch::DType::kBFloat16: {
      float f = static_cast<float>(d);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      put(static_cast<uint16_t>(bits >> 16));
      break;
    }
    case torch::DType::kFloat16: {
      // Exact for the values fill_value takes in practice (0, small integers).
      float f = static_cast<float>(d);
      uint32_t x;
      std::memcpy(&x, &f, 4);
      uint16_t h = static_cast<uint16_t>(((x >> 16) & 0x8000) |
                                         ((((x & 0x7f800000) - 0x38000000) >> 13) & 0x7c00) |
                                         ((x >> 13) & 0x03ff));
      put(f == 0 ? static_cast<uint16_t>((x >> 16) & 0x8000) : h);
      break;
    }
    case torch::DType::kInt64:
      put(static_cast<int64_t>(d));
      break;
    case torch::DType::kInt32:
      put(static_cast<int32_t>(d));
      break;
    case torch::DType::kInt16:
      put(static_cast<int16_t>(d));
      break;
    case torch::DType::kInt8:
      put(static_cast<int8_t>(d));
      break;
    case torch::DType::kUInt8:
    case torch::DType::kBool:
      put(static_cast<uint8_t>(d));
      break;
    default:
      break;  // complex/unsigned wide: zero bytes
  }
  return out;
}

// A zstd-compressed chunk file, decompressed into the cache on first read.
class ZstdChunk final : public LazyChunk {
 public:
  // `level`, `checksum`: the array's compressor settings, for re-encoding.
  ZstdChunk(uint32_t blob, uint64_t expected, std::string cache_path, std::string what, int level,
            bool checksum)
      : blob_(blob),
        expected_(expected),
        cache_path_(std::move(cache_path)),
        what_(std::move(what)),
        level_(level),
        checksum_(checksum) {}

  uint32_t blob() const override { return blob_; }

  Result<std::string> Encode(std::string_view plain) const override {
    if (plain.size() != expected_) {
      return Err(EINVAL, "{}: {} bytes to encode, the chunk has {}", what_, plain.size(),
                 expected_);
    }
    std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(ZSTD_createCCtx(), &ZSTD_freeCCtx);
    if (!cctx) return Err(ENOMEM, "{}: cannot allocate a zstd compressor", what_);
    ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_compressionLevel, level_);
    ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_checksumFlag, checksum_ ? 1 : 0);
    ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_contentSizeFlag, 1);
    std::string out(ZSTD_compressBound(plain.size()), '\0');
    size_t n = ZSTD_compress2(cctx.get(), out.data(), out.size(), plain.data(), plain.size());
    if (ZSTD_isError(n)) return Err(EIO, "{}: zstd: {}", what_, ZSTD_getErrorName(n));
    out.resize(n);
    return out;
  }

  Status PatchDecoded(uint64_t offset, std::string_view bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!fd_.valid()) return Ok();  // not decoded yet: the next Get decodes the new file
    if (offset + bytes.size() > expected_) {
      return Err(EINVAL, "{}: a patch past the end of the decoded chunk", what_);
    }
    return PwriteThroughReadOnly(fd_.get(), bytes, offset, cache_path_);
  }

  Result<source::FileRange> Get(source::Source& src) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (fd_.valid()) return source::FileRange{fd_.get(), 0, expected_};
    NEMOFS_ASSIGN_OR_RETURN(source::FileRange in, src.Locate(blob_));
    if (in.length > (1ull << 31)) return Err(EFBIG, "{}: compressed chunk too large", what_);
    std::string packed(in.length, '\0');
    NEMOFS_RETURN_IF_ERROR(PreadFull(in.fd, packed.data(), packed.size(), in.offset, what_));
    unsigned long long n = ZSTD_getFrameContentSize(packed.data(), packed.size());
    if (n == ZSTD_CONTENTSIZE_ERROR || (n != ZSTD_CONTENTSIZE_UNKNOWN && n != expected_)) {
      return Err(EIO, "{}: not a zstd frame of {} bytes", what_, expected_);
    }
    std::string plain(expected_, '\0');
    size_t got = ZSTD_decompress(plain.data(), plain.size(), packed.data(), packed.size());
    if (ZSTD_isError(got) || got != expected_) {
      return Err(EIO, "{}: zstd: {}", what_,
                 ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short chunk");
    }
    auto slash = cache_path_.rfind('/');
    NEMOFS_RETURN_IF_ERROR(MakeDirs(cache_path_.substr(0, slash)));
    ReplaceOptions options;  // a cache file: atomic, not durable
    options.temp_path = fmt::format("{}.tmp.{}", cache_path_, ::getpid());
    options.durable = false;
    NEMOFS_RETURN_IF_ERROR(ReplaceFile(cache_path_, options, [&](int out) {
      return WriteFull(out, plain.data(), plain.size(), options.temp_path);
    }));
    NEMOFS_ASSIGN_OR_RETURN(fd_, OpenReadOnly(cache_path_));
    return source::FileRange{fd_.get(), 0, expected_};
  }

 private:
  uint32_t blob_;
  uint64_t expected_;
  std::string cache_path_;
  std::string what_;
  int level_ = 0;
  bool checksum_ = false;
  std::mutex mu_;  // guards fd_ (decode once)
  UniqueFd fd_;
};

}  // namespace

void AddZarr(source::Source& src, const Layout& layout, Catalog* cat) {
  const std::string dir = layout.dist_dir;
  const std::string prefix = dir.empty() ? "" : dir + "/";
  for (const auto& e : src.entries()) {
    if (e.type != source::EntryType::kFile) continue;
    if (e.path.size() < prefix.size() + 8 || e.path.compare(0, prefix.size(), prefix) != 0)
      continue;
    std::string rest = e.path.substr(prefix.size());
    if (rest.find('/') == std::string::npos || rest.substr(rest.find('/')) != "/.zarray") continue;
    const std::string key = rest.substr(0, rest.find('/'));
    const std::string where = src.path() + ":" + e.path;
    auto bad = [&](std::string why) {
      cat->warnings.push_back(fmt::format("{}: tensor {} is not shown: {}", where, key, why));
      cat->bad[key] = std::move(why);
    };
    auto text = src.ReadAll(e, 1 << 20);
    if (!text) {
      bad(text.error().message());
      continue;
    }
    auto j = nlohmann::json::parse(*text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      bad("'.zarray' is not a JSON object");
      continue;
    }
    try {
      if (j.value("zarr_format", 0) != 2) {
        bad("not a zarr v2 array");
        continue;
      }
      auto shape = j.at("shape").get<std::vector<int64_t>>();
      auto chunks = j.at("chunks").get<std::vector<int64_t>>();
      std::string dtype_s = j.at("dtype").get<std::string>();
      std::string order = j.value("order", "C");
      std::string sep = j.contains("dimension_separator") && j["dimension_separator"].is_string()
                            ? j["dimension_separator"].get<std::string>()
                            : ".";
      auto dtype = ZarrDType(dtype_s);
      if (!dtype) {
        bad(fmt::format("dtype '{}' is not supported", dtype_s));
        continue;
      }
      if (order != "C") {
        bad(fmt::format("order '{}' is not supported (C only)", order));
        continue;
      }
      if (j.contains("filters") && !j["filters"].is_null()) {
        bad("zarr filters are not supported");
        continue;
      }
      std::string codec;
      int level = 0;  // numcodecs' default: zstd's own (3)
      bool checksum = false;
      if (j.contains("compressor") && !j["compressor"].is_null()) {
        codec = j["compressor"].value("id", "?");
        if (j["compressor"].contains("level") && j["compressor"]["level"].is_number_integer()) {
          level = j["compressor"]["level"].get<int>();
        }
        if (j["compressor"].contains("checksum") && j["compressor"]["checksum"].is_boolean()) {
          checksum = j["compressor"]["checksum"].get<bool>();
        }
        if (codec != "zstd") {
          bad(
              fmt::format("compressor '{}' is not supported (nemofs reads uncompressed and zstd "
                          "chunks)",
                          codec));
          continue;
        }
      }
      if (shape.size() != chunks.size() || (sep != "." && sep != "/")) {
        bad("shape and chunks disagree, or an unknown dimension_separator");
        continue;
      }
      bool ok = true;
      for (size_t d = 0; d < shape.size(); ++d) ok &= shape[d] >= 0 && chunks[d] > 0;
      if (!ok) {
        bad("negative shape or non-positive chunk size");
        continue;
      }
      Tensor t;
      t.key = key;
      t.dtype = *dtype;
      t.shape = shape;
      const uint64_t item = torch::Info(t.dtype).itemsize;
      std::string fill = FillBytes(j.value("fill_value", nlohmann::json()), t.dtype);
      std::vector<int64_t> grid(shape.size());
      uint64_t nchunks = 1;
      for (size_t d = 0; d < shape.size(); ++d) {
        grid[d] = (shape[d] + chunks[d] - 1) / chunks[d];
        nchunks *= static_cast<uint64_t>(grid[d]);
      }
      if (t.numel() == 0) nchunks = 0;
      if (nchunks > (1u << 24)) {
        bad(fmt::format("{} chunks is too many", nchunks));
        continue;
      }
      uint64_t chunk_bytes = item;
      std::vector<int64_t> cstrides(shape.size(), 1);
      for (size_t d = shape.size(); d-- > 0;) {
        cstrides[d] = static_cast<int64_t>(chunk_bytes / item);
        chunk_bytes *= static_cast<uint64_t>(chunks[d]);
      }
      std::vector<int64_t> idx(shape.size(), 0);
      for (uint64_t n = 0; n < nchunks; ++n) {
        Chunk c;
        std::string name;
        bool edge = false;
        for (size_t d = 0; d < shape.size(); ++d) {
          c.offsets.push_back(idx[d] * chunks[d]);
          c.sizes.push_back(std::min(chunks[d], shape[d] - idx[d] * chunks[d]));
          edge |= c.sizes.back() != chunks[d];
          name += (d ? sep : "") + std::to_string(idx[d]);
        }
        if (shape.empty()) name = "0";
        if (edge) c.strides = cstrides;  // zarr stores edge chunks padded to full shape
        const std::string file = JoinPath(JoinPath(dir, key), name);
        const source::Entry* ce = src.Find(file);
        if (!ce || ce->type != source::EntryType::kFile) {
          if (fill.empty()) {
            c.missing = fmt::format("chunk {} of {} is missing and fill_value is null",
                                    src.path() + ":" + file, key);
          } else {
            c.fill = fill;
          }
        } else if (codec == "zstd") {
          c.lazy = std::make_shared<ZstdChunk>(
              ce->blob, chunk_bytes,
              fmt::format("{}/zarr-{:016x}/{}", layout.cache_dir,
                          std::hash<std::string>()(src.path() + ":" + file), n),
              src.path() + ":" + file, level, checksum);
        } else if (ce->size < chunk_bytes) {
          c.missing = fmt::format("chunk {} has {} bytes, expected {}", src.path() + ":" + file,
                                  ce->size, chunk_bytes);
        } else {
          c.blob = ce->blob;
        }
        t.chunks.push_back(std::move(c));
        for (size_t d = shape.size(); d-- > 0;) {  // next grid index, C order
          if (++idx[d] < grid[d]) break;
          idx[d] = 0;
        }
      }
      if (t.numel() == 0) {
        Chunk c;
        c.offsets.assign(shape.size(), 0);
        c.sizes = shape;
        c.fill = std::string(item, '\0');
        t.chunks.push_back(c);
      }
      bool opt = key.rfind("optimizer.", 0) == 0;
      (opt ? cat->optimizer : cat->tensors).push_back(std::move(t));
    } catch (const nlohmann::json::exception& ex) {
      bad(fmt::format("malformed '.zarray': {}", ex.what()));
    }
  }
}

}  // namespace nemofs::checkpoint
