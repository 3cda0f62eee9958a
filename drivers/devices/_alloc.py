"""The GPU allocator: devices, allocations and the wait queue, with no I/O.

The driver (drivers/devices/__init__.py) feeds it requests and process exits and
sends the replies; everything here is deterministic so the policy can be read
(and modelled by the tests) in one place. See docs/devices.md.

Invariants, checked by check():
  - the allocations on a device add up to at most its capacity;
  - an exclusive allocation is the only one on its devices;
  - an allocation of count > 1 is on count distinct devices.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Gpu:
    id: str                 # the UUID for a real GPU, "sim<N>" for a simulated one
    index: int
    name: str
    capacity: int           # bytes
    simulated: bool
    handle: Any = None      # the NVML handle of a real GPU


@dataclass
class Alloc:
    id: str
    pid: int
    uid: int
    devices: list[str]
    bytes_each: int
    exclusive: bool
    t: float = field(default_factory=time.time)

    @property
    def total(self) -> int:
        return self.bytes_each * len(self.devices)

    def to_json(self) -> dict:
        return {"id": self.id, "pid": self.pid, "uid": self.uid, "devices": self.devices,
                "bytes_each": self.bytes_each, "exclusive": self.exclusive, "t": self.t}


@dataclass
class Waiter:
    """A request in the queue (or being placed right now, when wait is False)."""
    seq: int
    pid: int
    uid: int
    mem: int
    count: int
    exclusive: bool
    priority: int
    wait: bool
    ctx: Any = None         # the driver's Request
    t0: float = field(default_factory=time.monotonic)
    bypassed: int = 0       # grants to requests behind it while it waited

    @property
    def key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class Allocator:
    def __init__(self, gpus: list[Gpu], max_bypass: int = 4,
                 quota: dict[int, int] | None = None) -> None:
        self.gpus = {g.id: g for g in gpus}
        self.max_bypass = max_bypass
        self.quota = dict(quota or {})
        self.allocs: dict[str, Alloc] = {}
        self.queue: list[Waiter] = []     # sorted by Waiter.key
        self._seq = 0

    # -- state ------------------------------------------------------------------------

    def used(self, dev: str) -> int:
        return sum(a.bytes_each for a in self.allocs.values() if dev in a.devices)

    def held_exclusively(self, dev: str) -> bool:
        return any(a.exclusive and dev in a.devices for a in self.allocs.values())

    def busy(self, dev: str) -> bool:
        return any(dev in a.devices for a in self.allocs.values())

    def free(self, dev: str) -> int:
        if self.held_exclusively(dev):
            return 0
        return self.gpus[dev].capacity - self.used(dev)

    def uid_bytes(self, uid: int) -> int:
        """What uid holds plus what it waits for: both count against its quota."""
        return (sum(a.total for a in self.allocs.values() if a.uid == uid)
                + sum(w.mem * w.count for w in self.queue if w.uid == uid))

    def never_fits(self, mem: int, count: int) -> bool:
        """No state of the allocations could ever meet this request."""
        return sum(g.capacity >= mem for g in self.gpus.values()) < count

    def over_quota(self, uid: int, mem: int, count: int) -> int | None:
        """uid's quota when this request would take it over, else None."""
        q = self.quota.get(uid)
        if q is not None and self.uid_bytes(uid) + mem * count > q:
            return q
        return None

    def place(self, mem: int, count: int, exclusive: bool) -> list[str] | None:
        """Best fit: the count devices with the least free memory that still fit,
        ties to the lower index; None when fewer than count fit. Returned in
        index order."""
        fits = [g for g in self.gpus.values()
                if (not self.busy(g.id) if exclusive else self.free(g.id) >= mem)
                and g.capacity >= mem]
        if len(fits) < count:
            return None
        fits.sort(key=lambda g: (self.free(g.id), g.index))
        return [g.id for g in sorted(fits[:count], key=lambda g: g.index)]

    # -- changes ----------------------------------------------------------------------

    def new_waiter(self, pid: int, uid: int, mem: int, count: int, exclusive: bool,
                   priority: int, wait: bool, ctx: Any = None) -> Waiter:
        self._seq += 1
        return Waiter(self._seq, pid, uid, mem, count, exclusive, priority, wait, ctx)

    def enqueue(self, w: Waiter) -> None:
        i = 0
        while i < len(self.queue) and self.queue[i].key < w.key:
            i += 1
        self.queue.insert(i, w)

    def grant(self, w: Waiter, devices: list[str]) -> Alloc:
        a = Alloc(secrets.token_hex(12), w.pid, w.uid, devices, w.mem, w.exclusive)
        self.allocs[a.id] = a
        return a

    def schedule(self) -> list[tuple[Waiter, Alloc]]:
        """Grant what the queue allows, in order (priority, then arrival).

        A request that does not fit is skipped and later ones may go first, but
        each grant behind a waiting request counts as one bypass of it; once a
        request has been bypassed max_bypass times nothing behind it is granted
        until it is (it holds a reservation), so large requests never starve.
        Requests that do not wait are never skipped over: they just fail."""
        granted: list[tuple[Waiter, Alloc]] = []
        skipped: list[Waiter] = []
        for w in list(self.queue):
            if any(s.bypassed >= self.max_bypass for s in skipped):
                break
            devices = self.place(w.mem, w.count, w.exclusive)
            if devices is None:
                if w.wait:
                    skipped.append(w)
                continue
            self.queue.remove(w)
            granted.append((w, self.grant(w, devices)))
            for s in skipped:
                s.bypassed += 1
        return granted

    def release(self, alloc_id: str) -> Alloc:
        return self.allocs.pop(alloc_id)

    def drop_pid(self, pid: int) -> tuple[list[Alloc], list[Waiter]]:
        """Free every allocation of pid and take its requests off the queue."""
        gone = [a for a in self.allocs.values() if a.pid == pid]
        for a in gone:
            del self.allocs[a.id]
        waiting = [w for w in self.queue if w.pid == pid]
        self.queue = [w for w in self.queue if w.pid != pid]
        return gone, waiting

    def restore(self, a: Alloc) -> str | None:
        """Take back an allocation from the journal; why not, or None when taken."""
        if len(set(a.devices)) != len(a.devices) or not a.devices:
            return "its devices are not distinct"
        for d in a.devices:
            if d not in self.gpus:
                return f"device {d} is gone"
            if self.held_exclusively(d) or (a.exclusive and self.busy(d)):
                return f"device {d} is held exclusively"
            if self.free(d) < a.bytes_each:
                return f"device {d} has not {a.bytes_each} bytes free"
        if a.id in self.allocs:
            return "its id is taken"
        self.allocs[a.id] = a
        return None

    def check(self) -> None:
        """Assert the invariants (cheap; the driver runs it after every change)."""
        for g in self.gpus.values():
            on = [a for a in self.allocs.values() if g.id in a.devices]
            assert sum(a.bytes_each for a in on) <= g.capacity, (g.id, on)
            assert not any(a.exclusive for a in on) or len(on) == 1, (g.id, on)
        for a in self.allocs.values():
            assert len(set(a.devices)) == len(a.devices), a
