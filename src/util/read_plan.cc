#include "nemofs/read_plan.h"

#include <cstring>

#include "util/io.h"

namespace nemofs {

Status ExecuteReadPlan(const ReadPlan& plan, char* out) {
  for (const auto& piece : plan.pieces) {
    if (piece.fd >= 0) {
      NEMOFS_RETURN_IF_ERROR(PreadFull(piece.fd, out, piece.length, piece.offset, "read plan"));
    } else {
      std::memcpy(out, piece.data, piece.length);
    }
    out += piece.length;
  }
  return Ok();
}

}  // namespace nemofs
