#!/usr/bin/python3
"""Checks stitched dist-checkpoint tensors of a nemofs mount against
tests/data/dist/expected.json (sha256 computed by torch from the unsharded
originals).

    check_dist.py MOUNT FIXTURE

For every expected tensor: the file is tensors/<key> (optimizer/<key> for
optimizer.* keys), size == nbytes, xattrs dtype/shape match, sha256 of a
full read matches, numpy.fromfile gives the same bytes, and 200 reads at odd
offsets and sizes (crossing chunk boundaries) equal the same slices of the
full read. Keys listed as "missing" must be absent or fail to read with EIO.
Prints one line per failure; exits 1 if any.
"""
import errno
import hashlib
import json
import os
import random
import sys

import numpy as np

from checklib import NP_DTYPES, esc, fail, failures




def main():
    mount, fixture = sys.argv[1], sys.argv[2]
    exp = json.load(open(os.path.join(os.path.dirname(__file__), "..", "data", "dist",
                                      "expected.json")))[fixture]
    missing = set(exp.get("missing", []))
    rng = random.Random(7)
    checked = 0
    for key, want in exp["tensors"].items():
        tree = ("optimizer/" if key.startswith("optimizer.") else "tensors/") + esc(key)
        path = os.path.join(mount, tree)
        if key in missing:
            if os.path.exists(path):
                try:
                    with open(path, "rb") as f:
                        f.read()
                    fail(f"{key}: read succeeded but its shard is missing")
                except OSError as e:
                    if e.errno != errno.EIO:
                        fail(f"{key}: read failed with {e} instead of EIO")
            checked += 1
            continue
        if not os.path.isfile(path):
            fail(f"{key}: {tree} missing")
            continue
        data = open(path, "rb").read()
        if len(data) != want["nbytes"]:
            fail(f"{key}: {len(data)} bytes, want {want['nbytes']}")
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            fail(f"{key}: sha256 differs")
        if os.getxattr(path, "user.nemofs.dtype").decode() != want["dtype"]:
            fail(f"{key}: dtype xattr")
        if json.loads(os.getxattr(path, "user.nemofs.shape").decode()) != want["shape"]:
            fail(f"{key}: shape xattr")
        npd = NP_DTYPES.get(want["dtype"])
        if npd is not None and np.fromfile(path, dtype=npd).tobytes() != data:
            fail(f"{key}: numpy bytes differ")
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(200):
                off = rng.randrange(0, max(1, len(data)))
                size = rng.randrange(1, 4099)
                if os.pread(fd, size, off) != data[off:off + size]:
                    fail(f"{key}: pread({size}, {off}) differs")
                    break
        finally:
            os.close(fd)
        checked += 1
    print(f"checked {checked} tensors, {len(failures)} failures")
    sys.exit(1 if failures or checked == 0 else 0)


if __name__ == "__main__":
    main()
