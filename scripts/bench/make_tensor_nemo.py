#!/usr/bin/python3
"""Create (or reuse) the .nemo files of scripts/bench/bench_tensors.sh and
scripts/bench/bench_tensor_write.sh.

    make_tensor_nemo.py big  OUT.nemo    # one 1 GiB float32 tensor + a small one
    make_tensor_nemo.py many OUT.nemo    # 10,000 small tensors (float32 and bf16)
    make_tensor_nemo.py write OUT.nemo TOTAL_BYTES TENSOR_BYTES
                                         # one TENSOR_BYTES tensor among fillers

Needs torch (Debian python3-torch; run with /usr/bin/python3). Packs exactly
like NeMo: stage a folder with `model_config.yaml` and `model_weights.ckpt`
(= `torch.save(state_dict)`), then `tarfile.open(OUT, "w:")` +
`tar.add(folder, arcname=".")`.

`big`: {'model.embedding.word_embeddings.weight': float32 [262144, 1024] (1 GiB)
of values in [1, 2) (never zero), 'model.output_layer.weight': float32 [1024, 64]}.
`many`: keys model.decoder.layers.{i}.w{j}, i < 1000, j < 10: w0..w7 float32
[16, 16], w8 bfloat16 [16, 16], w9 float32 [64]; 10,000 tensors, about 8.8 MB.
`write`: tensors totalling TOTAL_BYTES (both multiples of 4 MiB, TENSOR_BYTES <=
TOTAL_BYTES): 'model.decoder.layers.0.self_attention.linear_qkv.weight' (WRITE_KEY),
float32 [TENSOR_BYTES / 4096, 1024] of values in [1, 2), in the middle of fillers
'model.decoder.layers.{i}.mlp.linear_fc1.weight', float32 [.., 1024] of at most
256 MiB each, filled with i + 1 (torch.full: fast to make). The target's storage is
the zip record archive/data/N; its bytes lie contiguous in the tar.

If OUT exists and its model_config.yaml carries the marker of the same KIND and
VERSION it is reused. Either way the tar is then inspected without torch
(tarfile + zipfile + a stub unpickler of data.pkl) and one JSON line is printed:
    {"tar", "tar_bytes", "reused", "ckpt_offset" (offset_data of
     ./model_weights.ckpt), "ckpt_size", "count", "total_nbytes",
     "big": {"key", "dtype", "shape", "nbytes", "record", "record_data_offset",
             "storage_offset_bytes", "tar_offset"}   # for KIND big and write
    }
where "big" describes BIG_KEY (KIND big) or WRITE_KEY (KIND write), and
tar_offset is the absolute byte offset in the tar of that tensor's
first byte: ckpt_offset + the zip record's data offset (local header at
ZipInfo.header_offset: 30 + len(filename) + len(extra)) + storage offset.
"""
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tarfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchio import StubUnpickler, Window  # noqa: E402

VERSION = 1
MEMBER = "./model_weights.ckpt"
BIG_KEY = "model.embedding.word_embeddings.weight"
BIG_SHAPE = (262144, 1024)
SMALL_KEY = "model.output_layer.weight"
SMALL_SHAPE = (1024, 64)
MANY_LAYERS = 1000
WRITE_KEY = "model.decoder.layers.0.self_attention.linear_qkv.weight"
WRITE_FILLER = "model.decoder.layers.{}.mlp.linear_fc1.weight"
WRITE_PIECE = 256 << 20  # largest filler tensor, bytes
ROW = 1024 * 4           # bytes of one [.., 1024] float32 row

ELEM = {"FloatStorage": (4, "float32"), "BFloat16Storage": (2, "bfloat16"),
        "HalfStorage": (2, "float16"), "DoubleStorage": (8, "float64"),
        "LongStorage": (8, "int64"), "IntStorage": (4, "int32")}


def marker(kind, sizes=()):
    extra = "".join(f" {k}={v}" for k, v in sizes)
    return f"# nemofs-bench-tensors: kind={kind} version={VERSION}{extra}\n"


def config_text(kind, sizes=()):
    return marker(kind, sizes) + """\
mcore_gpt: true
num_layers: %d
hidden_size: 1024
tensor_model_parallel_size: 1
pipeline_model_parallel_size: 1
precision: bf16-mixed
target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel
nemo_version: 2.0.0
""" % (MANY_LAYERS if kind == "many" else 1)


