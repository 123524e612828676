"""I/O helpers shared by the benchmark generators (make_tensor_nemo.py, make_dist_bench.py)."""

import collections
import io
import pickle


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


class StubUnpickler(pickle.Unpickler):
    """Reads a torch.save data.pkl without torch: every _rebuild_tensor* call
    becomes rebuild(storage, storage_offset, size, stride), a storage its
    persistent id as {"type", "key", "numel"}. Other globals are refused."""

    def __init__(self, file, rebuild):
        super().__init__(file)
        self._rebuild = rebuild

    def find_class(self, module, name):
        if module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return lambda storage, off, size, stride, *rest: self._rebuild(storage, off, size, stride)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        return {"type": pid[1], "key": pid[2], "numel": pid[4]}
