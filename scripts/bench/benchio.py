"""I/O helpers shared by the benchmark generators (make_tensor_nemo.py, make_dist_bench.py)."""

import io


class Window(io.RawIOBase):
    """Read-only seekable view of [base, base + size) of an open binary file."""

    def __init__(self, f, base, size):
        self.f, self.base, self.size, self.pos = f, base, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, off, whence=0):
        self.pos = {0: off, 1: self.pos + off, 2: self.size + off}[whence]
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.base + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got
