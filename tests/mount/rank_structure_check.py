#!/usr/bin/python3
"""Structural writes of a per-rank checkpoint through a nemofs mount (issue 11).

  rank_structure_check.py edit MOUNT PLAN.json
      Through the mount: deletes a layer tensor, renames one (within its
      rule), replaces tensors with ones of other shapes (a column-parallel,
      a row-parallel and, with SwiGLU, a gated fc1), adds a new layer tensor
      and a new non-layer one, grows the word embeddings by the xattr, and
      checks the refusals (EINVAL): a name without a TP rule, a shape TP
      cannot split, a rename to another pipeline stage. Writes PLAN.json.
  rank_structure_check.py check ORIGINAL SOURCE PLAN.json
      Loads every rank file of ORIGINAL and SOURCE (.nemo tars or extracted folders) with
      torch.load, merges each into global tensors by Megatron's rules
      (written here again, independently of nemofs: TP concatenation along
      the split dim, SwiGLU halves, PP layer renumbering), applies PLAN to
      the original's and compares every tensor. Also checks placement:
      each rank file holds exactly what the rules give it, and every rank
      tensor the plan does not touch is unchanged.
"""
import io
import json
import os
import re
import sys
import tarfile

import numpy as np
import torch
import yaml

DIM0 = ("word_embeddings.weight", "linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
        "linear_fc1.bias", "output_layer.weight")
DIM1 = ("linear_proj.weight", "linear_fc2.weight")


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def split_dim(key):
    if key.endswith(DIM0):
        return 0
    if key.endswith(DIM1):
        return 1
    return None  # replicated (norms, biases of row-parallel layers)


# ---- reading a per-rank .nemo


def members(path):
    """(name, bytes) of every file of a .nemo tar (in order) or an extracted folder."""
    if os.path.isdir(path):
        for dirpath, _, names in os.walk(path):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                yield os.path.relpath(p, path), open(p, "rb").read()
        return
    t = tarfile.open(path)
    for m in t.getmembers():
        if m.isfile():
            yield m.name.lstrip("./"), t.extractfile(m).read()


def ranks_of(path):
    """{(tp, pp): state dict}, config."""
    files, cfg = {}, None
    for name, data in members(path):
        if name == "model_config.yaml":
            cfg = yaml.safe_load(data)
        got = re.match(r"(?:tp_rank_(\d+)_pp_rank_(\d+)|mp_rank_(\d+))/model_weights.ckpt$", name)
        if got:
            tp = int(got.group(1) or got.group(3))
            pp = int(got.group(2) or 0)
            files[(tp, pp)] = data  # the last of a name wins, as in NeMo
    out = {}
    for k, data in files.items():
        out[k] = torch.load(io.BytesIO(data), map_location="cpu")
    return out, cfg


def layer_of(key):
    m = re.search(r"(^|\.)layers\.(\d+)\.", key)
    return (m.start(2), m.end(2), int(m.group(2))) if m else None


def merge(ranks, cfg):
    tps = 1 + max(tp for tp, _ in ranks)
    pps = 1 + max(pp for _, pp in ranks)
    per_stage = cfg["num_layers"] // pps
    gated = cfg.get("activation") in ("swiglu", "fast-swiglu")
    groups = {}
    for (tp, pp), sd in sorted(ranks.items()):
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor) or "_extra_state" in k:
                continue
            g = k
            at = layer_of(k)
            if at and pps > 1:
                g = k[:at[0]] + str(pp * per_stage + at[2]) + k[at[1]:]
            groups.setdefault(g, {}).setdefault(pp, {})[tp] = v
    out = {}
    for g, stages in groups.items():
        parts = stages[min(stages)]
        shards = [parts[r] for r in range(tps)]
        d = split_dim(g)
        if tps == 1 or d is None:
            out[g] = shards[0]
        elif gated and d == 0 and g.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            halves = [s.chunk(2, 0) for s in shards]
            out[g] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
        else:
            out[g] = torch.cat(shards, d)
    return out


def esc(key):
    return key.replace("%", "%25").replace("/", "%2F")


# ---- edit


