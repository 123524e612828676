"""Shared helpers of the mount checkers (check_tensors.py, check_dist.py)."""

import numpy as np

# numpy dtype that reads a tensor file's bytes (bfloat16 as its int16 bit patterns).
NP_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64,
    "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128, "bfloat16": np.int16,
}

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def esc(key):
    """The file name nemofs gives a tensor key (DESIGN.md §2)."""
    return key.replace("%", "%25").replace("/", "%2F")
