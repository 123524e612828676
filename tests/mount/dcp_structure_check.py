#!/usr/bin/python3
"""Structural writes of a PyTorch DCP / Megatron torch_dist folder through a
nemofs mount (issue 11).

  dcp_structure_check.py edit MOUNT PLAN.json
      Through the mount: deletes a tensor, renames another, adds a float32
      and an int64 tensor (np.save), replaces one with another dtype and
      shape, grows a 2-d one by a row (xattr + truncate), deletes an
      optimizer tensor when there is optimizer/. Writes what it did, with
      the sha256 of every tensor's bytes as read before, to PLAN.json.
  dcp_structure_check.py check ORIGINAL_DIR SOURCE_DIR PLAN.json
      Reads both DCP folders with tests/tools/dcp_read.py (PyTorch's read
      path: real pickle, torch.load of every item) and compares every
      tensor and byte item with the original plus the plan. Every .distcp
      file of the original is still there, byte for byte (a commit writes
      only the new items and .metadata).
  dcp_structure_check.py check-zarr ORIGINAL_DIR SOURCE_DIR PLAN.json
      The same for a Megatron-Core zarr folder, read with the zarr library
      (every array folder with a .zarray): every tensor as the plan says,
      the chunk files of the arrays it left alone byte for byte as they
      were, and nothing nemofs uses for its commit left behind.
"""
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
READ = os.path.join(HERE, "..", "tools", "dcp_read.py")


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def esc(key):
    return key.replace("%", "%25").replace("/", "%2F")


def sha(b):
    return hashlib.sha256(b).hexdigest()


