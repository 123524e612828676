#!/usr/bin/python3
"""Create (or reuse) the distributed checkpoints of scripts/bench/bench_dist.sh and
compute reference bytes of their global tensor.

    make_dist_bench.py build KIND DIR              # KIND: dim1 | dim0; prints one JSON line
    make_dist_bench.py structure DIR SIZE_GIB      # for bench_structure_dcp.sh; one JSON line
    make_dist_bench.py expect DIR OUTPREFIX OFF:LEN ...
        # writes OUTPREFIX.<i> = bytes [OFF, OFF+LEN) of the global tensor, for the i-th range

Needs torch (Debian python3-torch 1.13; run with /usr/bin/python3). DIR is a Megatron-Core
torch_dist checkpoint (FORMATS.md section 4.4) holding one float32 tensor `model.w` of
global shape [16384, 32768] (2 GiB), cut into 8 chunks:

  dim1: 8 x [16384, 4096] at offsets (0, 4096 k)  -- every row crosses all 8 chunks
  dim0: 8 x [2048, 32768] at offsets (2048 k, 0)  -- every row lies in one chunk

Chunk k is the only item of `__<k // 2>_<k % 2>.distcp` (4 ranks x 2 writer threads):
the bytes of `torch.save(chunk, BytesIO)` (a torch zip, archive name `archive`). Element
number e of the global tensor (row-major) holds the float32 whose bit pattern is
0x3F800000 + e (normal floats from 1.0 up, all distinct), so misplaced bytes show.

Debian's torch 1.13 has no torch.distributed.checkpoint: `.metadata` is pickled
(protocol 4) from stub classes whose __module__/__qualname__ are the real ones
(registered in sys.modules only while pickling). Also writes `metadata.json`
(sharded_backend torch_dist) and a marker file `.nemofs-bench-dist`; a DIR with the
marker of the same KIND and VERSION is reused.

Either way DIR is then inspected without the stubs (a generic unpickler for `.metadata`,
zipfile for the items) and one JSON line is printed:
    {"dir", "reused", "kind", "key", "dtype", "shape", "nbytes", "dir_bytes",
     "chunks": [{"file", "item_offset", "item_length", "offsets", "sizes",
                 "record", "data_offset", "nbytes"}],
     "ranges": "PATH:DATA_OFFSET:NBYTES,..."}   # raw tensor bytes of each chunk, in chunk order
where data_offset is the absolute offset in the .distcp file of the chunk's first tensor
byte: item offset + the local header offset of `archive/data/0` in the item's zip
+ 30 + name length + extra length.

`structure DIR SIZE_GIB` (scripts/bench/bench_structure_dcp.sh) writes a torch_dist folder
of N = round(4 x SIZE_GIB) float32 tensors `model.decoder.layers.<i>.mlp.linear_fc1.weight`
of [65536, 1024] (256 MiB each), every one cut on dim 0 into 8 chunks of [8192, 1024]
(32 MiB), chunk k of every tensor in `__<k // 2>_<k % 2>.distcp` (the way a 4-rank,
2-thread DCP save spreads a sharded model), filled with torch.full (tensor i, chunk k:
the value 8 i + k + 1). Same stubs, `metadata.json` and marker (kind structure-N). It
prints {"dir", "reused", "keys", "tensor_bytes", "metadata_bytes", "dir_bytes",
"files": [the .distcp names]}.

`expect` reads `.metadata` the same way, `torch.load`s each chunk item that overlaps a
requested range (so the layout is checked by torch, not by our own offsets), assembles
the rows of the global tensor and also checks them against the formula above.
"""
import contextlib
import enum
import io
import json
import os
import pickle
import shutil
import struct
import sys
import time
import types
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchio import StubUnpickler, Window  # noqa: E402

VERSION = 1
KEY = "model.w"
SHAPE = (16384, 32768)
NCHUNK = 8
ELEM = 4
BASE_BITS = 0x3F800000
MARKER = ".nemofs-bench-dist"
M_META = "torch.distributed.checkpoint.metadata"
M_FS = "torch.distributed.checkpoint.filesystem"
DIST_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


def chunk_layout(kind):
    """[(offsets, sizes)] of the 8 chunks of KIND."""
    rows, cols = SHAPE
    if kind == "dim1":
        w = cols // NCHUNK
        return [((0, w * k), (rows, w)) for k in range(NCHUNK)]
    h = rows // NCHUNK
    return [((h * k, 0), (h, cols)) for k in range(NCHUNK)]


def file_name(k):
    return f"__{k // 2}_{k % 2}.distcp"


