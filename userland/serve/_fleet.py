"""A deployment's replicas, as serve runs them: spawned, routed to, watched, scaled.

Each replica is drivers/executor/replica.py, spawned through the kernel as the
deployment owner's uid, holding its own alloc_gpu allocation. Replicas connect
DEALERs to the fleet's ROUTER (run/serve-gw.sock, in the home's run directory, mode
0600). A request goes to the ready replica with the fewest ongoing requests,
waiting in the deployment's bounded queue when every replica is full (429 beyond
it). A replica that dies has its requests sent again to another (the same seed
gives the same text) when nothing of them has gone to the client yet (a request
that is not streamed: all of it), else ended with EIO; the autoscaler (a tick every
TICK_S, userland/serve/_deploy.py's policy) replaces it.

A request's events: ("queued",) first when it waits for a replica (so that a
stream's headers need not wait with it), ("chunk", text, tokens), ("restart",)
when its replica died and it starts again elsewhere, then ("done", record) or
("error", errno, message).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import msgpack
import zmq
import zmq.asyncio

from syscalls import Errno, Home, SyscallError
from syscalls.client import alive

from ._deploy import REPLICA_KEYS, Autoscaler, read_specs, specs_file, status_file

log = logging.getLogger("llmos.serve")

TICK_S = 0.25
REPLICA_SILENCE_S = 3.0     # no heartbeat this long: the replica is lost
REPLICA_START_S = 120.0     # spawned and never heard from: lost
MAX_ATTEMPTS = 3            # a request sent again after its replica died, at most
BACKOFF_MAX_S = 30.0


def overloaded(message: str, retry_after: float) -> SyscallError:
    """EAGAIN for a deployment whose queue is full: 429 with Retry-After."""
    e = SyscallError(Errno.EAGAIN, message)
    e.retry_after = retry_after  # type: ignore[attr-defined]
    return e


def serve_clock() -> float:
    """monotonic time, plus the offset in $LLMOS_SERVE_CLOCK's file when it is set:
    tests move the autoscaler's clock forward by writing seconds there."""
    path = os.environ.get("LLMOS_SERVE_CLOCK")
    offset = 0.0
    if path:
        try:
            offset = float(open(path).read().strip() or 0)
        except (OSError, ValueError):
            pass
    return time.monotonic() + offset


@dataclass
class Job:
    id: int
    uid: int
    args: dict
    events: asyncio.Queue
    queued_at: float = 0.0
    stream: bool = False         # its text goes to the client as it comes
    sent: bool = False           # text of it has gone (or is on its way) to the client
    replica: "Replica | None" = None
    attempts: int = 0
    finished: bool = False


@dataclass
class Replica:
    pid: int
    spawned_at: float
    state: str = "starting"       # starting | waiting | loading | ready | failed
    ident: bytes = b""
    os_pid: int | None = None
    last_seen: float = 0.0
    jobs: dict[int, Job] = field(default_factory=dict)
    draining: bool = False
    stale: bool = False           # started with a spec that has changed: drains for good
    bytes: int = 0

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "state": "draining" if self.draining else self.state,
                "ongoing": len(self.jobs), "os_pid": self.os_pid, "bytes": self.bytes}


@dataclass
class Deployment:
    spec: dict
    scaler: Autoscaler
    replicas: dict[int, Replica] = field(default_factory=dict)
    queue: collections.deque = field(default_factory=collections.deque)
    desired: int = 0
    wanted: int = 0              # what the load asks for, before the delays
    requests: int = 0
    rejected: int = 0            # 429s
    lost_replicas: int = 0
    failures: int = 0            # replicas that failed to start in a row
    retry_at: float = 0.0
    last_error: tuple[int, str] | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def ongoing(self) -> int:
        return sum(len(r.jobs) for r in self.replicas.values()) + len(self.queue)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state != "failed"]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.spec["model"], "owner": self.spec["owner"],
                "min": self.spec["min"], "max": self.spec["max"],
                "target_ongoing": self.spec["target_ongoing"], "desired": self.desired,
                "wanted": self.wanted,
                "running": sum(r.state == "ready" for r in self.replicas.values()),
                "replicas": [r.record() for r in self.replicas.values()],
                "ongoing": sum(len(r.jobs) for r in self.replicas.values()),
                "queued": len(self.queue), "requests": self.requests,
                "rejected": self.rejected, "lost_replicas": self.lost_replicas,
                "error": self.last_error[1] if self.last_error else None}


