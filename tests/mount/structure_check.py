#!/usr/bin/python3
"""Structural writes through a nemofs mount, checked with torch (issue 11).

  structure_check.py edit MOUNT PLAN.json
      Through the mount, with numpy and plain file calls: deletes one tensor
      file, renames another, adds tensors (np.save in C and Fortran order,
      big-endian, a bfloat16 .npy named by the xattr, a raw file with
      user.nemofs.dtype/shape, an int64 replacing an existing key), deletes
      and renames an optimizer tensor when there is optimizer/. Checks what
      the mount shows at once, and writes what it did to PLAN.json.
  structure_check.py check ORIGINAL SOURCE PLAN.json
      Loads the weights of ORIGINAL (the source before the mount) and of
      SOURCE (after the unmount) with torch.load (weights_only=True when the
      original loads so), applies PLAN to the original's flattened state and
      compares every tensor (dtype, shape, values) and every other value.

The flattening is the tree's key rule (README "The tree"): dotted paths
through dicts, lists and tuples; under `state_dict` (Lightning) the rest of
the path is the key in tensors/, under `optimizer_states` in optimizer/.
"""
import io
import json
import os
import sys
import tarfile

import numpy as np
import torch


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def esc(key):
    return key.replace("%", "%25").replace("/", "%2F")


# ---- edit