def edit(mount, plan_path):
    index = json.load(open(os.path.join(mount, "index.json")))
    tensors = index["tensors"]
    tdir = os.path.join(mount, "tensors")
    keys = sorted(k for k, v in tensors.items() if v["nbytes"] > 0 and "/" not in k)
    plan = {"deleted": [], "renamed": {}, "added": {}, "grown": {}}
    gone, moved, replaced = keys[0], keys[1], keys[2]
    os.unlink(os.path.join(tdir, esc(gone)))
    plan["deleted"].append(gone)
    os.rename(os.path.join(tdir, esc(moved)), os.path.join(tdir, esc(moved + ".renamed")))
    plan["renamed"][moved] = moved + ".renamed"

    def added(key, a):
        c = np.ascontiguousarray(a)
        plan["added"][key] = {"dtype": str(c.dtype), "shape": list(c.shape),
                              "sha256": sha(c.astype(c.dtype.newbyteorder("<")).tobytes())}

    a = np.arange(40, dtype=np.float32).reshape(10, 4) / 3
    np.save(os.path.join(tdir, "model.nemofs_head.weight.npy"), a)
    added("model.nemofs_head.weight", a)
    b = np.asfortranarray(np.arange(6, dtype=">i8").reshape(2, 3) - 2)
    np.save(os.path.join(tdir, "model.nemofs_index.npy"), b)
    added("model.nemofs_index", b.astype("<i8"))
    c = np.arange(5, dtype=np.float64) * 1.5
    np.save(os.path.join(tdir, esc(replaced) + ".npy"), c)
    added(replaced, c)
    for key in keys[3:]:
        v = tensors[key]
        if len(v["shape"]) != 2:
            continue
        p = os.path.join(tdir, esc(key))
        before = open(p, "rb").read()
        shape = [v["shape"][0] + 1, v["shape"][1]]
        os.setxattr(p, "user.nemofs.shape", ("%d,%d" % tuple(shape)).encode())
        os.truncate(p, len(before) // v["shape"][0] * shape[0])
        plan["grown"][key] = {"shape": shape, "sha256": sha(before + b"\0" * (len(before) // v["shape"][0]))}
        break
    for key, want in plan["added"].items():
        shape = json.loads(os.getxattr(os.path.join(tdir, esc(key)), "user.nemofs.shape"))
        if shape != want["shape"]:
            fail("%s shows shape %s, expected %s" % (key, shape, want["shape"]))
    odir = os.path.join(mount, "optimizer")
    plan["optimizer_deleted"] = []
    if os.path.isdir(odir) and os.listdir(odir):
        k = sorted(os.listdir(odir))[0]
        os.unlink(os.path.join(odir, k))
        plan["optimizer_deleted"].append(k.replace("%2F", "/").replace("%25", "%"))
    json.dump(plan, open(plan_path, "w"))
    print("edited: %d deleted, %d renamed, %d added, %d grown" % (
        len(plan["deleted"]), len(plan["renamed"]), len(plan["added"]), len(plan["grown"])))


def read(folder):
    r = subprocess.run(["/usr/bin/python3", READ, folder], capture_output=True, text=True)
    if r.returncode != 0:
        fail("dcp_read.py %s: %s" % (folder, r.stderr))
    return json.loads(r.stdout)


def read_zarr(folder):
    import zarr
    out = {"tensors": {}, "bytes": {}, "errors": []}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(path, ".zarray")):
            continue
        meta = json.load(open(os.path.join(path, ".zarray")))
        label = None
        try:
            if meta["dtype"] == "bfloat16":
                # Megatron's literal: zarr has no such dtype; read the raw
                # 2-byte words from a copy that says "<u2".
                tmp = tempfile.mkdtemp()
                shutil.copytree(path, os.path.join(tmp, name))
                meta["dtype"] = "<u2"
                json.dump(meta, open(os.path.join(tmp, name, ".zarray"), "w"))
                a = zarr.open_array(os.path.join(tmp, name), mode="r")
                b = np.ascontiguousarray(a[...])
                shutil.rmtree(tmp)
                label = "bfloat16"
            else:
                a = zarr.open_array(path, mode="r")
                b = np.ascontiguousarray(a[...])
        except Exception as e:  # noqa: BLE001 - reported as a failure
            out["errors"].append("%s: %s" % (name, e))
            continue
        out["tensors"][name] = {"dtype": label or str(b.dtype), "shape": list(b.shape),
                                "sha256": sha(b.astype(b.dtype.newbyteorder("<")).tobytes())}
    return out


def tree_bytes(folder):
    files = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            files[os.path.relpath(p, folder)] = open(p, "rb").read()
    return files


def check(original, source, plan_path, zarr_folder=False):
    plan = json.load(open(plan_path))
    before = read_zarr(original) if zarr_folder else read(original)
    after = read_zarr(source) if zarr_folder else read(source)
    if after["errors"]:
        fail("reading the result: %s" % after["errors"])
    want = {k: {"dtype": v["dtype"], "shape": v["shape"], "sha256": v["sha256"]}
            for k, v in before["tensors"].items()}
    for k in plan["deleted"] + plan["optimizer_deleted"]:
        del want[k]
    for k, n in plan["renamed"].items():
        want[n] = want.pop(k)
    for k, a in plan["added"].items():
        want[k] = a
    for k, g in plan["grown"].items():
        want[k] = {"dtype": want[k]["dtype"], "shape": g["shape"], "sha256": g["sha256"]}
    got = {k: {"dtype": v["dtype"], "shape": v["shape"], "sha256": v["sha256"]}
           for k, v in after["tensors"].items()}
    problems = []
    if set(want) != set(got):
        problems.append("keys: missing %s, unexpected %s" % (
            sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5]))
    for k in sorted(set(want) & set(got)):
        if want[k] != got[k]:
            problems.append("%s: %s, expected %s" % (k, got[k], want[k]))
    if before["bytes"] != after["bytes"]:
        problems.append("byte items changed")
    if zarr_folder:
        touched = set(plan["deleted"]) | set(plan["renamed"]) | set(plan["added"]) | set(plan["grown"])
        old, new = tree_bytes(original), tree_bytes(source)
        for rel, b in old.items():
            key = rel.split(os.sep)[0]
            if key in touched:
                continue
            if new.get(rel) != b:
                problems.append(rel + " was rewritten or removed")
        for name in os.listdir(source):
            if name.startswith(".nemofs") or ".nemofs-tmp." in name:
                problems.append(name + " left behind")
        for k, n in plan["renamed"].items():
            for rel, b in old.items():
                if rel.split(os.sep)[0] == k and new.get(os.path.join(n, *rel.split(os.sep)[1:])) != b:
                    problems.append("%s: the renamed array's chunks are not the old ones" % rel)
    for name in os.listdir(original) if not zarr_folder else []:
        if name.endswith(".distcp"):
            if open(os.path.join(original, name), "rb").read() != \
                    open(os.path.join(source, name), "rb").read():
                problems.append(name + " was rewritten")
    if problems:
        fail("; ".join(problems[:10]))
    print("ok: %d tensors, %d byte items" % (len(got), len(after["bytes"])))


if __name__ == "__main__":
    if sys.argv[1] == "edit":
        edit(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "check-zarr":
        check(sys.argv[2], sys.argv[3], sys.argv[4], zarr_folder=True)
    else:
        fail("usage: edit MOUNT PLAN | check[-zarr] ORIGINAL_DIR SOURCE_DIR PLAN")
