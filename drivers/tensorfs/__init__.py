"""The tensorfs driver: a durable, permissioned namespace of tensors.

    open_tensor(path, mode, dtype=None, shape=None, perm=0o644, shm=False, whole=False)
    read_tensor(fd, slice=None, shm=False)   write_tensor(fd, data, slice=None)
    close_tensor(fd, discard=False)          stat, listdir, mkdir, unlink, rename, chmod

Paths such as /models/gpt2/wte live under LLMOS_HOME/tensors/: directories are
real directories (their owner and mode in a .llmos-dir file inside), each tensor
is one safetensors file (_format.py). A write goes to a staging buffer (memory,
or a /dev/shm segment the client maps) and becomes visible only at close, which
writes a temporary file, fsyncs it, renames it over the old one and fsyncs the
directory: a crash leaves the old version or the new, never a torn one. Startup
removes the temporary files crashed writes left. Reads verify the CRC-32 in the
header (EIO on a mismatch) and keep hot tensors in an LRU cache of /dev/shm
segments, handed to clients by hard link, so a cached read copies nothing.
Descriptors are 96-bit random tokens bound to the pid that opened them; when a
process ends its descriptors are closed and its uncommitted writes dropped.
See docs/tensorfs.md. It must never import the kernel or userland.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import queue
import secrets
import signal
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drivers import DriverLoop, Request, Service
from syscalls import Errno, SyscallError, format_size

from . import _format, _shm
from ._format import DTYPES, SUFFIX, FormatError, TensorMeta

log = logging.getLogger("llmos.tensorfs")

DIR_META = ".llmos-dir"
TMP_PREFIX = ".llmos-tmp-"
MAX_NAME = 200          # bytes of one path component (the file adds ".safetensors")
MAX_DEPTH = 64
MAX_DIMS_GROUP = 32     # dimensions of a group member (as the table's MAX_DIMS)
PATH_MAX = 4096         # Linux's, counting the NUL: a file path on disk must be shorter
SHM_GRACE_S = 30.0      # a handed-out segment the client has not taken by then is removed
PARALLEL_CRC_BYTES = 1 << 20  # from this size the checksum runs beside the write
DIRECT_ALIGN = 4096      # direct I/O: buffer, file offset and length in whole pages
ROOT_MODE = 0o1777      # like /tmp: anyone may create; only owners remove (sticky)
WRITE_MODES = ("w", "x", "rw")
MAX_SPARES = 2          # staging segments kept per process: a checkpoint's two groups


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


@dataclass
class DirMeta:
    owner: int
    mode: int
    ctime: float


@dataclass
class Cached:
    """A verified tensor's data in a /dev/shm segment of the cache."""
    path: Path
    buf: mmap.mmap
    nbytes: int


@dataclass
class Open:
    """One open descriptor. `buf` stages a write (bytearray or a segment's mmap);
    a reader keeps the OS file open, so it reads what it opened even after a rename,
    unlink or a newer commit."""
    fd: str
    pid: int
    uid: int
    path: str
    mode: str
    meta: TensorMeta
    os_fd: int = -1
    buf: Any = None
    seg: Path | None = None
    exists: bool = False
    key: tuple[int, int, int] | None = None


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    commits: int = 0
    checksum_errors: int = 0
    handouts: dict[int, dict[Path, float]] = field(default_factory=dict)


