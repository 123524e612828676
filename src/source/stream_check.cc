#include "source/stream_check.h"

#include <archive.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "util/fd.h"

namespace nemofs::source {
namespace {

constexpr size_t kBuf = 256 << 10;

// Buffered reader over a StreamInput that keeps the absolute offset.
class Pull {
 public:
  explicit Pull(const StreamInput& in) : in_(in), buf_(kBuf) {}
  // Makes at least one byte available unless at the end; false at end/error.
  bool Fill() {
    if (pos_ < len_) return true;
    if (eof_) return false;
    long n = in_(buf_.data(), buf_.size());
    if (n < 0) {
      error_ = true;
      eof_ = true;
      return false;
    }
    if (n == 0) {
      eof_ = true;
      return false;
    }
    base_ += len_;
    pos_ = 0;
    len_ = static_cast<size_t>(n);
    return true;
  }
  const char* data() const { return buf_.data() + pos_; }
  size_t avail() const { return len_ - pos_; }
  void Consume(size_t n) { pos_ += n; }
  uint64_t offset() const { return base_ + pos_; }
  bool error() const { return error_; }

 private:
  const StreamInput& in_;
  std::vector<char> buf_;
  size_t pos_ = 0, len_ = 0;
  uint64_t base_ = 0;
  bool eof_ = false, error_ = false;
};

std::string CheckGzip(const StreamInput& input, const std::string& what) {
  Pull in(input);
  std::vector<unsigned char> out(kBuf);
  for (int member = 1;; ++member) {
    // Skip to the next member; trailing zero bytes (tape padding) are what
    // gzip itself accepts, anything else after the last member is garbage.
    if (!in.Fill()) {
      if (in.error()) return fmt::format("{}: read error at offset {}", what, in.offset());
      return "";
    }
    uint64_t start = in.offset();
    if (member > 1 && static_cast<unsigned char>(*in.data()) != 0x1f) {
      while (in.Fill()) {
        const char* d = in.data();
        size_t n = in.avail();
        for (size_t i = 0; i < n; ++i) {
          if (d[i] != 0) {
            return fmt::format("{}: trailing garbage at offset {} after gzip member {}", what,
                               in.offset() + i, member - 1);
          }
        }
        in.Consume(n);
      }
      return in.error() ? fmt::format("{}: read error at offset {}", what, in.offset()) : "";
    }
    z_stream z{};
    if (inflateInit2(&z, 15 + 16) != Z_OK) return fmt::format("{}: zlib init failed", what);
    int rc = Z_OK;
    while (rc != Z_STREAM_END) {
      if (!in.Fill()) {
        inflateEnd(&z);
        if (in.error()) return fmt::format("{}: read error at offset {}", what, in.offset());
        return fmt::format(
            "{}: gzip member {} at offset {} is truncated (the stream ends at offset {} before its "
            "trailer: CRC-32 and length unchecked)",
            what, member, start, in.offset());
      }
      z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
      z.avail_in = static_cast<uInt>(in.avail());
      z.next_out = out.data();
      z.avail_out = static_cast<uInt>(out.size());
      rc = inflate(&z, Z_NO_FLUSH);
      in.Consume(in.avail() - z.avail_in);
      if (rc == Z_STREAM_END || rc == Z_OK) continue;
      if (rc == Z_BUF_ERROR) continue;  // needs more input
      std::string msg = z.msg ? z.msg : "corrupt deflate data";
      uint64_t produced = z.total_out;
      inflateEnd(&z);
      if (msg == "incorrect data check") {
        return fmt::format("{}: gzip member {} at offset {}: CRC-32 in its trailer (at offset {}) "
                           "does not match its {} bytes of data",
                           what, member, start, in.offset() - 4, produced);
      }
      if (msg == "incorrect length check") {
        return fmt::format("{}: gzip member {} at offset {}: length (ISIZE) in its trailer (at "
                           "offset {}) is not its {} bytes of data",
                           what, member, start, in.offset() - 4, produced);
      }
      return fmt::format("{}: gzip member {} at offset {}: {} (near offset {})", what, member,
                         start, msg, in.offset());
    }
    inflateEnd(&z);
  }
}

struct ReadCtx {
  const StreamInput* in;
  std::vector<char> buf;
};

la_ssize_t ReadCb(struct archive*, void* p, const void** out) {
  auto* c = static_cast<ReadCtx*>(p);
  long n = (*c->in)(c->buf.data(), c->buf.size());
  *out = c->buf.data();
  return n < 0 ? -1 : n;
}

std::string CheckWithLibarchive(const StreamInput& input, const std::string& what,
                                const std::string& kind) {
  struct archive* a = archive_read_new();
  archive_read_support_filter_all(a);
  archive_read_support_format_raw(a);
  ReadCtx ctx{&input, std::vector<char>(kBuf)};
  std::string problem;
  auto fail = [&](const char* stage, uint64_t at) {
    const char* e = archive_error_string(a);
    problem = fmt::format("{}: {} stream is corrupt ({}) at uncompressed offset {}: {}", what,
                          kind, stage, at, e ? e : "unknown error");
  };
  if (archive_read_open(a, &ctx, nullptr, ReadCb, nullptr) != ARCHIVE_OK) {
    fail("header", 0);
  } else {
    struct archive_entry* entry = nullptr;
    if (archive_read_next_header(a, &entry) != ARCHIVE_OK) {
      fail("header", 0);
    } else {
      std::vector<char> out(kBuf);
      uint64_t total = 0;
      for (;;) {
        la_ssize_t n = archive_read_data(a, out.data(), out.size());
        if (n < 0) {
          fail("data", total);
          break;
        }
        if (n == 0) break;
        total += static_cast<uint64_t>(n);
      }
    }
  }
  archive_read_free(a);
  return problem;
}

}  // namespace

std::string DetectCompression(std::string_view h) {
  if (h.size() >= 2 && h[0] == '\x1f' && h[1] == '\x8b') return "gzip";
  if (h.size() >= 6 && h.substr(0, 6) == std::string_view("\xfd" "7zXZ\0", 6)) return "xz";
  if (h.size() >= 4 && h.substr(0, 4) == "\x28\xb5\x2f\xfd") return "zstd";
  if (h.size() >= 3 && h.substr(0, 3) == "BZh") return "bzip2";
  return "";
}

std::string CheckStream(const StreamInput& input, const std::string& what) {
  // Peek the magic, then replay it ahead of the rest of the input.
  std::string head(6, '\0');
  size_t got = 0;
  while (got < head.size()) {
    long n = input(head.data() + got, head.size() - got);
    if (n < 0) return fmt::format("{}: read error", what);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  head.resize(got);
  std::string kind = DetectCompression(head);
  if (kind.empty()) return "";
  size_t replayed = 0;
  StreamInput replay = [&](char* buf, size_t n) -> long {
    if (replayed < head.size()) {
      size_t k = std::min(n, head.size() - replayed);
      std::memcpy(buf, head.data() + replayed, k);
      replayed += k;
      return static_cast<long>(k);
    }
    return input(buf, n);
  };
  if (kind == "gzip") return CheckGzip(replay, what);
  return CheckWithLibarchive(replay, what, kind);
}

std::string CheckStreamBytes(std::string_view data, const std::string& what) {
  size_t pos = 0;
  return CheckStream(
      [&](char* buf, size_t n) -> long {
        size_t k = std::min(n, data.size() - pos);
        std::memcpy(buf, data.data() + pos, k);
        pos += k;
        return static_cast<long>(k);
      },
      what);
}

std::string CheckStreamFile(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return fmt::format("{}: cannot open: {}", path, std::strerror(errno));
  return CheckStream(
      [&](char* buf, size_t n) -> long {
        for (;;) {
          ssize_t r = ::read(fd.get(), buf, n);
          if (r < 0 && errno == EINTR) continue;
          return static_cast<long>(r);
        }
      },
      path);
}

}  // namespace nemofs::source
