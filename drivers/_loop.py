"""The one driver loop every driver runs, after MINIX's chardriver_task.

A driver fills a table of handlers, one per syscall name it serves, and calls
run_driver(). The loop registers with the kernel, heartbeats both ways, hands each
request to its handler with the caller's credentials (Request.pid, Request.uid),
and sends the reply. A handler:
  - returns a result (bytes anywhere in it travel as raw frames), or
  - raises SyscallError for an errno reply (any other exception becomes EIO and is
    logged; the driver keeps serving), or
  - returns DEFERRED and answers later with req.reply()/req.fail(), e.g. from a
    timer set with loop.call_later(); req.partial() streams replies before that.
Hooks: on_exit(pid) when a process ends (reclaim what it held), on_welcome(live
pids) after each (re)start, status() for a small summary sent with every heartbeat
and shown in sysinfo, on_cancel(request id) when a caller gave up on a call.
A handler may hand slow work to a thread; the thread gives its result back with
loop.post(fn), which runs fn on the loop's thread (the only one that sends).
The loop exits when the kernel says stop, or when the kernel is gone (its pid
changed or its heartbeats stopped), so a driver never outlives its kernel.
It must never import the kernel or userland.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import zmq

from syscalls import BY_NUMBER, Errno, Home, SyscallError, WireError, decode, encode
from syscalls._wire import MAX_HEADER

log = logging.getLogger("llmos.driver")

DEFERRED = object()
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


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
        self._send({"r": result, "p": 1})

    def reply(self, result: Any = None) -> None:
        self._send({"r": result})
        self.done = True

    def fail(self, errno: Errno | int, message: str) -> None:
        self._send({"e": int(errno), "m": message})
        self.done = True

    def _send(self, head: dict) -> None:
        if self.done:
            raise RuntimeError(f"request {self.id} ({self.name}) was already answered")
        head.update(t="rep", i=self.id)
        if self._res:
            head["res"], self._res = self._res, []
        frames = encode(head)
        if len(frames[0]) > MAX_HEADER:  # as the kernel answers its own replies
            log.error("%s: a reply of %d bytes of header; answering E2BIG", self.name,
                      len(frames[0]))
            frames = encode({"t": "rep", "i": self.id, "e": int(Errno.E2BIG),
                             "m": f"{self.loop.service} driver: {self.name}: the reply's "
                                  f"header is {len(frames[0])} bytes, over {MAX_HEADER}"})
        try:  # what the kernel could not decode it would drop, and the caller would hang
            decode([frames[0]] + [b""] * (len(frames) - 1))
        except WireError as e:
            log.error("%s: a reply the kernel cannot decode (%s); answering EIO", self.name, e)
            frames = encode({"t": "rep", "i": self.id, "e": int(Errno.EIO),
                             "m": f"{self.loop.service} driver: {self.name}: a reply that "
                                  f"cannot be sent ({e})"})
        self.loop.send_frames(frames)


Handler = Callable[..., Any]


class DriverLoop:
    def __init__(self, service: str, handlers: dict[str, Handler],
                 on_exit: Callable[[int], None] | None = None,
                 on_welcome: Callable[[list[int]], None] | None = None,
                 status: Callable[[], dict] | None = None,
                 on_cancel: Callable[[int], None] | None = None) -> None:
        unknown = [n for n in handlers if n not in {s.name for s in BY_NUMBER.values()}]
        if unknown:
            raise ValueError(f"handlers for syscalls not in the table: {unknown}")
        self.service = service
        self.handlers = handlers
        self.on_exit = on_exit
        self.on_welcome = on_welcome
        self.status = status
        self.on_cancel = on_cancel
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self.background = 0  # jobs running in other threads that will post()
        self.home = Home.resolve(os.environ.get("LLMOS_HOME"))
        cfg = self.home.config()
        self.hb_s = float(cfg["driver_heartbeat_s"])
        self.dead_after_s = self.hb_s * cfg["driver_liveness"]
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

    def call_later(self, seconds: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), fn))

    def post(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop's thread soon: how a handler's background thread hands
        back its result (the socket belongs to the loop's thread). While
        self.background > 0 the loop looks for posted work every few ms."""
        self._posted.append(fn)

    def send(self, head: dict) -> None:
        self.send_frames(encode(head))

    def send_frames(self, frames: list) -> None:
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):  # int flags: cheaper than send_multipart
                self.sock.send(frame, _LAST if i == last else _MORE,
                               copy=len(frame) < 65536)
        except zmq.Again:
            log.warning("the kernel is not reading; dropped a message")

    def run(self) -> None:
        self.sock.connect(self.home.driver_endpoint)
        self.send({"t": "ready", "services": [self.service], "token": self.token,
                   "os_pid": os.getpid()})
        log.info("driver %s (%s) serving %s", self.service, self.ident.decode(),
                 sorted(self.handlers))
        last_heard = next_hb = time.monotonic()
        while self.running:
            now = time.monotonic()
            if now >= next_hb:
                # a heartbeat carries the driver's status summary, shown by sysinfo
                self.send({"t": "hb", "info": self.status()} if self.status else {"t": "hb"})
                next_hb = now + self.hb_s
                if now - last_heard > self.dead_after_s or self._kernel_gone():
                    log.warning("the kernel is gone; driver %s exits", self.service)
                    break
            self._run_timers(now)
            while self._posted:
                self._run(self._posted.popleft())
            wake = min(next_hb, self._timers[0][0] if self._timers else next_hb)
            if self.background:
                wake = min(wake, now + 0.003)
            # a blocking recv with a timeout: fewer system calls than poll-then-recv;
            # none at all when a timer is due already (a busy engine's next step)
            timeout = math.ceil((wake - time.monotonic()) * 1000)
            self.sock.setsockopt(zmq.RCVTIMEO, max(0, timeout))
            try:
                frames = self.sock.recv_multipart()
            except zmq.Again:
                continue
            last_heard = time.monotonic()
            self._on_message(frames)
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
        kind = head.get("t")
        if kind == "req":
            self._serve(head)
        elif kind == "exit" and self.on_exit is not None:
            self.on_exit(head["pid"])
        elif kind == "welcome" and self.on_welcome is not None:
            self.on_welcome(head.get("live", []))
        elif kind == "cancel" and self.on_cancel is not None:
            self.on_cancel(head.get("i"))
        elif kind == "stop":
            self.running = False

    def _serve(self, head: dict) -> None:
        call = BY_NUMBER.get(head.get("n"))
        creds = head.get("c") or {}
        req = Request(self, head.get("i"), call.name if call else "?", creds.get("pid", -1),
                      creds.get("uid", -1), head.get("a") or {})
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


def prepare_driver(service: str) -> None:
    """Logging to the driver's log, and no SIGINT: the kernel orchestrates shutdown."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {service} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_driver(service: str, handlers: dict[str, Handler], **hooks: Any) -> None:
    """Serve `handlers` as driver `service` until the kernel stops it."""
    prepare_driver(service)
    DriverLoop(service, handlers, **hooks).run()
