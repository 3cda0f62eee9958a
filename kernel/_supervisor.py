"""Driver supervision and routing, after MINIX's reincarnation server and Majordomo.

Each driver is an OS process the kernel starts (`python -m drivers.<name>`) and
watches. A driver instance has an epoch and an unguessable routing id
`<name>.<epoch>.<random>`, given to it at start; messages from any other id (an
older instance) are dropped and counted (stale_driver). A driver that exits
or misses `driver_liveness` heartbeats is killed and restarted: at once when it
had been ready for STABLE_S, after an exponential backoff when it dies starting
(a crash loop); its calls in flight are retried once when the syscall is
idempotent and answered EIO otherwise. Calls for a driver that is not ready wait in
its backlog for up to `driver_wait_s`, then get EIO. A driver dies with its kernel
(PR_SET_PDEATHSIG), whatever it is doing, so none outlives it. A starting driver
may take as long as it needs while it shows progress (heartbeats before its
ready); one silent for READY_TIMEOUT_S is killed. After a stall of the kernel
itself (stopped, swapped out, a paused VM) every deadline moves by the stall, so
a kernel that did not run never blames its drivers for not being heard.

It is given what it needs (the outbox to send on, the process table, the
configuration, the statistics and the Spawner) and never imports the kernel: a
routed call is the caller's Call, answered through it.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from syscalls import Config, Errno, Home, SyscallError, WireError, decode, encode, wire

from ._call import Call, Outbox
from ._proctable import Process, ProcessTable
from ._spawn import Spawner, die_with_kernel

log = logging.getLogger("llmos.supervisor")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# A driver that dies before it is ready, or within STABLE_S of it, is in a crash
# loop: its restarts back off. One that served longer was killed or failed at
# work: it restarts at once (BACKOFF_FIRST_S), whatever came before.
STABLE_S = 1.0
READY_TIMEOUT_S = 15.0


@dataclass
class Routed:
    """A call routed to a driver and not yet finally answered."""
    call: Call
    queued_at: float = 0.0
    retried: bool = False
    cancelled: bool = False  # the caller gave up on it

    @property
    def pid(self) -> int:
        return self.call.pid


@dataclass
class Driver:
    name: str
    epoch: int = 0
    state: str = "down"               # down | starting | ready
    popen: subprocess.Popen | None = None
    ident: bytes = b""
    token: str = ""
    started_at: float = 0.0
    ready_at: float | None = None     # when this instance became ready
    last_seen: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST_S
    restart_at: float = 0.0
    restart_delay: float | None = None  # how long the last restart waited
    inflight: dict[int, Routed] = field(default_factory=dict)
    backlog: deque[Routed] = field(default_factory=deque)
    last_exit: str = ""
    info: dict = field(default_factory=dict)  # the driver's own status summary


class Supervisor:
    def __init__(self, home: Home, config: Config, outbox: Outbox, table: ProcessTable,
                 spawner: Spawner) -> None:
        self.home = home
        self.config = config
        self.outbox = outbox
        self.stats = outbox.stats
        self.table = table
        self.spawner = spawner
        self.hb_s = config.driver_heartbeat_s
        self.dead_after_s = config.driver_heartbeat_s * config.driver_liveness
        self.wait_s = config.driver_wait_s
        self.drivers: dict[str, Driver] = {name: Driver(name) for name in config.drivers}
        self.by_ident: dict[bytes, Driver] = {}
        self.inflight: dict[int, int] = {}  # pid -> its calls in flight to drivers
        self.next_id = 1
        self.next_hb = 0.0
        self.stopping = False
        self.extra_env: dict[str, str] = {}  # for every driver (LLMOS_NET_HOST)

    # -- starting and stopping ------------------------------------------------------

    def start_all(self) -> None:
        for d in self.drivers.values():
            self._start(d)

    def _start(self, d: Driver) -> None:
        d.epoch += 1
        d.token = secrets.token_hex(16)
        # unguessable: drivers and clients share the kernel's socket, and a client
        # must not be able to connect under a driver's routing id
        d.ident = f"{d.name}.{d.epoch}.{secrets.token_hex(8)}".encode()
        env = dict(os.environ, **self.extra_env)
        env.update(LLMOS_HOME=str(self.home.root), LLMOS_DRIVER_ID=d.ident.decode(),
                   LLMOS_DRIVER_TOKEN=d.token, LLMOS_KERNEL_PID=str(os.getpid()),
                   PYTHONPATH=os.pathsep.join(filter(None, [_project_root(),
                                                            env.get("PYTHONPATH")])))
        logfile = self.home.driver_log(d.name)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "ab") as out:
            d.popen = subprocess.Popen([sys.executable, "-m", f"drivers.{d.name}"], env=env,
                                       stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, preexec_fn=die_with_kernel)
        self.by_ident[d.ident] = d
        d.state = "starting"
        d.started_at = d.last_seen = time.monotonic()
        d.ready_at = None
        log.info("driver %s epoch %d started (os pid %d)", d.name, d.epoch, d.popen.pid)

    def _died(self, d: Driver, why: str) -> None:
        """Declare the current instance dead: kill it, settle its calls, plan a restart."""
        log.warning("driver %s epoch %d is dead: %s", d.name, d.epoch, why)
        d.last_exit = why
        if d.popen is not None and d.popen.poll() is None:
            d.popen.kill()
            d.popen.wait()
        self.by_ident.pop(d.ident, None)
        d.state = "down"
        now = time.monotonic()
        if d.ready_at is not None and now - d.ready_at > STABLE_S:
            d.backoff = BACKOFF_FIRST_S
        d.restart_at = now + d.backoff
        d.restart_delay = d.backoff
        d.backoff = min(BACKOFF_MAX_S, d.backoff * 2)
        d.restarts += 1
        for r in d.inflight.values():
            if r.call.syscall.idempotent and not r.retried:
                r.retried = True
                r.queued_at = now
                d.backlog.appendleft(r)
            else:
                self._fail(r, Errno.EIO, f"driver {d.name} died while serving "
                           f"{r.call.name} ({why})")
        d.inflight.clear()

    def stop_all(self) -> None:
        self.stopping = True
        for d in self.drivers.values():
            if d.state != "down":
                self._send(d, wire.stop())
            for r in [*d.inflight.values(), *d.backlog]:
                self._fail(r, Errno.EIO, "llmos is shutting down")
            d.inflight.clear()
            d.backlog.clear()
        deadline = time.monotonic() + 3.0
        for d in self.drivers.values():
            if d.popen is None:
                continue
            try:
                d.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.popen.send_signal(signal.SIGTERM)
                try:
                    d.popen.wait(1.0)
                except subprocess.TimeoutExpired:
                    d.popen.kill()
                    d.popen.wait()

    # -- routing --------------------------------------------------------------------

    def route(self, call: Call) -> None:
        """Send call to the driver of its service (or hold it until that driver is
        ready); the driver's answer goes back through call."""
        d = self.drivers.get(call.syscall.service)
        if d is None:
            raise SyscallError(Errno.ENOSYS, f"{call.name}: no {call.syscall.service} "
                               "driver is configured")
        pid = call.pid
        inflight = self.inflight.get(pid, 0)
        if inflight >= self.config.max_inflight_per_process:
            raise SyscallError(Errno.EAGAIN, f"{call.name}: process {pid} has "
                               f"{inflight} calls in flight; wait for some replies")
        self.inflight[pid] = inflight + 1
        r = Routed(call, time.monotonic())
        if d.state == "ready":
            self._dispatch(d, r)
        else:
            d.backlog.append(r)

    def _dispatch(self, d: Driver, r: Routed) -> None:
        rid = self.next_id
        self.next_id += 1
        d.inflight[rid] = r
        c = r.call
        assert c.proc is not None
        head = wire.driver_request(rid, c.syscall.number, c.args, c.proc.pid, c.proc.uid)
        failure = self._send(d, head, c.bulk)
        if failure == "full":
            del d.inflight[rid]
            self._fail(r, Errno.EAGAIN, f"driver {d.name} has too many requests queued")
        elif failure == "gone":
            # Never delivered, so safe to send again whatever the syscall: keep it
            # for the next instance of a driver whose connection is gone.
            del d.inflight[rid]
            r.queued_at = time.monotonic()
            d.backlog.appendleft(r)
            self._died(d, "its connection is gone")

    def _send(self, d: Driver, head: dict, bulk: list | tuple = ()) -> str | None:
        """Send to the driver's current instance: None when sent, else "full"
        (its queue is at the high-water mark) or "gone" (no connection)."""
        return self.outbox.send(d.ident, encode(head, bulk), full="driver_queue_full",
                                gone="driver_unroutable")

    def _fail(self, r: Routed, errno: Errno, message: str) -> None:
        self._settle(r)
        r.call.fail(errno, message)

    def _settle(self, r: Routed) -> None:
        pid = r.pid
        n = self.inflight.get(pid, 0)
        if n > 1:
            self.inflight[pid] = n - 1
        else:
            self.inflight.pop(pid, None)

    # -- messages from drivers --------------------------------------------------------

    def on_message(self, frames: list[bytes]) -> None:
        ident = frames[0]
        try:
            head = decode(frames[1:], refs=True)
        except WireError:
            self.stats.drop("driver_malformed")
            return
        kind = head.get(wire.KIND)
        d = self.by_ident[ident]
        d.last_seen = time.monotonic()
        if kind == wire.REPLY:
            self._on_reply(d, head, frames[2:])
        elif kind == wire.READY:
            self._on_ready(d, head)
        elif kind == wire.HEARTBEAT:
            info = head.get(wire.INFO)
            if type(info) is dict:
                d.info = info
        else:
            self.stats.drop("driver_malformed")

    def _on_ready(self, d: Driver, head: dict) -> None:
        if head.get("token") != d.token or d.state != "starting":
            self.stats.drop("driver_bad_ready")
            return
        d.state = "ready"
        d.ready_at = time.monotonic()
        log.info("driver %s epoch %d is ready", d.name, d.epoch)
        self._send(d, wire.welcome([p.pid for p in self.table.live()]))
        while d.backlog and d.state == "ready":
            self._dispatch(d, d.backlog.popleft())

    def _on_reply(self, d: Driver, head: dict, bulk: list) -> None:
        rid = head.get(wire.ID)
        r = d.inflight.get(rid) if type(rid) is int else None
        if r is None:
            self.stats.drop("driver_unknown_reply")
            return
        final = not head.get(wire.PARTIAL)
        if final:
            del d.inflight[rid]
            self._settle(r)
        c = r.call
        proc = self.table.get(c.pid)
        if proc is None or proc.state != "running" or proc.conn != c.conn:
            self.stats.drop("reply_to_gone_process")
            return
        self._account(proc, head.get(wire.RESOURCES))
        if wire.ERRNO in head:
            errno = head[wire.ERRNO] if type(head[wire.ERRNO]) is int else int(Errno.EIO)
            msg = head.get(wire.MESSAGE)
            c.fail(errno, msg if type(msg) is str else "")
        elif final and c.syscall.spawns and r.cancelled:  # nobody would learn its pid
            c.fail(Errno.ECANCELED, f"{c.name}: cancelled; nothing was started")
        elif final and c.syscall.spawns:
            self._spawn_for(proc, c, head.get(wire.RESULT))
        elif final:
            c.reply(head.get(wire.RESULT), bulk)
        else:
            c.partial(head.get(wire.RESULT), bulk)

    def _spawn_for(self, proc: Process, c: Call, plan: Any) -> None:
        """A spawns syscall's driver answered with a program, {argv, env, cwd}: start it
        as the caller's child, as spawn would, and answer the caller with its pid."""
        if (type(plan) is not dict or type(plan.get("argv")) is not list
                or not all(type(a) is str for a in plan["argv"])
                or type(plan.get("env", {})) is not dict
                or not all(type(k) is str and type(v) is str
                           for k, v in plan.get("env", {}).items())):
            c.fail(Errno.EIO, f"{c.name}: driver {c.syscall.service} answered with no "
                   "program to spawn")
            return
        cwd = plan.get("cwd") if type(plan.get("cwd")) is str else None
        try:
            child = self.spawner.spawn(proc, plan["argv"], cwd=cwd,
                                       env=plan.get("env") or None)
        except SyscallError as e:
            c.fail(e)
            return
        c.reply(child.pid)

    def cancel(self, conn: bytes, seq: int) -> None:
        """Tell the driver serving call seq of conn that its caller gave up."""
        for d in self.drivers.values():
            for rid, r in d.inflight.items():
                if r.call.conn == conn and r.call.seq == seq:
                    r.cancelled = True
                    self._send(d, wire.driver_cancel(rid))
                    return
            for r in d.backlog:  # not sent yet: the driver will see it cancelled
                if r.call.conn == conn and r.call.seq == seq:
                    r.cancelled = True
                    return

    def _account(self, proc: "Process", changes: Any) -> None:
        """Apply a driver's resource changes, [[op, kind, id], ...] with op + or -,
        to the caller, or [op, kind, id, pid] to process pid."""
        if type(changes) is not list:
            return
        for ch in changes:
            if type(ch) is not list or not all(type(x) is str for x in ch[:3]):
                continue
            if len(ch) == 4 and type(ch[3]) is int:
                target = self.table.get(ch[3])
            elif len(ch) == 3:
                target = proc
            else:
                continue
            if target is not None:
                op, kind, rid = ch[:3]
                held = target.resources.setdefault(kind, set())
                if op == "+":
                    held.add(rid)
                elif op == "-":
                    held.discard(rid)

    def notify_exit(self, pid: int) -> None:
        """Tell every ready driver that a process ended, so it reclaims what it held;
        its calls not yet sent are dropped (nobody would read the answers)."""
        self.inflight.pop(pid, None)
        for d in self.drivers.values():
            if d.state == "ready":
                self._send(d, wire.exit_notice(pid))
            for r in [r for r in d.backlog if r.pid == pid]:
                d.backlog.remove(r)

    # -- periodic work ----------------------------------------------------------------

    def tick(self, now: float) -> None:
        send_hb = now >= self.next_hb
        if send_hb:
            self.next_hb = now + self.hb_s
        for d in self.drivers.values():
            if d.state == "down":
                if now >= d.restart_at and not self.stopping:
                    self._start(d)
                else:
                    self._expire_backlog(d, now)
                continue
            rc = d.popen.poll() if d.popen is not None else None
            if rc is not None:
                self._died(d, f"exited with status {rc}")
            elif d.state == "starting" and now - d.last_seen > READY_TIMEOUT_S:
                self._died(d, f"never became ready (silent for {READY_TIMEOUT_S:g} s)")
            elif d.state == "ready" and now - d.last_seen > self.dead_after_s:
                self._died(d, "missed its heartbeats")
            elif send_hb and d.state == "ready":
                self._send(d, wire.driver_heartbeat())
            self._expire_backlog(d, now)

    def stalled(self, lag: float) -> None:
        """The kernel did not run for lag seconds: nobody could be heard meanwhile,
        so every deadline that counts from a driver's last word, or from when a
        call was queued, moves by lag."""
        for d in self.drivers.values():
            d.last_seen += lag
            d.started_at += lag
            if d.ready_at is not None:
                d.ready_at += lag
            d.restart_at += lag
            for r in d.backlog:
                r.queued_at += lag

    def _expire_backlog(self, d: Driver, now: float) -> None:
        while d.backlog and now - d.backlog[0].queued_at > self.wait_s:
            self._fail(d.backlog.popleft(), Errno.EIO,
                       f"driver {d.name} is not available ({d.last_exit or 'starting'})")

    def os_pids(self) -> list[int]:
        return [d.popen.pid for d in self.drivers.values()
                if d.popen is not None and d.popen.poll() is None]

    def describe(self) -> list[dict]:
        now = time.monotonic()
        return [{"name": d.name, "state": d.state, "epoch": d.epoch,
                 "os_pid": d.popen.pid if d.popen is not None and d.state != "down" else None,
                 "restarts": d.restarts, "uptime_s": round(now - d.started_at, 3)
                 if d.state == "ready" else None, "inflight": len(d.inflight),
                 "backlog": len(d.backlog), "last_exit": d.last_exit,
                 "restart_delay_s": d.restart_delay,
                 "info": d.info if d.state == "ready" else {}}
                for d in self.drivers.values()]


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