def marker_text(kind):
    return f"nemofs-bench-dist kind={kind} version={VERSION}\n"


# ---- stub DCP classes with the real module paths (writing only) ----------------------
_STUBS = {}  # module -> {name: class}


def _stub(module, name, cls):
    cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    _STUBS.setdefault(module, {})[name] = cls
    return cls


class _Plain:
    """Pickles like a @dataclass under protocol 4: NEWOBJ + BUILD {field: value}."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


Metadata = _stub(M_META, "Metadata", type("Metadata", (_Plain,), {}))
TensorStorageMetadata = _stub(M_META, "TensorStorageMetadata", type("TensorStorageMetadata", (_Plain,), {}))
ChunkStorageMetadata = _stub(M_META, "ChunkStorageMetadata", type("ChunkStorageMetadata", (_Plain,), {}))
_StorageInfo = _stub(M_FS, "_StorageInfo", type("_StorageInfo", (_Plain,), {}))
class _MEM_FORMAT_ENCODING(enum.IntEnum):
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2

    # GLOBAL <enum class> + (0,) REDUCE, as FORMATS.md 4.4.1 shows (CPython >= 3.11 would
    # otherwise pickle members by name through builtins.getattr)
    def __reduce_ex__(self, proto):
        return self.__class__, (self._value_,)


_stub(M_META, "_MEM_FORMAT_ENCODING", _MEM_FORMAT_ENCODING)


class _MetadataIndex(_Plain):
    """frozen dataclass: state {'fqn', 'offset', 'index'}; hash/eq on (fqn, offset)."""

    def __init__(self, fqn, offset, index):
        import torch
        super().__init__(fqn=fqn, offset=torch.Size(offset), index=index)

    def __hash__(self):
        return hash((self.fqn, tuple(self.offset)))

    def __eq__(self, other):
        return isinstance(other, _MetadataIndex) and (self.fqn, tuple(self.offset)) == (other.fqn, tuple(other.offset))


MetadataIndex = _stub(M_META, "MetadataIndex", type("MetadataIndex", (_MetadataIndex,), {}))


class _TensorProperties:
    """__getstate__ is the 5-tuple (dtype, layout, requires_grad, memory format, pin_memory)."""

    def __init__(self, dtype):
        import torch
        self.dtype, self.layout = dtype, torch.strided

    def __getstate__(self):
        return (self.dtype, self.layout, False, _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT, False)


TensorProperties = _stub(M_META, "TensorProperties", type("TensorProperties", (_TensorProperties,), {}))


@contextlib.contextmanager
def stub_modules():
    saved = {}
    try:
        for mod, names in _STUBS.items():
            saved[mod] = sys.modules.get(mod)
            m = types.ModuleType(mod)
            for n, c in names.items():
                setattr(m, n, c)
            sys.modules[mod] = m
        yield
    finally:
        for mod, old in saved.items():
            if old is None:
                sys.modules.pop(mod, None)
            else:
                sys.modules[mod] = old


# ---- writing ---------------------------------------------------------------------------
def make_chunk(offsets, sizes):
    """The chunk's values: float32 with bit pattern BASE_BITS + global element index."""
    import torch
    (r0, c0), (nr, nc) = offsets, sizes
    bits = torch.arange(r0, r0 + nr, dtype=torch.int32).mul_(SHAPE[1]).add_(BASE_BITS + c0).unsqueeze(1)
    bits = bits + torch.arange(nc, dtype=torch.int32).unsqueeze(0)
    return bits.view(torch.float32)


def write_folder(out, tensors, marker):
    """Writes the torch_dist folder OUT: TENSORS is [(key, shape, [(file, offsets, sizes,
    make)])], make() giving the chunk's tensor; each chunk is appended to its file as the
    bytes of torch.save(chunk, BytesIO), in the order given."""
    import torch
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        state, storage = {}, {}
        for key, shape, pieces in tensors:
            chunks = []
            for k, (name, offs, sizes, make) in enumerate(pieces):
                buf = io.BytesIO()
                torch.save(make(), buf)
                path = os.path.join(tmp, name)
                item_off = os.path.getsize(path) if os.path.exists(path) else 0
                with open(path, "ab") as f:
                    f.write(buf.getbuffer())
                length = buf.getbuffer().nbytes
                del buf
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(sizes)))
                storage[MetadataIndex(key, offs, k)] = _StorageInfo(relative_path=name, offset=item_off,
                                                                    length=length)
            state[key] = TensorStorageMetadata(properties=TensorProperties(torch.float32),
                                               size=torch.Size(shape), chunks=chunks)
        md = Metadata(state_dict_metadata=state, planner_data=None, storage_data=storage)
        with stub_modules(), open(os.path.join(tmp, ".metadata"), "wb") as f:
            pickle.dump(md, f, protocol=4)
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(DIST_METADATA, f)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(marker)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dir(kind, out):
    pieces = [(file_name(k), offs, sizes, lambda o=offs, z=sizes: make_chunk(o, z))
              for k, (offs, sizes) in enumerate(chunk_layout(kind))]
    write_folder(out, [(KEY, SHAPE, pieces)], marker_text(kind))


