"""The one driver loop every driver runs, after MINIX's chardriver_task.

A driver is a Service: a class that names itself and the syscalls it serves (a
method of each name), and may define the hooks below. Its package's __main__
calls run_driver(TheService), which owns everything else: logging to the
driver's log, signals (SIGINT ignored, the kernel orchestrates shutdown; SIGTERM
ends the loop and still runs shutdown()), the typed configuration (Service.config),
the loop, and the background thread. The loop registers with the kernel,
heartbeats both ways, hands each request to its handler with the caller's
credentials (Request.pid, Request.uid), and sends the reply. A handler:
  - returns a result (bytes anywhere in it travel as raw frames), or
  - raises SyscallError for an errno reply (any other exception becomes EIO and is
    logged; the driver keeps serving), or
  - returns DEFERRED and answers later with req.reply()/req.fail(), e.g. from a
    timer set with loop.call_later(); req.partial() streams replies before that.
Hooks: on_exit(pid) when a process ends (reclaim what it held), on_welcome(live
pids) after each (re)start, status() for a small summary sent with every heartbeat
and shown in sysinfo (called once per heartbeat period: periodic work goes there
too), on_cancel(request id) when a caller gave up on a call, shutdown() last.
Slow work goes to loop.background(work, done, req): work() runs in the driver's
one background thread, done(result) back on the loop's thread (the only one
that sends), and a SyscallError from either answers req.
The loop exits when the kernel says stop; a driver dies with its kernel (the
kernel starts it with PR_SET_PDEATHSIG), and as a fallback the loop exits when its
parent is no longer the kernel. A kernel that is silent but alive (stopped,
swapped out) is waited for: silence alone never ends a driver. A driver whose
start is slow calls loop.progress() now and then, so the kernel sees it alive.
It must never import the kernel or userland.
"""
from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, ClassVar

import zmq

from syscalls import (BY_NAME, BY_NUMBER, MAX_HEADER, Config, Errno, Home, SyscallError,
                      WireError, decode, encode, send_frames, wire)

log = logging.getLogger("llmos.driver")

DEFERRED = object()


class Request:
    """One call being served: its caller's credentials, its args, its replies."""

    __slots__ = ("loop", "id", "name", "pid", "uid", "args", "done", "_res")

    def __init__(self, loop: "DriverLoop", rid: int, name: str, pid: int, uid: int,
                 args: dict) -> None:
        self.loop, self.id, self.name = loop, rid, name
        self.pid, self.uid, self.args = pid, uid, args
        self.done = False
        self._res: list[list[str]] = []

    def hold(self, kind: str, rid: str) -> None:
        """Record that the caller now holds resource kind:rid (shown by ps)."""
        self._res.append(["+", kind, rid])

    def release(self, kind: str, rid: str, pid: int | None = None) -> None:
        """Record that kind:rid is released: by the caller, or by process pid (an
        administrator freeing another process's resource)."""
        self._res.append(["-", kind, rid] if pid is None else ["-", kind, rid, pid])

    def partial(self, result: Any) -> None:
        self._send(result, None, "", True)

    def reply(self, result: Any = None) -> None:
        self._send(result, None, "", False)
        self.done = True

    def fail(self, errno: Errno | int, message: str) -> None:
        self._send(None, errno, message, False)
        self.done = True

    def _send(self, result: Any, errno: Errno | int | None, message: str,
              partial: bool) -> None:
        if self.done:
            raise RuntimeError(f"request {self.id} ({self.name}) was already answered")
        res, self._res = self._res, []
        frames = encode(wire.driver_reply(self.id, result, errno, message, partial, res))
        if len(frames[0]) > MAX_HEADER:  # as the kernel answers its own replies
            log.error("%s: a reply of %d bytes of header; answering E2BIG", self.name,
                      len(frames[0]))
            frames = encode(wire.driver_reply(
                self.id, errno=Errno.E2BIG, message=f"{self.loop.service} driver: "
                f"{self.name}: the reply's header is {len(frames[0])} bytes, over "
                f"{MAX_HEADER}"))
        try:  # what the kernel could not decode it would drop, and the caller would hang
            decode([frames[0]] + [b""] * (len(frames) - 1))
        except WireError as e:
            log.error("%s: a reply the kernel cannot decode (%s); answering EIO", self.name, e)
            frames = encode(wire.driver_reply(
                self.id, errno=Errno.EIO, message=f"{self.loop.service} driver: "
                f"{self.name}: a reply that cannot be sent ({e})"))
        self.loop.send_frames(frames)