def expect_einval(what, fn):
    try:
        fn()
    except OSError as e:
        if e.errno != 22:
            fail("%s: %s, expected EINVAL" % (what, e))
        return
    fail(what + ": accepted, expected EINVAL")


def edit(mount, plan_path):
    index = json.load(open(os.path.join(mount, "index.json")))["tensors"]
    tdir = os.path.join(mount, "tensors")
    gated = "swiglu" in open(os.path.join(mount, "config.yaml")).read()
    layers = sorted({layer_of(k)[2] for k in index if layer_of(k)})
    last = layers[-1]
    plan = {"deleted": [], "renamed": {}, "added": {}, "grown": {}}

    def key(layer, rest):
        return "model.decoder.layers.%d.%s" % (layer, rest)

    def added(k, a):
        plan["added"][k] = {"values": a.astype(np.float64).tolist(), "dtype": str(a.dtype),
                            "shape": list(a.shape)}

    # Delete a layer tensor of the last stage; rename a norm within its rule.
    gone = key(last, "mlp.linear_fc2.weight")
    os.unlink(os.path.join(tdir, gone))
    plan["deleted"].append(gone)
    old = key(0, "mlp.linear_fc1.layer_norm_bias")
    new = key(0, "pre_mlp_layernorm.bias")
    os.rename(os.path.join(tdir, old), os.path.join(tdir, new))
    plan["renamed"][old] = new
    # Refused renames: to another pipeline stage (when there are two), to a
    # name without a TP rule.
    if len(index) and any("pp_rank_001" in m for m in os.listdir(os.path.join(mount, "archive"))):
        expect_einval("rename to another stage", lambda: os.rename(
            os.path.join(tdir, key(0, "self_attention.linear_qkv.layer_norm_weight")),
            os.path.join(tdir, key(last, "pre_mlp_layernorm.weight"))))
    expect_einval("rename to a name without a TP rule", lambda: os.rename(
        os.path.join(tdir, key(0, "self_attention.linear_qkv.weight")),
        os.path.join(tdir, "model.qkv.unknown")))

    # Replaced with other shapes: column-parallel (or gated fc1), row-parallel.
    a = (np.arange(8 * 4, dtype=np.float32).reshape(8, 4) - 3) / 4
    np.save(os.path.join(tdir, key(last, "mlp.linear_fc1.weight") + ".npy"), a)
    added(key(last, "mlp.linear_fc1.weight"), a)
    b = np.arange(6 * 8, dtype=np.float64).reshape(6, 8) * 3
    np.save(os.path.join(tdir, key(0, "self_attention.linear_proj.weight") + ".npy"), b)
    added(key(0, "self_attention.linear_proj.weight"), b)
    # New: a replicated bias of a layer, a column-parallel non-layer tensor.
    c = np.arange(64, dtype=np.float32) / 8
    np.save(os.path.join(tdir, key(last, "self_attention.linear_proj.bias") + ".npy"), c)
    added(key(last, "self_attention.linear_proj.bias"), c)
    d = np.arange(4 * 6, dtype=np.int32).reshape(4, 6) - 7
    np.save(os.path.join(tdir, "model.extra.output_layer.weight.npy"), d)
    added("model.extra.output_layer.weight", d)
    # Refused at close: no TP rule for the name, rows TP cannot split.
    expect_einval("a name without a TP rule",
                  lambda: np.save(os.path.join(tdir, "nemofs.unknown.npy"), a))
    expect_einval("rows TP cannot split", lambda: np.save(
        os.path.join(tdir, "model.odd.output_layer.weight.npy"), np.zeros((5, 3), np.float32)))
    for k in ("nemofs.unknown", "model.odd.output_layer.weight"):
        if os.path.exists(os.path.join(tdir, k)) or os.path.exists(os.path.join(tdir, k + ".npy")):
            fail(k + ": a refused file is still there")
    # The word embeddings grown by two rows (one per TP rank).
    emb = "model.embedding.word_embeddings.weight"
    v = index[emb]
    shape = [v["shape"][0] + 2, v["shape"][1]]
    p = os.path.join(tdir, emb)
    os.setxattr(p, "user.nemofs.shape", ("%d,%d" % tuple(shape)).encode())
    os.truncate(p, shape[0] * shape[1] * 2)
    plan["grown"][emb] = shape
    # A shape TP cannot split is refused at the setxattr.
    expect_einval("an odd shape by xattr", lambda: os.setxattr(
        os.path.join(tdir, key(0, "self_attention.linear_qkv.weight")), "user.nemofs.shape",
        b"191,64"))
    plan["gated"] = gated
    json.dump(plan, open(plan_path, "w"))
    print("edited: %d deleted, %d renamed, %d added" % (
        len(plan["deleted"]), len(plan["renamed"]), len(plan["added"])))


