"""spawn, wait, kill, exit, getppid and report against a model of the process table.

A hypothesis state machine drives a real kernel through one host-attached handle
(uid 1000, 1001 or 0) and checks every answer, errno included, against a small
model: the handle's children and how each may end (the (status, reason) pairs wait
may return), which are zombies, which were reaped, the handle's published info,
and a foreign (uid 1001) process of root's. ps must agree after every step.

Children are cheap OS programs (sleep, sh -c 'exit N') and, for getppid and
report, Python programs that attach with their spawn token. The model of which
child can end how is the one tests/test_proc_stateful.py keeps (Child, imported);
this machine adds the errnos: spawn's EINVAL/ENOENT/EACCES/EPERM, wait's
ECHILD/ETIMEDOUT, kill's ESRCH/EPERM, report's EPERM/EINVAL, and the ENOTCONN of a
connection whose process has exited.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant,
                                 rule, run_state_machine_as_test)

import userland
from conftest import Booted, wait_until
from syscalls import Errno
from test_proc_stateful import Child

from ._util import FAST, LONG, WAIT_S, errno_of, expect, walk

INIT = 1
FOREIGN_UID = 1001
SIGNUM = {"TERM": int(signal.SIGTERM), "KILL": int(signal.SIGKILL)}
SLEEPER = ["sleep", "600"]
MAX_INFO_KEYS = 64


def exiter(status: int) -> list[str]:
    return ["sh", "-c", f"exit {status}"]


def reporter(status: int) -> list[str]:
    """Attach, print getppid, publish {"step": status} and, for its parent,
    {"child<pid>": its parent's pid}, then exit(status) through llmos."""
    code = ("import userland; o = userland.connect(); p = o.getppid(); "
            "print('ppid', p, flush=True); "
            f"o.report({{'step': {status}}}); o.report({{'child%d' % o.pid: p}}, pid=p); "
            f"o.exit({status})")
    return ["python", "-c", code]


BAD_SPAWNS = [([], Errno.EINVAL), ([""], Errno.EINVAL), (["/nonexistent/program"], Errno.ENOENT),
              (["no-such-program-on-path"], Errno.ENOENT), (["{home}/plain"], Errno.EACCES),
              (["{home}/garbage"], Errno.EIO), (["/" + "a" * 300], Errno.ENAMETOOLONG)]


def bad_programs(home: Path) -> None:
    """{home}/plain: a file without an x bit (EACCES); {home}/garbage: an executable
    file in no executable format (ENOEXEC, which spawn answers EIO)."""
    for name, mode in (("plain", 0o644), ("garbage", 0o755)):
        f = home / name
        f.write_bytes(b"\x00\x01 not a program\n")
        f.chmod(mode)


class ProcessMachine(RuleBasedStateMachine):
    system: Booted
    root: userland.Llmos

    pids = Bundle("pids")

    def __init__(self) -> None:
        super().__init__()
        self.osh: userland.Llmos | None = None
        self.children: dict[int, Child] = {}
        self.reaped: set[int] = set()
        self.info: dict = {}
        # keys a running (or killed) reporter may or may not have published for us
        self.maybe: set[str] = set()
        self.foreign: int | None = None
        self.max_pid = 0

    @initialize(uid=st.sampled_from([1000, FOREIGN_UID, 0]))
    def attach(self, uid: int) -> None:
        self.osh = self.system.connect(uid=uid)
        assert (self.osh.uid, self.osh.getppid()) == (uid, INIT)
        self.max_pid = self.osh.pid

    def teardown(self) -> None:
        osh = self.osh
        if osh is None:
            return
        try:
            for pid in list(self.children):
                errno_of(osh.kill, pid, "KILL")
                errno_of(osh.wait, pid, timeout=WAIT_S)
            if self.foreign is not None:
                errno_of(self.root.kill, self.foreign, "KILL")
                errno_of(self.root.wait, self.foreign, timeout=WAIT_S)
        finally:
            osh.close()

    # -- helpers --------------------------------------------------------------

    def _new(self, pid: int, kind: str, uid: int, outcomes: set) -> int:
        assert pid > self.max_pid, f"pid {pid} reused (last {self.max_pid})"
        self.max_pid = pid
        self.children[pid] = Child(pid, kind, uid, set(outcomes))
        return pid

    def _reaped(self, rec: dict) -> None:
        pid = rec["pid"]
        assert pid in self.children, f"wait returned {rec}, not an unreaped child"
        child = self.children.pop(pid)
        got = (rec["status"], rec["reason"])
        assert got in child.outcomes, (child, got)
        self.reaped.add(pid)
        if child.kind == "reporter" and got[1] == "exited":
            assert rec["info"] == {"step": got[0]}, rec
            log = (self.system.home.log / "proc" / f"{pid}.log").read_text()
            assert f"ppid {self.osh.pid}" in log, log       # getppid of a spawned child
            if not child.zombie:                             # settle did it already
                self._published(pid)
        elif child.kind == "reporter":                       # killed: it may have
            self.osh.report({f"child{pid}": None})           # published, or not
            self.maybe.discard(f"child{pid}")
        else:
            assert rec["info"] == {}, rec

    def _published(self, pid: int) -> None:
        """Reporter pid exited: its report for us is in our info."""
        self.maybe.discard(f"child{pid}")
        self.info[f"child{pid}"] = self.osh.pid

    def _foreign(self) -> int:
        if self.foreign is None:
            self.foreign = self.root.spawn(SLEEPER, uid=FOREIGN_UID)
            self.max_pid = max(self.max_pid, self.foreign)
        return self.foreign

    # -- spawn ----------------------------------------------------------------

    @rule(target=pids)
    def spawn_sleeper(self) -> int:
        return self._new(self.osh.spawn(SLEEPER), "sleeper", self.osh.uid, set())

    @rule(target=pids, status=st.integers(0, 255))
    def spawn_exiter(self, status: int) -> int:
        return self._new(self.osh.spawn(exiter(status)), "exiter", self.osh.uid,
                         {(status, "exited")})

    @rule(target=pids, status=st.integers(0, 3))
    def spawn_reporter(self, status: int) -> int:
        if len(self.info) + len(self.maybe) + 8 > MAX_INFO_KEYS:
            self.osh.report({k: None for k in sorted(self.info)[:32]})
            for k in sorted(self.info)[:32]:
                del self.info[k]
        pid = self._new(self.osh.spawn(reporter(status)), "reporter", self.osh.uid,
                        {(status, "exited")})
        self.maybe.add(f"child{pid}")
        return pid

    @rule(uid=st.sampled_from([0, 1000, FOREIGN_UID]))
    def spawn_as(self, uid: int) -> None:
        if self.osh.uid in (0, uid):
            self._new(self.osh.spawn(SLEEPER, uid=uid), "sleeper", uid, set())
        else:
            expect(Errno.EPERM, self.osh.spawn, SLEEPER, uid=uid)

    @rule(bad=st.sampled_from(BAD_SPAWNS))
    def spawn_refused(self, bad: tuple[list[str], Errno]) -> None:
        argv, errno = bad
        expect(errno, self.osh.spawn, [a.format(home=self.system.root) for a in argv])

    # -- kill -----------------------------------------------------------------

    @rule(pid=pids, sig=st.sampled_from(["TERM", "KILL"]))
    def kill(self, pid: int, sig: str) -> None:
        err = errno_of(self.osh.kill, pid, sig)
        child = self.children.get(pid)
        if child is None or child.zombie:           # reaped, or ended: not running
            assert err == Errno.ESRCH, (pid, err)
        elif not child.ending:                      # a sleeper: it dies of sig
            assert err is None, (pid, err)
            child.outcomes = {(-SIGNUM[sig], "killed")}
        else:                                       # racing its own end
            assert err in (None, Errno.ESRCH), (pid, err)
            if err is None:
                child.outcomes.add((-SIGNUM[sig], "killed"))

    @rule(pid=st.sampled_from([INIT, 10**6, 2**31 - 1]), sig=st.sampled_from(["TERM", "KILL"]))
    def kill_not_mine(self, pid: int, sig: str) -> None:
        expect(Errno.EPERM if pid == INIT else Errno.ESRCH, self.osh.kill, pid, sig)

    @rule(sig=st.sampled_from(["TERM", "KILL", "INT"]))
    def kill_foreign(self, sig: str) -> None:
        pid = self._foreign()
        if self.osh.uid in (0, FOREIGN_UID):
            self.osh.kill(pid, sig)
            rec = self.root.wait(pid, timeout=WAIT_S)
            assert (rec["status"], rec["reason"]) == (-signal.Signals[f"SIG{sig}"], "killed")
            self.foreign = None
        else:
            expect(Errno.EPERM, self.osh.kill, pid, sig)

    # -- wait -----------------------------------------------------------------

    @rule(pid=pids, poll=st.sampled_from([0, 0.02]))
    def wait_pid(self, pid: int, poll: float) -> None:
        child = self.children.get(pid)
        if child is None:
            expect(Errno.ECHILD, self.osh.wait, pid, timeout=WAIT_S)
        elif not child.ending:
            expect(Errno.ETIMEDOUT, self.osh.wait, pid, timeout=poll)
        else:
            self._reaped(self.osh.wait(pid, timeout=WAIT_S))

    @rule(timeout=st.sampled_from([0, 0.02]))
    def wait_any(self, timeout: float) -> None:
        if any(c.ending for c in self.children.values()):
            self._reaped(self.osh.wait(timeout=WAIT_S))
        elif self.children:
            expect(Errno.ETIMEDOUT, self.osh.wait, timeout=timeout)
        else:
            expect(Errno.ECHILD, self.osh.wait)   # no child at all: at once, no block

    @rule()
    def wait_not_a_child(self) -> None:
        for pid in (INIT, self.osh.pid, self._foreign(), 10**6):
            expect(Errno.ECHILD, self.osh.wait, pid, timeout=0)

    # -- getppid, report, exit ------------------------------------------------

    @rule()
    def getppid(self) -> None:
        assert self.osh.getppid() == INIT

    @rule(keys=st.lists(st.sampled_from(["step", "loss", "tokens", "note"]), max_size=3),
          value=st.one_of(st.none(), st.integers(0, 9), st.floats(0, 1), st.text(max_size=5)))
    def report(self, keys: list[str], value) -> None:
        info = {k: value for k in keys}
        if len(self.info) + len(self.maybe) + len(info) > MAX_INFO_KEYS:
            return
        assert self.osh.report(info) is None
        for k in keys:
            if value is None:
                self.info.pop(k, None)
            else:
                self.info[k] = value

    @rule(n=st.sampled_from([20, 32]), tag=st.integers(0, 3))
    def report_many(self, n: int, tag: int) -> None:
        if self.maybe:      # whether it fits depends on what the reporters did
            return
        info = {f"k{tag}_{i}": i for i in range(n)}
        merged = {**self.info, **info}
        if len(merged) > MAX_INFO_KEYS:
            expect(Errno.EINVAL, self.osh.report, info)
        else:
            self.osh.report(info)
            self.info = merged

    @rule()
    def report_clear(self) -> None:
        if self.maybe:
            return
        keys = sorted(self.info)
        for i in range(0, len(keys), 32):        # info: at most 32 keys a call
            self.osh.report({k: None for k in keys[i:i + 32]})
        self.info = {}

    @rule(target_=st.sampled_from(["init", "foreign", "nobody"]))
    def report_for_another(self, target_: str) -> None:
        if target_ == "init":   # our parent: another uid's, unless we are root
            if self.osh.uid == 0:
                assert self.osh.report({"conformance": None}, pid=INIT) is None
            else:
                expect(Errno.EPERM, self.osh.report, {"x": 1}, pid=INIT)
        else:                    # neither us nor our parent
            pid = self._foreign() if target_ == "foreign" else 10**6
            expect(Errno.EPERM, self.osh.report, {"x": 1}, pid=pid)

    @rule(status=st.integers(0, 255))
    def another_process_exits(self, status: int) -> None:
        """A second process exits (the exit syscall); its connection is then
        unattached (ENOTCONN) and it is gone from ps (init reaped it)."""
        other = self.system.connect(uid=self.osh.uid)
        try:
            pid = other.pid
            assert other._call(7, {"status": status}) is None   # exit, keeping the socket
            expect(Errno.ENOTCONN, other.getpid)
            assert pid not in {r["pid"] for r in self.osh.ps()}
            self.max_pid = max(self.max_pid, pid)
        finally:
            other._close()

    @rule()
    def settle(self) -> None:
        """Let every ending child end: ps shows each as a zombie."""
        ending = {c.pid for c in self.children.values() if c.ending}
        assert wait_until(lambda: all(r["state"] == "zombie" for r in self.osh.ps()
                                      if r["pid"] in ending), WAIT_S)
        reasons = {r["pid"]: r["reason"] for r in self.osh.ps() if r["pid"] in ending}
        for pid in ending:
            child = self.children[pid]
            if child.kind == "reporter" and reasons[pid] == "exited" and not child.zombie:
                self._published(pid)
            child.zombie = True

    # -- after every step -----------------------------------------------------

    @invariant()
    def ps_agrees(self) -> None:
        if self.osh is None:
            return
        table = {r["pid"]: r for r in self.osh.ps()}
        me = table[self.osh.pid]
        assert (me["ppid"], me["uid"], me["state"]) == (INIT, self.osh.uid, "running")
        info = {k: v for k, v in me["info"].items() if k not in self.maybe}
        assert info == self.info, (me["info"], self.info, self.maybe)
        assert {p for p, r in table.items() if r["ppid"] == self.osh.pid} == set(self.children)
        for pid, child in self.children.items():
            r = table[pid]
            assert r["uid"] == child.uid, r
            if not child.ending:
                assert r["state"] == "running", r
            if child.zombie:
                assert r["state"] == "zombie" and (r["status"], r["reason"]) in child.outcomes
        assert not self.reaped & set(table)


def _run(system: Booted, root: userland.Llmos, cfg) -> None:
    def factory() -> ProcessMachine:
        m = ProcessMachine()
        m.system, m.root = system, root
        return m

    bad_programs(system.root)
    run_state_machine_as_test(factory, settings=cfg)
    with system.connect(uid=0, heartbeat=False) as osh:
        drivers = {d["os_pid"] for d in osh.sysinfo()["drivers"]}
        left = [r for r in osh.ps() if r["pid"] not in (INIT, root.pid, osh.pid)
                and r["os_pid"] not in drivers and r["argv"][:1] != ["init"]]
        assert not [r for r in left if r["ppid"] != INIT or r["os_pid"] is not None], left


def test_process_walk(system: Booted, root: userland.Llmos) -> None:
    """Every errno of spawn, wait, kill and report the model predicts, in one walk."""
    bad_programs(system.root)
    m = ProcessMachine()
    m.system, m.root = system, root
    sleeper = lambda out: out[1]      # noqa: E731 - what spawn_sleeper returned
    walk(m, [
        ("attach", {"uid": 1000}),
        ("spawn_sleeper", {}),
        ("wait_pid", {"pid": sleeper, "poll": 0}),                 # ETIMEDOUT
        ("kill_not_mine", {"pid": INIT, "sig": "TERM"}),           # EPERM
        ("kill_not_mine", {"pid": 10**6, "sig": "KILL"}),          # ESRCH
        ("kill_foreign", {"sig": "TERM"}),                         # EPERM
        ("spawn_as", {"uid": 0}),                                  # EPERM
        *[("spawn_refused", {"bad": bad}) for bad in BAD_SPAWNS],  # EINVAL ... EIO
        ("wait_not_a_child", {}),                                  # ECHILD
        ("kill", {"pid": sleeper, "sig": "KILL"}),
        ("wait_pid", {"pid": sleeper, "poll": 0}),
        ("kill", {"pid": sleeper, "sig": "TERM"}),                 # ESRCH: reaped
        ("wait_pid", {"pid": sleeper, "poll": 0}),                 # ECHILD: reaped
        ("spawn_reporter", {"status": 2}),
        ("spawn_exiter", {"status": 7}),
        ("settle", {}),
        ("wait_any", {"timeout": 0}),
        ("wait_any", {"timeout": 0}),
        ("wait_any", {"timeout": 0}),                              # ECHILD: none left
        ("report_many", {"n": 32, "tag": 0}),
        ("report_many", {"n": 32, "tag": 1}),                      # EINVAL: over 64 keys
        ("report_for_another", {"target_": "init"}),               # EPERM
        ("report_for_another", {"target_": "foreign"}),            # EPERM
        ("report_clear", {}),
        ("another_process_exits", {"status": 3}),                  # then EPERM
    ], ("ps_agrees",))


@pytest.mark.timeout(300)
def test_process_machine(system: Booted, root: userland.Llmos) -> None:
    _run(system, root, FAST)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_process_machine_long(system: Booted, root: userland.Llmos) -> None:
    _run(system, root, LONG)
