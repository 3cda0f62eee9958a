"""The process syscalls (spawn, wait, kill, exit, ps) against a reference model.

A hypothesis state machine drives a real booted kernel through one userland
handle (the "parent") and checks every answer against a small model of the
process table: which children it has, which of them can end and how (the set of
(status, reason) pairs wait may return), which are known to be zombies, which
were reaped, which grandchildren were orphaned to init. After every step ps must
agree with the model.

Children are small real Python programs: sleepers (end only when killed), exiters
(sys.exit(S), or the llmos exit syscall), and forkers (attach, spawn a sleeping
grandchild, exit through llmos) whose grandchild must be reparented to pid 1.
Killing a child that is already on its way out is a race the kernel may resolve
either way, so the model keeps every outcome it allows and checks the one that
happened is among them.

One kernel serves the whole module; each example attaches a fresh parent (uid
1000, 1001 or 0) and kills and reaps everything it started in teardown.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant,
                                 rule, run_state_machine_as_test)

import userland
from conftest import Booted, errno_of, examples, wait_until
from userland import Errno, SyscallError

WAIT_S = 20.0            # liveness bound for a child that is ending (python start-up)
NOW_S = 2.0              # a timeout for calls that must answer at once (ECHILD), not block
INIT = 1
FOREIGN_UID = 1001       # the uid of processes the parent does not own (unless 0 / 1001)
SIGNUM = {"TERM": int(signal.SIGTERM), "KILL": int(signal.SIGKILL)}

SLEEPER = ["python", "-c", "import time; time.sleep(600)"]


def sys_exiter(status: int) -> list[str]:
    return ["python", "-c", f"import sys; sys.exit({status})"]


def llmos_exiter(status: int) -> list[str]:
    return ["python", "-c", f"import userland; osh = userland.connect(); osh.exit({status})"]


def forker(status: int) -> list[str]:
    """Attach, spawn a sleeping grandchild tagged gc-of-<own pid>, exit(status)."""
    code = ("import userland; osh = userland.connect(); "
            "gc = osh.spawn(['python', '-c', 'import time; time.sleep(600)', "
            "'gc-of-%d' % osh.pid]); "
            f"print('grandchild', gc, flush=True); osh.exit({status})")
    return ["python", "-c", code]


def gc_tag(pid: int) -> str:
    return f"gc-of-{pid}"



@pytest.fixture(scope="module")
def kernel():
    with Booted() as b:
        yield b


@pytest.fixture(scope="module")
def root(kernel):
    """A uid-0 handle, parent of the foreign (uid 1001) processes."""
    with kernel.connect(uid=0) as osh:
        yield osh


@dataclass
class Child:
    pid: int
    kind: str                       # sleeper | exiter | forker
    uid: int
    outcomes: set = field(default_factory=set)   # (status, reason) wait may return
    zombie: bool = False            # ps showed it ended, not yet reaped

    @property
    def ending(self) -> bool:
        """It will end without anything more being done to it."""
        return bool(self.outcomes)


class ProcMachine(RuleBasedStateMachine):
    """Model: the parent's unreaped children, the reaped pids, the orphans."""

    booted: Booted
    root: userland.Llmos

    pids = Bundle("pids")

    def __init__(self) -> None:
        super().__init__()
        self.osh: userland.Llmos | None = None
        self.children: dict[int, Child] = {}
        self.reaped: dict[int, tuple[int, str]] = {}
        self.orphans: set[int] = set()          # grandchildren now owned by init, running
        self.forkers: set[int] = set()
        self.foreign: int | None = None         # a uid-1001 sleeper, child of root
        self.max_pid = 0

    # -- set-up and tear-down -------------------------------------------------

    @initialize(uid=st.sampled_from([1000, FOREIGN_UID, 0]))
    def attach(self, uid: int) -> None:
        self.osh = self.booted.connect(uid=uid)
        assert self.osh.uid == uid
        assert self.osh.getppid() == INIT       # host-attached: a child of init
        self.max_pid = self.osh.pid

    def teardown(self) -> None:
        """Kill and reap all this example started. Best effort: it runs after a
        failed step too, and must not hide that failure; _run checks afterwards
        that nothing was left behind."""
        osh = self.osh
        if osh is None:
            return
        try:
            for pid in list(self.children):
                errno_of(osh.kill, pid, "KILL")
                errno_of(osh.wait, pid, timeout=WAIT_S)
            tags = {gc_tag(f) for f in self.forkers}

            def leftovers() -> list[int]:
                return [r["pid"] for r in osh.ps() if r["argv"][-1] in tags]

            for pid in leftovers():
                errno_of(osh.kill, pid, "KILL")
            wait_until(lambda: not leftovers(), 5.0)
            if self.foreign is not None:
                pid, self.foreign = self.foreign, None
                errno_of(self.root.kill, pid, "KILL")
                errno_of(self.root.wait, pid, timeout=WAIT_S)
        finally:
            osh.close()

    def _spawn_foreign(self) -> int:
        if self.foreign is None:
            self.foreign = self.root.spawn(SLEEPER, uid=FOREIGN_UID)
            self.max_pid = max(self.max_pid, self.foreign)
        return self.foreign

    # -- helpers --------------------------------------------------------------

    def _new_child(self, pid: int, kind: str, uid: int, outcomes: set) -> int:
        assert pid > self.max_pid, f"pid {pid} reused (last {self.max_pid})"
        self.max_pid = pid
        self.children[pid] = Child(pid, kind, uid, set(outcomes))
        if kind == "forker":
            self.forkers.add(pid)
        return pid

    def _reaped(self, rec: dict) -> None:
        """wait returned rec: check it against the model and update it."""
        pid = rec["pid"]
        assert pid in self.children, f"wait returned {rec}, not an unreaped child"
        child = self.children.pop(pid)
        got = (rec["status"], rec["reason"])
        assert got in child.outcomes, f"pid {pid} ({child.kind}) ended {got}, " \
                                      f"expected one of {child.outcomes}"
        self.reaped[pid] = got
        event(f"{child.kind} reaped: {got[1]}")
        if child.kind == "forker" and not child.zombie:
            self._forker_ended(child, got[1])

    def _forker_ended(self, child: Child, reason: str) -> None:
        """A forker ended: its grandchild (if it got to spawn one) is init's now."""
        gcs = [r for r in self.osh.ps() if r["argv"][-1] == gc_tag(child.pid)]
        for r in gcs:
            assert r["ppid"] == INIT and r["state"] == "running", r
            assert r["uid"] == child.uid, r
        # a forker that exited got past its spawn; a killed one may not have
        assert len(gcs) == 1 if reason == "exited" else len(gcs) <= 1, gcs
        self.orphans.update(r["pid"] for r in gcs)
        event(f"forker {reason}, {len(gcs)} grandchild orphaned")

    def _ending(self) -> list[Child]:
        return [c for c in self.children.values() if c.ending]

    # -- spawn ----------------------------------------------------------------

    @rule(target=pids)
    def spawn_sleeper(self) -> int:
        pid = self.osh.spawn(SLEEPER)
        return self._new_child(pid, "sleeper", self.osh.uid, set())

    @rule(target=pids, status=st.integers(0, 255), how=st.sampled_from(["sys", "llmos"]))
    def spawn_exiter(self, status: int, how: str) -> int:
        pid = self.osh.spawn(sys_exiter(status) if how == "sys" else llmos_exiter(status))
        return self._new_child(pid, "exiter", self.osh.uid, {(status, "exited")})

    @rule(target=pids, status=st.integers(0, 255))
    def spawn_forker(self, status: int) -> int:
        pid = self.osh.spawn(forker(status))
        return self._new_child(pid, "forker", self.osh.uid, {(status, "exited")})

    @rule(uid=st.sampled_from([0, 1000, FOREIGN_UID]))
    def spawn_as_uid(self, uid: int) -> None:
        if self.osh.uid in (0, uid):
            pid = self.osh.spawn(SLEEPER, uid=uid)
            self._new_child(pid, "sleeper", uid, set())
        else:
            assert errno_of(self.osh.spawn, SLEEPER, uid=uid) == Errno.EPERM
            # nothing was created: no pid past the last one we know of (grandchildren
            # aside, which forkers spawn on their own)
            newest = max(r["pid"] for r in self.osh.ps()
                         if not r["argv"][-1].startswith("gc-of-"))
            assert newest <= self.max_pid, newest

    # -- kill -----------------------------------------------------------------

    @rule(pid=pids, sig=st.sampled_from(["TERM", "KILL"]))
    def kill(self, pid: int, sig: str) -> None:
        err = errno_of(self.osh.kill, pid, sig)
        child = self.children.get(pid)
        if child is None:                       # reaped: no such process
            assert err == Errno.ESRCH, (pid, err)
        elif child.zombie:                      # ended, not reaped: not running
            assert err == Errno.ESRCH, (pid, err)
        elif not child.ending:                  # a sleeper: it surely dies of sig
            assert err is None, (pid, err)
            child.outcomes = {(-SIGNUM[sig], "killed")}
        else:                                   # racing its own end
            assert err in (None, Errno.ESRCH), (pid, err)
            event(f"kill of an ending {child.kind}: {err and err.name}")
            if err is None:
                child.outcomes.add((-SIGNUM[sig], "killed"))

    @rule(pid=st.sampled_from([0, 10**6, 2**31 - 1]))
    def kill_unknown(self, pid: int) -> None:
        # pid 0 names no process (there is no process group to signal): EINVAL
        expected = Errno.EINVAL if pid == 0 else Errno.ESRCH
        assert errno_of(self.osh.kill, pid, "TERM") == expected

    @rule(sig=st.sampled_from(["TERM", "KILL", "INT"]))
    def kill_init(self, sig: str) -> None:
        assert errno_of(self.osh.kill, INIT, sig) == Errno.EPERM

    @rule(sig=st.sampled_from(["TERM", "KILL"]))
    def kill_foreign(self, sig: str) -> None:
        pid = self._spawn_foreign()
        err = errno_of(self.osh.kill, pid, sig)
        if self.osh.uid in (0, FOREIGN_UID):
            assert err is None
            rec = self.root.wait(pid, timeout=WAIT_S)
            assert rec == {"pid": pid, "status": -SIGNUM[sig], "reason": "killed", "info": {}}
            self.foreign = None
        else:
            assert err == Errno.EPERM
            rec = next(r for r in self.osh.ps() if r["pid"] == pid)
            assert rec["state"] == "running"

    @rule(index=st.integers(0, 7), sig=st.sampled_from(["TERM", "KILL"]))
    def kill_orphan(self, index: int, sig: str) -> None:
        # no precondition or draw depends on the orphans: whether a killed forker
        # got to spawn its grandchild is a race, and hypothesis needs the steps it
        # can choose to be the same when it replays an example
        if not self.orphans:
            return
        pid = sorted(self.orphans)[index % len(self.orphans)]
        assert errno_of(self.osh.wait, pid, timeout=0) == Errno.ECHILD  # init's, not ours
        assert errno_of(self.osh.kill, pid, sig) is None
        self.orphans.discard(pid)
        event("orphan killed")
        # init reaps its zombies at once: it leaves the table
        assert wait_until(lambda: pid not in {r["pid"] for r in self.osh.ps()}, WAIT_S)
        assert errno_of(self.osh.kill, pid, sig) == Errno.ESRCH

    # -- wait -----------------------------------------------------------------

    @rule(pid=pids, poll=st.sampled_from([0, 0.05]))
    def wait_pid(self, pid: int, poll: float) -> None:
        child = self.children.get(pid)
        if child is None:                       # reaped: no longer a child
            assert errno_of(self.osh.wait, pid, timeout=NOW_S) == Errno.ECHILD
        elif not child.ending:                  # a sleeper: still running
            assert errno_of(self.osh.wait, pid, timeout=poll) == Errno.ETIMEDOUT
        else:
            self._reaped(self.osh.wait(pid, timeout=0 if child.zombie else WAIT_S))

    @rule(timeout=st.sampled_from([0, 0.05]))
    def wait_any(self, timeout: float) -> None:
        # one rule, branching inside: which child a wait for any reaps is a race, so
        # the set of children (and any precondition on it) differs between replays
        if any(c.ending for c in self.children.values()):
            rec = self.osh.wait(timeout=WAIT_S)
            assert rec["pid"] in self.children and self.children[rec["pid"]].ending, rec
            self._reaped(rec)
        elif self.children:
            assert errno_of(self.osh.wait, timeout=timeout) == Errno.ETIMEDOUT
        else:
            # no timeout: with no child at all it must answer at once, not block
            assert errno_of(self.osh.wait) == Errno.ECHILD

    @rule()
    def wait_not_a_child(self) -> None:
        for pid in (INIT, self.osh.pid, self._spawn_foreign()):
            assert errno_of(self.osh.wait, pid, timeout=0) == Errno.ECHILD

    @rule()
    def settle(self) -> None:
        """Let every ending child end; ps then shows each as a zombie.

        (Which ending children are left after a wait for any is a race, so this
        has no precondition on them.)"""
        ending = {c.pid for c in self._ending()}

        def all_zombies() -> bool:
            return all(r["state"] == "zombie" for r in self.osh.ps() if r["pid"] in ending)

        assert wait_until(all_zombies, WAIT_S)
        reasons = {r["pid"]: r["reason"] for r in self.osh.ps() if r["pid"] in ending}
        for pid in ending:
            child = self.children[pid]
            if not child.zombie and child.kind == "forker":
                self._forker_ended(child, reasons[pid])
            child.zombie = True

    # -- invariants -----------------------------------------------------------

    @invariant()
    def ps_agrees(self) -> None:
        if self.osh is None:
            return
        table = {r["pid"]: r for r in self.osh.ps()}
        me = table[self.osh.pid]
        assert (me["ppid"], me["uid"], me["state"]) == (INIT, self.osh.uid, "running")
        assert table[INIT]["state"] == "running"
        mine = {pid for pid, r in table.items() if r["ppid"] == self.osh.pid}
        assert mine == set(self.children), (mine, set(self.children))
        for pid, child in self.children.items():
            r = table[pid]
            assert r["uid"] == child.uid, r
            if not child.ending:
                assert r["state"] == "running", r
            if child.zombie:
                assert r["state"] == "zombie", r
                assert (r["status"], r["reason"]) in child.outcomes, (r, child.outcomes)
        for pid in self.reaped:
            assert pid not in table, table[pid]
        for pid in self.orphans:
            assert (table[pid]["ppid"], table[pid]["state"]) == (INIT, "running"), table[pid]
        for f in self.forkers:
            for r in table.values():
                if r["argv"][-1] == gc_tag(f):
                    parent = self.children.get(f)
                    allowed = {f, INIT} if parent is not None and not parent.zombie else {INIT}
                    assert r["ppid"] in allowed, (r, f)


