#!/usr/bin/python3
"""Checks the tensor views of a nemofs mount against tests/data/torch/expected.json.

    check_tensors.py MOUNT FIXTURE [--expected PATH] [--torch SOURCE]

FIXTURE is the key of expected.json (path relative to tests/data). Checks:
  * every expected tensor is a file at its tree path, size == nbytes, sha256 equal;
  * its xattrs user.nemofs.dtype / shape match;
  * numpy.fromfile of the file equals the expected bytes (dtypes numpy knows);
  * index.json lists exactly the tensors/ files with the right dtype/shape/nbytes;
  * model.safetensors passes a strict safetensors validation (the rules of the
    reference implementation: 8-byte little-endian header size, JSON header,
    known dtypes, data_offsets contiguous from 0 and covering the data exactly,
    shape x itemsize == length) and each tensor's bytes equal tensors/<key>;
  * per-rank fixtures: merged tensors in tensors/, per-rank ones in ranks/.
With --torch SOURCE (the original file, or a .nemo member extracted to a file),
values read by numpy from the mount are compared with torch.load's tensors.
Prints one line per failure and exits 1 if any.
"""
import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np

from checklib import NP_DTYPES, esc, fail, failures

ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
             "U64": 8, "F8_E8M0": 1}


# torch dtype -> safetensors code (the reference implementation's Dtype names);
# absent: no code (complex128, float8 *fnuz, quantized types).
ST_OF_TORCH = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
               "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
               "bool": "BOOL", "complex64": "C64", "float8_e4m3fn": "F8_E4M3",
               "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
               "float8_e8m0fnu": "F8_E8M0"}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_file(mount, tree_path, want, key):
    path = os.path.join(mount, tree_path)
    if not os.path.isfile(path):
        fail(f"{key}: {tree_path} missing")
        return
    if os.path.getsize(path) != want["nbytes"]:
        fail(f"{key}: size {os.path.getsize(path)} != {want['nbytes']}")
    if sha(path) != want["sha256"]:
        fail(f"{key}: sha256 differs")
    dtype = os.getxattr(path, "user.nemofs.dtype").decode()
    shape = json.loads(os.getxattr(path, "user.nemofs.shape").decode())
    if dtype != want["dtype"] or shape != want["shape"]:
        fail(f"{key}: xattrs {dtype} {shape} != {want['dtype']} {want['shape']}")
    npd = NP_DTYPES.get(want["dtype"])
    if npd is not None:
        arr = np.fromfile(path, dtype=npd)
        if arr.size != int(np.prod(want["shape"])):
            fail(f"{key}: numpy read {arr.size} elements")
        if hashlib.sha256(arr.tobytes()).hexdigest() != want["sha256"]:
            fail(f"{key}: numpy bytes differ")


def tree_path_single(fixture, key):
    if fixture.endswith("lightning.ckpt"):
        if key.startswith("state_dict."):
            return "tensors/" + esc(key[len("state_dict."):])
        if key.startswith("optimizer_states."):
            return "optimizer/" + esc(key[len("optimizer_states."):])
    return "tensors/" + esc(key)


def check_index(mount):
    index = json.load(open(os.path.join(mount, "index.json")))
    listed = {v["path"] for v in index["tensors"].values()}
    on_disk = {"tensors/" + n for n in os.listdir(os.path.join(mount, "tensors"))}
    if listed != on_disk:
        fail(f"index.json lists {len(listed)} tensors, tensors/ has {len(on_disk)}")
    for key, v in index["tensors"].items():
        p = os.path.join(mount, v["path"])
        if os.path.getsize(p) != v["nbytes"]:
            fail(f"index.json nbytes of {key}")
        if os.getxattr(p, "user.nemofs.dtype").decode() != v["dtype"]:
            fail(f"index.json dtype of {key}")
    return index


def check_omitted(meta, header, index):
    """Nothing is left out silently: every tensors/ key is in the header or named in
    __metadata__["nemofs.omitted"] (a JSON object as a string, name -> why), and only
    for a dtype safetensors has no code for; optimizer/ is named when there is one."""
    if not all(isinstance(v, str) for v in meta.values()):
        fail("safetensors: __metadata__ values must be strings")
    omitted = json.loads(meta["nemofs.omitted"]) if "nemofs.omitted" in meta else {}
    for key, v in index["tensors"].items():
        st = ST_OF_TORCH.get(v["dtype"])
        if st is not None and key not in header:
            fail(f"safetensors: {key} ({v['dtype']}) missing from the header")
        if st is None and key not in omitted:
            fail(f"safetensors: {key} ({v['dtype']}) left out but not in nemofs.omitted")
        if key in header and key in omitted:
            fail(f"safetensors: {key} both in the header and omitted")
        if key in header and header[key]["dtype"] != st:
            fail(f"safetensors: {key} dtype {header[key]['dtype']} != {st}")
    if ("optimizer" in index) != ("optimizer/" in omitted):
        fail("safetensors: optimizer/ exists but is not named in nemofs.omitted (or vice versa)")
    for name in set(index.get("unmerged", {})) | set(index.get("unreadable", {})):
        if name not in omitted:
            fail(f"safetensors: {name} is not in tensors/ and not named in nemofs.omitted")
    extra = set(omitted) - set(index["tensors"]) - set(index.get("unmerged", {})) \
        - set(index.get("unreadable", {})) - {"optimizer/"}
    if extra:
        fail(f"safetensors: nemofs.omitted names what the tree does not have: {sorted(extra)}")
    print(f"model.safetensors omits {len(omitted)}: {sorted(omitted)}")


