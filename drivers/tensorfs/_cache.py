"""The read cache: an LRU of verified tensors' data in /dev/shm segments (kind "c"),
within a byte budget, keyed by the file's inode, mtime and size, so a commit (a new
inode) never serves stale data. A read hands a client the cache's segment by hard
link (_driver.py), so a cached read copies nothing; a segment evicted while a
client maps it stays readable to that client. It must never keep data that failed
its checksum, never hold more than its budget, and never import the kernel or
userland.
"""
from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syscalls import Errno, SyscallError

from . import _shm
from ._format import TensorMeta

FileKey = tuple[int, int, int]   # (inode, mtime in ns, size) of an open file


def file_key(fd: int) -> FileKey:
    s = os.fstat(fd)
    return (s.st_ino, s.st_mtime_ns, s.st_size)


@dataclass
class Loaded:
    """A tensor's verified data, in buf; segment is the cache's /dev/shm file that
    holds it (None: read into memory, not cached)."""
    buf: Any
    nbytes: int
    segment: Path | None = None


class Cache:
    def __init__(self, pfx: str, budget: int) -> None:
        self.pfx = pfx
        self.budget = budget
        self.entries: OrderedDict[FileKey, Loaded] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.checksum_errors = 0

    def load(self, os_fd: int, meta: TensorMeta, key: FileKey | None, path: str) -> Loaded:
        """The verified data of the tensor open at os_fd: from the cache, or read,
        checked (EIO on a checksum mismatch) and, when it fits the budget, cached."""
        c = self.entries.get(key) if key is not None else None
        if c is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return c
        self.misses += 1
        n = meta.nbytes
        cacheable = key is not None and 0 < n <= self.budget
        seg = _shm.new_name(self.pfx, "c") if cacheable else None
        buf: Any = _shm.create(seg, n) if seg else bytearray(n)
        try:
            got = os.preadv(os_fd, [memoryview(buf)[:n]], meta.data_offset) if n else 0
            if got != n or zlib.crc32(memoryview(buf)[:n]) != meta.crc32:
                self.checksum_errors += 1
                raise SyscallError(Errno.EIO, f"{path}: checksum mismatch: the tensor is "
                                   "damaged")
        except BaseException:
            if seg:
                _shm.unlink(seg)
            raise
        if not seg:
            return Loaded(buf, n)
        while self.entries and self.bytes + n > self.budget:
            self.evict()
        c = Loaded(buf, n, seg)
        self.entries[key] = c
        self.bytes += n
        return c

    def evict(self) -> None:
        _, c = self.entries.popitem(last=False)
        self.bytes -= c.nbytes
        self.evictions += 1
        _shm.release(c.segment, c.buf)

    def clear(self) -> None:
        self.entries.clear()

    def summary(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "bytes": self.bytes, "budget": self.budget, "entries": len(self.entries)}