# No shrinking: replaying against a real kernel races (which child a wait for any
# reaps, whether a killed forker got to spawn), so hypothesis would mostly report
# "flaky" instead of the failure; the first failing run's steps are printed as is.
FAST = settings(max_examples=examples(30), stateful_step_count=20, deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
LONG = settings(FAST, max_examples=examples(90), stateful_step_count=25)


def _run(kernel: Booted, root: userland.Llmos, cfg: settings) -> None:
    def factory() -> ProcMachine:
        m = ProcMachine()
        m.booted, m.root = kernel, root
        return m

    run_state_machine_as_test(factory, settings=cfg)
    # nothing leaked: only init, the drivers and root's handle remain
    with kernel.connect(uid=0, heartbeat=False) as osh:
        drivers = {d["os_pid"] for d in osh.sysinfo()["drivers"]}
        left = [r for r in osh.ps() if r["pid"] not in (INIT, root.pid, osh.pid)
                and r["os_pid"] not in drivers]
        assert left == [], left

    def os_leftovers() -> list[int]:   # the kernel's OS children: its drivers only
        return [p.pid for p in kernel.descendants() if p.pid not in drivers]

    assert wait_until(lambda: not os_leftovers(), 5.0), os_leftovers()


def test_proc_model(kernel, root):
    _run(kernel, root, FAST)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_proc_model_long(kernel, root):
    _run(kernel, root, LONG)


# -- orphans and uid rules, explicitly ----------------------------------------------

def test_orphan_goes_to_init(kernel):
    with kernel.connect() as osh:
        f = osh.spawn(forker(7))
        assert osh.wait(f, timeout=WAIT_S) == {"pid": f, "status": 7, "reason": "exited", "info": {}}
        [gc] = [r for r in osh.ps() if r["argv"][-1] == gc_tag(f)]
        assert (gc["ppid"], gc["uid"], gc["state"]) == (INIT, osh.uid, "running")
        assert f"grandchild {gc['pid']}" in _log(kernel, f)
        with pytest.raises(SyscallError) as e:
            osh.wait(gc["pid"], timeout=0)      # init's child now, not ours
        assert e.value.errno == Errno.ECHILD
        with pytest.raises(SyscallError) as e:
            osh.wait(timeout=0)                 # and we have no children left
        assert e.value.errno == Errno.ECHILD
        osh.kill(gc["pid"], "KILL")
        # init reaps it: it leaves the table, and cannot be signalled again
        assert wait_until(lambda: gc["pid"] not in {r["pid"] for r in osh.ps()}, WAIT_S)
        with pytest.raises(SyscallError) as e:
            osh.kill(gc["pid"], "KILL")
        assert e.value.errno == Errno.ESRCH



UID_REPORTER = ["python", "-c",
                "import userland; osh = userland.connect(); "
                "print('ids', osh.uid, osh.pid, osh.getppid(), flush=True)"]


def _log(kernel: Booted, pid: int) -> str:
    return (kernel.home.log / "proc" / f"{pid}.log").read_text()


def test_root_spawns_as_other_uid_and_kills_it(kernel, root):
    pid = root.spawn(SLEEPER, uid=FOREIGN_UID)
    rec = next(r for r in root.ps() if r["pid"] == pid)
    assert (rec["ppid"], rec["uid"], rec["state"]) == (root.pid, FOREIGN_UID, "running")
    assert root.kill(pid, "KILL") is None
    assert root.wait(pid, timeout=WAIT_S) == {"pid": pid, "status": -9, "reason": "killed", "info": {}}
    assert pid not in {r["pid"] for r in root.ps()}


def test_user_cannot_signal_another_uid(kernel, root):
    pid = root.spawn(SLEEPER, uid=FOREIGN_UID)
    try:
        with kernel.connect() as user:
            assert user.uid == 1000
            for sig in ("TERM", "KILL", "INT"):
                with pytest.raises(SyscallError) as e:
                    user.kill(pid, sig)
                assert e.value.errno == Errno.EPERM
            with pytest.raises(SyscallError) as e:
                user.kill(INIT, "KILL")
            assert e.value.errno == Errno.EPERM
        assert next(r for r in root.ps() if r["pid"] == pid)["state"] == "running"
    finally:
        root.kill(pid, "KILL")
        assert root.wait(pid, timeout=WAIT_S)["reason"] == "killed"


def test_root_cannot_kill_init(root):
    for sig in ("TERM", "KILL", "INT"):
        with pytest.raises(SyscallError) as e:
            root.kill(INIT, sig)
        assert e.value.errno == Errno.EPERM


def test_user_cannot_spawn_as_another_uid(kernel):
    with kernel.connect() as user:
        for uid in (0, FOREIGN_UID):
            with pytest.raises(SyscallError) as e:
                user.spawn(SLEEPER, uid=uid)
            assert e.value.errno == Errno.EPERM
        assert [r for r in user.ps() if r["ppid"] == user.pid] == []
        pid = user.spawn(UID_REPORTER, uid=1000)   # its own uid, said explicitly: fine
        assert user.wait(pid, timeout=WAIT_S) == {"pid": pid, "status": 0, "reason": "exited", "info": {}}
        assert f"ids 1000 {pid} {user.pid}" in _log(kernel, pid)


@pytest.mark.parametrize("uid", [0, 1000, FOREIGN_UID])
def test_child_inherits_parents_uid(kernel, uid):
    with kernel.connect(uid=uid) as osh:
        pid = osh.spawn(UID_REPORTER)
        assert next(r for r in osh.ps() if r["pid"] == pid)["uid"] == uid
        assert osh.wait(pid, timeout=WAIT_S) == {"pid": pid, "status": 0, "reason": "exited", "info": {}}
        assert f"ids {uid} {pid} {osh.pid}" in _log(kernel, pid)


def test_uid_of_child_spawned_as_other_uid_passes_to_grandchild(kernel, root):
    """root spawns a uid-1001 child; that child may not spawn as root, and its own
    child is uid 1001 too."""
    code = ("import userland; osh = userland.connect()\n"
            "try:\n"
            "    osh.spawn(['python', '-c', 'pass'], uid=0)\n"
            "except userland.SyscallError as e:\n"
            "    print('root spawn', e.errno.name, flush=True)\n"
            "gc = osh.spawn(['python', '-c', 'pass'])\n"
            "print('gc uid', next(r['uid'] for r in osh.ps() if r['pid'] == gc), flush=True)\n"
            "print('gc', osh.wait(gc, timeout=20), flush=True)\n")
    pid = root.spawn(["python", "-c", code], uid=FOREIGN_UID)
    assert root.wait(pid, timeout=WAIT_S) == {"pid": pid, "status": 0, "reason": "exited", "info": {}}
    out = _log(kernel, pid)
    assert "root spawn EPERM" in out, out
    assert f"gc uid {FOREIGN_UID}" in out, out
    assert "'status': 0, 'reason': 'exited'" in out, out
