"""alloc_gpu, free_gpu and devices against the allocator's reference model.

The model is tests/test_devices_stateful.py's (best fit, priority then arrival, at
most gpu_max_bypass grants behind a waiting request, quotas counting waiting
requests), imported; the same two simulated 1 GiB GPUs, bypass 2 and 1 GiB quota for
uid 1001 are conformance's shared configuration. This machine drives it from three
in-process handles (uids 1000, 1001 and 0), a queued request being a call sent and
answered later, and adds what that machine does not check: ETIMEDOUT of a wait with
a timeout, free_gpu's EBADF (unknown ids, ids another process freed) and the
success of freeing one's own allocation twice, root freeing anyone's, and the exit
of a process with a request queued. devices() must show exactly the model after
every step, and no handle may get an answer the model does not expect.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import userland
from conftest import Booted, wait_until
from test_devices import GiB, MiB, check_invariants
from test_devices_stateful import CAP, QUOTA, MWait, Model

from ._util import FAST, LONG, WAIT_S, Draws, answer, has_answer, send, walk

UIDS = (1000, 1001, 0)
MEMS = [256 * MiB, 512 * MiB, 768 * MiB, GiB, GiB + 1]


@dataclass
class Slot:
    uid: int
    osh: userland.Llmos
    queued: tuple[int, MWait] | None = None     # (sequence number, its model entry)
    freed: set[str] = field(default_factory=set)  # ids it freed (a second free succeeds)


class DevicesMachine(RuleBasedStateMachine):
    system: Booted
    observer: userland.Llmos

    def __init__(self) -> None:
        super().__init__()
        assert wait_until(lambda: _clean(self.observer), WAIT_S)
        self.slots = [Slot(uid, self.system.connect(uid=uid)) for uid in UIDS]
        self.model = Model()
        self.tomb: dict[str, int] = {}   # freed id -> the pid it was freed from
        # (draws pick from lists in the model's order, never sorted by the random ids:
        # the same choices must lead to the same steps when hypothesis replays them)

    def teardown(self) -> None:
        for s in self.slots:
            s.osh.close()
        assert wait_until(lambda: _clean(self.observer), WAIT_S), self.observer.devices()

    # -- expectations ---------------------------------------------------------------

    def _settle(self, granted: list) -> None:
        """The queued requests the model grants now get their answers."""
        for w, devs in granted:
            slot = self.slots[w.slot]
            assert slot.queued is not None and slot.queued[1] is w
            kind, got = answer(slot.osh, slot.queued[0])
            assert kind == "r" and got["devices"] == devs and got["bytes_each"] == w.mem, \
                (w, kind, got)
            a = self.model.allocs.pop(f"pending-{w.seq}")
            a.id = got["id"]
            self.model.allocs[a.id] = a
            slot.queued = None

    def _request(self, i: int, mem: int, count: int, exclusive: bool, wait: bool,
                 priority: int, timeout: float | None) -> None:
        slot, m = self.slots[i], self.model
        seq = send(slot.osh, "alloc_gpu", mem=mem, count=count, exclusive=exclusive,
                   wait=wait, priority=priority, timeout=timeout)
        if priority > 0 and slot.uid != 0:
            assert answer(slot.osh, seq) == ("e", "EPERM")
            return
        if sum(c >= mem for c in CAP.values()) < count:
            assert answer(slot.osh, seq) == ("e", "ENOMEM")
            return
        if slot.uid in QUOTA and m.uid_bytes(slot.uid) + mem * count > QUOTA[slot.uid]:
            assert answer(slot.osh, seq) == ("e", "EDQUOT")
            return
        m.seq += 1
        w = MWait(m.seq, i, slot.uid, mem, count, exclusive, priority)
        at = 0
        while at < len(m.queue) and (-m.queue[at].priority, m.queue[at].seq) < (-priority, w.seq):
            at += 1
        m.queue.insert(at, w)
        slot.queued = (seq, w)
        granted = m.schedule()
        if w not in m.queue:
            self._settle(granted)
            return
        if not wait:                   # cannot be met now: ENOMEM, off the queue
            m.queue.remove(w)
            slot.queued = None
            self._settle(granted)
            assert answer(slot.osh, seq) == ("e", "ENOMEM")
            return
        self._settle(granted)
        if timeout is not None:        # it waits, then gives up
            assert answer(slot.osh, seq) == ("e", "ETIMEDOUT")
            m.queue.remove(w)
            slot.queued = None
            self._settle(m.schedule())

    # -- rules ----------------------------------------------------------------------

    @rule(i=st.integers(0, 2), mem=st.sampled_from(MEMS), count=st.sampled_from([1, 1, 2, 3]),
          exclusive=st.booleans(), wait=st.booleans(), priority=st.sampled_from([0, 0, -1, 1]))
    def alloc(self, i, mem, count, exclusive, wait, priority) -> None:
        if self.slots[i].queued is None:
            self._request(i, mem, count, exclusive, wait, priority, None)

    @rule(i=st.integers(0, 2), mem=st.sampled_from(MEMS[:4]), exclusive=st.booleans(),
          timeout=st.sampled_from([0.0, 0.01]))
    def alloc_with_timeout(self, i, mem, exclusive, timeout) -> None:
        if self.slots[i].queued is None:
            self._request(i, mem, 1, exclusive, True, 0, timeout)

    @rule(i=st.integers(0, 2), data=st.data())
    def free_own(self, i, data) -> None:
        slot = self.slots[i]
        mine = [a for a in self.model.allocs.values() if a.slot == i]
        if slot.queued is not None or not mine:
            return
        a = data.draw(st.sampled_from(mine))
        assert slot.osh.free_gpu(a.id) is None
        self._freed(a.id, i)

    def _freed(self, aid: str, by: int) -> None:
        a = self.model.allocs.pop(aid)
        self.tomb[aid] = self.slots[a.slot].osh.pid
        self.slots[by].freed.add(aid)
        self._settle(self.model.schedule())

    @rule(i=st.integers(0, 2), data=st.data())
    def free_another(self, i, data) -> None:
        slot = self.slots[i]
        others = [a for a in self.model.allocs.values() if a.slot != i]
        if slot.queued is not None or not others:
            return
        a = data.draw(st.sampled_from(others))
        if slot.uid == 0:              # root may free anyone's
            assert slot.osh.free_gpu(a.id) is None
            self._freed(a.id, i)
        else:
            assert _outcome(slot.osh, a.id) == ("e", "EPERM")

    @rule(i=st.integers(0, 2), data=st.data())
    def free_freed(self, i, data) -> None:
        """Freeing an id again: fine for the process it was freed from (a retried
        call), EBADF for any other."""
        slot = self.slots[i]
        if slot.queued is not None or not self.tomb:
            return
        aid = data.draw(st.sampled_from(list(self.tomb)))
        got = _outcome(slot.osh, aid)
        assert got == (("r", None) if self.tomb[aid] == slot.osh.pid else ("e", "EBADF")), got

    @rule(i=st.integers(0, 2), aid=st.sampled_from(["", "nope", "0" * 24]))
    def free_unknown(self, i, aid) -> None:
        slot = self.slots[i]
        if slot.queued is None:
            assert _outcome(slot.osh, aid or secrets.token_hex(12)) == ("e", "EBADF")

    @rule(i=st.integers(0, 2))
    def process_exits(self, i) -> None:
        """The process exits: what it held is freed, its queued request dropped (its
        answer never comes), and the queue moves on."""
        slot, m = self.slots[i], self.model
        slot.osh.close()
        for a in [a for a in m.allocs.values() if a.slot == i]:
            del m.allocs[a.id]
            self.tomb[a.id] = slot.osh.pid
        m.queue = [w for w in m.queue if w.slot != i]
        self.slots[i] = Slot(slot.uid, self.system.connect(uid=slot.uid))
        self._settle(m.schedule())

    # -- after every step -----------------------------------------------------------

    @invariant()
    def devices_show_the_model(self) -> None:
        # a request sent without waiting for its answer (one the model queues) may
        # reach the driver after the observer's devices(): the kernel fair-queues
        # its clients. So: the driver's state must come to be the model's.
        assert wait_until(self._matches, WAIT_S), self.last
        assert not [s.uid for s in self.slots if has_answer(s.osh)], "an unexpected answer"

    def _matches(self) -> bool:
        info = self.observer.devices()
        check_invariants(info)
        got = sorted((r["id"], g["id"], r["pid"], r["bytes"], r["exclusive"])
                     for g in info["gpus"] for r in g["allocations"])
        want = sorted((a.id, d, self.slots[a.slot].osh.pid, a.bytes_each, a.exclusive)
                      for a in self.model.allocs.values() for d in a.devices)
        got_q = [(w["pid"], w["mem"], w["count"], w["priority"], w["bypassed"])
                 for w in info["queue"]]
        want_q = [(self.slots[w.slot].osh.pid, w.mem, w.count, w.priority, w.bypassed)
                  for w in self.model.queue]
        self.last = (got, want, got_q, want_q)
        return got == want and got_q == want_q


def _outcome(osh: userland.Llmos, aid: str) -> tuple:
    try:
        return "r", osh.free_gpu(aid)
    except userland.SyscallError as e:
        return "e", e.errno.name


def _clean(osh: userland.Llmos) -> bool:
    info = osh.devices()
    return not info["queue"] and not any(g["allocations"] for g in info["gpus"])


def _run(system: Booted, cfg) -> None:
    with system.connect(uid=0) as observer:
        DevicesMachine.system, DevicesMachine.observer = system, observer
        run_state_machine_as_test(DevicesMachine, settings=cfg)


def test_devices_walk(system: Booted) -> None:
    """Every errno of alloc_gpu and free_gpu the model predicts, in one walk."""
    with system.connect(uid=0) as observer:
        DevicesMachine.system, DevicesMachine.observer = system, observer
        m = DevicesMachine()

        def of(slot: int) -> Draws:
            return Draws(next(a for a in m.model.allocs.values() if a.slot == slot))

        def alloc(i: int, mem: int, count: int = 1, wait: bool = False,
                  priority: int = 0) -> tuple[str, dict]:
            return "alloc", {"i": i, "mem": mem, "count": count, "exclusive": False,
                             "wait": wait, "priority": priority}

        freed: list[str] = []

        def remember(d: Draws) -> Draws:
            freed.append(d.values[0].id)
            return d
        walk(m, [
            alloc(0, GiB + 1, wait=True),                        # ENOMEM: never
            alloc(0, GiB, priority=1),                           # EPERM: priority
            alloc(1, 768 * MiB),                                 # sim0
            alloc(1, 512 * MiB),                                 # EDQUOT: 1001's 1 GiB
            alloc(0, 512 * MiB),                                 # sim1
            alloc(0, 768 * MiB),                                 # ENOMEM: not now
            ("alloc_with_timeout", {"i": 2, "mem": GiB, "exclusive": False,
                                    "timeout": 0.01}),           # ETIMEDOUT
            ("free_another", {"i": 0, "data": lambda out: of(1)}),   # EPERM
            ("free_unknown", {"i": 0, "aid": "nope"}),           # EBADF
            ("free_own", {"i": 1, "data": lambda out: remember(of(1))}),
            ("free_freed", {"i": 1, "data": lambda out: Draws(freed[0])}),  # again: fine
            ("free_freed", {"i": 0, "data": lambda out: Draws(freed[0])}),  # EBADF
            ("free_another", {"i": 2, "data": lambda out: of(0)}),   # root may
            alloc(2, GiB, wait=True),                            # queued ...
            ("process_exits", {"i": 2}),                         # ... and dropped
        ], ("devices_show_the_model",))


@pytest.mark.timeout(300)
def test_devices_machine(system: Booted) -> None:
    _run(system, FAST)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_devices_machine_long(system: Booted) -> None:
    _run(system, LONG)