class Fleet:
    """Every deployment's replicas. admin_call(fn) runs fn(serve's uid-0 handle) in
    a thread; admin_pid is that handle's pid (the replicas' parent)."""

    def __init__(self, home: Home, admin_call: Callable[[Any], Awaitable[Any]],
                 admin_pid: int, replica_threads: int = 1) -> None:
        self.home, self.admin_call, self.admin_pid = home, admin_call, admin_pid
        self.url = ""  # serve's, for the status file
        self.deployments: dict[str, Deployment] = {}
        self.ids = itertools.count(1)
        self.endpoint = f"ipc://{home.run / 'serve-gw.sock'}"
        self.replica_threads = replica_threads
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: Any = None
        self.tasks: list[asyncio.Task] = []
        self._specs_seen: Any = None
        self._ps_at = 0.0

    async def start(self) -> None:
        path = self.home.run / "serve-gw.sock"
        path.unlink(missing_ok=True)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(self.endpoint)
        os.chmod(path, 0o600)
        self.tasks = [asyncio.create_task(self._reader(), name="gw-reader"),
                      asyncio.create_task(self._ticker(), name="gw-ticker"),
                      asyncio.create_task(self._heartbeats(), name="gw-heartbeats")]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for d in self.deployments.values():
            for r in list(d.replicas.values()):
                await self._kill(r, "TERM")
            for job in d.queue:
                self._end(job, "error", int(Errno.EIO), "serve is stopping")
        if self.sock is not None:
            self.sock.close(0)
        (self.home.run / "serve-gw.sock").unlink(missing_ok=True)

    async def submit(self, d: Deployment, uid: int, args: dict, stream: bool
                     ) -> AsyncIterator[tuple]:
        """The events of a request to deployment d (see the module docstring)."""
        job = Job(next(self.ids), uid, {**args, "owner": uid}, asyncio.Queue(), stream=stream)
        free = self._free_replica(d)
        if free is None and len(d.queue) >= d.spec["max_queued"]:
            d.rejected += 1
            raise overloaded(f"deployment {d.name} is at capacity ({d.ongoing} requests, "
                             f"{len(d.queue)} queued)", retry_after=1)
        d.requests += 1
        job.queued_at = serve_clock()
        d.queue.append(job)
        self._dispatch(d)
        try:
            if job.replica is None:  # it waits for a replica: say so (a stream starts)
                yield ("queued",)
            while True:
                ev = await job.events.get()
                yield ev
                if ev[0] in ("done", "error"):
                    return
        finally:
            if not job.finished:
                job.finished = True
                if job in d.queue:
                    d.queue.remove(job)
                r = job.replica
                if r is not None and r.jobs.pop(job.id, None) is not None:
                    # after its "req", which _dispatch sent the same way
                    asyncio.ensure_future(self._send(r, {"t": "cancel", "id": job.id}))
                    self._dispatch(d)

    def _free_replica(self, d: Deployment) -> Replica | None:
        ready = [r for r in d.replicas.values() if r.state == "ready" and not r.draining
                 and len(r.jobs) < d.spec["max_ongoing"]]
        return min(ready, key=lambda r: len(r.jobs)) if ready else None

    def _dispatch(self, d: Deployment) -> None:
        while d.queue:
            r = self._free_replica(d)
            if r is None:
                return
            job = d.queue.popleft()
            job.replica, job.attempts = r, job.attempts + 1
            r.jobs[job.id] = job
            asyncio.ensure_future(self._send(r, {"t": "req", "id": job.id, "args": job.args}))

    def _end(self, job: Job, *ev: Any) -> None:
        job.events.put_nowait(tuple(ev))

    async def _send(self, r: Replica, msg: dict) -> None:
        if not r.ident:
            return
        try:
            await self.sock.send_multipart([r.ident, msgpack.packb(msg, use_bin_type=True)])
        except zmq.ZMQError:  # gone: the tick finds it lost
            pass

    # -- replicas' messages ---------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                ident, data = await self.sock.recv_multipart()
                msg = msgpack.unpackb(data, raw=False)
                if isinstance(msg, dict):
                    self._on_replica(ident, msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bad message from a replica")

    def _find(self, ident: bytes, msg: dict) -> tuple[Deployment, Replica] | None:
        for d in self.deployments.values():
            for r in d.replicas.values():
                if r.ident == ident:
                    return d, r
        if msg.get("t") == "state":  # its first word: it names itself
            d = self.deployments.get(msg.get("deployment"))
            r = d.replicas.get(msg.get("pid")) if d else None
            if r is not None and not r.ident:
                r.ident = ident
                return d, r
        return None

    def _on_replica(self, ident: bytes, msg: dict) -> None:
        found = self._find(ident, msg)
        if found is None:  # a replica this gateway no longer runs (or never did)
            asyncio.ensure_future(self.sock.send_multipart(
                [ident, msgpack.packb({"t": "bye"})]))
            return
        d, r = found
        r.last_seen = time.monotonic()
        t = msg.get("t")
        if t == "state":
            r.state, r.os_pid = msg.get("state", r.state), msg.get("os_pid", r.os_pid)
            r.bytes = msg.get("bytes", r.bytes)
            if r.state == "failed":
                d.failures += 1
                d.last_error = (int(msg.get("errno", Errno.EIO)), msg.get("error", "failed"))
                d.retry_at = serve_clock() + min(BACKOFF_MAX_S, 0.5 * 2 ** d.failures)
                self._lose(d, r, kill=False)
                if not d.live():  # nothing can serve: tell the waiting why
                    while d.queue:
                        job = d.queue.popleft()
                        job.finished = True
                        self._end(job, "error", *d.last_error)
            elif r.state == "ready":
                d.failures, d.last_error = 0, None
            self._dispatch(d)
        elif t in ("chunk", "done", "error"):
            job = r.jobs.get(msg.get("id"))
            if job is None:
                return
            if t == "chunk":
                job.sent = job.sent or job.stream
                self._end(job, "chunk", msg["text"], msg["tokens"])
                return
            del r.jobs[job.id]
            job.finished = True
            if t == "done":
                self._end(job, "done", {k: msg[k] for k in (
                    "text", "tokens", "prompt_tokens", "finish_reason", "seed", "time_s")})
            else:
                self._end(job, "error", msg.get("errno", Errno.EIO), msg.get("message", ""))
            self._dispatch(d)

    def _lose(self, d: Deployment, r: Replica, kill: bool = True) -> None:
        """r is gone (dead, silent or failed): its requests go to another replica, or
        end with EIO when part of them has reached the client."""
        d.replicas.pop(r.pid, None)
        if r.state != "failed":
            d.lost_replicas += 1
            log.warning("replica %d of %s lost (%d requests)", r.pid, d.name, len(r.jobs))
        for job in reversed(list(r.jobs.values())):
            job.replica = None
            if job.sent or job.attempts >= MAX_ATTEMPTS:
                job.finished = True
                self._end(job, "error", int(Errno.EIO), f"deployment {d.name}: replica "
                          f"{r.pid} died during the request")
            else:
                self._end(job, "restart")
                job.queued_at = serve_clock()  # its wait starts again
                d.queue.appendleft(job)
        r.jobs.clear()
        if kill:
            asyncio.ensure_future(self._kill(r, "KILL"))

    async def _kill(self, r: Replica, sig: str) -> None:
        try:
            await self.admin_call(lambda osh: osh.kill(r.pid, sig))
        except SyscallError:
            pass

    # -- the autoscaler's tick ------------------------------------------------------

    async def _heartbeats(self) -> None:
        """A word to every replica each half second (they leave after 5 s without
        one); no syscall on the way, so nothing slow holds it up."""
        while True:
            for d in list(self.deployments.values()):
                for r in list(d.replicas.values()):
                    if r.ident:
                        await self._send(r, {"t": "hb"})
            await asyncio.sleep(0.5)

    async def _ticker(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serve tick failed")
            await asyncio.sleep(TICK_S)

    def _reload_specs(self) -> None:
        try:
            st = specs_file(self.home).stat()
            sig: Any = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if sig == self._specs_seen:
            return
        self._specs_seen = sig
        specs = read_specs(self.home) if sig else {}
        for name in list(self.deployments):
            if name not in specs:
                d = self.deployments.pop(name)
                for r in list(d.replicas.values()):
                    asyncio.ensure_future(self._kill(r, "TERM"))
                for job in list(d.queue) + [j for r in d.replicas.values()
                                            for j in r.jobs.values()]:
                    job.finished = True
                    self._end(job, "error", int(Errno.ENOENT), f"deployment {name} was removed")
        for name, spec in specs.items():
            have = self.deployments.get(name)
            if have is None:
                self.deployments[name] = Deployment(spec, Autoscaler(spec))
                continue
            if any(have.spec.get(k) != spec.get(k) for k in REPLICA_KEYS):
                for r in have.replicas.values():  # they finish what they have, then stop
                    r.draining = r.stale = True
            have.spec = have.scaler.spec = spec

    async def tick(self) -> None:
        self._reload_specs()
        now, mono = serve_clock(), time.monotonic()
        running: set[int] | None = None
        if mono - self._ps_at > 2.0:
            self._ps_at = mono
            try:
                procs = await self.admin_call(lambda osh: osh.ps())
                running = {p["pid"] for p in procs if p["state"] == "running"}
                for p in procs:  # replicas that ended: reap them
                    if p["state"] == "zombie" and p["ppid"] == self.admin_pid:
                        await self.admin_call(lambda osh, pid=p["pid"]: osh.wait(pid, 0))
            except SyscallError:
                running = None
        for d in self.deployments.values():
            for r in list(d.replicas.values()):
                dead = (r.os_pid is not None and not alive(r.os_pid)) or \
                    (running is not None and r.pid not in running and
                     mono - r.spawned_at > 2.0)
                silent = mono - (r.last_seen or r.spawned_at) > (
                    REPLICA_SILENCE_S if r.last_seen else REPLICA_START_S)
                if dead or silent:
                    self._lose(d, r)
                elif r.draining and not r.jobs:
                    d.replicas.pop(r.pid)
                    asyncio.ensure_future(self._kill(r, "TERM"))
            # requests that waited too long for any replica
            limit = d.spec.get("queue_timeout_s", 60.0)
            for job in [j for j in d.queue if now - j.queued_at > limit]:
                d.queue.remove(job)
                job.finished = True
                self._end(job, "error", int(Errno.ETIMEDOUT), f"deployment {d.name}: no "
                          f"replica took the request in {limit:g} s")
            await self._scale(d, now)
            self._dispatch(d)
        self._write_status()

    async def _scale(self, d: Deployment, now: float) -> None:
        active = [r for r in d.replicas.values() if not r.draining]
        d.desired = d.scaler.decide(now, d.ongoing, len(active))
        d.wanted = d.scaler.last_want
        if d.desired > len(active):
            # a draining replica that is wanted again goes back to work first
            for r in d.replicas.values():
                if r.draining and not r.stale and len(active) < d.desired:
                    r.draining = False
                    active.append(r)
            if now < d.retry_at:
                return
            for _ in range(d.desired - len(active)):
                await self._spawn(d)
        elif d.desired < len(active):
            # the idlest first, those not yet ready before them
            order = sorted(active, key=lambda r: (r.state == "ready", len(r.jobs)))
            for r in order[:len(active) - d.desired]:
                r.draining = True
                if not r.jobs:
                    d.replicas.pop(r.pid)
                    await self._kill(r, "TERM")

    async def _spawn(self, d: Deployment) -> None:
        s = d.spec
        argv = [sys.executable, "-m", "drivers.executor.replica", "--deployment", d.name,
                "--model", s["model"], "--gateway", self.endpoint,
                "--gpu-mem", str(s["gpu_mem"]), "--max-batch", str(s["max_ongoing"]),
                "--threads", str(self.replica_threads)]
        try:
            pid = await self.admin_call(lambda osh: osh.spawn(argv, uid=s["owner"]))
        except SyscallError as e:
            d.failures += 1
            d.last_error = (int(e.errno), f"spawn: {e.message}")
            d.retry_at = serve_clock() + min(BACKOFF_MAX_S, 0.5 * 2 ** d.failures)
            return
        d.replicas[pid] = Replica(pid, time.monotonic())
        log.info("deployment %s: replica %d started", d.name, pid)

    def _write_status(self) -> None:
        data = {"pid": self.admin_pid, "os_pid": os.getpid(), "url": self.url,
                "updated": time.time(),
                "deployments": [d.record() for d in self.deployments.values()]}
        path = status_file(self.home)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError:
            pass
