// Distributed checkpoints in the catalog (see dist_catalog.cc).
#pragma once

#include "checkpoint/catalog.h"
#include "checkpoint/layout.h"
#include "source/source.h"
#include "util/json_util.h"

namespace nemofs::torch {
struct TorchFile;
}

namespace nemofs::checkpoint {

// Adds the tensors of layout.dist_dir (torch_dist / dcp / zarr) to `cat`, and
// common.pt plus the byte items (ShardedObjects) to its checkpoint.json.
void AddDistCatalog(source::Source& src, const Layout& layout, Catalog* cat);

// zarr backend (zarr_catalog.cc).
void AddZarr(source::Source& src, const Layout& layout, Catalog* cat);

// A whole torch.save object as JSON, tensors as {"tensor": null} (catalog.cc).
Json RenderPickle(const torch::TorchFile& file);

}  // namespace nemofs::checkpoint