# ---- the structural-write folder (bench_structure_dcp.sh) ------------------------------
S_SHAPE = (65536, 1024)  # 256 MiB of float32 per tensor
S_ROWS = S_SHAPE[0] // NCHUNK


def s_key(i):
    return f"model.decoder.layers.{i}.mlp.linear_fc1.weight"


def s_tensors(n):
    import torch

    def fill(i, k):
        return lambda: torch.full((S_ROWS, S_SHAPE[1]), float(8 * i + k + 1), dtype=torch.float32)
    return [(s_key(i), S_SHAPE, [(file_name(k), (S_ROWS * k, 0), (S_ROWS, S_SHAPE[1]), fill(i, k))
                                 for k in range(NCHUNK)])
            for i in range(n)]


def structure(out, size_gib):
    n = max(1, int(float(size_gib) * 4 + 0.5))
    marker = marker_text(f"structure-{n}")
    reused = False
    try:
        with open(os.path.join(out, MARKER)) as f:
            reused = f.read() == marker
    except OSError:
        pass
    if not reused:
        t0 = time.monotonic()
        write_folder(out, s_tensors(n), marker)
        print(f"make_dist_bench: wrote {out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    with open(os.path.join(out, ".metadata"), "rb") as f:
        md = _MetaUnpickler(f).load()
    keys = sorted(md.state_dict_metadata)
    if keys != sorted(s_key(i) for i in range(n)):
        sys.exit(f"make_dist_bench: {out}: unexpected keys {keys[:3]}...")
    for k in keys:
        if tuple(md.state_dict_metadata[k].size) != S_SHAPE:
            sys.exit(f"make_dist_bench: {out}: {k} has shape {md.state_dict_metadata[k].size}")
    files = sorted(x for x in os.listdir(out) if x.endswith(".distcp"))
    info = {"dir": out, "reused": reused, "keys": keys,
            "tensor_bytes": n * S_SHAPE[0] * S_SHAPE[1] * ELEM,
            "metadata_bytes": os.path.getsize(os.path.join(out, ".metadata")),
            "dir_bytes": sum(os.path.getsize(os.path.join(out, x)) for x in os.listdir(out)),
            "files": files}
    print(json.dumps(info))


# ---- reading (no stubs) ----------------------------------------------------------------
class _Obj:
    """Any DCP class: keeps the BUILD state (dict -> attributes, tuple -> .state)."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, st):
        if isinstance(st, dict):
            self.__dict__.update(st)
        else:
            self.state = st


class _MetaUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("torch.distributed.") or module.startswith("megatron."):
            return type(name, (_Obj,), {})
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and name in ("float32", "bfloat16", "float16"):
            return name
        if (module, name) == ("torch.serialization", "_get_layout"):
            return lambda s: s
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def read_metadata(d):
    with open(os.path.join(d, ".metadata"), "rb") as f:
        md = _MetaUnpickler(f).load()
    tsm = md.state_dict_metadata[KEY]
    if tsm.properties.state[0] != "float32":
        raise ValueError(f"{KEY}: dtype {tsm.properties.state[0]}")
    if tuple(tsm.size) != SHAPE:
        raise ValueError(f"{KEY}: shape {tsm.size}")
    chunks = []
    for c in tsm.chunks:
        offs, sizes = tuple(c.offsets), tuple(c.sizes)
        si = next(v for k, v in md.storage_data.items() if k.fqn == KEY and tuple(k.offset) == offs)
        chunks.append({"file": si.relative_path, "item_offset": si.offset, "item_length": si.length,
                       "offsets": list(offs), "sizes": list(sizes)})
    return chunks




def inspect(d):
    chunks = read_metadata(d)
    for c in chunks:
        with open(os.path.join(d, c["file"]), "rb") as raw:
            zf = zipfile.ZipFile(Window(raw, c["item_offset"], c["item_length"]))
            pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            storage, off, size, stride = StubUnpickler(
                io.BytesIO(zf.read(pkl)),
                lambda storage, off, size, stride: (storage, off, tuple(size), tuple(stride))).load()
            rows, cols = c["sizes"]
            if (storage["type"], off, size, stride) != ("FloatStorage", 0, (rows, cols), (cols, 1)):
                raise ValueError(f"{c['file']}: unexpected item tensor {storage} {off} {size} {stride}")
            rec = pkl[: -len("data.pkl")] + "data/" + str(storage["key"])
            zi = zf.getinfo(rec)
            if zi.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{rec} is compressed")
            raw.seek(c["item_offset"] + zi.header_offset)
            lh = raw.read(30)
            if lh[:4] != b"PK\x03\x04":
                raise ValueError(f"{c['file']}: no local header of {rec}")
            name_len, extra_len = struct.unpack("<HH", lh[26:30])
            c["record"] = rec
            c["data_offset"] = c["item_offset"] + zi.header_offset + 30 + name_len + extra_len
            c["nbytes"] = rows * cols * ELEM
            if zi.file_size != c["nbytes"]:
                raise ValueError(f"{rec}: {zi.file_size} bytes, expected {c['nbytes']}")
    return chunks


def expect(d, prefix, specs):
    import torch
    chunks = read_metadata(d)
    row_bytes = SHAPE[1] * ELEM
    ranges = []
    for s in specs:
        off, length = (int(x) for x in s.split(":"))
        if off % row_bytes or length % row_bytes or off + length > SHAPE[0] * row_bytes:
            sys.exit(f"make_dist_bench: range {s} is not whole rows of {KEY}")
        r0 = off // row_bytes
        ranges.append((r0, length // row_bytes, torch.zeros((length // row_bytes, SHAPE[1]), dtype=torch.float32)))
    for c in chunks:
        (cr, cc), (nr, nc) = c["offsets"], c["sizes"]
        if not any(r0 < cr + nr and cr < r0 + n for r0, n, _ in ranges):
            continue
        with open(os.path.join(d, c["file"]), "rb") as f:
            f.seek(c["item_offset"])
            item = f.read(c["item_length"])
        t = torch.load(io.BytesIO(item), map_location="cpu")
        del item
        if tuple(t.shape) != (nr, nc) or t.dtype != torch.float32:
            sys.exit(f"make_dist_bench: {c['file']}: item is {t.dtype} {tuple(t.shape)}, expected {(nr, nc)}")
        for r0, n, out in ranges:
            lo, hi = max(r0, cr), min(r0 + n, cr + nr)
            if lo < hi:
                out[lo - r0:hi - r0, cc:cc + nc] = t[lo - cr:hi - cr]
        del t
    for i, (r0, n, out) in enumerate(ranges):
        formula = make_chunk((r0, 0), (n, SHAPE[1]))
        if not torch.equal(out.view(torch.int32), formula.view(torch.int32)):
            sys.exit(f"make_dist_bench: rows {r0}..{r0 + n - 1} assembled from the chunks do not match the formula")
        with open(f"{prefix}.{i}", "wb") as f:
            f.write(out.numpy().tobytes())


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "expect":
        expect(os.path.abspath(sys.argv[2]), sys.argv[3], sys.argv[4:])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "structure":
        structure(os.path.abspath(sys.argv[2]), sys.argv[3])
        return
    if len(sys.argv) != 4 or sys.argv[1] != "build" or sys.argv[2] not in ("dim1", "dim0"):
        sys.exit(__doc__)
    kind, out = sys.argv[2], os.path.abspath(sys.argv[3])
    reused = False
    chunks = None
    try:
        with open(os.path.join(out, MARKER)) as f:
            if f.read() == marker_text(kind):
                chunks = inspect(out)
                reused = True
    except Exception:
        chunks = None
    if not reused:
        t0 = time.monotonic()
        write_dir(kind, out)
        chunks = inspect(out)
        print(f"make_dist_bench: wrote {out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    layout = chunk_layout(kind)
    if [(tuple(c["offsets"]), tuple(c["sizes"])) for c in chunks] != layout:
        sys.exit(f"make_dist_bench: {out}: chunks differ from the {kind} layout")
    info = {"dir": out, "reused": reused, "kind": kind, "key": KEY, "dtype": "float32",
            "shape": list(SHAPE), "nbytes": SHAPE[0] * SHAPE[1] * ELEM,
            "dir_bytes": sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)),
            "chunks": chunks,
            "ranges": ",".join(f"{os.path.join(out, c['file'])}:{c['data_offset']}:{c['nbytes']}" for c in chunks)}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
