"""Shared-memory segments: plain files under /dev/shm, created and owned by the
driver, mapped by clients with mmap (never multiprocessing.shared_memory, whose
resource tracker would unlink a segment when an attaching process exits).

Names: llmos-<home hash>-<instance tag>-<kind>-<random>. The instance tag is a
hash of the driver's identity (LLMOS_DRIVER_ID, new for every start), so each
instance knows its own. Kind "c" is the driver's cache; kind "x" is a transfer
segment lent to one process (a staging area for a write, or a tensor handed out
by a read). Every "x" segment is tracked with its pid and unlinked on close, on
that process's exit, or by the sweep after a grace period. At start an instance
removes the segments of the instances before it (none of them is alive: one
kernel per home, one tensorfs per kernel, and a driver dies with its kernel),
but for those made in the last SHM_GRACE_S: the last reply of an instance that
died may name one its client has yet to map. Its sweep removes those later. At
stop it removes its own and must never touch another instance's: a driver that
outlives its kernel for a moment must not take the next boot's segments with it.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def prefix(home_root: Path) -> str:
    """The names of every segment of this home start with it."""
    return f"llmos-{_digest(str(home_root), 12)}-"


def instance_tag(driver_id: str) -> str:
    """A short name for one driver instance (its identity is tensorfs.<epoch>.<random>)."""
    return _digest(driver_id, 8)


def new_name(pfx: str, kind: str) -> Path:
    """pfx: the instance's prefix (the home's prefix and its tag)."""
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


def sweep_all(pfx: str, keep: str | None = None,
              spare_s: float = 0.0) -> tuple[int, int]:
    """Remove every segment whose name starts with pfx (a home's prefix: all of
    that home's; an instance's: its own), but those starting with keep and those
    made or written less than spare_s seconds ago. (removed, spared)."""
    removed = spared = 0
    now = time.time()
    for p in SHM_DIR.glob(pfx + "*"):
        if keep is not None and p.name.startswith(keep):
            continue
        if spare_s:
            try:
                if now - p.stat().st_mtime < spare_s:
                    spared += 1
                    continue
            except FileNotFoundError:
                continue
        unlink(p)
        removed += 1
    return removed, spared
