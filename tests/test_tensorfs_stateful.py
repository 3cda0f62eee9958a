"""A hypothesis state machine drives open/write/close, read, rename (of tensors and
of directories), unlink, mkdir and listdir on a real tensorfs and on an in-memory
reference filesystem, and checks after every step that the two agree (names,
types, contents), including that a staged write is invisible until its close, and
that it belongs to its directory from the open on (that directory cannot be
removed; renaming it moves the write along)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import Booted, examples
from syscalls import Errno, SyscallError
from test_tensorfs import CONFIG

NAMES = st.sampled_from(["a", "b", "c"])
DIRS = st.sampled_from(["", "/d", "/e"])


def tfs_machine(b: Booted):
    class TensorfsMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.osh = b.connect()
            for e in self.osh.listdir("/"):
                self.remove(e)
            self.dirs = {""}
            self.tensors: dict[str, np.ndarray] = {}
            self.staged: tuple[str, str, np.ndarray] | None = None

        def remove(self, e: dict) -> None:
            if e["type"] == "dir":
                for c in self.osh.listdir(e["path"]):
                    self.remove(c)
            self.osh.unlink(e["path"])

        def expect(self, errno: Errno, fn, *a) -> None:
            try:
                fn(*a)
            except SyscallError as e:
                assert e.errno == errno, e
            else:
                raise AssertionError(f"{fn.__name__}{a} did not fail with {errno.name}")

        @rule(d=st.sampled_from(["/d", "/e"]))
        def mkdir(self, d):
            if d in self.dirs:
                self.expect(Errno.EEXIST, self.osh.mkdir, d)
            else:
                self.osh.mkdir(d)
                self.dirs.add(d)

        @precondition(lambda self: self.staged is None)
        @rule(d=DIRS, n=NAMES, v=st.integers(0, 100), size=st.sampled_from([1, 5, 20_000]))
        def open_and_write(self, d, n, v, size):
            path = f"{d}/{n}"
            if d not in self.dirs:
                self.expect(Errno.ENOENT, self.osh.open_tensor, path, "w", "int32", [size])
                return
            fd = self.osh.open_tensor(path, "w", "int32", [size])["fd"]
            data = np.full(size, v, np.int32)
            self.osh.write_tensor(fd, data.tobytes())
            self.staged = (fd, path, data)

        @precondition(lambda self: self.staged is not None)
        @rule(discard=st.booleans())
        def close(self, discard):
            fd, path, data = self.staged
            self.staged = None
            self.osh.close_tensor(fd, discard)
            if not discard:
                self.tensors[path] = data

        @rule(d=DIRS, n=NAMES)
        def read(self, d, n):
            path = f"{d}/{n}"
            if path in self.tensors:
                np.testing.assert_array_equal(self.osh.load_tensor(path).numpy(),
                                              self.tensors[path])
            else:
                self.expect(Errno.ENOENT, self.osh.load_tensor, path)

        @rule(d1=DIRS, n1=NAMES, d2=DIRS, n2=NAMES)
        def rename(self, d1, n1, d2, n2):
            src, dst = f"{d1}/{n1}", f"{d2}/{n2}"
            if src not in self.tensors:
                self.expect(Errno.ENOENT, self.osh.rename, src, dst)
            elif d2 not in self.dirs:
                self.expect(Errno.ENOENT, self.osh.rename, src, dst)
            elif dst in self.tensors:
                self.expect(Errno.EEXIST, self.osh.rename, src, dst)
            else:
                self.osh.rename(src, dst)
                self.tensors[dst] = self.tensors.pop(src)

        @rule(src=st.sampled_from(["/d", "/e"]), dst=st.sampled_from(["/d", "/e"]))
        def rename_dir(self, src, dst):
            if src not in self.dirs:
                self.expect(Errno.ENOENT, self.osh.rename, src, dst)
            elif src == dst:
                self.expect(Errno.EINVAL, self.osh.rename, src, dst)  # into itself
            elif dst in self.dirs:
                self.expect(Errno.EEXIST, self.osh.rename, src, dst)
            else:
                self.osh.rename(src, dst)
                self.dirs.remove(src)
                self.dirs.add(dst)
                for p in [p for p in self.tensors if p.startswith(src + "/")]:
                    self.tensors[dst + p[len(src):]] = self.tensors.pop(p)
                if self.staged and self.staged[1].startswith(src + "/"):
                    fd, path, data = self.staged
                    self.staged = (fd, dst + path[len(src):], data)

        @rule(d=DIRS, n=st.one_of(NAMES, st.just("")))
        def unlink(self, d, n):
            path = f"{d}/{n}" if n else d
            if not path:
                return
            if path in self.tensors:
                self.osh.unlink(path)
                del self.tensors[path]
            elif path in self.dirs:
                if any(t.startswith(path + "/") for t in self.tensors) or \
                        (self.staged and self.staged[1].startswith(path + "/")):
                    self.expect(Errno.ENOTEMPTY, self.osh.unlink, path)
                else:
                    self.osh.unlink(path)
                    self.dirs.discard(path)
            else:
                self.expect(Errno.ENOENT, self.osh.unlink, path)

        @invariant()
        def listings_agree(self):
            for d in self.dirs:
                got = {(e["name"], e["type"]) for e in self.osh.listdir(d or "/")}
                want = {(p.rsplit("/", 1)[1], "tensor") for p in self.tensors
                        if p.rsplit("/", 1)[0] == d}
                want |= {(x[1:], "dir") for x in self.dirs if x and d == ""}
                assert got == want, (d, got, want)

        def teardown(self) -> None:
            if self.staged is not None:
                self.osh.close_tensor(self.staged[0], True)
            self.osh.close()

    return TensorfsMachine


@pytest.fixture(scope="module")
def kernel():
    with Booted(CONFIG) as b:
        yield b


def test_tensorfs_matches_a_reference_filesystem(kernel):
    machine = tfs_machine(kernel)
    machine.TestCase.settings = settings(max_examples=examples(30), stateful_step_count=30,
                                         deadline=None)
    machine.TestCase().runTest()


def test_a_staged_write_keeps_its_directory(kernel):
    """The steps the machine once found: mkdir /d, open /d/a for writing, write,
    unlink /d, close. The unlink is ENOTEMPTY (the write is in progress there; it
    was allowed, and the close then ENOENT) and the close commits /d/a. Then the
    same with a rename of /d to /e between: the write lands at /e/a."""
    m = tfs_machine(kernel)()
    steps = [("mkdir", {"d": "/d"}),
             ("open_and_write", {"d": "/d", "n": "a", "v": 7, "size": 5}),
             ("unlink", {"d": "/d", "n": ""}),
             ("close", {"discard": False}),
             ("open_and_write", {"d": "/d", "n": "b", "v": 8, "size": 20_000}),
             ("rename_dir", {"src": "/d", "dst": "/e"}),
             ("close", {"discard": False}),
             ("read", {"d": "/e", "n": "b"})]
    try:
        for rule, args in steps:
            getattr(m, rule)(**args)
            m.listings_agree()
        assert set(m.tensors) == {"/e/a", "/e/b"}
    finally:
        m.teardown()