# ---- check


def check(original, source, plan_path):
    plan = json.load(open(plan_path))
    before, cfg = ranks_of(original)
    after, _ = ranks_of(source)
    if set(before) != set(after):
        fail("rank files: %s, were %s" % (sorted(after), sorted(before)))
    want = merge(before, cfg)
    got = merge(after, cfg)
    for k in plan["deleted"]:
        del want[k]
    for k, n in plan["renamed"].items():
        want[n] = want.pop(k)
    dtypes = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32}
    for k, a in plan["added"].items():
        want[k] = torch.tensor(np.array(a["values"])).to(dtypes[a["dtype"]]).reshape(a["shape"])
    for k, shape in plan["grown"].items():
        old = want[k]
        want[k] = torch.cat([old, torch.zeros([shape[0] - old.shape[0]] + list(old.shape[1:]),
                                              dtype=old.dtype)])
    problems = []
    if set(want) != set(got):
        problems.append("keys: missing %s, unexpected %s" % (
            sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5]))
    for k in sorted(set(want) & set(got)):
        w, g = want[k], got[k]
        if w.dtype != g.dtype or list(w.shape) != list(g.shape) or not torch.equal(w, g):
            problems.append("%s: %s %s, expected %s %s" % (k, g.dtype, list(g.shape), w.dtype,
                                                           list(w.shape)))
    # Placement: a layer key only in its stage's files, a non-layer new key
    # in every file; untouched rank tensors unchanged, every other value too.
    pps = 1 + max(pp for _, pp in before)
    per_stage = cfg["num_layers"] // pps
    touched = set()
    old_of = {n: k for k, n in plan["renamed"].items()}
    had = merge(before, cfg)

    def local_of(k):
        at = layer_of(k)
        if at and pps > 1:
            return k[:at[0]] + str(at[2] % per_stage) + k[at[1]:], at[2] // per_stage
        return k, None

    for k in list(plan["deleted"]) + list(plan["renamed"]) + list(plan["renamed"].values()) + \
            list(plan["added"]) + list(plan["grown"]):
        local, stage = local_of(k)
        touched.add(local)
        for (tp, pp), sd in after.items():
            if stage is not None and pp != stage:
                continue  # that stage's key of this name is another layer
            here = local in sd
            if k in plan["deleted"] or k in plan["renamed"]:
                should = False
            elif k in old_of:
                should = local_of(old_of[k])[0] in before[(tp, pp)]
            elif k in had:  # replaced or grown: where it was
                should = local in before[(tp, pp)]
            else:  # new: its stage, or every rank file
                should = True
            if here != should:
                problems.append("%s (%s) in rank tp%d pp%d: %s, expected %s" % (
                    k, local, tp, pp, here, should))
    for r, sd in before.items():
        for k, v in sd.items():
            if k in touched:
                continue
            if isinstance(v, torch.Tensor):
                if k not in after[r] or not torch.equal(v, after[r][k]):
                    problems.append("rank %s: %s changed" % (r, k))
            elif repr(v) != repr(after[r].get(k)) and not isinstance(v, io.BytesIO):
                problems.append("rank %s: value %s changed" % (r, k))
    if problems:
        fail("; ".join(problems[:10]))
    print("ok: %d merged tensors over %d rank files" % (len(got), len(after)))


if __name__ == "__main__":
    if sys.argv[1] == "edit":
        edit(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        fail("usage: edit MOUNT PLAN | check ORIGINAL SOURCE PLAN")
