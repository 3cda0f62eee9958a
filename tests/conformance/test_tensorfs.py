"""The tensorfs syscalls against a reference filesystem with owners, modes and quotas.

Four in-process handles (uids 1000, 1001, 1002 with a 256 KiB tensor quota, and 0)
open, read, write, close, stat, list, make, remove, rename and chmod in a small
namespace under /t (owned by root, mode 1777, as / is). The model is written from
drivers/tensorfs and docs/tensorfs.md, check by check in the driver's order, so
every answer, errno included, is predicted: EINVAL, ENOENT, ENOTDIR, EISDIR,
EEXIST, EACCES, EPERM, EFBIG, EDQUOT, EBADF, ENOTEMPTY. Staged writes are invisible
until close, but belong to their directory from the open on: it cannot be removed
(ENOTEMPTY), and a rename of it moves them along; a reader keeps what it opened;
close commits against the namespace as it is then (a mode x tensor may exist by
then: EEXIST; a directory gone behind tensorfs's back, on disk: ENOENT, ENOTDIR,
test_a_commit_whose_directory_went_behind_tensorfs_back). After every step,
root's view (listdir, stat, the data of every tensor) must be the model's.

(tests/test_tensorfs_stateful.py's machine checks one uid's data paths; this one
is about who may do what, and which errno says no.)
"""
from __future__ import annotations

import posixpath
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import userland
from conftest import Booted, examples
from syscalls import Errno

from ._util import FAST, LONG, TENSOR_MAX, TENSOR_QUOTA, Draws, expect, outcome, walk

BASE = "/t"
PATHS = ["/t/a", "/t/b", "/t/d", "/t/a/x", "/t/d/a", "/t/d/e", "/t/d/e/a"]
UIDS = (1000, 1001, 1002, 0)
SHAPES = [[2], [2, 3], [20_000], [40_000]]   # int32: 8 B, 24 B, 80 000 B, 160 000 B
PERMS = [0o644, 0o600, 0o666, 0o640]
DIR_PERMS = [0o755, 0o700, 0o777, 0o1777, 0o555]
BAD_PATHS = ["", "t/a", "/t//a", "/t/./a", "/t/../a", "/t/.hidden", "/t/a\\b",
             "/t/" + "n" * 201, "/t" + "/x" * 64]
MAX_FDS = 2


@dataclass
class Node:
    kind: str                      # dir | tensor
    owner: int
    mode: int
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.nbytes


@dataclass
class Fd:
    fd: str
    path: str
    mode: str                      # r | w | x | rw
    owner: int                     # of the tensor it commits (its meta's)
    perm: int
    data: np.ndarray               # r: what it opened; else: the staged tensor


@dataclass
class Slot:
    uid: int
    osh: userland.Llmos
    fds: list[Fd] = field(default_factory=list)


def allowed(uid: int, owner: int, mode: int, want: int) -> bool:
    if uid == 0:
        return True
    bits = (mode >> 6) & 7 if uid == owner else mode & 7
    return bits & want == want


