"""Durable writes: every change tensorfs makes to the tree on disk, each one safe
against a crash at any point.

A commit writes a temporary file (.llmos-tmp-<instance tag>-*) in the target's
directory, fsyncs it, renames it over the target (links it, for mode x) and fsyncs
the directory; making or removing a directory renames a prepared temporary one.
So a crash leaves the old version or the new, never a torn file, and the next
instance's scan (_scan.py) removes the temporary files and directories a crash
left. A commit the file system has no room for (ENOSPC, EDQUOT) is ENOSPC and
leaves nothing behind. Large data goes with direct I/O, its checksum computed in
a thread meanwhile. The Store also keeps each owner's usage, which the quota
checks read: the scan's counts plus every change since, accounted under the
scan's lock. It must never write to a tensor's own name except by rename or link
of a whole, fsynced file, and never import the kernel or userland.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import queue
import secrets
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from syscalls import Errno, SyscallError, format_size

from . import _format
from ._format import FormatError, TensorMeta
from ._paths import DIR_META, ROOT_MODE, TMP_PREFIX, DirMeta, Namespace, file_meta
from ._scan import Scan, remove_tree

log = logging.getLogger("llmos.tensorfs")

PARALLEL_CRC_BYTES = 1 << 20  # from this size the checksum runs beside the write
DIRECT_ALIGN = 4096      # direct I/O: buffer, file offset and length in whole pages
NO_SPACE = {errno.ENOSPC: "the file system holding the store is full",
            errno.EDQUOT: "the driver's disk quota on the file system holding the store "
                          "is used up (EDQUOT)"}


class UsageNotReady(Exception):
    """A quota check for an owner with a quota before the scan has counted usage."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: Any) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv[:1 << 30])
        mv = mv[n:]


def page_aligned(data: memoryview) -> bool:
    return len(data) > 0 and np.frombuffer(data, np.uint8).ctypes.data % DIRECT_ALIGN == 0


def pwrite_direct(fd: int, data: memoryview, offset: int) -> int:
    """Write data's whole pages at offset with O_DIRECT: straight from the staging
    buffer to the disk, no copy into the page cache, so the fsync after it has
    nothing left to write back. Returns how many bytes went; 0 where the file
    system cannot do direct I/O (tmpfs, some FUSE), and the caller writes the rest
    through the page cache."""
    bulk = len(data) - len(data) % DIRECT_ALIGN
    done = 0
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return 0
    try:
        while done < bulk:
            n = os.pwrite(fd, data[done:min(bulk, done + (1 << 30))], offset + done)
            if n <= 0 or n % DIRECT_ALIGN:
                done += max(n, 0)
                break
            done += n
    except OSError as e:
        if e.errno != errno.EINVAL:  # a real I/O error; EINVAL: no direct I/O here
            raise
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return done


def write_data_and_crc(fd: int, m: TensorMeta, data: memoryview) -> None:
    """Write header and data, setting m.crc32. For large data the checksum runs in a
    thread while the data is written (zlib and os.write both release the GIL), then
    the header, whose checksum field is fixed-width, is rewritten in place. Large
    page-aligned data (every staging segment) starts at a page boundary in the
    file and goes with direct I/O."""
    if len(data) < PARALLEL_CRC_BYTES:
        m.crc32 = zlib.crc32(data)
        write_all(fd, _format.header(m))
        write_all(fd, data)
        return
    crc: list[int] = []
    worker = threading.Thread(target=lambda: crc.append(zlib.crc32(data)))
    worker.start()
    m.crc32 = 0
    direct = page_aligned(data)
    head = _format.header(m, DIRECT_ALIGN if direct else 8)
    try:
        write_all(fd, head)
        done = pwrite_direct(fd, data, len(head)) if direct else 0
        os.lseek(fd, len(head) + done, os.SEEK_SET)
        write_all(fd, data[done:])
    finally:
        worker.join()
    m.crc32 = crc[0]
    final = _format.header(m, DIRECT_ALIGN if direct else 8)
    assert len(final) == len(head)
    os.pwrite(fd, final, 0)


