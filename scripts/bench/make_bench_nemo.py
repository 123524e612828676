#!/usr/bin/python3
"""Create (or reuse) a large .nemo-shaped plain tar for scripts/bench/bench_archive.sh.

    make_bench_nemo.py OUT.nemo SIZE_BYTES

Packs exactly like NeMo's `_make_nemo_file_from_folder`: stage a folder with
`model_config.yaml`, `<32hex>_tokenizer.model` and `model_weights.ckpt`, then
`tarfile.open(OUT, "w:")` + `tar.add(folder, arcname=".")`.

The weights are SIZE_BYTES of pseudo-random, non-zero data made fast: one
64 MiB block from os.urandom, written repeatedly with an 8-byte counter
stamped at the start of every MiB so no two MiB of the file are identical.

If OUT exists and holds `./model_weights.ckpt` of exactly SIZE_BYTES it is
reused as is. Always prints one JSON line on stdout:
    {"tar": ..., "tar_bytes": ..., "offset_data": ..., "size": ..., "reused": ...}
(`offset_data`/`size` of `./model_weights.ckpt`, found with tarfile).
"""
import json
import os
import shutil
import struct
import sys
import tarfile
import time

MIB = 1 << 20
BLOCK = 64 * MIB
MEMBER = "./model_weights.ckpt"
TOKENIZER_HEX = "5f1e0b7c2a9d4e83b6c0a1f2d3e4b5c6"
TOKENIZER = f"{TOKENIZER_HEX}_tokenizer.model"

MODEL_CONFIG = f"""\
mcore_gpt: true
micro_batch_size: 4
global_batch_size: 256
tensor_model_parallel_size: 1
pipeline_model_parallel_size: 1
encoder_seq_length: 4096
max_position_embeddings: 4096
num_layers: 24
hidden_size: 2048
ffn_hidden_size: 5632
num_attention_heads: 16
num_query_groups: 16
init_method_std: 0.02
hidden_dropout: 0.0
attention_dropout: 0.0
normalization: rmsnorm
layernorm_epsilon: 1.0e-05
bias: false
activation: swiglu
position_embedding_type: rope
rotary_percentage: 1.0
share_embeddings_and_output_weights: false
precision: bf16-mixed
tokenizer:
  library: sentencepiece
  type: null
  model: nemo:{TOKENIZER}
  vocab_file: null
  merge_file: null
  delimiter: null
  sentencepiece_legacy: false
data:
  seq_length: 4096
  data_prefix: []
optim:
  name: distributed_fused_adam
  lr: 0.0003
  weight_decay: 0.1
  betas: [0.9, 0.95]
  sched:
    name: CosineAnnealing
    warmup_steps: 2000
    min_lr: 3.0e-05
target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel
nemo_version: 2.0.0
"""


def member_info(path):
    """(offset_data, size) of MEMBER in the tar at path, or None."""
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.name == MEMBER and m.isfile():
                    return m.offset_data, m.size
    except (OSError, tarfile.TarError):
        return None
    return None


def tokenizer_bytes():
    # A few KB that look vaguely like a serialized sentencepiece ModelProto.
    rnd = os.urandom(6 * 1024)
    return b"\x0a\x1cnemofs-bench-tokenizer.model" + rnd


def write_weights(path, size):
    block = bytearray(os.urandom(BLOCK))
    counter = 0
    left = size
    with open(path, "wb", buffering=0) as f:
        while left > 0:
            for off in range(0, BLOCK, MIB):
                struct.pack_into("<Q", block, off, counter | (1 << 63))
                counter += 1
            n = min(left, BLOCK)
            f.write(memoryview(block)[:n])
            left -= n


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out = os.path.abspath(sys.argv[1])
    size = int(sys.argv[2])
    reused = False
    info = member_info(out) if os.path.exists(out) else None
    if info is not None and info[1] == size:
        reused = True
    else:
        t0 = time.monotonic()
        stage = out + ".stage"
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        try:
            with open(os.path.join(stage, "model_config.yaml"), "w") as f:
                f.write(MODEL_CONFIG)
            with open(os.path.join(stage, TOKENIZER), "wb") as f:
                f.write(tokenizer_bytes())
            write_weights(os.path.join(stage, "model_weights.ckpt"), size)
            tmp = out + ".tmp"
            with tarfile.open(tmp, "w:") as tar:
                tar.add(stage, arcname=".")
            os.replace(tmp, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            if os.path.exists(out + ".tmp"):
                os.unlink(out + ".tmp")
        info = member_info(out)
        if info is None or info[1] != size:
            sys.exit(f"make_bench_nemo: {out}: {MEMBER} missing or wrong size after packing")
        print(f"make_bench_nemo: wrote {out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    print(json.dumps({"tar": out, "tar_bytes": os.path.getsize(out), "offset_data": info[0],
                      "size": info[1], "reused": reused}))


if __name__ == "__main__":
    main()
