// Integrity check of a compressed stream (issue 16 §4): a gzip file's every
// member is inflated and its trailer CRC-32 and ISIZE compared; xz, zstd and
// bzip2 streams are decoded to the end so that their own checks (xz check
// field, zstd frame checksum, bzip2 block and stream CRCs) run. Streaming:
// memory is bounded by a fixed buffer whatever the stream's size.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace nemofs::source {

// Reads up to `n` bytes into `buf`; returns the count, 0 at the end, -1 on error.
using StreamInput = std::function<long(char* buf, size_t n)>;

// "gzip", "xz", "zstd", "bzip2" for a stream starting with that format's
// magic, "" otherwise.
std::string DetectCompression(std::string_view head);

// Checks the stream. Returns "" when it is intact or not compressed, else one
// message naming `what`, the first bad member and its compressed offset.
std::string CheckStream(const StreamInput& input, const std::string& what);
std::string CheckStreamBytes(std::string_view data, const std::string& what);
// Checks the file at `path` (a compressed .nemo); "" when intact.
std::string CheckStreamFile(const std::string& path);

}  // namespace nemofs::source