def write_file(path: Path, m: TensorMeta, data: memoryview) -> None:
    """A new file at path holding the tensor, fsynced (m.crc32 set)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_data_and_crc(fd, m, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def no_space(e: OSError, call: str, path: str, d: Path, size: int) -> SyscallError | None:
    """ENOSPC for a write the file system has no room for (full, or the driver's
    disk quota used up); None for any other error."""
    why = NO_SPACE.get(e.errno or 0)
    if why is None:
        return None
    try:
        st = os.statvfs(d)
        free = f"{format_size(st.f_bavail * st.f_frsize)} free"
    except OSError:
        free = "free space unknown"
    return SyscallError(Errno.ENOSPC, f"{call}: {path}: {why} ({free}; the tensor is "
                        f"{format_size(size)}): nothing was written, the store is as it "
                        "was")


def check_bools(m: TensorMeta, data: memoryview, path: str) -> None:
    """EINVAL when a bool tensor (or member) holds a byte other than 0 and 1: the
    format stores one byte per bool, and torch's reading of any other value is
    undefined. A shared-memory write is only seen here, at the commit."""
    regions = [("", 0, m.nbytes)] if m.dtype == "bool" and m.members is None else [
        (f" member {g.name!r}", g.offset, g.nbytes)
        for g in m.members or [] if g.dtype == "bool"]
    for what, at, n in regions:
        if n and int(np.frombuffer(data, np.uint8, count=n, offset=at).max()) > 1:
            raise SyscallError(Errno.EINVAL, f"close_tensor: {path}{what}: a bool "
                               "holds a byte other than 0 or 1; the write is "
                               "discarded")


class Store:
    """The tree's durable changes, and each owner's bytes (for quotas). Replaced
    large files are unlinked by a thread of its own, off the commit's path (the
    next instance's scan removes any a crash left: they carry the temporary
    prefix). Temporary names carry this instance's tag (self.tmp), so the scan,
    running beside the commits, tells ours from leftovers."""

    def __init__(self, ns: Namespace, max_bytes: int, quota: dict[int, int],
                 tag: str) -> None:
        self.ns = ns
        self.max_bytes = max_bytes
        self.quota = quota
        self.tmp = f"{TMP_PREFIX}{tag}-"
        self.scan = Scan(ns.root, self.tmp)
        self.usage: dict[int, int] = {}   # until the scan is done: changes since it began
        self.commits = 0
        self.reaper: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self.reaper_thread = threading.Thread(target=self.reap, name="tensorfs-reaper",
                                              daemon=True)
        self.reaper_thread.start()

    def reap(self) -> None:
        while (p := self.reaper.get()) is not None:
            try:
                os.unlink(p)
            except OSError as e:
                log.warning("removing replaced %s: %s", p, e)

    def close(self) -> None:
        self.scan.stop()
        self.reaper.put(None)
        self.reaper_thread.join(5.0)

    def prepare(self) -> None:
        """At start, before the scan: the root, with its metadata."""
        root = self.ns.root
        root.mkdir(parents=True, exist_ok=True)
        if not (root / DIR_META).exists():
            self.write_dir_meta(root, DirMeta(0, ROOT_MODE, time.time()))

    def temp_name(self, d: Path) -> Path:
        return d / (self.tmp + secrets.token_hex(8))

    # -- sizes and quotas ------------------------------------------------------------

    def scan_walked(self) -> None:
        """On the loop thread, once the scan's walk is over: usage is its counts
        plus the changes accounted since it began."""
        with self.scan.lock:
            for owner, n in self.scan.counted.items():
                self.usage[owner] = self.usage.get(owner, 0) + n
            self.scan.done = True

    def changed(self, p: Path, old: TensorMeta | None, new: TensorMeta | None) -> None:
        """Account the change of tensor file p from old to new (None: no file),
        made holding the scan's lock, unless the scan is yet to read p: it will
        count what it finds there then."""
        if self.scan.pending(p):
            return
        for meta, sign in ((old, -1), (new, 1)):
            if meta is not None:
                self.usage[meta.owner] = self.usage.get(meta.owner, 0) + sign * meta.nbytes

    def check_space(self, owner: int, size: int, replaced: int, staged: int,
                    path: str) -> None:
        """EFBIG over tensor_max_size; EDQUOT when owner's tensors, less the one
        replaced, plus its staged writes and this one are over its quota."""
        if size > self.max_bytes:
            raise SyscallError(Errno.EFBIG, f"open_tensor: {path}: {format_size(size)} is "
                               f"over the largest tensor allowed, {format_size(self.max_bytes)}"
                               " (tensor_max_size)")
        quota = self.quota.get(owner)
        if quota is not None and not self.scan.done:
            raise UsageNotReady(owner)
        used = self.usage.get(owner, 0) - replaced + staged
        if quota is not None and used + size > quota:
            raise SyscallError(Errno.EDQUOT, f"open_tensor: {path}: uid {owner} holds "
                               f"{format_size(used)}; {format_size(size)} more is over its "
                               f"quota of {format_size(quota)}")

    # -- tensors -----------------------------------------------------------------------

    def commit(self, path: str, m: TensorMeta, buf: Any, exclusive: bool,
               call: str = "close_tensor") -> dict[str, Any]:
        """Make buf's first m.nbytes the tensor at path: temp file, fsync, rename (or,
        exclusive, link: EEXIST if another writer got there first), fsync dir. No
        room on the file system: ENOSPC, and no temporary file is left."""
        parts = self.ns.split(path)
        d = self.ns.parent_dir(parts, path)  # it may have gone behind our back
        target = self.ns.tensor_path(parts)
        if self.ns.dir_path(parts).is_dir():  # made since the open: one name, one thing
            raise SyscallError(Errno.EISDIR, f"{call}: {path} is a directory now; "
                               "the write is discarded")
        data = memoryview(buf).cast("B")[:m.nbytes]
        check_bools(m, data, path)
        m.mtime = time.time()
        old = None
        if target.is_file():
            try:
                old = file_meta(target)
            except FormatError:
                old = None
        tmp = self.temp_name(d)
        try:
            write_file(tmp, m, data)
            with self.scan.lock:
                if exclusive:
                    try:
                        os.link(tmp, target)  # fails if another writer got there first
                    except FileExistsError:
                        raise SyscallError(Errno.EEXIST, f"{call}: {path} was created "
                                           "by another writer (mode x)") from None
                else:
                    self.replace(tmp, target, old)
                self.changed(target, old, m)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            full = no_space(e, call, path, d, m.nbytes) if isinstance(e, OSError) else None
            if full is not None:
                raise full from None
            raise
        if exclusive:
            os.unlink(tmp)
        fsync_dir(d)
        self.commits += 1
        return {"size": m.nbytes, "checksum": f"crc32:{m.crc32:08x}"}

    def replace(self, tmp: Path, target: Path, old: TensorMeta | None) -> None:
        doomed = None
        if old is not None and old.nbytes >= PARALLEL_CRC_BYTES:
            # freeing a large file's blocks takes tens of ms inside the rename;
            # keep a link so the rename is quick and free it after the reply
            doomed = self.temp_name(target.parent)
            try:
                os.link(target, doomed)
            except OSError:
                doomed = None
        os.replace(tmp, target)
        if doomed is not None:
            self.reaper.put(doomed)

    def remove_tensor(self, p: Path, meta: TensorMeta | None) -> None:
        """Unlink the tensor file p (meta: its header; None if unreadable)."""
        with self.scan.lock:
            os.unlink(p)
            self.changed(p, meta, None)
        fsync_dir(p.parent)

    def move(self, src: Path, dst: Path, meta: TensorMeta | None = None) -> None:
        """Rename src to dst: a tensor file with its header meta (None if unreadable:
        uncounted), or a directory (never while the scan runs: _scan.py)."""
        with self.scan.lock:
            os.rename(src, dst)
            self.changed(src, meta, None)
            self.changed(dst, None, meta)
        fsync_dir(dst.parent)
        if dst.parent != src.parent:
            fsync_dir(src.parent)

    # -- directories ---------------------------------------------------------------------

    def write_dir_meta(self, d: Path, meta: DirMeta) -> None:
        tmp = self.temp_name(d)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(meta.__dict__).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, d / DIR_META)
        fsync_dir(d)

    def make_dir(self, d: Path, name: str, meta: DirMeta) -> None:
        """Directory d/name with meta, made whole beside it and renamed into place."""
        tmp = self.temp_name(d)
        tmp.mkdir()
        self.write_dir_meta(tmp, meta)
        os.rename(tmp, d / name)
        fsync_dir(d)

    def remove_dir(self, p: Path) -> None:
        """Remove the (empty) directory p: renamed aside first, atomically, so a
        crash after it leaves a leftover the next instance's scan removes."""
        tmp = self.temp_name(p.parent)
        os.rename(p, tmp)
        fsync_dir(p.parent)
        remove_tree(tmp)