def build_state_dict(kind, total=0, tensor=0):
    import torch
    torch.manual_seed(20240601)
    if kind == "write":
        fill = []
        rest = total - tensor
        while rest > 0:
            n = min(rest, WRITE_PIECE)
            fill.append(torch.full((n // ROW, 1024), float(len(fill) + 1), dtype=torch.float32))
            rest -= n
        target = torch.empty((tensor // ROW, 1024), dtype=torch.float32).uniform_(1.0, 2.0)
        sd = {}
        half = len(fill) // 2  # the target in the middle of the ckpt: a realistic offset
        for i, t in enumerate(fill[:half]):
            sd[WRITE_FILLER.format(i + 1)] = t
        sd[WRITE_KEY] = target
        for i, t in enumerate(fill[half:], start=half):
            sd[WRITE_FILLER.format(i + 1)] = t
        return sd
    if kind == "big":
        big = torch.empty(BIG_SHAPE, dtype=torch.float32).uniform_(1.0, 2.0)
        small = torch.arange(1, SMALL_SHAPE[0] * SMALL_SHAPE[1] + 1, dtype=torch.float32)
        return {BIG_KEY: big, SMALL_KEY: small.view(SMALL_SHAPE)}
    sd = {}
    for i in range(MANY_LAYERS):
        for j in range(10):
            base = float(i * 10 + j + 1)
            if j < 8:
                t = torch.arange(256, dtype=torch.float32).add_(base).view(16, 16)
            elif j == 8:
                t = torch.arange(256, dtype=torch.float32).add_(base).to(torch.bfloat16).view(16, 16)
            else:
                t = torch.full((64,), base, dtype=torch.float32)
            sd[f"model.decoder.layers.{i}.w{j}"] = t
    return sd


def write_nemo(kind, out, sizes=()):
    import torch
    stage = out + ".stage"
    tmp = out + ".tmp"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        with open(os.path.join(stage, "model_config.yaml"), "w") as f:
            f.write(config_text(kind, sizes))
        sd = build_state_dict(kind, **dict(sizes))
        torch.save(sd, os.path.join(stage, "model_weights.ckpt"))
        del sd
        with tarfile.open(tmp, "w:") as tar:
            tar.add(stage, arcname=".")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Tensor:
    def __init__(self, storage, storage_offset, size):
        self.storage, self.storage_offset, self.size = storage, storage_offset, tuple(size)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return _Tensor(storage, storage_offset, size)




def inspect(out, target=BIG_KEY):
    """Parses OUT; returns the JSON-able dict (minus tar/reused) or raises;
    "big" describes the tensor TARGET."""
    with tarfile.open(out, "r:") as tar:
        m = next((m for m in tar if m.name == MEMBER and m.isfile()), None)
        cfg = next((c for c in tar.getmembers() if c.name == "./model_config.yaml"), None)
        if m is None or cfg is None:
            raise ValueError("no ./model_weights.ckpt or ./model_config.yaml")
        cfg_text = tar.extractfile(cfg).read().decode()
        ckpt_off, ckpt_size = m.offset_data, m.size
    with open(out, "rb") as raw:
        raw.seek(ckpt_off)
        # zipfile needs a seekable file that starts at the member: wrap a window.
        win = Window(raw, ckpt_off, ckpt_size)
        zf = zipfile.ZipFile(win)
        names = zf.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        sd = StubUnpickler(io.BytesIO(zf.read(pkl)), _rebuild_tensor).load()
        total = 0
        big = None
        for key, t in sd.items():
            elem, dtype = ELEM[t.storage["type"]]
            n = 1
            for d in t.size:
                n *= d
            total += n * elem
            if key == target:
                rec = prefix + "data/" + str(t.storage["key"])
                zi = zf.getinfo(rec)
                if zi.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{rec} is compressed")
                raw.seek(ckpt_off + zi.header_offset)
                lh = raw.read(30)
                if lh[:4] != b"PK\x03\x04":
                    raise ValueError(f"{rec}: no local header at {zi.header_offset}")
                name_len, extra_len = struct.unpack("<HH", lh[26:30])
                data_off = zi.header_offset + 30 + name_len + extra_len
                big = {"key": key, "dtype": dtype, "shape": list(t.size), "nbytes": n * elem,
                       "record": rec, "record_data_offset": data_off,
                       "storage_offset_bytes": t.storage_offset * elem,
                       "tar_offset": ckpt_off + data_off + t.storage_offset * elem}
    info = {"ckpt_offset": ckpt_off, "ckpt_size": ckpt_size, "count": len(sd),
            "total_nbytes": total, "config_marker": cfg_text.splitlines()[0]}
    if big is not None:
        info["big"] = big
    return info


def main():
    argc = {"big": 3, "many": 3, "write": 5}
    if len(sys.argv) < 2 or argc.get(sys.argv[1]) != len(sys.argv):
        sys.exit(__doc__)
    kind, out = sys.argv[1], os.path.abspath(sys.argv[2])
    sizes = ()
    target = BIG_KEY
    if kind == "write":
        total, tensor = int(sys.argv[3]), int(sys.argv[4])
        mib4 = 4 << 20
        if tensor <= 0 or total < tensor or total % mib4 or tensor % mib4:
            sys.exit(f"make_tensor_nemo: write: need 0 < TENSOR_BYTES <= TOTAL_BYTES, both "
                     f"multiples of 4 MiB (got {total}, {tensor})")
        sizes = (("total", total), ("tensor", tensor))
        target = WRITE_KEY
    reused = False
    info = None
    if os.path.exists(out):
        try:
            info = inspect(out, target)
            reused = info["config_marker"] + "\n" == marker(kind, sizes)
        except Exception:
            info = None
    if not reused:
        t0 = time.monotonic()
        write_nemo(kind, out, sizes)
        info = inspect(out, target)
        print(f"make_tensor_nemo: wrote {out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    if kind != "many" and "big" not in info:
        sys.exit(f"make_tensor_nemo: {out}: {target} not found")
    del info["config_marker"]
    info.update(tar=out, tar_bytes=os.path.getsize(out), reused=reused)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