def edit(mount, plan_path):
    index = json.load(open(os.path.join(mount, "index.json")))
    keys = [k for k, v in index["tensors"].items() if v["nbytes"] > 0 and "/" not in k]
    keys.sort()
    if len(keys) < 3:
        fail("fewer than 3 tensors in " + mount)
    plan = {"deleted": [], "renamed": {}, "added": {}, "optimizer_deleted": [],
            "optimizer_renamed": {}}
    tdir = os.path.join(mount, "tensors")

    # Delete one, rename another.
    gone, moved, replaced = keys[0], keys[1], keys[2]
    os.unlink(os.path.join(tdir, esc(gone)))
    plan["deleted"].append(gone)
    want = open(os.path.join(tdir, esc(moved)), "rb").read()
    os.rename(os.path.join(tdir, esc(moved)), os.path.join(tdir, esc(moved + ".renamed")))
    plan["renamed"][moved] = moved + ".renamed"
    if os.path.exists(os.path.join(tdir, esc(gone))) or os.path.exists(os.path.join(tdir, esc(moved))):
        fail("a deleted or renamed tensor file is still there")
    if open(os.path.join(tdir, esc(moved + ".renamed")), "rb").read() != want:
        fail("the renamed tensor file reads other bytes")

    def added(key, array, dtype=None):
        plan["added"][key] = {"values": array.astype(np.float64).tolist() if dtype != "bfloat16"
                              else array.view(np.uint16).tolist(),
                              "dtype": dtype or str(array.dtype), "shape": list(array.shape)}

    # np.save, C order float32.
    a = np.arange(640, dtype=np.float32).reshape(10, 64) / 7
    np.save(os.path.join(tdir, "model.head.weight.npy"), a)
    added("model.head.weight", a)
    # Fortran order, big-endian.
    b = np.asfortranarray(np.arange(24, dtype=">f8").reshape(2, 3, 4) - 5)
    np.save(os.path.join(tdir, "nemofs.fortran.npy"), b)
    added("nemofs.fortran", np.ascontiguousarray(b).astype("<f8"))
    # bfloat16: a '<u2' .npy with the dtype given by the xattr first.
    bits = (np.arange(6, dtype=np.uint16) + 0x3F80).reshape(3, 2)
    p = os.path.join(tdir, "nemofs.bf16.npy")
    open(p, "wb").close()
    os.setxattr(p, "user.nemofs.dtype", b"bfloat16")
    np.save(p, bits)
    added("nemofs.bf16", bits, "bfloat16")
    # A raw file: dtype and shape first, then the bytes.
    raw = np.array([[1, -2, 3], [4, 5, -6]], dtype=np.int16)
    p = os.path.join(tdir, "nemofs.raw")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    os.setxattr(p, "user.nemofs.dtype", b"int16")
    os.setxattr(p, "user.nemofs.shape", b"2,3")
    os.write(fd, raw.tobytes())
    os.close(fd)
    added("nemofs.raw", raw)
    # An existing key given a new tensor (another dtype and shape).
    c = np.arange(5, dtype=np.int64) * 11
    np.save(os.path.join(tdir, esc(replaced) + ".npy"), c)
    added(replaced, c)

    # What the mount shows at once.
    for key, want in plan["added"].items():
        path = os.path.join(tdir, esc(key))
        dt = os.getxattr(path, "user.nemofs.dtype").decode()
        shape = json.loads(os.getxattr(path, "user.nemofs.shape").decode())
        if dt != want["dtype"] or shape != want["shape"]:
            fail("%s shows %s %s, expected %s %s" % (key, dt, shape, want["dtype"], want["shape"]))
        if os.path.exists(path + ".npy"):
            fail(key + ".npy is still there after its close")
    listing = set(os.listdir(tdir))
    for key in plan["added"]:
        if esc(key) not in listing:
            fail(key + " is not listed")

    # Reshape: more rows (the new ones zero), and a retype of the same size.
    plan["retyped"] = {}
    used = {gone, moved, replaced}
    for key in keys:
        v = index["tensors"][key]
        if key in used or len(v["shape"]) != 2:
            continue
        path = os.path.join(tdir, esc(key))
        shape = [v["shape"][0] + 2, v["shape"][1]]
        os.setxattr(path, "user.nemofs.shape", ("%d,%d" % tuple(shape)).encode())
        itemsize = v["nbytes"] // (v["shape"][0] * v["shape"][1])
        os.truncate(path, shape[0] * shape[1] * itemsize)
        if json.loads(os.getxattr(path, "user.nemofs.shape")) != shape:
            fail("the new shape does not show")
        if os.stat(path).st_size != shape[0] * shape[1] * itemsize:
            fail("the truncated size does not show")
        plan["retyped"][key] = {"mode": "grow", "shape": shape, "dtype": v["dtype"]}
        used.add(key)
        break
    for key in keys:
        v = index["tensors"][key]
        if key in used or v["dtype"] not in ("bfloat16", "float16"):
            continue
        to = "float16" if v["dtype"] == "bfloat16" else "bfloat16"
        os.setxattr(os.path.join(tdir, esc(key)), "user.nemofs.dtype", to.encode())
        plan["retyped"][key] = {"mode": "reinterpret", "shape": v["shape"], "dtype": to}
        break

    # A file that is no tensor: EINVAL at its close, and it is gone.
    p = os.path.join(tdir, "nemofs.bad")
    f = open(p, "wb")
    f.write(b"12345")
    try:
        f.close()
        fail("closing a raw file without dtype and shape succeeded")
    except OSError as e:
        if e.errno != 22:
            fail("closing a raw file without dtype and shape: %s" % e)
    if os.path.exists(p):
        fail("the refused file is still there")

    odir = os.path.join(mount, "optimizer")
    if os.path.isdir(odir):
        okeys = sorted(k for k, v in index.get("optimizer", {}).items() if v["nbytes"] > 0)
        if len(okeys) >= 2:
            os.unlink(os.path.join(odir, esc(okeys[0])))
            plan["optimizer_deleted"].append(okeys[0])
            os.rename(os.path.join(odir, esc(okeys[1])), os.path.join(odir, esc(okeys[1] + ".renamed")))
            plan["optimizer_renamed"][okeys[1]] = okeys[1] + ".renamed"
    json.dump(plan, open(plan_path, "w"))
    print("edited: %d deleted, %d renamed, %d added" % (
        len(plan["deleted"]), len(plan["renamed"]), len(plan["added"])))