def check_safetensors(mount, index):
    path = os.path.join(mount, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    if n > 100_000_000 or 8 + n > len(raw):
        fail("safetensors header size invalid")
        return
    header = json.loads(raw[8:8 + n])
    check_omitted(header.pop("__metadata__", {}), header, index)
    data = raw[8 + n:]
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items())
    pos = 0
    for start, end, k in spans:
        v = header[k]
        if start != pos:
            fail(f"safetensors: {k} starts at {start}, expected {pos} (gap/overlap)")
        size = ST_DTYPES.get(v["dtype"])
        if size is None:
            fail(f"safetensors: unknown dtype {v['dtype']}")
            continue
        if int(np.prod(v["shape"])) * size != end - start:
            fail(f"safetensors: {k} shape x itemsize != length")
        pos = end
        want = index["tensors"][k]
        if hashlib.sha256(data[start:end]).hexdigest() != sha(os.path.join(mount, want["path"])):
            fail(f"safetensors: bytes of {k} differ from {want['path']}")
    if pos != len(data):
        fail(f"safetensors: data is {len(data)} bytes, offsets cover {pos}")
    # Reading at odd offsets returns the same bytes.
    with open(path, "rb") as f:
        for off in (0, 1, 7, 8, 8 + n - 3, len(raw) // 3, len(raw) - 5):
            f.seek(off)
            if f.read(1000) != raw[off:off + 1000]:
                fail(f"safetensors: read at offset {off} differs")


def compare_with_torch(mount, fixture, source):
    import torch
    obj = torch.load(source, map_location="cpu")

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            yield path, o
        elif isinstance(o, dict):
            for k, v in o.items():
                yield from walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                yield from walk(v, f"{path}.{i}" if path else str(i))

    n = 0
    for key, t in walk(obj, ""):
        tp = os.path.join(mount, tree_path_single(fixture, key))
        if not os.path.exists(tp):
            continue
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            want = t.view(torch.int16).numpy()
            got = np.fromfile(tp, dtype=np.int16).reshape(want.shape)
        else:
            want = t.numpy()
            got = np.fromfile(tp, dtype=want.dtype).reshape(want.shape)
        if not np.array_equal(got, want):
            fail(f"torch: values of {key} differ")
        n += 1
    print(f"compared {n} tensors with torch.load")
    if n == 0:
        fail("no tensor compared with torch")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mount")
    ap.add_argument("fixture")
    ap.add_argument("--expected", default=os.path.join(os.path.dirname(__file__), "..", "data",
                                                      "torch", "expected.json"))
    ap.add_argument("--torch", dest="torch_source")
    a = ap.parse_args()
    count = 0
    exp = json.load(open(a.expected)).get(a.fixture)
    if exp is None:  # not a generated fixture: compare with torch.load only
        if not a.torch_source:
            fail(f"{a.fixture} is not in {a.expected} and no --torch source was given")
        exp = {"tensors": {}}
        count = -1
    if "merged" in exp:
        strip = "model." if os.path.isdir(os.path.join(os.path.dirname(a.expected), "..",
                                                       a.fixture)) else ""
        for key, want in exp["merged"]["tensors"].items():
            k = key[len(strip):] if strip and key.startswith(strip) else key
            check_file(a.mount, "tensors/" + esc(k), want, key)
            count += 1
        ranks = sorted(os.listdir(os.path.join(a.mount, "ranks")))
        members = sorted(exp["members"])
        if len(ranks) != len(members):
            fail(f"{len(ranks)} rank folders for {len(members)} members")
        for member in members:
            parts = member.strip("./").split("/")
            rank_dir = [p for p in parts if "rank" in p][0]
            nums = [int(x) for x in rank_dir.replace("tp_rank_", "").replace("_pp_rank_", " ")
                    .replace("mp_rank_", "").replace("_", " ").split()]
            name = f"tp{nums[0]}_pp{nums[1] if len(nums) > 1 else 0}"
            for key, want in exp["members"][member]["tensors"].items():
                k = key[len(strip):] if strip and key.startswith(strip) else key
                check_file(a.mount, f"ranks/{name}/" + esc(k), want, f"{name}/{key}")
                count += 1
    else:
        for key, want in exp["tensors"].items():
            check_file(a.mount, tree_path_single(a.fixture, key), want, key)
            count += 1
    index = check_index(a.mount)
    check_safetensors(a.mount, index)
    if a.torch_source:
        compare_with_torch(a.mount, a.fixture, a.torch_source)
    print(f"checked {max(count, 0)} tensors, {len(failures)} failures")
    sys.exit(1 if failures or count == 0 else 0)


if __name__ == "__main__":
    main()
