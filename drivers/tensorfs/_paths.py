"""Paths and what they name: the rules for a path, where its directory or tensor is
on disk, directory metadata, stat records, permission checks, and PATH[name], the
member `name` of the group at PATH.

/a/b is the directory tensors/a/b (owner and mode in the .llmos-dir inside it) or
the tensor file tensors/a/b.safetensors (_format.py). Everything here only reads:
it must never change anything on disk (_commit.py does), and never import the
kernel or userland.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from syscalls import Errno, SyscallError

from . import _format
from ._format import SUFFIX, FormatError, TensorMeta

DIR_META = ".llmos-dir"
TMP_PREFIX = ".llmos-tmp-"
MAX_NAME = 200          # bytes of one path component (the file adds ".safetensors")
MAX_DEPTH = 64
PATH_MAX = 4096         # Linux's, counting the NUL: a file path on disk must be shorter
ROOT_MODE = 0o1777      # like /tmp: anyone may create; only owners remove (sticky)


@dataclass
class DirMeta:
    owner: int
    mode: int
    ctime: float


class MemberPath(NamedTuple):
    """PATH[name] where PATH is a group: the group's path and parts, the member's name."""
    group: str
    parts: list[str]
    name: str


def allowed(uid: int, owner: int, mode: int, want: int) -> bool:
    """want: 4 read, 2 write; uid 0 may do anything; no groups."""
    if uid == 0:
        return True
    bits = (mode >> 6) & 7 if uid == owner else mode & 7
    return bits & want == want


def need(uid: int, owner: int, mode: int, want: int, what: str) -> None:
    if not allowed(uid, owner, mode, want):
        raise SyscallError(Errno.EACCES, f"{what}: uid {uid} may not "
                           f"{'read' if want == 4 else 'write'} (owner {owner}, "
                           f"mode {mode:o})")


def refused(call: str, path: str, m: MemberPath, verb: str, hint: str = "") -> SyscallError:
    """EINVAL for a call that would act on member m on its own (it is its group's)."""
    return SyscallError(Errno.EINVAL, f"{call}: {path} is member {m.name!r} of the group "
                        f"{m.group}: a member cannot be {verb} on its own{hint}")


def file_meta(p: Path) -> TensorMeta:
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return _format.read_meta(fd)
    finally:
        os.close(fd)


def read_dir_meta(d: Path) -> DirMeta:
    try:
        m = json.loads((d / DIR_META).read_text())
        return DirMeta(int(m["owner"]), int(m["mode"]), float(m["ctime"]))
    except (OSError, ValueError, KeyError):
        return DirMeta(0, 0o755, 0.0)


class Namespace:
    """The tree under root, read: paths checked and looked up, records described."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_bytes = len(str(root).encode())

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
        on_disk = self.root_bytes + len(path.encode()) + len(SUFFIX)
        if on_disk >= PATH_MAX:
            raise SyscallError(Errno.ENAMETOOLONG, f"{path[:60]!r}...: its file on disk "
                               f"would be {on_disk} bytes, over PATH_MAX ({PATH_MAX})")
        return parts

    def dir_path(self, parts: list[str]) -> Path:
        return self.root.joinpath(*parts)

    def tensor_path(self, parts: list[str]) -> Path:
        return self.root.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    def taken(self, parts: list[str]) -> bool:
        """A directory or a tensor is at parts."""
        return self.dir_path(parts).exists() or self.tensor_path(parts).exists()

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

    def lookup(self, parts: list[str], path: str) -> tuple[str, Path]:
        """("dir" or "tensor", its place on disk); ENOENT / ENOTDIR."""
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

    def may_remove(self, uid: int, d: Path, owner: int, path: str) -> None:
        """Write permission on the directory; with its sticky bit, also ownership."""
        dm = read_dir_meta(d)
        need(uid, dm.owner, dm.mode, 2, f"{path} (its directory)")
        if dm.mode & 0o1000 and uid not in (0, owner, dm.owner):
            raise SyscallError(Errno.EACCES, f"{path}: the directory is sticky and "
                               f"uid {uid} owns neither it nor the entry")

    # -- PATH[name]: a group's member ---------------------------------------------------

    def member_of(self, path: str) -> MemberPath | None:
        """The member path[i+1:-1] of the group path[:i], for the first '[' at i where
        path[:i] is a group; None where there is none (then path is an ordinary name,
        brackets and all). A member's name may hold '/' and brackets."""
        if not path.endswith("]"):
            return None
        at = path.find("[")
        while 0 < at < len(path) - 2:  # a name of one character at least
            group = path[:at]
            try:
                parts = self.split(group)
            except SyscallError:
                parts = []
            if parts and self.is_group(self.tensor_path(parts)):
                return MemberPath(group, parts, path[at + 1:-1])
            at = path.find("[", at + 1)
        return None

    @staticmethod
    def is_group(p: Path) -> bool:
        try:
            return p.is_file() and file_meta(p).members is not None
        except (OSError, FormatError):
            return False

    def not_a_member(self, call: str, path: str, verb: str, hint: str = "") -> None:
        """EINVAL when path names a group's member, for the calls that act on a
        whole entry: a member cannot be <verb> on its own."""
        m = self.member_of(path)
        if m is not None:
            raise refused(call, path, m, verb, hint)

    # -- stat records ------------------------------------------------------------------

    def describe(self, path: str, kind: str, p: Path) -> dict[str, Any]:
        if kind == "dir":
            m = read_dir_meta(p)
            return {"path": path, "type": "dir", "owner": m.owner, "mode": m.mode,
                    "ctime": m.ctime, "mtime": p.stat().st_mtime}
        t = self.tensor_meta(p, path)
        out = {"path": path, "type": "tensor", "owner": t.owner, "mode": t.mode,
               "ctime": t.ctime, "mtime": t.mtime, "dtype": t.dtype, "shape": t.shape,
               "size": t.nbytes, "checksum": f"crc32:{t.crc32:08x}", "key": t.key}
        if t.members is not None:
            del out["dtype"], out["shape"]
            out["type"] = "group"
            out["members"] = [{"name": m.name, "dtype": m.dtype, "shape": m.shape,
                               "size": m.nbytes} for m in t.members]
        return out

    def describe_member(self, path: str, m: MemberPath) -> dict[str, Any]:
        """A member's record: its dtype, shape and size; the group's owner, mode,
        times, checksum and key (it has none of its own)."""
        g = self.tensor_meta(self.tensor_path(m.parts), m.group)
        member = g.member(m.name)
        if member is None:
            raise SyscallError(Errno.ENOENT, f"stat: the group {m.group} has no member "
                               f"{m.name!r}")
        return {"path": path, "type": "member", "group": m.group, "name": m.name,
                "owner": g.owner, "mode": g.mode, "ctime": g.ctime, "mtime": g.mtime,
                "dtype": member.dtype, "shape": member.shape, "size": member.nbytes,
                "checksum": f"crc32:{g.crc32:08x}", "key": g.key}

    @staticmethod
    def tensor_meta(p: Path, path: str) -> TensorMeta:
        try:
            return file_meta(p)
        except FormatError as e:
            raise SyscallError(Errno.EIO, f"{path}: {e}") from None

    def entries(self, d: Path, path: str) -> list[dict[str, Any]]:
        """The stat records of directory d's entries (path is its llmos path), with
        name, sorted; a group's count its members instead of listing them."""
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

