"""The tensorfs service: its syscall handlers, descriptors and process hooks.

Handlers check arguments and permissions, then call the parts that do the work:
_paths (lookup, stat records), _regions (members, slices), _commit (every change
on disk), _cache (verified data), _staging (segments lent to processes), _fsck. A
descriptor is a 96-bit random token bound to the pid that opened it; a write's
data is staged in it until close_tensor commits it, and the staged write belongs
to its path's directory from the open on: that directory cannot be removed
(ENOTEMPTY) and a rename of it carries the write along.

The driver is ready at once; the scan of the store (_scan.py) runs after, in a
thread. Until it is done the calls that need what it counts wait for it, in the
order they came (DEFERRED): an open for writing of a tensor whose owner has a
quota, and a directory's rename. It must never import the kernel or userland.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from drivers import DEFERRED, DriverLoop, Request, Service
from syscalls import Errno, SyscallError, format_size

from . import _format, _shm
from ._cache import Cache, FileKey, Loaded, file_key
from ._channel import Channels
from ._commit import DIRECT_ALIGN, Store, UsageNotReady
from ._format import DTYPES, FormatError, TensorMeta
from ._namespace import NamespaceCalls
from ._paths import Namespace, need, read_dir_meta, refused
from ._regions import member_specs, region, slices
from ._staging import SHM_GRACE_S, Segments

log = logging.getLogger("llmos.tensorfs")
WAKE_S = 0.05   # while the scan runs: the loop wakes this often to run what it posts


@dataclass
class Open:
    """One open descriptor. `buf` stages a write (bytearray, or an mmap: anonymous
    or a segment's); a reader keeps the OS file open, so it reads what it opened
    even after a rename, unlink or a newer commit. `member`: opened as PATH[name],
    the member read when read_tensor names none."""
    fd: str
    pid: int
    uid: int
    path: str
    mode: str
    meta: TensorMeta
    os_fd: int = -1
    buf: Any = None
    seg: Path | None = None
    key: FileKey | None = None
    member: str | None = None


class TensorFS(NamespaceCalls, Service):
    name = "tensorfs"
    serves = ("open_tensor", "read_tensor", "write_tensor", "close_tensor", "stat",
              "listdir", "mkdir", "unlink", "rename", "chmod", "fsck")

    def __init__(self, loop: DriverLoop) -> None:
        super().__init__(loop)
        cfg = self.config
        # this instance's name for what it makes (temporary files, segments): the
        # scan and the sweeps tell its own from what earlier instances left
        tag = _shm.instance_tag(os.environ.get("LLMOS_DRIVER_ID") or secrets.token_hex(8))
        self.ns = Namespace(self.home.root / "tensors")
        self.home_pfx = _shm.prefix(self.home.root)
        self.pfx = f"{self.home_pfx}{tag}-"
        self.store = Store(self.ns, cfg.tensor_max_size, dict(cfg.tensor_quota), tag)
        self.cache = Cache(self.pfx, cfg.tensor_cache)
        self.segments = Segments(self.pfx, cfg.tensor_shm_threshold)
        # the kernel listens on TCP: reads for other hosts go by data channels
        host = os.environ.get("LLMOS_NET_HOST")
        self.channels = Channels(host) if host else None
        self.max_open = cfg.tensor_max_open
        self.fds: dict[str, Open] = {}
        self.after_scan: list[tuple[Request, Callable[..., Any], dict[str, Any]]] = []
        swept, self.foreign = _shm.sweep_all(self.home_pfx, self.pfx, SHM_GRACE_S)
        self.store.prepare()
        log.info("tensorfs %s on %s: removed %d segment(s) of earlier instances "
                 "(%d too recent, for later); scanning the store",
                 tag, self.ns.root, swept, self.foreign)
        self.store.scan.start(lambda: self.loop.post(self.scan_walked))
        self.loop.call_later(WAKE_S, self.wake)

    # -- calls that wait for the scan ------------------------------------------------

    def wake(self) -> None:
        """The loop sleeps until a message, a timer or its heartbeat: while the
        scan runs, this timer has it look at what the scan posted soon."""
        if not self.store.scan.done:
            self.loop.call_later(WAKE_S, self.wake)

    def scan_walked(self) -> None:
        """The scan is over: usage is known; answer the calls that waited, in order."""
        self.store.scan_walked()
        log.info("usage %s; %d call(s) waited for the scan", self.store.usage,
                 len(self.after_scan))
        waiting, self.after_scan = self.after_scan, []
        for req, handler, args in waiting:  # answered as the loop answers a handler
            try:
                req.reply(handler(req, **args))
            except SyscallError as e:
                req.fail(e.errno, e.message)
            except Exception as e:
                log.exception("%s failed", req.name)
                req.fail(Errno.EIO, f"tensorfs driver: {type(e).__name__}: {e}")

    def wait_for_scan(self, req: Request, handler: Callable[..., Any],
                      args: dict[str, Any]) -> object:
        self.after_scan.append((req, handler, args))
        return DEFERRED

    # -- descriptors -------------------------------------------------------------------

    def get_fd(self, req: Request, fd: str, call: str) -> Open:
        o = self.fds.get(fd)
        if o is None or o.pid != req.pid:  # another process's descriptor does not exist
            raise SyscallError(Errno.EBADF, f"{call}: {fd!r} is not an open descriptor "
                               "of this process")
        return o

    def open_tensor(self, req: Request, path: str, mode: str, dtype: str | None,
                    shape: list[int] | None, perm: int, shm: bool, whole: bool = False,
                    members: list[list[Any]] | None = None,
                    key: str | None = None) -> Any:
        try:
            return self.open_now(req, path, mode, dtype, shape, perm, shm, whole,
                                 members, key)
        except UsageNotReady:  # its owner has a quota: answered once usage is known
            return self.wait_for_scan(req, self.open_tensor, req.args)

    def open_now(self, req: Request, path: str, mode: str, dtype: str | None,
                 shape: list[int] | None, perm: int, shm: bool, whole: bool,
                 members: list[list[Any]] | None, key: str | None) -> dict[str, Any]:
        member = self.ns.member_of(path)
        if member is not None and mode != "r":
            raise refused("open_tensor", path, member, "written", " (open the group in "
                          "mode rw and write_tensor with member=)")
        asked, path = path, member.group if member else path
        parts = member.parts if member else self.ns.split(path)
        specs = member_specs(members, mode, dtype, shape) if members is not None else None
        if sum(o.pid == req.pid for o in self.fds.values()) >= self.max_open:
            raise SyscallError(Errno.EMFILE, f"open_tensor: pid {req.pid} has "
                               f"{self.max_open} descriptors open (tensor_max_open)")
        d = self.ns.parent_dir(parts, path)
        target = self.ns.tensor_path(parts)
        if self.ns.dir_path(parts).is_dir():
            raise SyscallError(Errno.EISDIR, f"open_tensor: {path} is a directory")
        exists = target.is_file()
        if mode == "x" and exists:
            raise SyscallError(Errno.EEXIST, f"open_tensor: {path} exists (mode x)")
        if mode in ("r", "rw") and not exists:
            raise SyscallError(Errno.ENOENT, f"open_tensor: no tensor {path}")
        if mode in ("r", "rw") and (dtype is not None or shape is not None):
            raise SyscallError(Errno.EINVAL, "open_tensor: dtype and shape are for "
                               "modes w and x")
        if key is not None and (mode == "r" or not key):
            why = "a key is for modes w, x and rw" if key else "an empty key"
            raise SyscallError(Errno.EINVAL, f"open_tensor: {why}")
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
                need(req.uid, old.owner, old.mode, 4, f"open_tensor {path}")
                if member is not None:  # ENOENT, naming it, if the group has none
                    region(old, member.name, f"open_tensor: {asked}")
                o = Open(secrets.token_hex(12), req.pid, req.uid, path, mode, old,
                         member=member.name if member else None)
                o.os_fd, os_fd = os_fd, -1
                o.key = file_key(o.os_fd)
            else:
                meta = self.written_meta(req, path, mode, dtype, shape, perm, specs, old, d)
                if key is not None or mode != "rw":  # rw without a key keeps the old one
                    meta.key = key
                self.store.check_space(meta.owner, meta.nbytes, old.nbytes if old and
                                       old.owner == meta.owner else 0,
                                       self.staged_bytes(meta.owner), path)
                o = Open(secrets.token_hex(12), req.pid, req.uid, path, mode, meta)
                o.seg, o.buf = self.segments.staging_buffer(
                    req.pid, meta.nbytes, shm, whole and mode != "rw")
                if mode == "rw":
                    src = self.cache.load(os_fd, old, file_key(os_fd), path)
                    o.buf[:meta.nbytes] = src.buf[:meta.nbytes]
        finally:
            if os_fd >= 0:
                os.close(os_fd)
        self.fds[o.fd] = o
        req.hold("tensor", o.fd)
        return self.opened(o)

    @staticmethod
    def opened(o: Open) -> dict[str, Any]:
        """open_tensor's reply: what the descriptor reads by default (the tensor, the
        group's data as bytes, or the member it was opened as), and a group's
        members, each [name, dtype, shape, offset]."""
        dtype, shape, _ = region(o.meta, o.member, "open_tensor")
        reply = {"fd": o.fd, "dtype": dtype, "shape": shape,
                 "size": _format.nbytes(dtype, shape),
                 "shm": str(o.seg) if o.seg else None, "members": None}
        if o.member is None and o.meta.members is not None:
            reply["members"] = [[m.name, m.dtype, m.shape, m.offset] for m in o.meta.members]
        return reply

    def written_meta(self, req: Request, path: str, mode: str, dtype: str | None,
                     shape: list[int] | None, perm: int,
                     specs: list[tuple[str, str, list[int]]] | None,
                     old: TensorMeta | None, d: Path) -> TensorMeta:
        """The metadata a write in mode w, x or rw will commit, once the caller may."""
        now = time.time()
        if mode == "rw":
            need(req.uid, old.owner, old.mode, 6, f"open_tensor {path}")
            return TensorMeta(old.dtype, old.shape, old.owner, old.mode, old.ctime,
                              now, 0, members=old.members, key=old.key)
        if specs is not None:  # a group: its data is its members' bytes, back to back
            dtype, shape = "uint8", [0]
        if dtype is None or shape is None:
            raise SyscallError(Errno.EINVAL, f"open_tensor: mode {mode} needs "
                               "dtype and shape")
        if old is not None:  # overwriting keeps the owner and mode, as O_TRUNC does
            need(req.uid, old.owner, old.mode, 2, f"open_tensor {path}")
            owner, bits, ctime = old.owner, old.mode, old.ctime
        else:
            dm = read_dir_meta(d)
            need(req.uid, dm.owner, dm.mode, 2, f"open_tensor {path} (its directory)")
            owner, bits, ctime = req.uid, perm, now
        if specs is None:
            return TensorMeta(dtype, shape, owner, bits, ctime, now, 0)
        meta = _format.group_meta(_format.layout(specs), owner, bits, ctime, now)
        head = len(_format.header(meta, DIRECT_ALIGN))
        if head > _format.MAX_HEADER:
            raise SyscallError(Errno.EINVAL, f"open_tensor: {len(specs)} members make a "
                               f"header of {format_size(head)}, over "
                               f"{format_size(_format.MAX_HEADER)}")
        return meta

    def staged_bytes(self, owner: int) -> int:
        return sum(o.meta.nbytes for o in self.fds.values()
                   if o.mode != "r" and o.meta.owner == owner)

    def read_tensor(self, req: Request, fd: str, slice: list[list[int]] | None,
                    shm: bool, member: str | None = None,
                    channel: bool = False) -> dict[str, Any]:
        if channel and self.channels is None:
            raise SyscallError(Errno.ENOTSUP, "read_tensor: no data channels: the kernel "
                               "does not listen on TCP (llmos start --listen)")
        o = self.get_fd(req, fd, "read_tensor")
        m = o.meta
        if o.mode == "r":
            src = self.cache.load(o.os_fd, m, o.key, o.path)
        elif o.mode == "rw":
            src = Loaded(o.buf, m.nbytes)
        else:
            raise SyscallError(Errno.EBADF, f"read_tensor: {fd} is open for writing only")
        member = member if member is not None else o.member
        buf = src.buf
        dtype, full, at = region(m, member, "read_tensor")
        sl = slices(full, slice, "read_tensor")
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
        if channel and self.channels is not None:
            # the cache's segment, sent from the file (held open: an eviction may
            # unlink it first); else a copy, the buffer may go before the caller comes
            what: Any = (src.segment, at, size) if data is None and src.segment else \
                data.tobytes() if data is not None else bytes(buf[:size])
            out["channel"] = self.channels.grant(req.pid, what)
        elif shm and size >= self.segments.threshold:
            # zero-copy: the client maps the cache's pages; a group's member is at
            # offset in them (the caller may read the whole file anyway)
            linked = data is None and src.segment is not None
            seg = self.segments.lend(req.pid, src.segment if linked else None,
                                     data if data is not None else buf, size)
            out["shm"], out["offset"] = str(seg), at if linked else 0
        else:
            out["data"] = data.tobytes() if data is not None else bytes(buf[:size])
        return out

    def write_tensor(self, req: Request, fd: str, data: bytes,
                     slice: list[list[int]] | None, member: str | None = None) -> int:
        o = self.get_fd(req, fd, "write_tensor")
        if o.mode == "r":
            raise SyscallError(Errno.EBADF, f"write_tensor: {fd} is open for reading only")
        dtype, full, at = region(o.meta, member, "write_tensor")
        sl = slices(full, slice, "write_tensor")
        n = _format.nbytes(dtype, full)
        dst = np.frombuffer(o.buf, dtype=DTYPES[dtype][2], count=n // DTYPES[dtype][1],
                            offset=at).reshape(full)
        part = dst[sl] if sl else dst
        want = part.size * DTYPES[dtype][1]
        if len(data) != want:
            off = len(data) - want
            raise SyscallError(Errno.EINVAL, f"write_tensor: {format_size(len(data))} of "
                               f"data for a {dtype} region of shape {list(part.shape)}, "
                               f"which is {format_size(want)} ({format_size(abs(off))} "
                               f"too {'much' if off > 0 else 'little'})")
        part[...] = np.frombuffer(data, dtype=dst.dtype).reshape(part.shape)
        return len(data)

    def close_tensor(self, req: Request, fd: str, discard: bool) -> dict[str, Any] | None:
        o = self.get_fd(req, fd, "close_tensor")
        try:
            if o.mode != "r" and not discard:
                return self.store.commit(o.path, o.meta, o.buf, o.mode == "x")
            return None
        finally:
            self.drop(o)
            req.release("tensor", fd)

    def drop(self, o: Open, keep_spare: bool = True) -> None:
        self.fds.pop(o.fd, None)
        if o.os_fd >= 0:
            os.close(o.os_fd)
            o.os_fd = -1
        if o.seg is not None:  # a staging segment
            if keep_spare:
                self.segments.keep(o.pid, o.seg, o.buf, o.meta.nbytes)
            else:
                _shm.release(o.seg, o.buf)
        o.buf = None

    # -- process exit, the sweep, the status summary ------------------------------------

    def on_exit(self, pid: int) -> None:
        mine = [o for o in self.fds.values() if o.pid == pid]
        for o in mine:
            self.drop(o, keep_spare=False)  # uncommitted writes are discarded
        self.segments.end(pid)
        if self.channels is not None:
            self.channels.revoke(pid)
        for w in [w for w in self.after_scan if w[0].pid == pid]:
            self.after_scan.remove(w)
            w[0].fail(Errno.ECANCELED, f"process {pid} ended")
        if mine:
            log.info("pid %d ended: closed %d descriptor(s)", pid, len(mine))

    def on_welcome(self, live: list[int]) -> None:
        alive = set(live)
        for pid in [p for p in self.segments.handouts if p not in alive]:
            self.on_exit(pid)

    def status(self) -> dict[str, Any]:
        self.segments.sweep()  # the heartbeat's period is the sweep's
        if self.foreign:  # an earlier instance's recent segments, spared at start
            self.foreign = _shm.sweep_all(self.home_pfx, self.pfx, SHM_GRACE_S)[1]
        return {"open": len(self.fds), "cache": self.cache.summary(),
                "commits": self.store.commits,
                "checksum_errors": self.cache.checksum_errors,
                "segments_lent": self.segments.lent(),
                "scan": {**self.store.scan.summary(), "waiting": len(self.after_scan)}}

    def shutdown(self) -> None:
        self.store.close()
        for o in list(self.fds.values()):
            self.drop(o, keep_spare=False)
        self.segments.close()
        self.cache.clear()
        _shm.sweep_all(self.pfx)  # this instance's own segments, never another's
