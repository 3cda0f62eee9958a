"""The tensorfs syscalls on names: stat, listdir, mkdir, unlink, rename, chmod and
fsck, a part of the service (_driver.py's TensorFS inherits them), which holds the
state they use. Handlers check the path, permissions and the staged writes below
a directory, then call _commit's Store for every change on disk and _fsck for the
check. A directory's rename waits for the scan (_scan.py). It must never import
the kernel or userland.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from drivers import DriverLoop, Request
from syscalls import Errno, SyscallError

from . import _fsck
from ._cache import Cache, file_key
from ._commit import Store
from ._format import FormatError, TensorMeta
from ._paths import DirMeta, Namespace, file_meta, need, read_dir_meta

WRITE_MODES = ("w", "x", "rw")


class NamespaceCalls:
    """The namespace handlers of TensorFS, which provides these attributes:"""
    loop: DriverLoop
    ns: Namespace
    store: Store
    cache: Cache
    fds: dict[str, Any]                       # descriptor -> _driver.Open
    wait_for_scan: Callable[..., object]      # answer the call once the scan is done

    def writes_under(self, path: str) -> list[Any]:
        """The staged writes (open in w, x or rw) inside directory path."""
        return [o for o in self.fds.values()
                if o.mode in WRITE_MODES and o.path.startswith(path + "/")]

    def stat(self, req: Request, path: str) -> dict[str, Any]:
        member = self.ns.member_of(path)
        if member is not None:
            return self.ns.describe_member(path, member)
        kind, p = self.ns.lookup(self.ns.split(path), path)
        return self.ns.describe(path, kind, p)

    def listdir(self, req: Request, path: str) -> list[dict[str, Any]]:
        self.ns.not_a_member("listdir", path, "listed", " (it is a tensor)")
        kind, d = self.ns.lookup(self.ns.split(path), path)
        if kind != "dir":
            raise SyscallError(Errno.ENOTDIR, f"listdir: {path} is a tensor")
        dm = read_dir_meta(d)
        need(req.uid, dm.owner, dm.mode, 4, f"listdir {path}")
        return self.ns.entries(d, path)

    def mkdir(self, req: Request, path: str, perm: int) -> None:
        self.ns.not_a_member("mkdir", path, "made")
        parts = self.ns.split(path)
        d = self.ns.parent_dir(parts, path)
        if self.ns.taken(parts):
            raise SyscallError(Errno.EEXIST, f"mkdir: {path} exists")
        dm = read_dir_meta(d)
        need(req.uid, dm.owner, dm.mode, 2, f"mkdir {path}")
        self.store.make_dir(d, parts[-1], DirMeta(req.uid, perm, time.time()))

    def unlink(self, req: Request, path: str) -> None:
        self.ns.not_a_member("unlink", path, "removed", " (write the group again "
                             "without it)")
        parts = self.ns.split(path)
        if not parts:
            raise SyscallError(Errno.EINVAL, "unlink: not the root")
        kind, p = self.ns.lookup(parts, path)
        if kind == "tensor":
            try:
                meta: TensorMeta | None = file_meta(p)
            except FormatError:
                meta = None  # a damaged tensor can go all the same
            self.ns.may_remove(req.uid, p.parent, meta.owner if meta else 0, path)
            self.store.remove_tensor(p, meta)
            return
        self.ns.may_remove(req.uid, p.parent, read_dir_meta(p).owner, path)
        if any(not e.name.startswith(".") for e in os.scandir(p)):
            raise SyscallError(Errno.ENOTEMPTY, f"unlink: directory {path} is not empty")
        pending = self.writes_under(path)
        if pending:
            raise SyscallError(Errno.ENOTEMPTY, f"unlink: directory {path} has a write "
                               f"in progress: {pending[0].path}, by pid {pending[0].pid}")
        self.store.remove_dir(p)

    def rename(self, req: Request, src: str, dst: str) -> object:
        for path in (src, dst):
            self.ns.not_a_member("rename", path, "renamed or moved")
        sp, dp = self.ns.split(src), self.ns.split(dst)
        if not sp or not dp:
            raise SyscallError(Errno.EINVAL, "rename: not the root")
        kind, p = self.ns.lookup(sp, src)
        dd = self.ns.parent_dir(dp, dst)
        if kind == "dir" and dp[:len(sp)] == sp:
            raise SyscallError(Errno.EINVAL, f"rename: {dst} is inside {src}")
        if self.ns.taken(dp):
            raise SyscallError(Errno.EEXIST, f"rename: {dst} exists")
        meta = file_meta(p) if kind == "tensor" else None
        owner = meta.owner if meta else read_dir_meta(p).owner
        self.ns.may_remove(req.uid, p.parent, owner, src)
        ddm = read_dir_meta(dd)
        need(req.uid, ddm.owner, ddm.mode, 2, f"rename to {dst}")
        if meta is not None:
            self.store.move(p, self.ns.tensor_path(dp), meta)
            return None
        if not self.store.scan.done:  # the scan could not follow it (_scan.py)
            return self.wait_for_scan(req, self.rename, req.args)
        self.store.move(p, self.ns.dir_path(dp))
        for o in self.writes_under(src):  # a staged write is in its directory already
            o.path = dst + o.path[len(src):]
        return None

    def chmod(self, req: Request, path: str, perm: int) -> None:
        self.ns.not_a_member("chmod", path, "given a mode", " (chmod the group)")
        kind, p = self.ns.lookup(self.ns.split(path), path)
        if kind == "dir":
            dm = read_dir_meta(p)
            if req.uid not in (0, dm.owner):
                raise SyscallError(Errno.EPERM, f"chmod: {path} belongs to uid {dm.owner}")
            dm.mode = perm
            self.store.write_dir_meta(p, dm)
            return
        meta = file_meta(p)
        if req.uid not in (0, meta.owner):
            raise SyscallError(Errno.EPERM, f"chmod: {path} belongs to uid {meta.owner}")
        # the mode is in the header: rewrite the file, atomically, keeping the data
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            src = self.cache.load(fd, meta, file_key(fd), path)
        finally:
            os.close(fd)
        self.store.commit(path, TensorMeta(meta.dtype, meta.shape, meta.owner, perm,
                                           meta.ctime, meta.mtime, 0, members=meta.members,
                                           key=meta.key),
                          src.buf, exclusive=False, call="chmod")

    def fsck(self, req: Request, path: str, repair: bool) -> object:
        if req.uid != 0:
            raise SyscallError(Errno.EPERM, f"fsck: only uid 0 may check the store "
                               f"(uid {req.uid} asked)")
        self.ns.not_a_member("fsck", path, "checked", " (fsck its group)")
        kind, p = self.ns.lookup(self.ns.split(path), path)
        if repair and self.ns.tensor_path([_fsck.LOST_FOUND]).exists():
            raise SyscallError(Errno.EEXIST, f"fsck: /{_fsck.LOST_FOUND} is a tensor: "
                               "move it away, and repair can move damaged files there")

        def done(found: tuple[int, list[_fsck.Damaged]]) -> None:
            checked, damaged = found
            moved = _fsck.repair(self.store, damaged) if repair else []
            req.reply({"checked": checked, "moved": moved,
                       "damaged": [{"path": d.path, "why": d.why} for d in damaged]})

        return self.loop.background(
            lambda: _fsck.check(self.ns.root, p, path, kind == "dir"), done, req)
