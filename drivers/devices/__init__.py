"""The devices driver: CPUs, memory and GPUs, and the GPU allocator.

    alloc_gpu(mem, count=1, exclusive=False, wait=False, timeout=None, priority=0)
    free_gpu(alloc_id)
    devices()

GPUs are the real NVIDIA ones NVML finds (keyed by UUID) or, when there are none
(or config says gpus = "sim"), simulated ones from LLMOS_SIM_GPUS or the
sim_gpus setting ("2x16GiB"). The allocation policy lives in _alloc.py. The
allocation table is journaled to LLMOS_HOME/devices/allocations.json (written to
a temporary file, fsynced, renamed over, the directory fsynced) before any reply
that depends on it, so a restarted driver takes it back, then drops the
allocations of processes the kernel's welcome does not list as live. Waiting
requests are not journaled: the kernel answers them EIO when the driver dies
(alloc_gpu is not idempotent). See docs/devices.md.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import psutil

from drivers import DEFERRED, DriverLoop, Request, Service
from syscalls import Errno, SyscallError, format_size

from . import _discover
from ._alloc import Alloc, Allocator, Gpu, Waiter

log = logging.getLogger("llmos.devices")

JOURNAL_VERSION = 1
MAX_TOMBSTONES = 4096


def boot_id() -> str:
    """Names this kernel's life: a journal from another boot is not ours (pids are
    reused across boots)."""
    kpid = int(os.environ.get("LLMOS_KERNEL_PID", "0") or 0)
    try:
        started = psutil.Process(kpid).create_time() if kpid else 0.0
    except psutil.Error:
        started = 0.0
    return f"{kpid}:{started}"


def write_atomically(path: Path, data: bytes) -> None:
    """Replace path with data so that a crash leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Devices(Service):
    name = "devices"
    serves = ("alloc_gpu", "free_gpu", "devices")

    def __init__(self, loop: DriverLoop) -> None:
        super().__init__(loop)
        gpus: list[Gpu] = _discover.nvml_gpus() if self.config.gpus == "auto" else []
        self.simulated = not gpus
        if self.simulated:  # LLMOS_SIM_GPUS: llmos start --sim-gpus, over config.toml
            gpus = _discover.simulated_gpus(os.environ.get("LLMOS_SIM_GPUS")
                                            or self.config.sim_gpus)
        self.alloc = Allocator(gpus, self.config.gpu_max_bypass,
                               dict(self.config.gpu_quota))
        self.tombstones: OrderedDict[str, int] = OrderedDict()  # freed id -> its pid
        self.journal = self.home.root / "devices" / "allocations.json"
        self.boot = boot_id()
        self.load()
        log.info("%d %s GPU(s): %s", len(gpus), "simulated" if self.simulated else "real",
                 ", ".join(f"{g.id} {g.capacity}" for g in gpus) or "none")

    # -- the journal ----------------------------------------------------------------

    def load(self) -> None:
        try:
            data = json.loads(self.journal.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("unreadable journal %s (%s): starting with no allocations",
                      self.journal, e)
            return
        if data.get("version") != JOURNAL_VERSION or data.get("boot") != self.boot:
            log.info("journal %s is from another boot: not taken back", self.journal)
            return
        for rec in data.get("allocations", []):
            try:
                a = Alloc(str(rec["id"]), int(rec["pid"]), int(rec["uid"]),
                          [str(d) for d in rec["devices"]], int(rec["bytes_each"]),
                          bool(rec["exclusive"]), float(rec["t"]))
            except (KeyError, TypeError, ValueError) as e:
                log.error("journal: dropped a malformed allocation %r (%s)", rec, e)
                continue
            why = self.alloc.restore(a)
            if why is not None:
                log.error("journal: dropped allocation %s of pid %d: %s", a.id, a.pid, why)
        for aid, pid in data.get("freed", []):
            self.tombstones[str(aid)] = int(pid)
        log.info("journal: took back %d allocation(s)", len(self.alloc.allocs))

    def save(self) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": JOURNAL_VERSION, "boot": self.boot,
                "allocations": [a.to_json() for a in self.alloc.allocs.values()],
                "freed": [[k, v] for k, v in self.tombstones.items()]}
        write_atomically(self.journal, json.dumps(data).encode())

    # -- making changes -----------------------------------------------------------------

    def commit(self, grants: list[tuple[Waiter, Alloc]]) -> None:
        """After any change: check, journal, then answer the granted requests."""
        self.alloc.check()
        self.save()
        for w, a in grants:
            req: Request = w.ctx
            if req.done:
                continue
            req.hold("gpu", a.id)
            req.reply(self.describe_alloc(a))

    def describe_alloc(self, a: Alloc) -> dict[str, Any]:
        gpus = [self.alloc.gpus[d] for d in a.devices]
        return {"id": a.id, "devices": list(a.devices), "bytes_each": a.bytes_each,
                "count": len(a.devices), "exclusive": a.exclusive,
                "simulated": all(g.simulated for g in gpus),
                "capacity": [g.capacity for g in gpus]}

    def forget(self, a: Alloc) -> None:
        self.tombstones[a.id] = a.pid
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    # -- syscalls -----------------------------------------------------------------------

    def alloc_gpu(self, req: Request, mem: int, count: int, exclusive: bool, wait: bool,
                  timeout: float | None, priority: int) -> object:
        if priority > 0 and req.uid != 0:
            raise SyscallError(Errno.EPERM, f"alloc_gpu: priority {priority} is for uid 0; "
                               "others may ask for 0 or less")
        al = self.alloc
        if al.never_fits(mem, count):
            big = max((g.capacity for g in al.gpus.values()), default=0)
            raise SyscallError(Errno.ENOMEM, f"alloc_gpu: {count} device(s) of "
                               f"{format_size(mem)} can never be met: {len(al.gpus)} "
                               f"GPU(s), the largest of {format_size(big)}")
        quota = al.over_quota(req.uid, mem, count)
        if quota is not None:
            raise SyscallError(Errno.EDQUOT, f"alloc_gpu: uid {req.uid} holds or waits for "
                               f"{format_size(al.uid_bytes(req.uid))}; "
                               f"{format_size(mem * count)} more is over its quota of "
                               f"{format_size(quota)}")
        w = al.new_waiter(req.pid, req.uid, mem, count, exclusive, priority, wait, req)
        al.enqueue(w)
        grants = al.schedule()
        if w in al.queue and not wait:
            al.queue.remove(w)
            if grants:
                self.commit(grants)
            raise SyscallError(Errno.ENOMEM, f"alloc_gpu: no {count} device(s) with "
                               f"{format_size(mem)} free"
                               f"{' for exclusive use' if exclusive else ''} now "
                               "(asked with wait, it queues)")
        self.commit(grants)
        if w in al.queue and timeout is not None:
            req.loop.call_later(timeout, lambda: self.expire(w))
        return DEFERRED

    def expire(self, w: Waiter) -> None:
        if w not in self.alloc.queue:
            return
        self.alloc.queue.remove(w)
        w.ctx.fail(Errno.ETIMEDOUT, f"alloc_gpu: not met within the timeout "
                   f"({time.monotonic() - w.t0:.3f}s waited)")
        self.commit(self.alloc.schedule())

    def free_gpu(self, req: Request, alloc_id: str) -> None:
        a = self.alloc.allocs.get(alloc_id)
        if a is None:
            if self.tombstones.get(alloc_id) == req.pid:
                req.release("gpu", alloc_id)  # freed already (a retried call)
                return None
            raise SyscallError(Errno.EBADF, f"free_gpu: no allocation {alloc_id!r}")
        if a.pid != req.pid and req.uid != 0:
            raise SyscallError(Errno.EPERM, f"free_gpu: allocation {alloc_id} belongs to "
                               f"pid {a.pid}")
        self.alloc.release(alloc_id)
        self.forget(a)
        req.release("gpu", alloc_id, pid=a.pid)
        self.commit(self.alloc.schedule())
        return None

    def devices(self, req: Request) -> dict[str, Any]:
        al = self.alloc
        gpus = []
        for g in al.gpus.values():
            on = [a for a in al.allocs.values() if g.id in a.devices]
            gpus.append({
                "id": g.id, "index": g.index, "name": g.name, "simulated": g.simulated,
                "capacity": g.capacity, "allocated": sum(a.bytes_each for a in on),
                "free": al.free(g.id), "exclusive": al.held_exclusively(g.id),
                "allocations": [{"id": a.id, "pid": a.pid, "uid": a.uid,
                                 "bytes": a.bytes_each, "exclusive": a.exclusive}
                                for a in on],
                **_discover.live_stats(g)})
        now = time.monotonic()
        return {"gpus": gpus, "simulated": self.simulated,
                "cpus": _discover.cpus(), "memory": _discover.memory(),
                "queue": [{"pid": w.pid, "uid": w.uid, "mem": w.mem, "count": w.count,
                           "exclusive": w.exclusive, "priority": w.priority,
                           "waited_s": round(now - w.t0, 3), "bypassed": w.bypassed}
                          for w in al.queue]}

    def status(self) -> dict[str, Any]:
        """The summary sysinfo shows: each GPU's capacity and use, and the queue."""
        al = self.alloc
        return {"gpus": [{"id": g.id, "simulated": g.simulated, "capacity": g.capacity,
                          "free": al.free(g.id),
                          "allocations": sum(g.id in a.devices for a in al.allocs.values())}
                         for g in al.gpus.values()],
                "queued": len(al.queue)}

    # -- the kernel's notices -------------------------------------------------------------

    def on_exit(self, pid: int) -> None:
        gone, waiting = self.alloc.drop_pid(pid)
        for w in waiting:  # the kernel drops the answer; it settles the call
            if not w.ctx.done:
                w.ctx.fail(Errno.ECANCELED, f"process {pid} ended")
        for a in gone:
            self.forget(a)
        if gone or waiting:
            log.info("pid %d ended: freed %d allocation(s), dropped %d request(s)",
                     pid, len(gone), len(waiting))
            self.commit(self.alloc.schedule())

    def on_welcome(self, live: list[int]) -> None:
        alive = set(live)
        dead = {a.pid for a in self.alloc.allocs.values() if a.pid not in alive}
        for pid in dead:
            for a in self.alloc.drop_pid(pid)[0]:
                self.forget(a)
                log.info("pid %d ended while the driver was down: freed %s", pid, a.id)
        self.commit(self.alloc.schedule())

