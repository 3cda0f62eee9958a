"""Every family at once: three llmos processes (uids 1000, 1001 and 0) working
concurrently, each answer checked against one combined reference.

A step is either a batch, where each process makes one call chosen by hypothesis
(processes, echo, devices, tensorfs, executor) and the three run at the same time
in three threads, or a cross step, where one process reaches for another's
resources (kill or wait for its child, free its allocation, read its tensor,
report for it) and must get EPERM, ECHILD or EACCES unless it is root. The calls
of one batch touch only their own process's resources (children, allocations of
64 MiB that always fit, tensors under /i/u<uid>), so whatever order the kernel
and the drivers serve them in, each answer is the one the reference predicts.
After every step ps, devices() and tensorfs must show the reference: each
process's children, info, allocations and tensors.
"""
from __future__ import annotations

import secrets
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import userland
from conftest import Booted, wait_until
from test_devices import MiB
from test_proc_stateful import Child

from ._util import FAST, LONG, WAIT_S, errno_of, outcome

UIDS = (1000, 1001, 0)
ALLOC = 64 * MiB
MAX_ALLOCS = 3
MAX_CHILDREN = 3
BASE = "/i"
NAMES = ("a", "b")
INIT = 1


@dataclass
class Proc:
    uid: int
    osh: userland.Llmos
    children: dict[int, Child] = field(default_factory=dict)
    allocs: list[str] = field(default_factory=list)   # in order: never sort random ids
    tensors: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (value, perm)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> str:
        return f"{BASE}/u{self.uid}"


# One call of one process: (name, function to run, function to check its outcome).
Op = tuple[str, Callable[[], Any], Callable[[tuple[str, Any]], None]]


