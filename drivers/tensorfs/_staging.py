"""Segments lent to processes (kind "x" in /dev/shm): staging segments a client
maps and fills for a write, and read segments handed out (a hard link to the
cache's, or a copy) for the client to map and unlink.

A staging segment stays the driver's: each process's last MAX_SPARES are kept,
mapped, for its next write of the same size, since faulting in a fresh segment's
pages costs more than the copy. A handed-out read segment is tracked until its
process ends, or the sweep removes it after SHM_GRACE_S. It must never hand one
process's segment to another (a spare holds only its own previous write), never
leave a lent segment untracked, and never import the kernel or userland.
"""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _shm
from ._commit import PARALLEL_CRC_BYTES

SHM_GRACE_S = 30.0      # a handed-out segment the client has not taken by then is removed
MAX_SPARES = 2          # staging segments kept per process: a checkpoint's two groups


@dataclass
class Spare:
    path: Path
    buf: mmap.mmap
    size: int


class Segments:
    def __init__(self, pfx: str, threshold: int) -> None:
        self.pfx = pfx
        self.threshold = threshold                   # from this size, through /dev/shm
        self.spares: dict[int, list[Spare]] = {}     # per pid, the newest last
        self.handouts: dict[int, dict[Path, float]] = {}  # per pid: lent when

    def staging_buffer(self, pid: int, size: int, shm: bool,
                       whole: bool) -> tuple[Path | None, Any]:
        """Where a write of size bytes is staged: a segment (shm, large enough), or
        memory, page-aligned when large (it goes to the disk with direct I/O)."""
        if shm and size >= self.threshold:
            return self.staging(pid, size, whole)
        if size >= PARALLEL_CRC_BYTES:
            return None, mmap.mmap(-1, size)  # zeroed and page-aligned
        return None, bytearray(size)

    def staging(self, pid: int, size: int, whole: bool) -> tuple[Path, mmap.mmap]:
        """A segment of size bytes for pid to write into: its spare when the size
        matches (mapped pages cost less than faulting in new ones), else a new one.
        It comes zero-filled unless whole (the caller will write every byte): a
        spare holds only pid's own previous write, and zeroing it is a pass over
        the tensor (12 ms for 256 MiB)."""
        mine = self.spares.get(pid, [])
        for i, spare in enumerate(mine):
            if spare.size == size:
                del mine[i]
                if not whole:
                    np.frombuffer(spare.buf, dtype=np.uint8, count=size)[:] = 0
                return spare.path, spare.buf
        seg = _shm.new_name(self.pfx, "x")
        return seg, _shm.create(seg, size)

    def keep(self, pid: int, seg: Path, buf: mmap.mmap, size: int) -> None:
        """A closed write's staging segment becomes pid's newest spare."""
        mine = self.spares.setdefault(pid, [])
        mine.append(Spare(seg, buf, size))
        while len(mine) > MAX_SPARES:  # the least recently used goes
            old = mine.pop(0)
            _shm.release(old.path, old.buf)

    def lend(self, pid: int, source: Path | None, data: Any, size: int) -> Path:
        """A read's segment for pid: a hard link to source (the cache's segment: no
        copy at all), or else a new one holding data's first size bytes."""
        seg = _shm.new_name(self.pfx, "x")
        if source is not None:
            os.link(source, seg)
        else:
            mm = _shm.create(seg, size)
            mm[:size] = memoryview(data).cast("B")[:size]
            mm.close()
        self.handouts.setdefault(pid, {})[seg] = time.monotonic()
        return seg

    def lent(self) -> int:
        return sum(len(v) for v in self.handouts.values())

    def end(self, pid: int) -> None:
        """pid ended: its spares and what it was lent go."""
        for spare in self.spares.pop(pid, []):
            _shm.release(spare.path, spare.buf)
        for seg in self.handouts.pop(pid, {}):
            _shm.unlink(seg)

    def sweep(self) -> None:
        now = time.monotonic()
        for pid, segs in list(self.handouts.items()):
            for seg, t in list(segs.items()):
                if now - t > SHM_GRACE_S:
                    _shm.unlink(seg)
                    del segs[seg]
            if not segs:
                del self.handouts[pid]

    def close(self) -> None:
        for mine in self.spares.values():
            for spare in mine:
                _shm.release(spare.path, spare.buf)
        self.spares.clear()
