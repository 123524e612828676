#include "checkpoint/tensor.h"

#include <algorithm>
#include <cstring>
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

Result<ReadPlan> PlanTensorRead(const Tensor& t, source::Source& src, uint64_t offset,
                                uint64_t length) {
  ReadPlan plan;
  const uint64_t item = torch::Info(t.dtype).itemsize;
  const uint64_t total = t.nbytes();
  if (offset >= total || length == 0) return plan;
  const uint64_t end = offset + std::min(length, total - offset);
  const size_t nd = t.shape.size();

  // C-order element strides of the global tensor.
  std::vector<uint64_t> gstride(nd, 1);
  for (size_t d = nd; d-- > 1;) gstride[d - 1] = gstride[d] * static_cast<uint64_t>(t.shape[d]);

  std::vector<int64_t> idx(nd);
  std::vector<source::FileRange> located(t.chunks.size(), source::FileRange{-2, 0, 0});
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
    const bool fill = !c.fill.empty();
    if (!fill && !c.lazy && c.blob == source::kNoBlob) {
      return Err(EIO, "tensor {}: {}", t.key, c.missing);
    }
    if (!fill && located[ci].fd == -2) {
      if (c.lazy) {
        NEMOFS_ASSIGN_OR_RETURN(located[ci], c.lazy->Get(src));
      } else {
        NEMOFS_ASSIGN_OR_RETURN(located[ci], src.Locate(c.blob));
      }
    }

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
    if (fill) {  // a chunk that was never written: fill_value repeated
      auto bytes = std::make_shared<std::string>();
      bytes->reserve(run);
      for (uint64_t b = within; bytes->size() < run; ++b) bytes->push_back(c.fill[b % item]);
      plan.AddMemory(bytes->data(), bytes->size());
      plan.keepalive.push_back(bytes);
      p += run;
      continue;
    }
    uint64_t src_off = c.byte_offset + src_elem * item + within;
    if (src_off + run > located[ci].length) {
      return Err(EIO, "tensor {}: chunk {} needs bytes up to {} but its file has {}", t.key, ci,
                 src_off + run, located[ci].length);
    }
    plan.AddFd(located[ci].fd, located[ci].offset + src_off, run);
    p += run;
  }
  return Gather(std::move(plan));
}

}  // namespace nemofs::checkpoint
