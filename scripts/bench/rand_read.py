#!/usr/bin/python3
"""Random aligned reads with os.pread, for scripts/bench/bench_archive.sh.

    rand_read.py FILE BASE_OFFSET RANGE_BYTES [--count N] [--block B] [--seed S]

Draws N offsets (fixed seed) aligned to B in [0, RANGE_BYTES - B], opens FILE
once, and times N calls os.pread(fd, B, BASE_OFFSET + off). The same seed,
count and range give the same offsets, so running it on a mounted member
(BASE_OFFSET 0) and on the tar (BASE_OFFSET = offset_data) reads the same
bytes. Prints one JSON line: total_ms, us_per_read, bytes and a crc32 of
everything read (computed outside the timed loop) to cross-check both sides.
"""
import argparse
import json
import os
import random
import time
import zlib


def main():
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("base", type=int)
    p.add_argument("range", type=int)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--seed", type=int, default=20240601)
    a = p.parse_args()

    rng = random.Random(a.seed)
    slots = (a.range - a.block) // a.block + 1
    offsets = [rng.randrange(slots) * a.block for _ in range(a.count)]

    fd = os.open(a.file, os.O_RDONLY)
    try:
        bufs = []
        pread = os.pread
        base, block = a.base, a.block
        t0 = time.perf_counter_ns()
        for off in offsets:
            bufs.append(pread(fd, block, base + off))
        t1 = time.perf_counter_ns()
    finally:
        os.close(fd)

    total = sum(len(b) for b in bufs)
    if total != a.count * a.block:
        raise SystemExit(f"rand_read: short reads: {total} of {a.count * a.block} bytes")
    crc = 0
    for b in bufs:
        crc = zlib.crc32(b, crc)
    ns = t1 - t0
    print(json.dumps({"total_ms": ns / 1e6, "us_per_read": ns / 1e3 / a.count, "bytes": total,
                      "crc32": f"{crc:08x}"}))


if __name__ == "__main__":
    main()
