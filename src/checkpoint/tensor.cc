#include "checkpoint/tensor.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>

#include "util/io.h"

namespace nemofs::checkpoint {
namespace {

// Above this many pieces, a plan whose pieces share one descriptor and lie
// within kGatherSpanMax bytes is answered by one read + an in-memory gather.
constexpr size_t kGatherPieces = 64;
constexpr uint64_t kGatherSpanMax = 64 << 20;

bool ContainsIndex(const Chunk& c, const std::vector<int64_t>& idx) {
  for (size_t d = 0; d < idx.size(); ++d) {
    if (idx[d] < c.offsets[d] || idx[d] >= c.offsets[d] + c.sizes[d]) return false;
  }
  return true;
}

// Many small pieces (inner-dimension chunk splits, transposed views): read
// each descriptor's span once and copy the pieces out in memory, instead of
// thousands of tiny splices. Only when the spans are small.
Result<ReadPlan> Gather(ReadPlan plan) {
  if (plan.pieces.size() <= kGatherPieces) return plan;
  struct Span {
    uint64_t lo = UINT64_MAX, hi = 0;
    std::string bytes;
  };
  std::map<int, Span> spans;
  for (const auto& p : plan.pieces) {
    if (p.fd < 0) return plan;  // memory pieces (fill values) stay as they are
    Span& s = spans[p.fd];
    s.lo = std::min(s.lo, p.offset);
    s.hi = std::max(s.hi, p.offset + p.length);
  }
  uint64_t total = 0;
  for (auto& [fd, s] : spans) total += s.hi - s.lo;
  if (total > kGatherSpanMax || total > 8 * plan.size() + (1 << 20)) return plan;
  for (auto& [fd, s] : spans) {
    s.bytes.resize(s.hi - s.lo);
    NEMOFS_RETURN_IF_ERROR(PreadFull(fd, s.bytes.data(), s.bytes.size(), s.lo, "tensor gather"));
  }
  auto out = std::make_shared<std::string>();
  out->reserve(plan.size());
  for (const auto& p : plan.pieces) {
    const Span& s = spans[p.fd];
    out->append(s.bytes, p.offset - s.lo, p.length);
  }
  ReadPlan gathered;
  gathered.AddMemory(out->data(), out->size());
  gathered.keepalive.push_back(out);
  return gathered;
}

// Whether distinct elements of the chunk are distinct stored elements: with
// the dims of size > 1 sorted by stride, each stride must exceed the span of
// all smaller ones.
bool Injective(const Chunk& c) {
  if (c.strides.empty()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (size_t d = 0; d < c.strides.size(); ++d) {
    if (c.sizes[d] > 1) dims.emplace_back(c.strides[d], c.sizes[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // largest offset reachable with the smaller dims
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += stride * (size - 1);
  }
  return true;
}

}  // namespace

uint64_t Tensor::numel() const {
  uint64_t n = 1;
  for (int64_t s : shape) n *= static_cast<uint64_t>(s);
  return n;
}

Status ValidateChunks(const Tensor& t) {
  const size_t nd = t.shape.size();
  uint64_t covered = 0;
  for (size_t i = 0; i < t.chunks.size(); ++i) {
    const Chunk& c = t.chunks[i];
    if (c.offsets.size() != nd || c.sizes.size() != nd ||
        (!c.strides.empty() && c.strides.size() != nd)) {
      return Err(EINVAL, "tensor {}: chunk {} has the wrong number of dimensions", t.key, i);
    }
    uint64_t vol = 1;
    for (size_t d = 0; d < nd; ++d) {
      if (c.offsets[d] < 0 || c.sizes[d] < 0 || c.offsets[d] + c.sizes[d] > t.shape[d]) {
        return Err(EINVAL, "tensor {}: chunk {} (offset {} size {} in dim {}) exceeds shape {}",
                   t.key, i, c.offsets[d], c.sizes[d], d, t.shape[d]);
      }
      vol *= static_cast<uint64_t>(c.sizes[d]);
    }
    covered += vol;
    for (size_t j = 0; j < i; ++j) {
      const Chunk& o = t.chunks[j];
      bool overlap = vol > 0;
      for (size_t d = 0; d < nd && overlap; ++d) {
        overlap =
            c.offsets[d] < o.offsets[d] + o.sizes[d] && o.offsets[d] < c.offsets[d] + c.sizes[d];
      }
      if (overlap) return Err(EINVAL, "tensor {}: chunks {} and {} overlap", t.key, j, i);
    }
  }
  if (covered != t.numel()) {
    return Err(EINVAL, "tensor {}: chunks cover {} of {} elements (holes)", t.key, covered,
               t.numel());
  }
  return Ok();
}

Status MapTensorRange(const Tensor& t, uint64_t offset, uint64_t length,
                      const std::function<Status(const StoredRun&)>& fn) {
  const uint64_t item = torch::Info(t.dtype).itemsize;
  const uint64_t total = t.nbytes();
  if (offset >= total || length == 0) return Ok();
  const uint64_t end = offset + std::min(length, total - offset);
  const size_t nd = t.shape.size();

  // C-order element strides of the global tensor.
  std::vector<uint64_t> gstride(nd, 1);
  for (size_t d = nd; d-- > 1;) gstride[d - 1] = gstride[d] * static_cast<uint64_t>(t.shape[d]);

  std::vector<int64_t> idx(nd);
  size_t hint = 0;
  for (uint64_t p = offset; p < end;) {
    uint64_t elem = p / item;
    uint64_t within = p % item;
    uint64_t rem = elem;
    for (size_t d = 0; d < nd; ++d) {
      idx[d] = static_cast<int64_t>(rem / gstride[d]);
      rem %= gstride[d];
    }
    size_t ci = t.chunks.size();
    for (size_t k = 0; k < t.chunks.size(); ++k) {
      size_t cand = (hint + k) % t.chunks.size();
      if (ContainsIndex(t.chunks[cand], idx)) {
        ci = cand;
        break;
      }
    }
    if (ci == t.chunks.size()) {
      return Err(EIO, "tensor {}: no chunk holds element {}", t.key, elem);
    }
    hint = ci;
    const Chunk& c = t.chunks[ci];

    // Run of elements contiguous both in the global order and in the chunk.
    uint64_t run_elems = 1;
    uint64_t src_elem = 0;
    if (c.strides.empty()) {
      int64_t j = static_cast<int64_t>(nd) - 1;  // innermost dim where the chunk is partial
      while (j >= 0 && c.sizes[j] == t.shape[j]) --j;
      if (j < 0) {
        run_elems = t.numel() - elem;  // the chunk is the whole tensor
      } else {
        uint64_t inner = gstride[j];  // dims after j are whole in the chunk
        run_elems =
            static_cast<uint64_t>(c.offsets[j] + c.sizes[j] - idx[j]) * inner - elem % inner;
      }
      uint64_t cstride = 1;
      for (size_t d = nd; d-- > 0;) {
        src_elem += static_cast<uint64_t>(idx[d] - c.offsets[d]) * cstride;
        cstride *= static_cast<uint64_t>(c.sizes[d]);
      }
    } else {
      for (size_t d = 0; d < nd; ++d) {
        src_elem +=
            static_cast<uint64_t>(idx[d] - c.offsets[d]) * static_cast<uint64_t>(c.strides[d]);
      }
      if (nd > 0 && c.strides[nd - 1] == 1) {
        run_elems = static_cast<uint64_t>(c.offsets[nd - 1] + c.sizes[nd - 1] - idx[nd - 1]);
      }
    }
    uint64_t run = std::min(run_elems * item - within, end - p);
    NEMOFS_RETURN_IF_ERROR(fn(StoredRun{ci, p, c.byte_offset + src_elem * item + within, run}));
    p += run;
  }
  return Ok();
}

Result<ReadPlan> PlanTensorRead(const Tensor& t, source::Source& src, uint64_t offset,
                                uint64_t length) {
  ReadPlan plan;
  const uint64_t item = torch::Info(t.dtype).itemsize;
  std::vector<source::FileRange> located(t.chunks.size(), source::FileRange{-2, 0, 0});
  NEMOFS_RETURN_IF_ERROR(MapTensorRange(t, offset, length, [&](const StoredRun& r) -> Status {
    const Chunk& c = t.chunks[r.chunk];
    const bool fill = !c.fill.empty();
    if (fill) {  // a chunk that was never written: fill_value repeated
      auto bytes = std::make_shared<std::string>();
      bytes->reserve(r.length);
      for (uint64_t b = r.tensor_offset % item; bytes->size() < r.length; ++b) {
        bytes->push_back(c.fill[b % item]);
      }
      plan.AddMemory(bytes->data(), bytes->size());
      plan.keepalive.push_back(bytes);
      return Ok();
    }
    if (!c.lazy && c.blob == source::kNoBlob) return Err(EIO, "tensor {}: {}", t.key, c.missing);
    if (located[r.chunk].fd == -2) {
      if (c.lazy) {
        NEMOFS_ASSIGN_OR_RETURN(located[r.chunk], c.lazy->Get(src));
      } else {
        NEMOFS_ASSIGN_OR_RETURN(located[r.chunk], src.Locate(c.blob));
      }
    }
    if (r.chunk_offset + r.length > located[r.chunk].length) {
      return Err(EIO, "tensor {}: chunk {} needs bytes up to {} but its file has {}", t.key,
                 r.chunk, r.chunk_offset + r.length, located[r.chunk].length);
    }
    plan.AddFd(located[r.chunk].fd, located[r.chunk].offset + r.chunk_offset, r.length);
    return Ok();
  }));
  return Gather(std::move(plan));
}

Result<std::vector<BlobWrite>> PlanTensorWrite(const Tensor& t, uint64_t offset,
                                               std::string_view data) {
  for (const auto& c : t.chunks) {
    if (c.lazy) {
      if (c.lazy->blob() == source::kNoBlob) {
        return Err(EROFS, "tensor {}: a compressed chunk of it has no file to rewrite", t.key);
      }
      continue;
    }
    if (!c.fill.empty()) {
      return Err(EROFS, "tensor {}: a chunk of it was never written (zarr fill value)", t.key);
    }
    if (c.blob == source::kNoBlob) return Err(EROFS, "tensor {}: {}", t.key, c.missing);
  }
  if (offset + data.size() > t.nbytes() || offset + data.size() < offset) {
    return Err(EINVAL, "tensor {}: a write up to byte {} is past its {} bytes", t.key,
               offset + data.size(), t.nbytes());
  }
  // A chunk whose strides map two elements to one stored element (an
  // expanded view, stride 0; an as_strided overlap) stores one byte for
  // several tensor bytes: they must all be written, with one value.
  bool aliasing = false;
  for (const auto& c : t.chunks) aliasing = aliasing || !Injective(c);
  if (aliasing && (offset != 0 || data.size() != t.nbytes())) {
    return Err(EINVAL,
               "tensor {} is an expanded or overlapping view (several elements share one stored "
               "value): only "
               "a write of the whole tensor can be stored, and this one covers bytes {}..{} of {}",
               t.key, offset, offset + data.size(), t.nbytes());
  }
  std::vector<BlobWrite> out;
  NEMOFS_RETURN_IF_ERROR(MapTensorRange(t, offset, data.size(), [&](const StoredRun& r) -> Status {
    const Chunk& c = t.chunks[r.chunk];
    const uint32_t blob = c.lazy ? c.lazy->blob() : c.blob;
    std::string_view bytes = data.substr(r.tensor_offset - offset, r.length);
    if (!out.empty() && out.back().blob == blob &&
        out.back().offset + out.back().bytes.size() == r.chunk_offset) {
      out.back().Append(bytes, true);
    } else {
      out.push_back(BlobWrite{blob, r.chunk_offset, bytes, c.lazy.get(), nullptr});
    }
    return Ok();
  }));
  std::sort(out.begin(), out.end(), [](const BlobWrite& a, const BlobWrite& b) {
    return a.blob != b.blob ? a.blob < b.blob : a.offset < b.offset;
  });
  // Merge what overlaps (views: a stored byte reached twice) and check that
  // every stored byte gets one value.
  std::vector<BlobWrite> merged;
  for (auto& w : out) {
    if (!merged.empty() && merged.back().blob == w.blob &&
        merged.back().offset + merged.back().bytes.size() >= w.offset) {
      BlobWrite& m = merged.back();
      const uint64_t at = w.offset - m.offset;
      const uint64_t overlap = std::min<uint64_t>(m.bytes.size() - at, w.bytes.size());
      if (m.bytes.substr(at, overlap) != w.bytes.substr(0, overlap)) {
        return Err(EINVAL,
                   "tensor {}: the write gives two different values to one stored byte (an "
                   "expanded or overlapping view); nothing written",
                   t.key);
      }
      m.Append(w.bytes.substr(overlap), !w.own);
    } else {
      merged.push_back(std::move(w));
    }
  }
  return merged;
}

}  // namespace nemofs::checkpoint