class TensorFS(Service):
    name = "tensorfs"
    serves = ("open_tensor", "read_tensor", "write_tensor", "close_tensor", "stat",
              "listdir", "mkdir", "unlink", "rename", "chmod")

    def __init__(self, loop: DriverLoop) -> None:
        super().__init__(loop)
        cfg = self.config
        self.root = self.home.root / "tensors"
        self.root_bytes = str(self.root).encode()
        self.max_bytes = cfg.tensor_max_size
        self.quota = dict(cfg.tensor_quota)
        self.cache_budget = cfg.tensor_cache
        self.threshold = cfg.tensor_shm_threshold
        self.max_open = cfg.tensor_max_open
        self.pfx = _shm.prefix(self.home.root)
        self.fds: dict[str, Open] = {}
        # each process's last staging segment, kept for its next write of the same
        # size: a fresh segment's first touch of new pages costs more than the copy
        self.spares: dict[int, list[tuple[Path, Any, int]]] = {}  # newest last
        self.cache: OrderedDict[tuple[int, int, int], Cached] = OrderedDict()
        self.cache_bytes = 0
        self.stats = Stats()
        self.usage: dict[int, int] = {}
        # replaced files are unlinked here, off the commit's path (boot removes any
        # a crash left: they carry the temporary prefix)
        self.reaper: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self.reaper_thread = threading.Thread(target=self.reap, name="tensorfs-reaper",
                                              daemon=True)
        self.reaper_thread.start()
        self.boot()

    def reap(self) -> None:
        while (p := self.reaper.get()) is not None:
            try:
                os.unlink(p)
            except OSError as e:
                log.warning("removing replaced %s: %s", p, e)

    # -- start: the root, crash leftovers, usage ---------------------------------------

    def boot(self) -> None:
        swept = _shm.sweep_all(self.pfx)
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / DIR_META).exists():
            self.write_dir_meta(self.root, DirMeta(0, ROOT_MODE, time.time()))
        leftovers = 0
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=True):
            for name in list(dirnames):
                if name.startswith(TMP_PREFIX):  # a mkdir or unlink cut short
                    self.remove_tree(Path(dirpath) / name)
                    dirnames.remove(name)
                    leftovers += 1
            for name in filenames:
                p = Path(dirpath) / name
                if name.startswith(TMP_PREFIX):
                    p.unlink()
                    leftovers += 1
                elif name.endswith(SUFFIX):
                    try:
                        meta = self.file_meta(p)
                    except (OSError, FormatError) as e:
                        log.error("%s: %s", p, e)
                        continue
                    self.usage[meta.owner] = self.usage.get(meta.owner, 0) + meta.nbytes
        if leftovers:
            fsync_dir(self.root)
        log.info("tensorfs on %s: removed %d crash leftover(s), %d stale segment(s); "
                 "usage %s", self.root, leftovers, swept, self.usage)

    @staticmethod
    def remove_tree(p: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(p, topdown=False):
            for name in filenames:
                os.unlink(os.path.join(dirpath, name))
            for name in dirnames:
                os.rmdir(os.path.join(dirpath, name))
        os.rmdir(p)

    # -- paths and metadata --------------------------------------------------------------

    def split(self, path: str) -> list[str]:
        """The components of an absolute llmos path; EINVAL for anything that could
        escape the root or name a file of ours."""
        if not path.startswith("/"):
            raise SyscallError(Errno.EINVAL, f"{path!r}: a path must start with /")
        if path == "/":
            return []
        parts = path[1:].split("/")
        if len(parts) > MAX_DEPTH:
            raise SyscallError(Errno.EINVAL, f"{path!r}: deeper than {MAX_DEPTH}")
        for p in parts:
            if p in ("", ".", ".."):
                raise SyscallError(Errno.EINVAL, f"{path!r}: empty, . and .. components "
                                   "are not allowed")
            if p.startswith("."):
                raise SyscallError(Errno.EINVAL, f"{path!r}: names must not start with .")
            if "\x00" in p or "\\" in p:
                raise SyscallError(Errno.EINVAL, f"{path!r}: NUL or backslash in a name")
            if len(p.encode()) > MAX_NAME:
                raise SyscallError(Errno.EINVAL, f"{path!r}: a name is over {MAX_NAME} bytes")
        on_disk = len(self.root_bytes) + len(path.encode()) + len(SUFFIX)
        if on_disk >= PATH_MAX:
            raise SyscallError(Errno.ENAMETOOLONG, f"{path[:60]!r}...: its file on disk "
                               f"would be {on_disk} bytes, over PATH_MAX ({PATH_MAX})")
        return parts

    def dir_path(self, parts: list[str]) -> Path:
        return self.root.joinpath(*parts)

    def tensor_path(self, parts: list[str]) -> Path:
        return self.root.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    def read_dir_meta(self, d: Path) -> DirMeta:
        try:
            m = json.loads((d / DIR_META).read_text())
            return DirMeta(int(m["owner"]), int(m["mode"]), float(m["ctime"]))
        except (OSError, ValueError, KeyError):
            return DirMeta(0, 0o755, 0.0)

    @staticmethod
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

    @staticmethod
    def file_meta(p: Path) -> TensorMeta:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return _format.read_meta(fd)
        finally:
            os.close(fd)

    def parent_dir(self, parts: list[str], path: str) -> Path:
        """The directory that holds the last component: ENOENT / ENOTDIR if none."""
        if not parts:
            raise SyscallError(Errno.EINVAL, "the root has no parent")
        d = self.dir_path(parts[:-1])
        if not d.is_dir():
            if len(parts) > 1 and self.tensor_path(parts[:-1]).exists():
                raise SyscallError(Errno.ENOTDIR, f"{path}: a tensor in the way")
            raise SyscallError(Errno.ENOENT, f"{path}: no such directory")
        return d

    @staticmethod
    def allowed(uid: int, owner: int, mode: int, want: int) -> bool:
        """want: 4 read, 2 write; uid 0 may do anything; no groups."""
        if uid == 0:
            return True
        bits = (mode >> 6) & 7 if uid == owner else mode & 7
        return bits & want == want

    def need(self, req: Request, owner: int, mode: int, want: int, what: str) -> None:
        if not self.allowed(req.uid, owner, mode, want):
            raise SyscallError(Errno.EACCES, f"{what}: uid {req.uid} may not "
                               f"{'read' if want == 4 else 'write'} (owner {owner}, "
                               f"mode {mode:o})")

    def may_remove(self, req: Request, d: Path, owner: int, path: str) -> None:
        """Write permission on the directory; with its sticky bit, also ownership."""
        dm = self.read_dir_meta(d)
        self.need(req, dm.owner, dm.mode, 2, path)
        if dm.mode & 0o1000 and req.uid not in (0, owner, dm.owner):
            raise SyscallError(Errno.EACCES, f"{path}: the directory is sticky and "
                               f"uid {req.uid} owns neither it nor the entry")

    def lookup(self, parts: list[str], path: str) -> tuple[str, Path]:
        if not parts:
            return "dir", self.root
        self.parent_dir(parts, path)
        t = self.tensor_path(parts)
        if t.is_file():
            return "tensor", t
        d = self.dir_path(parts)
        if d.is_dir():
            return "dir", d
        raise SyscallError(Errno.ENOENT, f"{path}: no such tensor or directory")

    def describe(self, path: str, kind: str, p: Path) -> dict[str, Any]:
        if kind == "dir":
            m = self.read_dir_meta(p)
            return {"path": path, "type": "dir", "owner": m.owner, "mode": m.mode,
                    "ctime": m.ctime, "mtime": p.stat().st_mtime}
        try:
            t = self.file_meta(p)
        except FormatError as e:
            raise SyscallError(Errno.EIO, f"{path}: {e}") from None
        out = {"path": path, "type": "tensor", "owner": t.owner, "mode": t.mode,
               "ctime": t.ctime, "mtime": t.mtime, "dtype": t.dtype, "shape": t.shape,
               "size": t.nbytes, "checksum": f"crc32:{t.crc32:08x}"}
        if t.members is not None:
            del out["dtype"], out["shape"]
            out["type"] = "group"
            out["members"] = [{"name": m.name, "dtype": m.dtype, "shape": m.shape,
                               "size": m.nbytes} for m in t.members]
        return out

    # -- descriptors -------------------------------------------------------------------

    def get_fd(self, req: Request, fd: str, call: str) -> Open:
        o = self.fds.get(fd)
        if o is None or o.pid != req.pid:  # another process's descriptor does not exist
            raise SyscallError(Errno.EBADF, f"{call}: {fd!r} is not an open descriptor "
                               "of this process")
        return o

    def open_tensor(self, req: Request, path: str, mode: str, dtype: str | None,
                    shape: list[int] | None, perm: int, shm: bool, whole: bool = False,
                    members: list[list[Any]] | None = None) -> dict[str, Any]:
        parts = self.split(path)
        specs = self.member_specs(members, mode, dtype, shape) if members is not None else None
        if sum(o.pid == req.pid for o in self.fds.values()) >= self.max_open:
            raise SyscallError(Errno.EMFILE, f"open_tensor: pid {req.pid} has "
                               f"{self.max_open} descriptors open (tensor_max_open)")
        d = self.parent_dir(parts, path)
        target = self.tensor_path(parts)
        if self.dir_path(parts).is_dir():
            raise SyscallError(Errno.EISDIR, f"open_tensor: {path} is a directory")
        exists = target.is_file()
        if mode == "x" and exists:
            raise SyscallError(Errno.EEXIST, f"open_tensor: {path} exists (mode x)")
        if mode in ("r", "rw") and not exists:
            raise SyscallError(Errno.ENOENT, f"open_tensor: no tensor {path}")
        if mode in ("r", "rw") and (dtype is not None or shape is not None):
            raise SyscallError(Errno.EINVAL, "open_tensor: dtype and shape are for "
                               "modes w and x")
        if specs is not None:  # a group: its data is its members' bytes, back to back
            dtype, shape = "uint8", [0]
        now = time.time()
        os_fd, old = -1, None
        if exists:
            os_fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                old = _format.read_meta(os_fd)
            except FormatError as e:
                os.close(os_fd)
                raise SyscallError(Errno.EIO, f"open_tensor: {path}: {e}") from None
        try:
            if mode == "r":
                self.need(req, old.owner, old.mode, 4, f"open_tensor {path}")
                meta = old
            elif mode == "rw":
                self.need(req, old.owner, old.mode, 6, f"open_tensor {path}")
                meta = TensorMeta(old.dtype, old.shape, old.owner, old.mode, old.ctime,
                                  now, 0, members=old.members)
            else:
                if dtype is None or shape is None:
                    raise SyscallError(Errno.EINVAL, f"open_tensor: mode {mode} needs "
                                       "dtype and shape")
                if old is not None:  # overwriting keeps the owner and mode, as O_TRUNC does
                    self.need(req, old.owner, old.mode, 2, f"open_tensor {path}")
                    owner, bits, ctime = old.owner, old.mode, old.ctime
                else:
                    dm = self.read_dir_meta(d)
                    self.need(req, dm.owner, dm.mode, 2, f"open_tensor {path} (its directory)")
                    owner, bits, ctime = req.uid, perm, now
                if specs is not None:
                    meta = _format.group_meta(_format.layout(specs), owner, bits, ctime, now)
                    if len(_format.header(meta, DIRECT_ALIGN)) > _format.MAX_HEADER:
                        raise SyscallError(Errno.EINVAL, f"open_tensor: {len(specs)} members "
                                           "make a header over 1 MiB")
                else:
                    meta = TensorMeta(dtype, shape, owner, bits, ctime, now, 0)
            size = meta.nbytes
            if mode != "r":
                self.check_space(meta.owner, size, old.nbytes if old and
                                 old.owner == meta.owner else 0, path)
            o = Open(secrets.token_hex(12), req.pid, req.uid, path, mode, meta,
                     exists=exists)
            if mode == "r":
                o.os_fd, os_fd = os_fd, -1
                s = os.fstat(o.os_fd)
                o.key = (s.st_ino, s.st_mtime_ns, s.st_size)
            else:
                if shm and size >= self.threshold:
                    o.seg, o.buf = self.staging(req.pid, size, whole and mode != "rw")
                elif size >= PARALLEL_CRC_BYTES:
                    o.buf = mmap.mmap(-1, size)  # zeroed and page-aligned: direct I/O
                else:
                    o.buf = bytearray(size)
                if mode == "rw":
                    s = os.fstat(os_fd)
                    src = self.load(os_fd, old, (s.st_ino, s.st_mtime_ns, s.st_size), path)
                    o.buf[:size] = src.buf[:size] if isinstance(src, Cached) else src[:size]
        finally:
            if os_fd >= 0:
                os.close(os_fd)
        self.fds[o.fd] = o
        req.hold("tensor", o.fd)
        reply = {"fd": o.fd, "dtype": meta.dtype, "shape": meta.shape, "size": meta.nbytes,
                 "shm": str(o.seg) if o.seg else None, "members": None}
        if meta.members is not None:
            reply["members"] = [[m.name, m.dtype, m.shape, m.offset] for m in meta.members]
        return reply

    @staticmethod
    def member_specs(members: list[list[Any]], mode: str, dtype: str | None,
                     shape: list[int] | None) -> list[tuple[str, str, list[int]]]:
        """A group's [name, dtype, shape] triples, checked: EINVAL for anything off."""
        if mode not in ("w", "x"):
            raise SyscallError(Errno.EINVAL, "open_tensor: members are for modes w and x")
        if dtype is not None or shape is not None:
            raise SyscallError(Errno.EINVAL, "open_tensor: a group takes members, not "
                               "dtype and shape")
        seen: set[str] = set()
        out = []
        for name, mdtype, mshape in members:
            why = ("is empty" if not name else
                   f"is over {MAX_NAME} bytes" if len(name.encode()) > MAX_NAME else
                   "has a NUL" if "\x00" in name else
                   "is reserved by the format" if name == "__metadata__" else
                   "is given twice" if name in seen else
                   f"has dtype {mdtype!r}, not one of {', '.join(DTYPES)}"
                   if mdtype not in DTYPES else
                   f"has {len(mshape)} dimensions, over {MAX_DIMS_GROUP}"
                   if len(mshape) > MAX_DIMS_GROUP else None)
            if why:
                raise SyscallError(Errno.EINVAL, f"open_tensor: member {name[:80]!r} {why}")
            seen.add(name)
            out.append((name, mdtype, mshape))
        return out

    @staticmethod
    def region(m: TensorMeta, member: str | None, call: str) -> tuple[str, list[int], int]:
        """(dtype, shape, byte offset) of what a read or write addresses: the tensor,
        a group's member, or (no member) a group's data as bytes."""
        if member is None:
            return m.dtype, m.shape, 0
        if m.members is None:
            raise SyscallError(Errno.EINVAL, f"{call}: member {member!r} of a tensor that "
                               "is not a group")
        for g in m.members:
            if g.name == member:
                return g.dtype, g.shape, g.offset
        raise SyscallError(Errno.ENOENT, f"{call}: the group has no member {member!r}")

    def check_space(self, owner: int, size: int, replaced: int, path: str) -> None:
        if size > self.max_bytes:
            raise SyscallError(Errno.EFBIG, f"open_tensor: {path}: {format_size(size)} is "
                               f"over the largest tensor allowed, {format_size(self.max_bytes)}"
                               " (tensor_max_size)")
        quota = self.quota.get(owner)
        staged = sum(o.meta.nbytes for o in self.fds.values()
                     if o.mode != "r" and o.meta.owner == owner)
        used = self.usage.get(owner, 0) - replaced + staged
        if quota is not None and used + size > quota:
            raise SyscallError(Errno.EDQUOT, f"open_tensor: {path}: uid {owner} holds "
                               f"{format_size(used)}; {format_size(size)} more is over its "
                               f"quota of {format_size(quota)}")

    def slices(self, shape: list[int], slc: list[list[int]] | None, call: str) -> tuple:
        if slc is None:
            return ()
        if len(slc) > len(shape):
            raise SyscallError(Errno.EINVAL, f"{call}: slice has {len(slc)} dimensions, "
                               f"the tensor {len(shape)}")
        out = []
        for i, (pair, n) in enumerate(zip(slc, shape)):
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1] <= n:
                raise SyscallError(Errno.EINVAL, f"{call}: slice {pair} of dimension {i} "
                                   f"is not [start, stop] with 0 <= start <= stop <= {n}")
            out.append(slice(pair[0], pair[1]))
        return tuple(out)

    def read_tensor(self, req: Request, fd: str, slice: list[list[int]] | None,
                    shm: bool, member: str | None = None) -> dict[str, Any]:
        o = self.get_fd(req, fd, "read_tensor")
        m = o.meta
        if o.mode == "r":
            src = self.load(o.os_fd, m, o.key, o.path)
        elif o.mode == "rw":
            src = o.buf
        else:
            raise SyscallError(Errno.EBADF, f"read_tensor: {fd} is open for writing only")
        buf = src.buf if isinstance(src, Cached) else src
        dtype, full, at = self.region(m, member, "read_tensor")
        sl = self.slices(full, slice, "read_tensor")
        if at or member is not None:
            n = _format.nbytes(dtype, full)
            buf = memoryview(buf).cast("B")[at:at + n]
        if sl:
            arr = _format.view(buf, dtype, full)[sl]
            shape = list(arr.shape)
            data: Any = np.ascontiguousarray(arr)
        else:
            shape, data = full, None
        out = {"dtype": dtype, "shape": shape, "data": None, "shm": None, "offset": 0}
        size = _format.nbytes(dtype, shape)
        if shm and size >= self.threshold:
            seg = _shm.new_name(self.pfx, "x")
            if data is None and isinstance(src, Cached):
                # zero-copy: the client maps the cache's pages; a group's member is
                # at offset in them (the caller may read the whole file anyway)
                os.link(src.path, seg)
                out["offset"] = at
            else:
                mm = _shm.create(seg, size)
                mm[:size] = memoryview(data if data is not None else buf).cast("B")[:size]
                mm.close()
            self.stats.handouts.setdefault(req.pid, {})[seg] = time.monotonic()
            out["shm"] = str(seg)
        else:
            out["data"] = data.tobytes() if data is not None else bytes(buf[:size])
        return out

    def write_tensor(self, req: Request, fd: str, data: bytes,
                     slice: list[list[int]] | None, member: str | None = None) -> int:
        o = self.get_fd(req, fd, "write_tensor")
        if o.mode == "r":
            raise SyscallError(Errno.EBADF, f"write_tensor: {fd} is open for reading only")
        dtype, full, at = self.region(o.meta, member, "write_tensor")
        sl = self.slices(full, slice, "write_tensor")
        n = _format.nbytes(dtype, full)
        dst = np.frombuffer(o.buf, dtype=DTYPES[dtype][2], count=n // DTYPES[dtype][1],
                            offset=at).reshape(full)
        part = dst[sl] if sl else dst
        want = part.size * DTYPES[dtype][1]
        if len(data) != want:
            raise SyscallError(Errno.EINVAL, f"write_tensor: {len(data)} bytes for a "
                               f"{dtype} region of shape {list(part.shape)} "
                               f"({want} bytes)")
        part[...] = np.frombuffer(data, dtype=dst.dtype).reshape(part.shape)
        return len(data)

    def close_tensor(self, req: Request, fd: str, discard: bool) -> dict[str, Any] | None:
        o = self.get_fd(req, fd, "close_tensor")
        try:
            if o.mode != "r" and not discard:
                return self.commit(o)
            return None
        finally:
            self.drop(o)
            req.release("tensor", fd)

    def staging(self, pid: int, size: int, whole: bool) -> tuple[Path, Any]:
        """A segment of size bytes for pid to write into: its spare when the size
        matches (mapped pages cost less than faulting in new ones), else a new one.
        It comes zero-filled unless whole (the caller will write every byte): a
        spare holds only pid's own previous write, and zeroing it is a pass over
        the tensor (12 ms for 256 MiB)."""
        mine = self.spares.get(pid, [])
        for i, spare in enumerate(mine):
            if spare[2] == size:
                del mine[i]
                if not whole:
                    np.frombuffer(spare[1], dtype=np.uint8, count=size)[:] = 0
                return spare[0], spare[1]
        seg = _shm.new_name(self.pfx, "x")
        return seg, _shm.create(seg, size)

    @staticmethod
    def free_segment(seg: Path, buf: Any) -> None:
        _shm.unlink(seg)
        try:
            buf.close()
        except BufferError:
            pass

    def drop(self, o: Open, keep_spare: bool = True) -> None:
        self.fds.pop(o.fd, None)
        if o.os_fd >= 0:
            os.close(o.os_fd)
            o.os_fd = -1
        if o.seg is not None:
            if keep_spare and o.mode in WRITE_MODES:
                mine = self.spares.setdefault(o.pid, [])
                mine.append((o.seg, o.buf, o.meta.nbytes))
                while len(mine) > MAX_SPARES:  # the least recently used goes
                    old = mine.pop(0)
                    self.free_segment(old[0], old[1])
            else:
                self.free_segment(o.seg, o.buf)
        o.buf = None

    @staticmethod
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

    def commit(self, o: Open) -> dict[str, Any]:
        """Make o's staged data the tensor at o.path: temp file, fsync, rename, fsync dir."""
        parts = self.split(o.path)
        d = self.parent_dir(parts, o.path)  # it may have been removed meanwhile
        target = self.tensor_path(parts)
        if self.dir_path(parts).is_dir():  # made since the open: one name, one thing
            raise SyscallError(Errno.EISDIR, f"close_tensor: {o.path} is a directory now; "
                               "the write is discarded")
        m = o.meta
        data = memoryview(o.buf).cast("B")[:m.nbytes]
        self.check_bools(m, data, o.path)
        m.mtime = time.time()
        old = None
        if target.is_file():
            try:
                old = self.file_meta(target)
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
        if o.mode == "x":
            try:
                os.link(tmp, target)  # fails if another writer got there first
            except FileExistsError:
                raise SyscallError(Errno.EEXIST, f"close_tensor: {o.path} was created "
                                   "by another writer (mode x)") from None
            finally:
                os.unlink(tmp)
        else:
            doomed = None
            if old is not None and old.nbytes >= PARALLEL_CRC_BYTES:
                # freeing a large file's blocks takes tens of ms inside the rename;
                # keep a link so the rename is quick and free it after the reply
                doomed = d / (TMP_PREFIX + secrets.token_hex(8))
                try:
                    os.link(target, doomed)
                except OSError:
                    doomed = None
            os.replace(tmp, target)
            if doomed is not None:
                self.reaper.put(doomed)
        fsync_dir(d)
        if old is not None:
            self.usage[old.owner] = self.usage.get(old.owner, 0) - old.nbytes
        self.usage[m.owner] = self.usage.get(m.owner, 0) + m.nbytes
        self.stats.commits += 1
        return {"size": m.nbytes, "checksum": f"crc32:{m.crc32:08x}"}

    # -- the cache ------------------------------------------------------------------------

    def load(self, os_fd: int, meta: TensorMeta, key: tuple[int, int, int] | None,
             path: str) -> Cached | Any:
        """A tensor's verified data: from the cache, or read, checked and (when it fits
        the budget) cached."""
        c = self.cache.get(key) if key is not None else None
        if c is not None:
            self.cache.move_to_end(key)
            self.stats.hits += 1
            return c
        self.stats.misses += 1
        n = meta.nbytes
        cacheable = key is not None and 0 < n <= self.cache_budget
        seg = _shm.new_name(self.pfx, "c") if cacheable else None
        buf: Any = _shm.create(seg, n) if seg else bytearray(n)
        try:
            got = os.preadv(os_fd, [memoryview(buf)[:n]], meta.data_offset) if n else 0
            if got != n or zlib.crc32(memoryview(buf)[:n]) != meta.crc32:
                self.stats.checksum_errors += 1
                raise SyscallError(Errno.EIO, f"{path}: checksum mismatch: the tensor is "
                                   "damaged")
        except BaseException:
            if seg:
                _shm.unlink(seg)
            raise
        if not seg:
            return buf
        while self.cache and self.cache_bytes + n > self.cache_budget:
            self.evict()
        c = Cached(seg, buf, n)
        self.cache[key] = c
        self.cache_bytes += n
        return c

    def evict(self) -> None:
        _, c = self.cache.popitem(last=False)
        self.cache_bytes -= c.nbytes
        self.stats.evictions += 1
        _shm.unlink(c.path)  # a client that mapped it keeps its pages
        try:
            c.buf.close()
        except BufferError:
            pass

    # -- the namespace ---------------------------------------------------------------------

    def stat(self, req: Request, path: str) -> dict[str, Any]:
        parts = self.split(path)
        kind, p = self.lookup(parts, path)
        return self.describe(path, kind, p)

    def listdir(self, req: Request, path: str) -> list[dict[str, Any]]:
        parts = self.split(path)
        kind, d = self.lookup(parts, path)
        if kind != "dir":
            raise SyscallError(Errno.ENOTDIR, f"listdir: {path} is a tensor")
        dm = self.read_dir_meta(d)
        self.need(req, dm.owner, dm.mode, 4, f"listdir {path}")
        out = []
        base = path.rstrip("/")
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                out.append(self.describe(f"{base}/{entry.name}", "dir", Path(entry.path)))
            elif entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                name = entry.name[:-len(SUFFIX)]
                try:
                    out.append(self.describe(f"{base}/{name}", "tensor", Path(entry.path)))
                except SyscallError:
                    out.append({"path": f"{base}/{name}", "type": "tensor", "error": "EIO"})
        for e in out:
            e["name"] = e["path"].rsplit("/", 1)[1]
            if "members" in e:  # stat lists them; a listing only counts them
                e["n_members"] = len(e.pop("members"))
        return out

    def mkdir(self, req: Request, path: str, perm: int) -> None:
        parts = self.split(path)
        d = self.parent_dir(parts, path)
        if self.dir_path(parts).exists() or self.tensor_path(parts).exists():
            raise SyscallError(Errno.EEXIST, f"mkdir: {path} exists")
        dm = self.read_dir_meta(d)
        self.need(req, dm.owner, dm.mode, 2, f"mkdir {path}")
        tmp = d / (TMP_PREFIX + secrets.token_hex(8))
        tmp.mkdir()
        self.write_dir_meta(tmp, DirMeta(req.uid, perm, time.time()))
        os.rename(tmp, self.dir_path(parts))
        fsync_dir(d)

    def unlink(self, req: Request, path: str) -> None:
        parts = self.split(path)
        if not parts:
            raise SyscallError(Errno.EINVAL, "unlink: not the root")
        kind, p = self.lookup(parts, path)
        d = p.parent
        if kind == "tensor":
            try:
                meta = self.file_meta(p)
                owner, size = meta.owner, meta.nbytes
            except FormatError:
                owner, size = 0, 0
            self.may_remove(req, d, owner, path)
            os.unlink(p)
            fsync_dir(d)
            self.usage[owner] = self.usage.get(owner, 0) - size
            return
        dm = self.read_dir_meta(p)
        self.may_remove(req, d, dm.owner, path)
        if any(not e.name.startswith(".") for e in os.scandir(p)):
            raise SyscallError(Errno.ENOTEMPTY, f"unlink: directory {path} is not empty")
        tmp = d / (TMP_PREFIX + secrets.token_hex(8))
        os.rename(p, tmp)  # atomic: a crash after it leaves a leftover boot removes
        fsync_dir(d)
        self.remove_tree(tmp)

    def rename(self, req: Request, src: str, dst: str) -> None:
        sp, dp = self.split(src), self.split(dst)
        if not sp or not dp:
            raise SyscallError(Errno.EINVAL, "rename: not the root")
        kind, p = self.lookup(sp, src)
        dd = self.parent_dir(dp, dst)
        if kind == "dir" and dp[:len(sp)] == sp:
            raise SyscallError(Errno.EINVAL, f"rename: {dst} is inside {src}")
        if self.dir_path(dp).exists() or self.tensor_path(dp).exists():
            raise SyscallError(Errno.EEXIST, f"rename: {dst} exists")
        owner = self.read_dir_meta(p).owner if kind == "dir" else self.file_meta(p).owner
        self.may_remove(req, p.parent, owner, src)
        ddm = self.read_dir_meta(dd)
        self.need(req, ddm.owner, ddm.mode, 2, f"rename to {dst}")
        os.rename(p, self.tensor_path(dp) if kind == "tensor" else self.dir_path(dp))
        fsync_dir(dd)
        if dd != p.parent:
            fsync_dir(p.parent)

    def chmod(self, req: Request, path: str, perm: int) -> None:
        parts = self.split(path)
        kind, p = self.lookup(parts, path)
        if kind == "dir":
            dm = self.read_dir_meta(p)
            if req.uid not in (0, dm.owner):
                raise SyscallError(Errno.EPERM, f"chmod: {path} belongs to uid {dm.owner}")
            dm.mode = perm
            self.write_dir_meta(p, dm)
            return
        meta = self.file_meta(p)
        if req.uid not in (0, meta.owner):
            raise SyscallError(Errno.EPERM, f"chmod: {path} belongs to uid {meta.owner}")
        # the mode is in the header: rewrite the file, atomically, keeping the data
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            s = os.fstat(fd)
            src = self.load(fd, meta, (s.st_ino, s.st_mtime_ns, s.st_size), path)
        finally:
            os.close(fd)
        o = Open("", req.pid, req.uid, path, "w", TensorMeta(
            meta.dtype, meta.shape, meta.owner, perm, meta.ctime, meta.mtime, 0,
            members=meta.members))
        o.buf = src.buf if isinstance(src, Cached) else src
        self.commit(o)

    # -- process exit, the sweep, the status summary ------------------------------------

    def on_exit(self, pid: int) -> None:
        mine = [o for o in self.fds.values() if o.pid == pid]
        for o in mine:
            self.drop(o, keep_spare=False)  # uncommitted writes are discarded
        for seg, buf, _ in self.spares.pop(pid, []):
            self.free_segment(seg, buf)
        for seg in self.stats.handouts.pop(pid, {}):
            _shm.unlink(seg)
        if mine:
            log.info("pid %d ended: closed %d descriptor(s)", pid, len(mine))

    def on_welcome(self, live: list[int]) -> None:
        alive = set(live)
        for pid in [p for p in self.stats.handouts if p not in alive]:
            self.on_exit(pid)

    def sweep(self) -> None:
        now = time.monotonic()
        for pid, segs in list(self.stats.handouts.items()):
            for seg, t in list(segs.items()):
                if now - t > SHM_GRACE_S:
                    _shm.unlink(seg)
                    del segs[seg]
            if not segs:
                del self.stats.handouts[pid]

    def status(self) -> dict[str, Any]:
        self.sweep()  # the heartbeat's period is the sweep's
        s = self.stats
        return {"open": len(self.fds), "cache": {
            "hits": s.hits, "misses": s.misses, "evictions": s.evictions,
            "bytes": self.cache_bytes, "budget": self.cache_budget, "entries": len(self.cache)},
            "commits": s.commits, "checksum_errors": s.checksum_errors,
            "segments_lent": sum(len(v) for v in s.handouts.values())}

    def shutdown(self) -> None:
        self.reaper.put(None)
        self.reaper_thread.join(5.0)
        for o in list(self.fds.values()):
            self.drop(o, keep_spare=False)
        for mine in self.spares.values():
            for seg, buf, _ in mine:
                self.free_segment(seg, buf)
        self.spares.clear()
        self.cache.clear()
        _shm.sweep_all(self.pfx)



__all__ = ["TensorFS"]
