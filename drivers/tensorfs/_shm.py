"""Shared-memory segments: plain files under /dev/shm, created and owned by the
driver, mapped by clients with mmap (never multiprocessing.shared_memory, whose
resource tracker would unlink a segment when an attaching process exits).

Names: llmos-<home hash>-<kind>-<random>. Kind "c" is the driver's cache; kind
"x" is a transfer segment lent to one process (a staging area for a write, or a
tensor handed out by a read). Every "x" segment is tracked with its pid and
unlinked on close, on that process's exit, by the sweep after a grace period, and
at driver start (a new instance removes whatever an old one left).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import secrets
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def prefix(home_root: Path) -> str:
    return "llmos-" + hashlib.sha256(str(home_root).encode()).hexdigest()[:12] + "-"


def new_name(pfx: str, kind: str) -> Path:
    return SHM_DIR / f"{pfx}{kind}-{secrets.token_hex(12)}"


def create(path: Path, size: int) -> mmap.mmap:
    """A new segment of size bytes (zero-filled), mapped read-write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, max(size, 1))
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def release(path: Path, buf: mmap.mmap) -> None:
    """Unlink a segment and close the driver's mapping of it, unless something
    still exports its buffer (a numpy view): then it goes with its last reference.
    A client that mapped it keeps its pages."""
    unlink(path)
    try:
        buf.close()
    except BufferError:
        pass


def sweep_all(pfx: str) -> int:
    """Remove every segment of this home (at start and stop): none outlives us."""
    n = 0
    for p in SHM_DIR.glob(pfx + "*"):
        unlink(p)
        n += 1
    return n