def write_back(mount, plan_path):
    """model.safetensors copied out, changed (a key dropped, one added, one
    with new values, one with another shape) and copied back whole."""
    path = os.path.join(mount, "model.safetensors")
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    body = data[8 + n:]
    keys = sorted(k for k in header if header[k]["data_offsets"][1] > header[k]["data_offsets"][0])
    codes = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BF16": np.uint16,
             "BOOL": np.bool_}
    tensors = {}
    for k, v in header.items():
        b, e = v["data_offsets"]
        tensors[k] = (v["dtype"], v["shape"], body[b:e])
    plan = {"deleted": [], "renamed": {}, "added": {}, "optimizer_deleted": [],
            "optimizer_renamed": {}, "retyped": {}}
    gone, changed, reshaped = keys[0], keys[1], keys[2]
    del tensors[gone]
    plan["deleted"].append(gone)

    def values(code, shape, raw):
        a = np.frombuffer(raw, dtype=codes[code]).reshape(shape)
        return a

    dt, shape, raw = tensors[changed]
    a = values(dt, shape, raw).copy()
    a.reshape(-1)[0] = a.reshape(-1)[-1]  # another value, same dtype and shape
    if a.tobytes() == raw:
        a.reshape(-1)[0] = 0 if a.reshape(-1)[0] else 1
    tensors[changed] = (dt, shape, a.tobytes())
    dt, shape, raw = tensors[reshaped]
    tensors[reshaped] = ("F32", [2, 3], np.arange(6, dtype=np.float32).tobytes())
    tensors["written.back"] = ("I32", [4], np.array([7, 8, 9, 10], np.int32).tobytes())
    names = {np.float32: "float32", np.float64: "float64", np.float16: "float16",
             np.int64: "int64", np.int32: "int32", np.int16: "int16", np.int8: "int8",
             np.uint8: "uint8", np.bool_: "bool"}
    for k in (changed, reshaped, "written.back"):
        code, shape, raw = tensors[k]
        arr = values(code, shape, raw)
        plan["added"][k] = {"values": arr.view(np.uint16).tolist() if code == "BF16"
                            else arr.astype(np.float64).tolist(),
                            "dtype": "bfloat16" if code == "BF16" else names[codes[code]],
                            "shape": list(shape)}
    out_header, out_body, at = {}, b"", 0
    for k, (code, shape, raw) in tensors.items():
        out_header[k] = {"dtype": code, "shape": shape, "data_offsets": [at, at + len(raw)]}
        out_body += raw
        at += len(raw)
    if meta:
        out_header["__metadata__"] = meta
    h = json.dumps(out_header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    open(plan_path + ".st", "wb").write(len(h).to_bytes(8, "little") + h + out_body)
    with open(plan_path + ".st", "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())  # the close applies it
    json.dump(plan, open(plan_path, "w"))
    print("written back: 1 deleted, %d new or changed" % len(plan["added"]))


# ---- check


def load_obj(path):
    """The weights object of a source, and how it was loaded."""
    if os.path.isdir(path):
        data = open(os.path.join(path, "model_weights.ckpt"), "rb").read()
    elif tarfile.is_tarfile(path):
        t = tarfile.open(path)
        member = None
        for m in t.getmembers():  # the last of a name wins, as in NeMo's restore
            if m.name.lstrip("./") == "model_weights.ckpt":
                member = m
        data = t.extractfile(member).read()
    else:
        data = open(path, "rb").read()
    return data


def torch_load(data, weights_only):
    if weights_only:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return torch.load(io.BytesIO(data), map_location="cpu")


def leaves(obj, path="", out=None, seen=None):
    if out is None:
        out, seen = {}, set()
    join = (lambda k: path + "." + k) if path else (lambda k: k)
    if isinstance(obj, torch.Tensor):
        out[path] = obj
    elif isinstance(obj, dict):
        if id(obj) in seen:
            return out
        seen.add(id(obj))
        for k, v in obj.items():
            leaves(v, join(str(k)), out, seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            leaves(v, join(str(i)), out, seen)
    else:
        out[path] = obj
    return out


def split_roles(obj, flat):
    """tensors/ keys, optimizer/ keys, other leaves."""
    model = opt = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        model, opt = "state_dict", "optimizer_states"
    tensors, optim, other = {}, {}, {}
    for path, v in flat.items():
        if not isinstance(v, torch.Tensor):
            other[path] = v
        elif opt and path.startswith(opt + "."):
            optim[path[len(opt) + 1:]] = v
        elif model and path.startswith(model + "."):
            tensors[path[len(model) + 1:]] = v
        else:
            tensors[path] = v
    return tensors, optim, other


def same(a, b):
    return a.dtype == b.dtype and list(a.shape) == list(b.shape) and torch.equal(a, b)


def check(original, source, plan_path):
    plan = json.load(open(plan_path))
    before_data, after_data = load_obj(original), load_obj(source)
    try:
        before = torch_load(before_data, True)
        weights_only = True
    except Exception:
        before = torch_load(before_data, False)
        weights_only = False
    try:
        after = torch_load(after_data, weights_only)
    except Exception as e:
        fail("torch.load%s of the result: %s" % ("(weights_only=True)" if weights_only else "", e))
    bt, bo, bother = split_roles(before, leaves(before))
    at, ao, aother = split_roles(after, leaves(after))

    want = dict(bt)
    for k in plan["deleted"]:
        del want[k]
    for k, new in plan["renamed"].items():
        want[new] = want.pop(k)
    dtypes = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
              "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
              "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
              "bfloat16": torch.bfloat16}
    for k, a in plan["added"].items():
        if a["dtype"] == "bfloat16":
            t = torch.tensor(np.array(a["values"], dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.tensor(np.array(a["values"], dtype=np.float64)).to(dtypes[a["dtype"]])
        want[k] = t.reshape(a["shape"])
    for k, r in plan.get("retyped", {}).items():
        dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(r["dtype"])
        if r["mode"] == "grow":
            old = want[k]
            extra = torch.zeros([r["shape"][0] - old.shape[0], old.shape[1]], dtype=old.dtype)
            want[k] = torch.cat([old, extra])
        else:
            want[k] = want[k].contiguous().view(dt).reshape(r["shape"])
    wopt = dict(bo)
    for k in plan["optimizer_deleted"]:
        del wopt[k]
    for k, new in plan["optimizer_renamed"].items():
        wopt[new] = wopt.pop(k)

    problems = []
    for name, w, got in (("tensors", want, at), ("optimizer", wopt, ao)):
        if set(w) != set(got):
            problems.append("%s/: missing %s, unexpected %s" % (
                name, sorted(set(w) - set(got))[:5], sorted(set(got) - set(w))[:5]))
        for k in sorted(set(w) & set(got)):
            if not same(w[k], got[k]):
                problems.append("%s/%s: %s %s, expected %s %s" % (
                    name, k, got[k].dtype, list(got[k].shape), w[k].dtype, list(w[k].shape)))
    # Everything else as it was (paths of renamed tensors aside).
    if set(bother) != set(aother):
        problems.append("other values: %s" % sorted(set(bother) ^ set(aother))[:5])
    for k in set(bother) & set(aother):
        if repr(bother[k]) != repr(aother[k]):
            problems.append("value %s: %r, was %r" % (k, aother[k], bother[k]))
    if problems:
        fail("; ".join(problems[:10]))
    print("ok: %d tensors, %d optimizer tensors, weights_only=%s" % (len(at), len(ao), weights_only))


if __name__ == "__main__":
    if sys.argv[1] == "edit":
        edit(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "safetensors":
        write_back(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        fail("usage: edit MOUNT PLAN | check ORIGINAL SOURCE PLAN")
