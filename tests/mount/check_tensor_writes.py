#!/usr/bin/python3
"""Writes tensors through a writable nemofs mount, then checks the result.

    check_tensor_writes.py write MOUNT STATE METHOD [--all]
    check_tensor_writes.py check MOUNT STATE SOURCE [--expect old|new]

`write` picks tensor files of MOUNT (the largest and the smallest non-empty
file of tensors/ and optimizer/; every one with --all; ranks/ files alias
the merged tensors/ ones and are checked through torch.load of the ranks),
computes new bytes (each byte of a span XOR 0x01: valid for every dtype,
bool included) and writes them with METHOD:
  pwrite  os.pwrite of a span in the middle, fsync, close
  dd      dd conv=notrunc of a span
  cp      cp of a whole new file over it (O_TRUNC + full rewrite)
  mmap    numpy.memmap mode r+, change the span, flush (msync), close
It records, in STATE (json), the sha256 of every tensor file before and the
expected bytes after, then exits 0; the caller unmounts.

`check` (MOUNT is a fresh mount of SOURCE) compares every tensor file with
what STATE expects (`--expect old`: the write must not have happened, e.g.
after a rollback), and checks the stored files with their own readers:
Python zipfile testzip() (CRC-32 of every record) of every torch.save zip
of SOURCE (tar members and folder files), and torch.load of each changed
tensor where SOURCE (or a tar member of it) holds it as a whole tensor
under the same key, or, for per-rank files, the concatenation of the
ranks' shards along some dimension; a zarr array is read by zarr (by
numcodecs for bfloat16) from its chunk files. Prints FAIL lines; exit 1 on any.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def tensor_files(mnt):
    out = []
    for top in ("tensors", "optimizer", "ranks"):
        root = os.path.join(mnt, top)
        if not os.path.isdir(root):
            continue
        for dirpath, _, names in os.walk(root):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                out.append(os.path.relpath(p, mnt))
    return sorted(out)


def key_of(mnt, rel):
    return os.getxattr(os.path.join(mnt, rel), "user.nemofs.key").decode()


def flip(b):
    return bytes(x ^ 1 for x in b)


def do_write(mnt, state, method, every):
    files = tensor_files(mnt)
    before = {}
    for rel in files:
        with open(os.path.join(mnt, rel), "rb") as f:
            before[rel] = f.read()
    # ranks/ files alias the merged tensors/ ones: written through tensors/,
    # checked by torch.load of the rank files.
    sized = [r for r in files if len(before[r]) > 0 and not r.startswith("ranks/")]
    if not sized:
        print("FAIL: no tensor files in", mnt)
        return 1
    if every:
        chosen = sized
    else:
        by_size = sorted(sized, key=lambda r: (len(before[r]), r))
        chosen = sorted({by_size[0], by_size[-1]})
    # The state first: a write that kills the daemon (crash tests) still
    # leaves the expectations behind.
    expected, plans = {}, []
    for rel in chosen:
        old = before[rel]
        n = len(old)
        lo, hi = (0, n) if method == "cp" or n < 8 else (n // 4, n - n // 4)
        new = old[:lo] + flip(old[lo:hi]) + old[hi:]
        expected[rel] = {"key": key_of(mnt, rel), "new": new.hex(), "old": old.hex()}
        plans.append((rel, lo, hi, new))
    with open(state, "w") as f:
        json.dump({"before": {r: sha(b) for r, b in before.items()}, "changed": expected}, f)
    for rel, lo, hi, new in plans:
        path = os.path.join(mnt, rel)
        if method == "pwrite":
            fd = os.open(path, os.O_WRONLY)
            assert os.pwrite(fd, new[lo:hi], lo) == hi - lo
            os.fsync(fd)
            os.close(fd)
        elif method == "dd":
            tmp = state + ".span"
            with open(tmp, "wb") as f:
                f.write(new[lo:hi])
            subprocess.run(["dd", "if=" + tmp, "of=" + path, "bs=1", "seek=%d" % lo,
                            "conv=notrunc", "status=none"], check=True)
        elif method == "cp":
            tmp = state + ".whole"
            with open(tmp, "wb") as f:
                f.write(new)
            subprocess.run(["cp", tmp, path], check=True)
        elif method == "mmap":
            import numpy as np
            m = np.memmap(path, dtype=np.uint8, mode="r+")
            m[lo:hi] ^= 1
            m.flush()
            del m
        else:
            raise SystemExit("unknown method " + method)
    print("wrote %d tensor file(s) with %s" % (len(expected), method))
    return 0


def open_tar(source):
    """SOURCE as a tarfile.TarFile (zstd through the zstd tool), or None."""
    if os.path.isdir(source):
        return None
    with open(source, "rb") as f:
        head = f.read(4)
    if head == b"\x28\xb5\x2f\xfd":  # zstd: Python 3.11's tarfile has no zstd
        data = subprocess.run(["zstd", "-dc", source], check=True, stdout=subprocess.PIPE).stdout
        return tarfile.open(fileobj=io.BytesIO(data))
    if tarfile.is_tarfile(source):
        return tarfile.open(source)
    return None


def zarr_arrays(source):
    """{key: C-order bytes} of every zarr array stored in folder SOURCE, read
    by zarr itself (numcodecs for Megatron's bfloat16, which zarr cannot)."""
    out = {}
    if not os.path.isdir(source):
        return out
    import numpy as np
    for dirpath, _, names in os.walk(source):
        if ".zarray" not in names:
            continue
        with open(os.path.join(dirpath, ".zarray")) as f:
            meta = json.load(f)
        key = os.path.basename(dirpath)
        comp = meta.get("compressor")
        if comp and comp.get("id") not in (None, "zstd"):
            continue  # nemofs does not show it
        if meta["dtype"] != "bfloat16":
            import zarr
            out[key] = np.ascontiguousarray(zarr.open(dirpath, mode="r")[...]).tobytes()
            continue
        import numcodecs
        codec = numcodecs.get_codec(comp) if comp else None
        shape, chunks = meta["shape"], meta["chunks"]
        sep = meta.get("dimension_separator", ".")
        arr = np.zeros(shape, dtype="<u2")
        grid = [-(-s // c) for s, c in zip(shape, chunks)]
        for idx in np.ndindex(*grid):
            name = sep.join(str(i) for i in idx) if shape else "0"
            path = os.path.join(dirpath, name)
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                b = f.read()
            b = codec.decode(b) if codec else b
            block = np.frombuffer(bytes(b), dtype="<u2").reshape(chunks)
            sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))
            arr[sl] = block[tuple(slice(0, x.stop - x.start) for x in sl)]
        out[key] = arr.tobytes()
    return out


def zips_of(source):
    """(name, bytes) of every torch.save zip stored in SOURCE."""
    out = []
    tar = open_tar(source)
    if os.path.isdir(source):
        for dirpath, _, names in os.walk(source):
            for n in names:
                p = os.path.join(dirpath, n)
                with open(p, "rb") as f:
                    head = f.read(4)
                if head == b"PK\x03\x04":
                    with open(p, "rb") as f:
                        out.append((p, f.read()))
    elif tar is not None:
        with tar as t:
            for m in t.getmembers():
                if m.isfile():
                    b = t.extractfile(m).read()
                    if b[:4] == b"PK\x03\x04":
                        out.append((source + ":" + m.name, b))
    else:
        with open(source, "rb") as f:
            b = f.read()
        if b[:4] == b"PK\x03\x04":
            out.append((source, b))
    return out


def tensors_in(obj, prefix=""):
    import torch
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(v, prefix + ("." if prefix else "") + str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_in(v, prefix + ("." if prefix else "") + str(i))


def raw(t):
    import torch
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def do_check(mnt, state, source, expect):
    with open(state) as f:
        st = json.load(f)
    changed = st["changed"]
    for rel, digest in st["before"].items():
        p = os.path.join(mnt, rel)
        with open(p, "rb") as f:
            got = f.read()
        if rel in changed:
            wants = ([bytes.fromhex(changed[rel]["old"]), bytes.fromhex(changed[rel]["new"])]
                     if expect == "either" else [bytes.fromhex(changed[rel][expect])])
            if got not in wants:
                fail("%s: not the %s bytes after the remount" % (rel, expect))
        elif sha(got) != digest and not rel.startswith("ranks/"):
            fail("%s: changed, but nothing was written to it" % rel)
    zips = zips_of(source)
    for name, b in zips:
        try:
            bad = zipfile.ZipFile(io.BytesIO(b)).testzip()
        except zipfile.BadZipFile as e:
            bad = str(e)
        if bad is not None:
            fail("%s: zipfile testzip: bad CRC-32 in %s" % (name, bad))
    try:
        import torch
    except ImportError:
        print("torch not importable: torch.load cross-check skipped")
        return
    loaded = []
    for name, b in zips:
        try:
            obj = torch.load(io.BytesIO(b), map_location="cpu")
        except Exception as e:  # a non-tensor zip (DCP item) is not an error here
            print("note: torch.load(%s): %s" % (name, e))
            continue
        loaded.append((name, dict(tensors_in(obj))))
    if not os.path.isdir(source) and open_tar(source) is None and not zips:
        obj = torch.load(source, map_location="cpu")  # legacy torch.save
        loaded.append((source, dict(tensors_in(obj))))
    arrays = zarr_arrays(source)
    for rel, c in changed.items():
        if expect == "either":  # whole old or whole new: what the mount shows
            with open(os.path.join(mnt, rel), "rb") as f:
                want = f.read()
        else:
            want = bytes.fromhex(c[expect])
        key = c["key"]
        if key in arrays:
            if arrays[key] != want:
                fail("%s (%s): zarr does not read the %s bytes from the chunk files" %
                     (rel, key, expect))
            continue
        shards = []
        for name, ts in loaded:
            for k, t in ts.items():
                if k == key or k.endswith("." + key) or key.endswith("." + k):
                    shards.append(t)
        if not shards:
            print("note: %s (%s): no torch.save file holds it under that key" % (rel, key))
            continue
        if any(raw(t) == want for t in shards):
            continue
        import torch
        ok = False
        if len(shards) > 1:
            for d in range(shards[0].dim()):
                try:
                    if raw(torch.cat(shards, d)) == want:
                        ok = True
                except RuntimeError:
                    pass
            # SwiGLU fc1 (FORMATS.md §6): each rank holds [gate_i; up_i].
            try:
                halves = [torch.chunk(t, 2, 0) for t in shards]
                gated = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
                ok = ok or raw(gated) == want
            except RuntimeError:
                pass
        if not ok:
            fail("%s (%s): torch.load does not give the %s bytes" % (rel, key, expect))


def do_race(mnt, rounds):
    """Two writers on two tensors (full rewrites with pwrite + fsync, each a
    commit) while two readers read both whole with one pread each: every
    read must be a whole version, never a mix. Exit 1 on a torn read."""
    import multiprocessing as mp
    files = [r for r in tensor_files(mnt) if not r.startswith("ranks/")]
    sizes = {r: os.path.getsize(os.path.join(mnt, r)) for r in files}
    small = sorted((r for r in files if 0 < sizes[r] <= 4096), key=lambda r: (sizes[r], r))[:2]
    if len(small) < 2:
        print("FAIL: fewer than two small tensors in", mnt)
        return 1
    versions = {}
    for r in small:
        with open(os.path.join(mnt, r), "rb") as f:
            old = f.read()
        versions[r] = [old] + [bytes([v]) * len(old) for v in (0x11, 0x22)]

    def writer(rel, q):
        fd = os.open(os.path.join(mnt, rel), os.O_WRONLY)
        for i in range(rounds):
            os.pwrite(fd, versions[rel][1 + i % 2], 0)
            os.fsync(fd)
        os.close(fd)
        q.put(0)

    def reader(q):
        fds = {r: os.open(os.path.join(mnt, r), os.O_RDONLY) for r in small}
        torn = 0
        for _ in range(rounds * 20):
            for r, fd in fds.items():
                got = os.pread(fd, len(versions[r][0]), 0)
                if got not in versions[r]:
                    torn += 1
        q.put(torn)

    q = mp.Queue()
    procs = [mp.Process(target=writer, args=(r, q)) for r in small]
    procs += [mp.Process(target=reader, args=(q,)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    torn = sum(results)
    # After the last commit every reader sees the last version.
    for r in small:
        with open(os.path.join(mnt, r), "rb") as f:
            if f.read() != versions[r][1 + (rounds - 1) % 2]:
                fail("%s: not the last version written" % r)
    if torn:
        fail("%d torn reads (neither a whole old nor a whole new tensor)" % torn)
    print("race: %d rounds, %d torn reads" % (rounds, torn))
    return 1 if failures else 0


def main():
    cmd = sys.argv[1]
    if cmd == "race":
        return do_race(sys.argv[2], int(sys.argv[3]))
    if cmd == "write":
        return do_write(sys.argv[2], sys.argv[3], sys.argv[4], "--all" in sys.argv)
    expect = "new"
    if "--expect" in sys.argv:
        expect = sys.argv[sys.argv.index("--expect") + 1]
    do_check(sys.argv[2], sys.argv[3], sys.argv[4], expect)
    print("%d failures" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
