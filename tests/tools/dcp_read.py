#!/usr/bin/python3
"""Reads a PyTorch DCP / Megatron torch_dist checkpoint folder the way PyTorch's
FileSystemReader does and prints what it holds as JSON (used by
tests/unit/dcp_writer_test.cc to check what nemofs commits).

Debian's torch (1.13) has no torch.distributed.checkpoint, so this is its
read path written out (torch/distributed/checkpoint/filesystem.py
FileSystemReader.read_metadata / read_data, DefaultLoadPlanner's lookup by
MetadataIndex(fqn, offset)): `.metadata` is unpickled with the real pickle
module (only the DCP/Megatron classes are stand-ins; torch.Size, dtypes and
_get_layout are torch's own), every tensor chunk is the slice
[offset, offset+length) of its .distcp file loaded with
torch.load(map_location='cpu', weights_only=True) and copied into the global
tensor at the chunk's offsets. Checked: every chunk has a storage_data entry
(matched by fqn and offsets, as MetadataIndex equality does), the item's
shape and dtype are the chunk's, the chunks tile the global shape exactly
once, byte items lie inside their files.

Usage: dcp_read.py DIR [--expect-raw KEY=FILE ...]
Output: {"torch": version, "tensors": {key: {"dtype", "shape", "chunks",
"sha256" (of the C-order little-endian bytes), "files": [...], "raw_match"
(when --expect-raw names it)}}, "bytes": {key: {"length", "sha256"}},
"errors": {key: message}, "classes": [module.name of every class unpickled]}.
Exit 0 when it could read .metadata (per-key errors are in "errors"), 2 if not.
"""
import hashlib
import io
import json
import pathlib
import pickle
import sys

try:
    import torch
except ImportError:
    print("dcp_read.py: /usr/bin/python3 has no torch (install python3-torch: scripts/setup.sh)",
          file=sys.stderr)
    sys.exit(3)

ALLOWED_MODULES = (
    "torch.distributed.checkpoint.",
    "torch.distributed._shard.sharded_tensor.metadata",
    "megatron.core.dist_checkpointing.",
)


class _Stub:
    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            self.__dict__.update(state[1])
        else:
            self.state = state


class Unpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.classes = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if (module, name) == ("pathlib", "PosixPath"):
            return pathlib.PurePosixPath
        if name.endswith("MEM_FORMAT_ENCODING"):
            self.classes.setdefault(full, None)
            return lambda v: ("mem_format", v)
        if any(module.startswith(m) or module == m.rstrip(".") for m in ALLOWED_MODULES):
            if full not in self.classes or self.classes[full] is None:
                self.classes[full] = type(name, (_Stub,), {"_path": full})
            return self.classes[full]
        raise pickle.UnpicklingError(f"global {full} is not a DCP class")


def raw_bytes(t):
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy().tobytes()


def read_slice(folder, info):
    p = folder / info.relative_path
    with open(p, "rb") as f:
        size = f.seek(0, 2)
        if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
            raise ValueError(f"item [{info.offset}, +{info.length}) lies outside "
                             f"{info.relative_path} ({size} bytes)")
        f.seek(info.offset)
        return f.read(info.length)


def tensor_properties(md):
    st = md.properties
    if hasattr(st, "state"):
        dtype, layout, requires_grad, mem, pin = st.state[:5]
    else:
        dtype, layout, mem = st.dtype, st.layout, st.memory_format
    assert layout == torch.strided, layout
    assert mem == ("mem_format", 0), mem
    return dtype


def main(argv):
    folder = pathlib.Path(argv[1])
    expect = {}
    for a in argv[2:]:
        if a.startswith("--expect-raw="):
            a = a[len("--expect-raw="):]
        if "=" in a:
            k, v = a.split("=", 1)
            expect[k] = pathlib.Path(v).read_bytes()
    try:
        with open(folder / ".metadata", "rb") as f:
            up = Unpickler(f)
            meta = up.load()
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"fatal": f"{type(e).__name__}: {e}"}))
        return 2
    out = {"torch": torch.__version__, "tensors": {}, "bytes": {}, "errors": {},
           "classes": sorted(up.classes)}
    # FileSystemReader.set_up_storage_reader: storage_data keyed by
    # MetadataIndex, whose equality is (fqn, offset) (index is only a hint).
    lookup = {}
    for idx, info in meta.storage_data.items():
        off = getattr(idx, "offset", None)
        lookup[(idx.fqn, tuple(off) if off is not None else None)] = (idx, info)
    for key, md in meta.state_dict_metadata.items():
        try:
            if type(md).__name__ == "BytesStorageMetadata":
                idx, info = lookup[(key, None)]
                data = read_slice(folder, info)
                out["bytes"][key] = {"length": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest()}
                continue
            dtype = tensor_properties(md)
            size = tuple(md.size)
            target = torch.zeros(size, dtype=dtype)
            covered = torch.zeros(size, dtype=torch.int32)
            files = []
            for ci, ch in enumerate(md.chunks):
                if (key, tuple(ch.offsets)) not in lookup:
                    raise KeyError(f"chunk at {tuple(ch.offsets)} has no storage_data entry")
                idx, info = lookup[(key, tuple(ch.offsets))]
                files.append(info.relative_path)
                if getattr(info, "transform_descriptors", None):
                    raise ValueError("stream transforms are not supported here")
                t = torch.load(io.BytesIO(read_slice(folder, info)), map_location="cpu",
                               weights_only=True)
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"item of chunk {ci} is a {type(t).__name__}")
                if tuple(t.shape) != tuple(ch.sizes) or t.dtype != dtype:
                    raise ValueError(f"item of chunk {ci} is {t.dtype}{tuple(t.shape)}, the chunk "
                                     f"needs {dtype}{tuple(ch.sizes)}")
                sl = tuple(slice(o, o + s) for o, s in zip(ch.offsets, ch.sizes))
                target[sl] = t
                covered[sl] += 1
            if not bool((covered == 1).all()):
                raise ValueError("the chunks do not tile the global tensor exactly once")
            raw = raw_bytes(target)
            entry = {"dtype": str(dtype).replace("torch.", ""), "shape": list(size),
                     "chunks": len(md.chunks), "sha256": hashlib.sha256(raw).hexdigest(),
                     "files": sorted(set(files))}
            if key in expect:
                entry["raw_match"] = expect[key] == raw
            out["tensors"][key] = entry
        except Exception as e:  # noqa: BLE001
            out["errors"][key] = f"{type(e).__name__}: {e}"
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