class InterleavedMachine(RuleBasedStateMachine):
    system: Booted
    observer: userland.Llmos
    model: str

    def __init__(self) -> None:
        super().__init__()
        _remove(self.observer, BASE)
        self.observer.mkdir(BASE, 0o1777)
        self.procs = [Proc(uid, self.system.connect(uid=uid)) for uid in UIDS]
        for p in self.procs:
            p.osh.mkdir(p.dir, 0o755)
        self.pool = ThreadPoolExecutor(len(self.procs))

    def teardown(self) -> None:
        try:
            for p in self.procs:
                for pid in list(p.children):
                    errno_of(p.osh.kill, pid, "KILL")
                    errno_of(p.osh.wait, pid, timeout=WAIT_S)
                p.osh.close()
            _remove(self.observer, BASE)
        finally:
            self.pool.shutdown()

    # -- one process's calls, on its own resources ---------------------------------------

    def ops(self, p: Proc, data: st.DataObject) -> Op:
        kinds = ["echo", "getpid", "spawn", "kill_init", "alloc", "free_unknown",
                 "save", "load", "unlink", "infer", "report"]
        if p.children:
            kinds += ["kill_child", "wait_child"]
        if p.allocs:
            kinds.append("free")
        kind = data.draw(st.sampled_from(kinds), label=f"uid {p.uid}")
        osh = p.osh

        if kind == "echo":
            blob = data.draw(st.binary(max_size=64))
            return kind, lambda: osh.echo(blob), lambda got: _is(got, ("r", blob))
        if kind == "getpid":
            return kind, lambda: (osh.getpid(), osh.getppid()), \
                lambda got: _is(got, ("r", (osh.pid, INIT)))
        if kind == "spawn":
            status = data.draw(st.sampled_from([None, 0, 3]))
            argv = ["sleep", "600"] if status is None else ["sh", "-c", f"exit {status}"]
            if len(p.children) >= MAX_CHILDREN:
                return kind, lambda: osh.kill(INIT), lambda got: _is(got, ("e", "EPERM"))

            def spawned(got: tuple[str, Any]) -> None:
                assert got[0] == "r", got
                outcomes = set() if status is None else {(status, "exited")}
                p.children[got[1]] = Child(got[1], "sleeper" if status is None else "exiter",
                                           p.uid, outcomes)
            return kind, lambda: osh.spawn(argv), spawned
        if kind == "kill_init":
            return kind, lambda: osh.kill(INIT, "TERM"), lambda got: _is(got, ("e", "EPERM"))
        if kind in ("kill_child", "wait_child"):
            child = p.children[data.draw(st.sampled_from(sorted(p.children)))]
            if kind == "kill_child":
                def killed(got: tuple[str, Any]) -> None:
                    if child.ending:      # an exiter may be gone already
                        assert got in (("r", None), ("e", "ESRCH")), got
                        if got[0] == "r":
                            child.outcomes.add((-signal.SIGKILL, "killed"))
                    else:
                        assert got == ("r", None), got
                        child.outcomes = {(-signal.SIGKILL, "killed")}
                return kind, lambda: osh.kill(child.pid, "KILL"), killed
            if not child.ending:
                return kind, lambda: osh.wait(child.pid, timeout=0), \
                    lambda got: _is(got, ("e", "ETIMEDOUT"))

            def reaped(got: tuple[str, Any]) -> None:
                assert got[0] == "r" and (got[1]["status"], got[1]["reason"]) in \
                    child.outcomes, (got, child)
                del p.children[child.pid]
            return kind, lambda: osh.wait(child.pid, timeout=WAIT_S), reaped
        if kind == "alloc":
            if len(p.allocs) >= MAX_ALLOCS:
                return kind, lambda: osh.free_gpu(secrets.token_hex(12)), \
                    lambda got: _is(got, ("e", "EBADF"))

            def allocated(got: tuple[str, Any]) -> None:
                assert got[0] == "r" and got[1]["bytes_each"] == ALLOC, got
                p.allocs.append(got[1]["id"])
            return kind, lambda: osh.alloc_gpu(ALLOC), allocated
        if kind == "free":
            aid = data.draw(st.sampled_from(p.allocs))

            def freed(got: tuple[str, Any]) -> None:
                _is(got, ("r", None))
                p.allocs.remove(aid)
            return kind, lambda: osh.free_gpu(aid), freed
        if kind == "free_unknown":
            return kind, lambda: osh.free_gpu(secrets.token_hex(12)), \
                lambda got: _is(got, ("e", "EBADF"))
        if kind in ("save", "load", "unlink"):
            name = data.draw(st.sampled_from(NAMES))
            path = f"{p.dir}/{name}"
            if kind == "save":
                v, perm = data.draw(st.integers(0, 99)), data.draw(st.sampled_from([0o644, 0o600]))

                def saved(got: tuple[str, Any]) -> None:
                    assert got[0] == "r", got   # replacing keeps the mode, as O_TRUNC
                    p.tensors[name] = (v, p.tensors.get(name, (v, perm))[1])
                return kind, lambda: osh.save_tensor(path, np.full(4, v, np.int32), perm=perm), \
                    saved
            if kind == "load":
                want = p.tensors.get(name)
                return kind, lambda: np.asarray(osh.load_tensor(path)).tolist(), \
                    lambda got: _is(got, ("r", [want[0]] * 4) if want else ("e", "ENOENT"))

            def unlinked(got: tuple[str, Any]) -> None:
                _is(got, ("r", None) if name in p.tensors else ("e", "ENOENT"))
                p.tensors.pop(name, None)
            return kind, lambda: osh.unlink(path), unlinked
        if kind == "infer":
            missing = data.draw(st.booleans())
            if missing:
                return kind, lambda: osh.infer("/models/none", "x", 2), \
                    lambda got: _is(got, ("e", "ENOENT"))
            return kind, lambda: osh.infer(self.model, "abc", 2)["tokens"], \
                lambda got: _is(got, ("r", 2))
        assert kind == "report"
        v = data.draw(st.integers(0, 9))

        def reported(got: tuple[str, Any]) -> None:
            _is(got, ("r", None))
            p.info["v"] = v
        return kind, lambda: osh.report({"v": v}), reported

    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        ops = [self.ops(p, data) for p in self.procs]
        start = threading.Barrier(len(ops))

        def run(fn: Callable[[], Any]) -> tuple[str, Any]:
            start.wait(WAIT_S)
            return outcome(fn)

        results = list(self.pool.map(run, [fn for _, fn, _ in ops]))
        for (kind, _, check), got in zip(ops, results):
            check(got)

    # -- one process reaches for another's -----------------------------------------------

    @rule(i=st.integers(0, 2), j=st.integers(0, 2), data=st.data())
    def cross(self, i: int, j: int, data: st.DataObject) -> None:
        if i == j:
            return
        me, them = self.procs[i], self.procs[j]
        root = me.uid == 0
        what = data.draw(st.sampled_from(["kill", "wait", "free", "load", "report"]))
        if what in ("kill", "wait") and them.children:
            child = them.children[data.draw(st.sampled_from(sorted(them.children)))]
            if what == "wait":                       # never another's child
                _is(outcome(me.osh.wait, child.pid, timeout=0), ("e", "ECHILD"))
            elif not root:    # ESRCH first when it is not running (any more)
                got = outcome(me.osh.kill, child.pid, "KILL")
                if child.zombie:
                    _is(got, ("e", "ESRCH"))
                elif child.ending:
                    assert got in (("e", "EPERM"), ("e", "ESRCH")), got
                else:
                    _is(got, ("e", "EPERM"))
            elif not child.ending:
                _is(outcome(me.osh.kill, child.pid, "KILL"), ("r", None))
                child.outcomes = {(-signal.SIGKILL, "killed")}
        elif what == "free" and them.allocs:
            aid = data.draw(st.sampled_from(them.allocs))
            if root:
                _is(outcome(me.osh.free_gpu, aid), ("r", None))
                them.allocs.remove(aid)
            else:
                _is(outcome(me.osh.free_gpu, aid), ("e", "EPERM"))
        elif what == "load" and them.tensors:
            name = data.draw(st.sampled_from(sorted(them.tensors)))
            v, perm = them.tensors[name]
            got = outcome(lambda: np.asarray(me.osh.load_tensor(f"{them.dir}/{name}")).tolist())
            _is(got, ("r", [v] * 4) if root or perm & 0o004 else ("e", "EACCES"))
        elif what == "report":
            _is(outcome(me.osh.report, {"x": 1}, pid=them.osh.pid), ("e", "EPERM"))

    @rule(i=st.integers(0, 2))
    def settle(self, i: int) -> None:
        """Let one process's ending children end (ps: zombies)."""
        p = self.procs[i]
        ending = {pid for pid, c in p.children.items() if c.ending}
        assert wait_until(lambda: all(r["state"] == "zombie" for r in self.observer.ps()
                                      if r["pid"] in ending), WAIT_S)
        for pid in ending:
            p.children[pid].zombie = True

    # -- after every step ------------------------------------------------------------------

    @invariant()
    def the_system_shows_the_reference(self) -> None:
        table = {r["pid"]: r for r in self.observer.ps()}
        held = {}
        for g in self.observer.devices()["gpus"]:
            for a in g["allocations"]:
                held.setdefault(a["pid"], set()).add(a["id"])
        for p in self.procs:
            me = table[p.osh.pid]
            assert (me["uid"], me["state"], me["info"]) == (p.uid, "running", p.info), me
            assert {q for q, r in table.items() if r["ppid"] == p.osh.pid} == set(p.children)
            for pid, c in p.children.items():
                if not c.ending:
                    assert table[pid]["state"] == "running", table[pid]
            assert held.get(p.osh.pid, set()) == set(p.allocs), (p.uid, held, p.allocs)
            listed = {e["name"]: e["mode"] for e in self.observer.listdir(p.dir)}
            assert listed == {n: perm for n, (_, perm) in p.tensors.items()}, (listed, p.tensors)


def _is(got: tuple[str, Any], want: tuple[str, Any]) -> None:
    assert got == want, f"got {got!r}, expected {want!r}"


def _remove(osh: userland.Llmos, path: str) -> None:
    got = outcome(osh.stat, path)
    if got[0] == "e":
        assert got == ("e", "ENOENT"), got
        return
    if got[1]["type"] == "dir":
        for e in osh.listdir(path):
            _remove(osh, e["path"])
    osh.unlink(path)


def _run(system: Booted, model: str, cfg) -> None:
    with system.connect(uid=0) as observer:
        InterleavedMachine.system, InterleavedMachine.observer = system, observer
        InterleavedMachine.model = model
        run_state_machine_as_test(InterleavedMachine, settings=cfg)


@pytest.mark.timeout(300)
def test_interleaved_machine(system: Booted, tiny_model: str) -> None:
    _run(system, tiny_model, FAST)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interleaved_machine_long(system: Booted, tiny_model: str) -> None:
    _run(system, tiny_model, LONG)
