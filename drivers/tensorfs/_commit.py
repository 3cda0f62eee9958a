"""Durable writes: every change tensorfs makes to the tree on disk, each one safe
against a crash at any point.

A commit writes a temporary file (.llmos-tmp-*) in the target's directory, fsyncs
it, renames it over the target (links it, for mode x) and fsyncs the directory;
making or removing a directory renames a prepared temporary one. So a crash
leaves the old version or the new, never a torn file, and recover() (at start)
removes the temporary files and directories a crash left. Large data goes with
direct I/O, its checksum computed in a thread meanwhile. The Store also keeps each
owner's usage, which the quota checks read. It must never write to a tensor's own
name except by rename or link of a whole, fsynced file, and never import the
kernel or userland.
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
from ._format import SUFFIX, FormatError, TensorMeta
from ._paths import DIR_META, ROOT_MODE, TMP_PREFIX, DirMeta, Namespace, file_meta

log = logging.getLogger("llmos.tensorfs")

PARALLEL_CRC_BYTES = 1 << 20  # from this size the checksum runs beside the write
DIRECT_ALIGN = 4096      # direct I/O: buffer, file offset and length in whole pages


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


def write_dir_meta(d: Path, meta: DirMeta) -> None:
    tmp = d / (TMP_PREFIX + secrets.token_hex(6))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps(meta.__dict__).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, d / DIR_META)
    fsync_dir(d)


def remove_tree(p: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(p, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(p)


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
    large files are unlinked by a thread of its own, off the commit's path (boot
    removes any a crash left: they carry the temporary prefix)."""

    def __init__(self, ns: Namespace, max_bytes: int, quota: dict[int, int]) -> None:
        self.ns = ns
        self.max_bytes = max_bytes
        self.quota = quota
        self.usage: dict[int, int] = {}
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
        self.reaper.put(None)
        self.reaper_thread.join(5.0)

    def recover(self) -> int:
        """At start: make the root, remove what crashed writes left, count each
        owner's bytes. Returns how many leftovers went."""
        root = self.ns.root
        root.mkdir(parents=True, exist_ok=True)
        if not (root / DIR_META).exists():
            write_dir_meta(root, DirMeta(0, ROOT_MODE, time.time()))
        leftovers = 0
        for dirpath, dirnames, filenames in os.walk(root, topdown=True):
            for name in list(dirnames):
                if name.startswith(TMP_PREFIX):  # a mkdir or unlink cut short
                    remove_tree(Path(dirpath) / name)
                    dirnames.remove(name)
                    leftovers += 1
            for name in filenames:
                p = Path(dirpath) / name
                if name.startswith(TMP_PREFIX):
                    p.unlink()
                    leftovers += 1
                elif name.endswith(SUFFIX):
                    try:
                        meta = file_meta(p)
                    except (OSError, FormatError) as e:
                        log.error("%s: %s", p, e)
                        continue
                    self.account(meta.owner, meta.nbytes)
        if leftovers:
            fsync_dir(root)
        return leftovers

    # -- sizes and quotas ------------------------------------------------------------

    def account(self, owner: int, delta: int) -> None:
        self.usage[owner] = self.usage.get(owner, 0) + delta

    def check_space(self, owner: int, size: int, replaced: int, staged: int,
                    path: str) -> None:
        """EFBIG over tensor_max_size; EDQUOT when owner's tensors, less the one
        replaced, plus its staged writes and this one are over its quota."""
        if size > self.max_bytes:
            raise SyscallError(Errno.EFBIG, f"open_tensor: {path}: {format_size(size)} is "
                               f"over the largest tensor allowed, {format_size(self.max_bytes)}"
                               " (tensor_max_size)")
        quota = self.quota.get(owner)
        used = self.usage.get(owner, 0) - replaced + staged
        if quota is not None and used + size > quota:
            raise SyscallError(Errno.EDQUOT, f"open_tensor: {path}: uid {owner} holds "
                               f"{format_size(used)}; {format_size(size)} more is over its "
                               f"quota of {format_size(quota)}")

    # -- tensors -----------------------------------------------------------------------

    def commit(self, path: str, m: TensorMeta, buf: Any, exclusive: bool) -> dict[str, Any]:
        """Make buf's first m.nbytes the tensor at path: temp file, fsync, rename (or,
        exclusive, link: EEXIST if another writer got there first), fsync dir."""
        parts = self.ns.split(path)
        d = self.ns.parent_dir(parts, path)  # it may have gone behind our back
        target = self.ns.tensor_path(parts)
        if self.ns.dir_path(parts).is_dir():  # made since the open: one name, one thing
            raise SyscallError(Errno.EISDIR, f"close_tensor: {path} is a directory now; "
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
        tmp = d / (TMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_data_and_crc(fd, m, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if exclusive:
            try:
                os.link(tmp, target)  # fails if another writer got there first
            except FileExistsError:
                raise SyscallError(Errno.EEXIST, f"close_tensor: {path} was created "
                                   "by another writer (mode x)") from None
            finally:
                os.unlink(tmp)
        else:
            self.replace(tmp, target, old)
        fsync_dir(d)
        if old is not None:
            self.account(old.owner, -old.nbytes)
        self.account(m.owner, m.nbytes)
        self.commits += 1
        return {"size": m.nbytes, "checksum": f"crc32:{m.crc32:08x}"}

    def replace(self, tmp: Path, target: Path, old: TensorMeta | None) -> None:
        doomed = None
        if old is not None and old.nbytes >= PARALLEL_CRC_BYTES:
            # freeing a large file's blocks takes tens of ms inside the rename;
            # keep a link so the rename is quick and free it after the reply
            doomed = target.parent / (TMP_PREFIX + secrets.token_hex(8))
            try:
                os.link(target, doomed)
            except OSError:
                doomed = None
        os.replace(tmp, target)
        if doomed is not None:
            self.reaper.put(doomed)

    def remove_tensor(self, p: Path, meta: TensorMeta | None) -> None:
        """Unlink the tensor file p (meta: its header; None if unreadable)."""
        os.unlink(p)
        fsync_dir(p.parent)
        if meta is not None:
            self.account(meta.owner, -meta.nbytes)

    # -- directories ---------------------------------------------------------------------

    @staticmethod
    def make_dir(d: Path, name: str, meta: DirMeta) -> None:
        """Directory d/name with meta, made whole beside it and renamed into place."""
        tmp = d / (TMP_PREFIX + secrets.token_hex(8))
        tmp.mkdir()
        write_dir_meta(tmp, meta)
        os.rename(tmp, d / name)
        fsync_dir(d)

    @staticmethod
    def remove_dir(p: Path) -> None:
        """Remove the (empty) directory p: renamed aside first, atomically, so a
        crash after it leaves a leftover recover() removes."""
        tmp = p.parent / (TMP_PREFIX + secrets.token_hex(8))
        os.rename(p, tmp)
        fsync_dir(p.parent)
        remove_tree(tmp)

    @staticmethod
    def move(src: Path, dst: Path) -> None:
        os.rename(src, dst)
        fsync_dir(dst.parent)
        if dst.parent != src.parent:
            fsync_dir(src.parent)