Handler = Callable[..., Any]


class Service:
    """A driver: subclass it, name it, list the syscalls it serves (each a method of
    that name, called as handler(req, **args)), and override the hooks it needs.
    run_driver() makes one with the loop, so self.loop, self.home and self.config
    (the typed settings) are there from __init__ on."""

    name: ClassVar[str] = ""
    serves: ClassVar[tuple[str, ...]] = ()

    def __init__(self, loop: "DriverLoop") -> None:
        self.loop = loop
        self.home = loop.home
        self.config = loop.config

    def handlers(self) -> dict[str, Handler]:
        return {name: getattr(self, name) for name in self.serves}

    def on_exit(self, pid: int) -> None:
        """Process pid ended: reclaim what it held."""

    def on_welcome(self, live: list[int]) -> None:
        """The kernel (re)accepted this instance; live are the running pids."""

    def on_cancel(self, rid: int) -> None:
        """The caller of request rid gave up on it."""

    def status(self) -> dict[str, Any]:
        """A small summary sent with every heartbeat (sysinfo shows it)."""
        return {}

    def shutdown(self) -> None:
        """The loop ended (stop, SIGTERM, the kernel gone): release what outlives us."""


class DriverLoop:
    def __init__(self, service: str, home: Home | None = None,
                 config: Config | None = None) -> None:
        self.service = service
        self.handlers: dict[str, Handler] = {}
        self.hooks: Service | None = None
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._pending = 0  # background jobs that will post() their result
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.home = home or Home.resolve(os.environ.get("LLMOS_HOME"))
        self.config = config or self.home.config()
        self.hb_s = self.config.driver_heartbeat_s
        self.kernel_pid = int(os.environ.get("LLMOS_KERNEL_PID", "0"))
        self.ident = os.environ.get("LLMOS_DRIVER_ID", f"{service}.0").encode()
        self.token = os.environ.get("LLMOS_DRIVER_TOKEN", "")
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.running = True
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.ident)
        self.sock.setsockopt(zmq.SNDHWM, 10000)
        self.sock.connect(self.home.driver_endpoint)
        self._next_progress = 0.0

    def progress(self) -> None:
        """While the service starts (before run): tell the kernel this driver is
        alive and getting on, at most once a heartbeat period, so a slow start is
        not taken for a hung one."""
        now = time.monotonic()
        if now >= self._next_progress:
            self._next_progress = now + self.hb_s
            self.send(wire.driver_heartbeat({"starting": True}))

    def attach(self, service: Service) -> None:
        """Serve service's handlers, and call its hooks."""
        handlers = service.handlers()
        unknown = [n for n in handlers if n not in BY_NAME]
        if unknown:
            raise ValueError(f"handlers for syscalls not in the table: {unknown}")
        self.handlers = handlers
        self.hooks = service

    def call_later(self, seconds: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), fn))

    def post(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop's thread soon: how a background thread hands back its
        result (the socket belongs to the loop's thread)."""
        self._posted.append(fn)

    def background(self, work: Callable[[], Any], done: Callable[[Any], None],
                   req: Request) -> object:
        """Run work() in the driver's background thread, then done(result) on the
        loop's thread; a SyscallError from either fails req (any other exception:
        EIO, logged). Nothing is called once req is answered. Returns DEFERRED, for
        the handler to return."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"{self.service}-background")
        self._pending += 1

        def finish(result: Any, error: SyscallError | None) -> None:
            self._pending -= 1
            if req.done:
                return
            if error is not None:
                req.fail(error.errno, error.message)
                return
            try:
                done(result)
            except SyscallError as e:
                if not req.done:
                    req.fail(e.errno, e.message)
            except Exception as e:
                log.exception("%s failed", req.name)
                if not req.done:
                    req.fail(Errno.EIO, f"{self.service}: {req.name}: "
                             f"{type(e).__name__}: {e}")

        def run() -> None:
            try:
                result, error = work(), None
            except SyscallError as e:
                result, error = None, e
            except Exception as e:
                log.exception("%s failed", req.name)
                result, error = None, SyscallError(Errno.EIO, f"{self.service}: "
                                                   f"{req.name}: {type(e).__name__}: {e}")
            self.post(lambda: finish(result, error))

        self._pool.submit(run)
        return DEFERRED

    def send(self, head: dict) -> None:
        self.send_frames(encode(head))

    def send_frames(self, frames: list) -> None:
        try:
            send_frames(self.sock, frames)
        except zmq.Again:
            log.warning("the kernel is not reading; dropped a message")

    def run(self) -> None:
        self.send(wire.ready([self.service], self.token, os.getpid()))
        log.info("driver %s (%s) serving %s", self.service, self.ident.decode(),
                 sorted(self.handlers))
        next_hb = time.monotonic()
        while self.running:
            now = time.monotonic()
            if now >= next_hb:
                # a heartbeat carries the driver's status summary, shown by sysinfo
                self.send(wire.driver_heartbeat(self.hooks.status() if self.hooks else None))
                next_hb = now + self.hb_s
                if self._kernel_gone():
                    log.warning("the kernel is gone; driver %s exits", self.service)
                    break
            self._run_timers(now)
            while self._posted:
                self._run(self._posted.popleft())
            wake = min(next_hb, self._timers[0][0] if self._timers else next_hb)
            if self._pending:  # a background job will post: look every few ms
                wake = min(wake, now + 0.003)
            # a blocking recv with a timeout: fewer system calls than poll-then-recv;
            # none at all when a timer is due already (a busy engine's next step)
            timeout = math.ceil((wake - time.monotonic()) * 1000)
            self.sock.setsockopt(zmq.RCVTIMEO, max(0, timeout))
            try:
                frames = self.sock.recv_multipart()
            except zmq.Again:
                continue
            self._on_message(frames)
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close(0)
        self.ctx.term()

    def _kernel_gone(self) -> bool:
        return self.kernel_pid != 0 and os.getppid() != self.kernel_pid
    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            self._run(heapq.heappop(self._timers)[2])

    @staticmethod
    def _run(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("timer or posted callback failed")

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            head = decode(frames)
        except WireError as e:
            log.warning("dropped a malformed message from the kernel: %s", e)
            return
        kind = head.get(wire.KIND)
        hooks = self.hooks
        if kind == wire.REQUEST:
            self._serve(head)
        elif kind == wire.EXIT and hooks is not None:
            hooks.on_exit(head["pid"])
        elif kind == wire.WELCOME and hooks is not None:
            hooks.on_welcome(head.get("live", []))
        elif kind == wire.CANCEL and hooks is not None:
            hooks.on_cancel(head.get(wire.ID))
        elif kind == wire.STOP:
            self.running = False

    def _serve(self, head: dict) -> None:
        call = BY_NUMBER.get(head.get(wire.NUMBER))
        creds = head.get(wire.CREDS) or {}
        req = Request(self, head.get(wire.ID), call.name if call else "?",
                      creds.get("pid", -1), creds.get("uid", -1), head.get(wire.ARGS) or {})
        handler = self.handlers.get(req.name)
        if handler is None:
            req.fail(Errno.ENOSYS, f"driver {self.service} does not serve {req.name}")
            return
        try:
            result = handler(req, **req.args)
        except SyscallError as e:
            req.fail(e.errno, e.message)
            return
        except Exception as e:
            log.exception("%s failed", req.name)
            req.fail(Errno.EIO, f"{self.service} driver: {type(e).__name__}: {e}")
            return
        if result is not DEFERRED and not req.done:
            req.reply(result)


def run_driver(service: type[Service]) -> int:
    """Run service as this process's driver until the kernel stops it (or is gone):
    logging to stderr (the driver's log), SIGINT ignored, SIGTERM ends the loop;
    service.shutdown() runs however the loop ends. Returns the exit status: 1 when
    the service cannot start (a bad setting, say: its log says why)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {service.name} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    loop = DriverLoop(service.name)
    try:
        instance = service(loop)
    except (ValueError, OSError) as e:
        log.error("driver %s cannot start: %s", service.name, e)
        loop.close()
        return 1
    loop.attach(instance)
    try:
        loop.run()
    finally:
        instance.shutdown()
    return 0