class TensorfsMachine(RuleBasedStateMachine):
    system: Booted
    root: userland.Llmos

    def __init__(self) -> None:
        super().__init__()
        _remove(self.root, BASE)
        self.root.mkdir(BASE, 0o1777)
        # "/" stands for the rest of tensorfs, which the machine leaves alone
        self.nodes: dict[str, Node] = {"/": Node("dir", 0, 0o1777),
                                       BASE: Node("dir", 0, 0o1777)}
        self.slots = [Slot(uid, self.system.connect(uid=uid)) for uid in UIDS]

    def teardown(self) -> None:
        for s in self.slots:
            s.osh.close()      # its descriptors close, its staged writes are dropped
        _remove(self.root, BASE)

    # -- the model's checks, in the driver's order -------------------------------------

    def parent_error(self, path: str) -> str | None:
        parent = self.nodes.get(posixpath.dirname(path))
        if parent is None:
            return "ENOENT"
        return "ENOTDIR" if parent.kind == "tensor" else None

    def lookup_error(self, path: str) -> str | None:
        return self.parent_error(path) or (None if path in self.nodes else "ENOENT")

    def usage(self, owner: int) -> int:
        return sum(n.nbytes for n in self.nodes.values() if n.owner == owner)

    def staged(self, owner: int) -> int:
        return sum(f.data.nbytes for s in self.slots for f in s.fds
                   if f.mode != "r" and f.owner == owner)

    def may_remove(self, uid: int, path: str, owner: int) -> bool:
        d = self.nodes[posixpath.dirname(path)]
        if not allowed(uid, d.owner, d.mode, 2):
            return False
        return not (d.mode & 0o1000 and uid not in (0, owner, d.owner))

    def open_error(self, uid: int, path: str, mode: str, size: int,
                   perm: int) -> tuple[str | None, int, int]:
        """(errno or None, owner, mode bits) of open_tensor."""
        err = self.parent_error(path)
        if err:
            return err, 0, 0
        node = self.nodes.get(path)
        if node is not None and node.kind == "dir":
            return "EISDIR", 0, 0
        exists = node is not None
        if mode == "x" and exists:
            return "EEXIST", 0, 0
        if mode in ("r", "rw") and not exists:
            return "ENOENT", 0, 0
        if mode == "r":
            return (None if allowed(uid, node.owner, node.mode, 4) else "EACCES"), \
                node.owner, node.mode
        if mode == "rw":
            ok = allowed(uid, node.owner, node.mode, 6)
        elif exists:
            ok = allowed(uid, node.owner, node.mode, 2)
        else:
            d = self.nodes[posixpath.dirname(path)]
            ok = allowed(uid, d.owner, d.mode, 2)
        if not ok:
            return "EACCES", 0, 0
        owner, bits = (node.owner, node.mode) if exists else (uid, perm)
        if size > TENSOR_MAX:
            return "EFBIG", 0, 0
        quota = TENSOR_QUOTA.get(owner)
        used = self.usage(owner) - (node.nbytes if exists else 0) + self.staged(owner)
        if quota is not None and used + size > quota:
            return "EDQUOT", 0, 0
        return None, owner, bits

    # -- rules: descriptors ---------------------------------------------------------------

    @rule(i=st.integers(0, 3), path=st.sampled_from(PATHS), mode=st.sampled_from("wx"),
          shape=st.sampled_from(SHAPES), v=st.integers(0, 9), perm=st.sampled_from(PERMS))
    def open_for_writing(self, i, path, mode, shape, v, perm) -> None:
        slot = self.slots[i]
        if len(slot.fds) >= MAX_FDS:
            return
        data = np.full(shape, v, np.int32)
        err, owner, bits = self.open_error(slot.uid, path, mode, data.nbytes, perm)
        got = outcome(slot.osh.open_tensor, path, mode, "int32", shape, perm)
        if err:
            assert got == ("e", err), (path, mode, got, err)
            return
        assert got[0] == "r", got
        assert (got[1]["dtype"], got[1]["shape"], got[1]["size"]) == \
            ("int32", shape, data.nbytes)
        f = Fd(got[1]["fd"], path, mode, owner, bits, np.zeros(shape, np.int32))
        slot.fds.append(f)
        assert slot.osh.write_tensor(f.fd, data.tobytes()) == data.nbytes
        f.data = data

    @rule(i=st.integers(0, 3), path=st.sampled_from(PATHS), mode=st.sampled_from(["r", "rw"]))
    def open_existing(self, i, path, mode) -> None:
        slot = self.slots[i]
        if len(slot.fds) >= MAX_FDS:
            return
        node = self.nodes.get(path)
        size = node.nbytes if node is not None and node.kind == "tensor" else 0
        err, owner, bits = self.open_error(slot.uid, path, mode, size, 0)
        got = outcome(slot.osh.open_tensor, path, mode)
        if err:
            assert got == ("e", err), (path, mode, got, err)
            return
        assert got[0] == "r" and got[1]["shape"] == list(node.data.shape), got
        slot.fds.append(Fd(got[1]["fd"], path, mode, owner, bits, node.data.copy()))

    @rule(i=st.integers(0, 3), data=st.data(), region=st.sampled_from(["all", "first", "bad"]))
    def read(self, i, data, region) -> None:
        slot = self.slots[i]
        if not slot.fds:
            return
        f = data.draw(st.sampled_from(slot.fds))
        n = f.data.shape[0]
        slc = {"all": None, "first": [[0, 1]], "bad": [[1, 0]]}[region]
        got = outcome(slot.osh.read_tensor, f.fd, slc)
        if f.mode in ("w", "x"):
            assert got == ("e", "EBADF"), got
            return
        if region == "bad":
            assert got == ("e", "EINVAL"), got
            return
        want = f.data[:1] if region == "first" else f.data
        assert got[0] == "r" and got[1]["shape"] == list(want.shape), got
        np.testing.assert_array_equal(np.frombuffer(got[1]["data"], np.int32).reshape(
            want.shape), want)
        assert n >= 1

    @rule(i=st.integers(0, 3), data=st.data(), v=st.integers(0, 9),
          region=st.sampled_from(["all", "first", "wrong size", "bad slice"]))
    def write(self, i, data, v, region) -> None:
        slot = self.slots[i]
        if not slot.fds:
            return
        f = data.draw(st.sampled_from(slot.fds))
        part = f.data[:1] if region == "first" else f.data
        payload = np.full(part.shape, v, np.int32).tobytes()
        slc = {"all": None, "first": [[0, 1]], "wrong size": None,
               "bad slice": [[0, f.data.shape[0] + 1]]}[region]
        if region == "wrong size":
            payload += b"\0\0\0\0"
        got = outcome(slot.osh.write_tensor, f.fd, payload, slc)
        if f.mode == "r":
            assert got == ("e", "EBADF"), got
        elif region in ("wrong size", "bad slice"):
            assert got == ("e", "EINVAL"), got
        else:
            assert got == ("r", len(payload)), got
            part[...] = v

    @rule(i=st.integers(0, 3), data=st.data(), discard=st.booleans())
    def close(self, i, data, discard) -> None:
        slot = self.slots[i]
        if not slot.fds:
            return
        f = data.draw(st.sampled_from(slot.fds))
        slot.fds.remove(f)            # closed whatever the commit says
        got = outcome(slot.osh.close_tensor, f.fd, discard)
        if f.mode == "r" or discard:
            assert got == ("r", None), got
            return
        err = self.parent_error(f.path)
        node = self.nodes.get(f.path)
        if err is None and f.mode == "x" and node is not None and node.kind == "tensor":
            err = "EEXIST"
        if err:
            assert got == ("e", err), (f, got)
            return
        assert got[0] == "r" and got[1]["size"] == f.data.nbytes, got
        assert node is None or node.kind == "tensor", "bug: a tensor and a directory " \
            "of one name (the machine avoids it: test_targeted.py)"
        self.nodes[f.path] = Node("tensor", f.owner, f.perm, f.data)

    @rule(i=st.integers(0, 3), j=st.integers(0, 3), data=st.data(),
          call=st.sampled_from(["read_tensor", "write_tensor", "close_tensor"]))
    def another_process_fd(self, i, j, data, call) -> None:
        """A descriptor is its process's only: another's, or a made-up one, is EBADF."""
        other = self.slots[j]
        fd = data.draw(st.sampled_from([f.fd for f in other.fds])) \
            if other.fds and i != j else "0" * 24
        args = {"fd": fd, "data": b""} if call == "write_tensor" else {"fd": fd}
        assert outcome(self.slots[i].osh.call, call, **args) == ("e", "EBADF")

    @rule(i=st.integers(0, 3), path=st.sampled_from(PATHS))
    def too_big(self, i, path) -> None:
        slot = self.slots[i]
        err, _, _ = self.open_error(slot.uid, path, "w", TENSOR_MAX + 4, 0o644)
        got = outcome(slot.osh.open_tensor, path, "w", "float32", [TENSOR_MAX // 4 + 1])
        assert got == ("e", err or "EFBIG"), (got, err)
        assert err in (None, "EFBIG", "ENOENT", "ENOTDIR", "EISDIR", "EACCES"), err

    # -- rules: the namespace ------------------------------------------------------------

    @rule(i=st.integers(0, 3), path=st.sampled_from(PATHS))
    def stat(self, i, path) -> None:
        got = outcome(self.slots[i].osh.stat, path)
        err = self.lookup_error(path)
        if err:
            assert got == ("e", err), got
            return
        n = self.nodes[path]
        assert got[0] == "r" and (got[1]["type"], got[1]["owner"], got[1]["mode"]) == \
            (n.kind, n.owner, n.mode), (got, n)

    @rule(i=st.integers(0, 3), path=st.sampled_from([BASE, *PATHS]))
    def listdir(self, i, path) -> None:
        slot = self.slots[i]
        got = outcome(slot.osh.listdir, path)
        err = self.lookup_error(path)
        n = self.nodes.get(path)
        if err is None and n.kind == "tensor":
            err = "ENOTDIR"
        if err is None and not allowed(slot.uid, n.owner, n.mode, 4):
            err = "EACCES"
        if err:
            assert got == ("e", err), got
            return
        assert got[0] == "r" and [e["name"] for e in got[1]] == self.children(path), got

    def children(self, path: str) -> list[str]:
        return sorted(posixpath.basename(p) for p in self.nodes
                      if posixpath.dirname(p) == path and p != path)

    @rule(i=st.integers(0, 3), path=st.sampled_from(PATHS), perm=st.sampled_from(DIR_PERMS))
    def mkdir(self, i, path, perm) -> None:
        slot = self.slots[i]
        if self._staged_at(path):
            return     # a staged write there would commit beside it (test_targeted.py)
        err = self.parent_error(path)
        if err is None and path in self.nodes:
            err = "EEXIST"
        if err is None:
            d = self.nodes[posixpath.dirname(path)]
            if not allowed(slot.uid, d.owner, d.mode, 2):
                err = "EACCES"
        got = outcome(slot.osh.mkdir, path, perm)
        if err:
            assert got == ("e", err), got
        else:
            assert got == ("r", None), got
            self.nodes[path] = Node("dir", slot.uid, perm)

    def _staged_at(self, path: str) -> bool:
        return path in self._staged_paths() or self._staged_under(path)

    def _staged_under(self, path: str) -> bool:
        return any(p.startswith(path + "/") for p in self._staged_paths())

    def _staged_paths(self) -> list[str]:
        return [f.path for s in self.slots for f in s.fds if f.mode != "r"]

    @rule(i=st.integers(0, 3), path=st.sampled_from(PATHS))
    def unlink(self, i, path) -> None:
        slot = self.slots[i]
        err = self.lookup_error(path)
        n = self.nodes.get(path)
        if err is None and not self.may_remove(slot.uid, path, n.owner):
            err = "EACCES"
        if err is None and n.kind == "dir" and (self.children(path) or
                                                self._staged_under(path)):
            err = "ENOTEMPTY"     # entries, or a write in progress below it
        got = outcome(slot.osh.unlink, path)
        if err:
            assert got == ("e", err), got
        else:
            assert got == ("r", None), got
            del self.nodes[path]

    @rule(i=st.integers(0, 3), src=st.sampled_from(PATHS), dst=st.sampled_from(PATHS))
    def rename(self, i, src, dst) -> None:
        slot = self.slots[i]
        if self._staged_at(dst):
            return     # as for mkdir
        err = self.lookup_error(src) or self.parent_error(dst)
        n = self.nodes.get(src)
        if err is None and n.kind == "dir" and (dst == src or dst.startswith(src + "/")):
            err = "EINVAL"
        if err is None and dst in self.nodes:
            err = "EEXIST"
        if err is None and not self.may_remove(slot.uid, src, n.owner):
            err = "EACCES"
        if err is None:
            d = self.nodes[posixpath.dirname(dst)]
            if not allowed(slot.uid, d.owner, d.mode, 2):
                err = "EACCES"
        got = outcome(slot.osh.rename, src, dst)
        if err:
            assert got == ("e", err), (src, dst, got, err)
            return
        assert got == ("r", None), got
        for p in sorted(self.nodes):
            if p == src or p.startswith(src + "/"):
                self.nodes[dst + p[len(src):]] = self.nodes.pop(p)
        for f in (f for s in self.slots for f in s.fds if f.mode != "r"):
            if f.path.startswith(src + "/"):      # a staged write moves with its directory
                f.path = dst + f.path[len(src):]

    @rule(i=st.integers(0, 3), path=st.sampled_from([BASE, *PATHS]), perm=st.sampled_from(PERMS + DIR_PERMS))
    def chmod(self, i, path, perm) -> None:
        slot = self.slots[i]
        err = self.lookup_error(path) if path != BASE else None
        n = self.nodes.get(path)
        if err is None and slot.uid not in (0, n.owner):
            err = "EPERM"
        if path == BASE and slot.uid == 0:
            perm = 0o1777            # keep the machine's root as it is
        got = outcome(slot.osh.chmod, path, perm)
        if err:
            assert got == ("e", err), got
        else:
            assert got == ("r", None), got
            n.mode = perm

    @rule(i=st.integers(0, 3), path=st.sampled_from(BAD_PATHS),
          call=st.sampled_from(["stat", "listdir", "mkdir", "unlink", "chmod", "open_tensor",
                                "rename"]))
    def bad_path(self, i, path, call) -> None:
        args = {"open_tensor": {"mode": "r"}, "chmod": {"perm": 0o600},
                "rename": {"dst": "/t/a"}}.get(call, {})
        if call == "rename":
            args, path = {"src": "/t/a", "dst": path}, None
        if path is not None:
            args["path"] = path
        assert outcome(self.slots[i].osh.call, call, **args) == ("e", "EINVAL")

    @rule(i=st.integers(0, 3), call=st.sampled_from(["mkdir", "unlink", "open_tensor"]))
    def the_root(self, i, call) -> None:
        args = {"mode": "w", "dtype": "int8", "shape": [1]} if call == "open_tensor" else {}
        assert outcome(self.slots[i].osh.call, call, path="/", **args) == ("e", "EINVAL")

    @rule(i=st.integers(0, 3), path=st.sampled_from(PATHS),
          bad=st.sampled_from(["r with dtype", "w without shape"]))
    def open_bad_arguments(self, i, path, bad) -> None:
        slot = self.slots[i]
        mode, extra = ("r", {"dtype": "int32"}) if bad == "r with dtype" else ("w", {"dtype": "int32"})
        got = outcome(slot.osh.call, "open_tensor", path=path, mode=mode, **extra)
        err = self.parent_error(path)
        n = self.nodes.get(path)
        if err is None and n is not None and n.kind == "dir":
            err = "EISDIR"
        if err is None and mode == "r" and n is None:
            err = "ENOENT"
        if err is None and mode == "w":   # checked after the dtype/shape rule of r
            err = "EACCES" if (n is not None and not allowed(slot.uid, n.owner, n.mode, 2)) \
                else "EINVAL"
        assert got == ("e", err or "EINVAL"), (got, err)

    # -- after every step ----------------------------------------------------------------

    @invariant()
    def root_sees_the_model(self) -> None:
        root = self.root
        for path, n in sorted(self.nodes.items()):
            if path == "/":
                continue
            if n.kind == "dir":
                entries = {e["name"]: e for e in root.listdir(path)}
                assert sorted(entries) == self.children(path), (path, sorted(entries))
                for name, e in entries.items():
                    c = self.nodes[f"{path}/{name}"]
                    assert (e["type"], e["owner"], e["mode"]) == (c.kind, c.owner, c.mode), \
                        (path, e, c)
            else:
                np.testing.assert_array_equal(np.asarray(root.load_tensor(path)), n.data)


def test_tensorfs_walk(system: Booted, root: userland.Llmos) -> None:
    """Every errno of the tensorfs syscalls the model predicts, in one walk (slots:
    0 is uid 1000, 1 uid 1001, 2 uid 1002 with a quota, 3 root)."""
    TensorfsMachine.system, TensorfsMachine.root = system, root
    m = TensorfsMachine()

    def fd(slot: int, k: int = -1):
        return lambda out: Draws(m.slots[slot].fds[k])

    def token(slot: int):
        return lambda out: Draws(m.slots[slot].fds[-1].fd)

    def write(i: int, path: str, mode: str = "w", shape: list[int] = [2],
              perm: int = 0o644) -> tuple[str, dict]:
        return "open_for_writing", {"i": i, "path": path, "mode": mode, "shape": shape,
                                    "v": 1, "perm": perm}

    def close(i: int) -> tuple[str, dict]:
        return "close", {"i": i, "data": fd(i, 0), "discard": False}

    def opened(i: int, path: str, mode: str = "r") -> tuple[str, dict]:
        return "open_existing", {"i": i, "path": path, "mode": mode}

    walk(m, [
        *[("bad_path", {"i": 0, "path": "t/a", "call": c}) for c in
          ("stat", "listdir", "mkdir", "unlink", "chmod", "open_tensor", "rename")],
        *[("the_root", {"i": 0, "call": c}) for c in ("mkdir", "unlink", "open_tensor")],
        ("open_bad_arguments", {"i": 0, "path": "/t/a", "bad": "w without shape"}),
        ("stat", {"i": 0, "path": "/t/a"}),                          # ENOENT ...
        ("listdir", {"i": 0, "path": "/t/a"}),
        ("unlink", {"i": 0, "path": "/t/a"}),
        ("chmod", {"i": 0, "path": "/t/a", "perm": 0o600}),
        ("rename", {"i": 0, "src": "/t/a", "dst": "/t/b"}),
        opened(0, "/t/a"),
        ("mkdir", {"i": 0, "path": "/t/d/e", "perm": 0o755}),
        # quota: 1002's 256 KiB, staged writes included
        ("mkdir", {"i": 2, "path": "/t/d", "perm": 0o777}),
        write(2, "/t/d/a", shape=[40_000]),
        close(2),
        write(2, "/t/d/e", shape=[40_000]),                          # EDQUOT
        ("too_big", {"i": 0, "path": "/t/d/e"}),                     # EFBIG
        ("mkdir", {"i": 2, "path": "/t/d", "perm": 0o755}),          # EEXIST
        ("unlink", {"i": 0, "path": "/t/d"}),                        # EACCES: sticky /t
        ("unlink", {"i": 2, "path": "/t/d"}),                        # ENOTEMPTY
        ("rename", {"i": 2, "src": "/t/d", "dst": "/t/d/e"}),        # EINVAL: into itself
        ("chmod", {"i": 2, "path": "/t/d", "perm": 0o755}),
        ("mkdir", {"i": 0, "path": "/t/d/e", "perm": 0o755}),        # EACCES
        ("listdir", {"i": 0, "path": "/t/d"}),
        ("chmod", {"i": 2, "path": "/t/d", "perm": 0o700}),
        ("listdir", {"i": 0, "path": "/t/d"}),                       # EACCES
        ("chmod", {"i": 0, "path": "/t/d", "perm": 0o777}),          # EPERM
        # a private tensor, and what others may not do with it
        write(0, "/t/a", perm=0o600),
        close(0),
        write(0, "/t/a", mode="x"),                                  # EEXIST
        write(0, "/t/d", mode="w"),                                  # EISDIR
        opened(1, "/t/a"),                                           # EACCES
        ("rename", {"i": 1, "src": "/t/a", "dst": "/t/b"}),          # EACCES
        ("rename", {"i": 0, "src": "/t/a", "dst": "/t/d"}),          # EEXIST
        # a tensor in the way
        write(0, "/t/a/x"),                                          # ENOTDIR ...
        ("stat", {"i": 0, "path": "/t/a/x"}),
        ("listdir", {"i": 0, "path": "/t/a"}),
        ("mkdir", {"i": 0, "path": "/t/a/x", "perm": 0o755}),
        ("unlink", {"i": 0, "path": "/t/a/x"}),
        ("rename", {"i": 0, "src": "/t/a/x", "dst": "/t/b"}),
        ("chmod", {"i": 0, "path": "/t/a/x", "perm": 0o600}),
        # descriptors: direction, size, ownership
        opened(0, "/t/a"),
        ("write", {"i": 0, "data": fd(0), "v": 2, "region": "all"}),         # EBADF: r
        ("read", {"i": 0, "data": fd(0), "region": "bad"}),                  # EINVAL
        ("another_process_fd", {"i": 1, "j": 0, "data": token(0), "call": "read_tensor"}),
        ("another_process_fd", {"i": 1, "j": 0, "data": token(0), "call": "write_tensor"}),
        ("another_process_fd", {"i": 1, "j": 0, "data": token(0), "call": "close_tensor"}),
        ("close", {"i": 0, "data": fd(0), "discard": False}),
        write(0, "/t/b"),
        ("read", {"i": 0, "data": fd(0), "region": "all"}),                  # EBADF: w
        ("write", {"i": 0, "data": fd(0), "v": 2, "region": "wrong size"}),  # EINVAL
        ("write", {"i": 0, "data": fd(0), "v": 2, "region": "bad slice"}),   # EINVAL
        # commits against the namespace as it is at close
        ("close", {"i": 0, "data": fd(0), "discard": True}),
        write(3, "/t/b", mode="x"),
        write(0, "/t/b", mode="x"),
        close(3),
        close(0),                                                    # EEXIST
        ("mkdir", {"i": 0, "path": "/t/d/e", "perm": 0o755}),        # /t/d is 1002's 777
        ("chmod", {"i": 2, "path": "/t/d", "perm": 0o777}),
        ("mkdir", {"i": 0, "path": "/t/d/e", "perm": 0o755}),
        write(0, "/t/d/e/a"),
        ("unlink", {"i": 0, "path": "/t/d/e"}),                      # ENOTEMPTY: a write
        ("unlink", {"i": 3, "path": "/t/b"}),
        ("rename", {"i": 0, "src": "/t/d/e", "dst": "/t/b"}),        # the write moves
        close(0),                                                    # to /t/b/a
    ], ("root_sees_the_model",))


def test_a_commit_whose_directory_went_behind_tensorfs_back(system: Booted) -> None:
    """tensorfs's own calls cannot take a staged write's directory away (unlink is
    ENOTEMPTY, rename moves the write along), so a commit finds it gone only when
    it was removed on disk, under $LLMOS_HOME/tensors: then close_tensor is ENOENT,
    or ENOTDIR where a tensor has taken the directory's name; either way the
    write is discarded and the descriptor closed."""
    with system.connect(uid=1000) as osh:
        d = f"/gone{osh.pid}"
        osh.mkdir(d)
        on_disk = system.root / "tensors" / d[1:] / "sub"
        for errno in (Errno.ENOENT, Errno.ENOTDIR):
            osh.mkdir(f"{d}/sub")
            fd = osh.open_tensor(f"{d}/sub/y", "w", "int8", [1])["fd"]
            shutil.rmtree(on_disk)
            if errno == Errno.ENOTDIR:
                osh.save_tensor(f"{d}/sub", np.zeros(1, np.int8))
            expect(errno, osh.close_tensor, fd)
            expect(Errno.EBADF, osh.close_tensor, fd)
        osh.unlink(f"{d}/sub")
        assert osh.listdir(d) == []
        osh.unlink(d)


def _remove(osh: userland.Llmos, path: str) -> None:
    try:
        st_ = osh.stat(path)
    except userland.SyscallError as e:
        assert e.errno == Errno.ENOENT, e
        return
    if st_["type"] == "dir":
        for e in osh.listdir(path):
            _remove(osh, e["path"])
    osh.unlink(path)


def _run(system: Booted, root: userland.Llmos, cfg) -> None:
    TensorfsMachine.system, TensorfsMachine.root = system, root
    run_state_machine_as_test(TensorfsMachine, settings=cfg)


@pytest.mark.timeout(300)
def test_tensorfs_machine(system: Booted, root: userland.Llmos) -> None:
    _run(system, root, settings(FAST, max_examples=examples(25), stateful_step_count=20))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tensorfs_machine_long(system: Booted, root: userland.Llmos) -> None:
    _run(system, root, LONG)


def test_fsck_is_uid_0s_and_checks_its_path(system: Booted, root: userland.Llmos) -> None:
    """fsck's errors: EPERM for anyone but uid 0, the path's as stat's (a member:
    EINVAL), and EEXIST for a repair where a tensor holds /lost+found's name; a
    store of sound tensors checks clean."""
    with system.connect(uid=1000) as osh:
        expect(Errno.EPERM, osh.fsck)
        d = f"/fsck{osh.pid}"
        osh.mkdir(d)
        osh.save_tensor(f"{d}/t", np.ones(3, np.int8))
        osh.save_tensors(f"{d}/g", {"a": np.zeros(2, np.int64), "b": np.ones(1, np.int8)})
    assert root.fsck(d) == {"checked": 2, "damaged": [], "moved": []}
    expect(Errno.EINVAL, root.fsck, f"{d}/g[a]")
    expect(Errno.ENOENT, root.fsck, f"{d}/missing")
    expect(Errno.ENOTDIR, root.fsck, f"{d}/t/x")
    long = "".join("/" + "a" * 200 for _ in range(20))
    expect(Errno.ENAMETOOLONG, root.fsck, long + "/" + "b" * (4095 - len(long)))
    root.save_tensor("/lost+found", np.zeros(1, np.int8))
    try:
        expect(Errno.EEXIST, root.fsck, d, repair=True)
    finally:
        root.unlink("/lost+found")
    _remove(root, d)


def test_a_full_disk_is_enospc() -> None:
    """A commit (close_tensor), or a chmod's rewrite of a tensor, that the file
    system has no room for: ENOSPC (tests/test_tensorfs_faults.py: what is left)."""
    from test_tensorfs_faults import free_bytes, tmpfs_home
    with tmpfs_home("4m", {"drivers": ["tensorfs"]}) as k, k.connect(uid=0) as osh:
        osh.save_tensor("/a", np.zeros(1 << 20, np.uint8))
        expect(Errno.ENOSPC, osh.save_tensor, "/b", np.zeros(free_bytes(k) + 4096, np.uint8))
        osh.save_tensor("/fill", np.zeros(free_bytes(k) - (512 << 10), np.uint8))
        expect(Errno.ENOSPC, osh.chmod, "/a", 0o600)
