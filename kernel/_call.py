"""One syscall in the kernel: who made it, where to answer it, when it began.

As MINIX's message passed to a handler: a kernel handler takes a Call and
returns a result (the loop answers it), raises SyscallError, or returns PARKED
and answers later through the Call (wait); a call routed to a driver is carried
by the supervisor until the driver answers. Every final answer goes through
reply() or fail(), which also account for the call in the statistics, so a call
is counted once whatever answers it.

The Outbox is the kernel's one way to send to a peer: never blocking, never
raising for a peer that is gone or slow (counted as dropped instead).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import zmq

from syscalls import MAX_HEADER, Errno, Syscall, SyscallError, encode, send_frames, wire

from ._stats import SyscallStats

if TYPE_CHECKING:
    from ._proctable import Process

PARKED = object()  # a handler's answer for "I will reply later"
NET = b"\xfftcp:"  # names a connection on the TCP endpoint (kernel/_net.py)


class Outbox:
    """Sends on the kernel's ROUTER without blocking; counts what it could not send.
    A connection named NET + routing id is on the TCP endpoint: sent by its relay."""

    def __init__(self, sock: zmq.Socket, stats: SyscallStats) -> None:
        self.sock = sock
        self.stats = stats
        self.relay: bytes | None = None  # the TCP relay's routing id (kernel/_net.py)

    def send(self, ident: bytes, frames: list, full: str = "reply_queue_full",
             gone: str = "reply_unroutable") -> str | None:
        """None when sent; else "full" (the peer's queue is at its high-water mark) or
        "gone" (no such peer), each counted under the name given."""
        if ident[:5] == NET and self.relay is not None:  # through the relay, to TCP
            frames = [ident[5:], *frames]
            ident = self.relay
        try:
            send_frames(self.sock, frames, ident)
            return None
        except zmq.Again:
            self.stats.drop(full)
            return "full"
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.stats.drop(gone)
            return "gone"

    def reply(self, conn: bytes, head: dict, bulk: list | tuple = ()) -> None:
        frames = encode(head, bulk)
        if len(frames[0]) > MAX_HEADER:  # the client would refuse it, and wait forever
            self.stats.drop("reply_too_big")
            frames = encode(wire.error(head.get(wire.SEQ), Errno.E2BIG,
                                       f"the reply's header is {len(frames[0])} bytes, "
                                       f"over {MAX_HEADER}"))
        self.send(conn, frames)


class Call:
    """A syscall being served: the caller (None for attach), its connection and
    sequence number, the checked arguments and bulk frames, and its start time."""

    __slots__ = ("outbox", "syscall", "proc", "conn", "seq", "args", "bulk", "t0", "done")

    def __init__(self, outbox: Outbox, syscall: Syscall, proc: "Process | None",
                 conn: bytes, seq: int, args: dict, bulk: list, t0: float) -> None:
        self.outbox, self.syscall, self.proc = outbox, syscall, proc
        self.conn, self.seq, self.args, self.bulk, self.t0 = conn, seq, args, bulk, t0
        self.done = False

    @property
    def name(self) -> str:
        return self.syscall.name

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def reply(self, result: Any = None, bulk: list | tuple = ()) -> None:
        """The final answer."""
        self.outbox.reply(self.conn, wire.reply(self.seq, result), bulk)
        self._account(None)

    def partial(self, result: Any, bulk: list | tuple = ()) -> None:
        """An answer with more to follow (a streamed token, progress)."""
        self.outbox.reply(self.conn, wire.reply(self.seq, result, partial=True), bulk)

    def fail(self, error: SyscallError | Errno | int, message: str = "") -> None:
        """The final answer: an errno and why."""
        if not isinstance(error, SyscallError):
            error = SyscallError(error, message)
        self.outbox.send(self.conn, encode(wire.error(self.seq, error.errno, error.message)))
        self._account(_errno_name(error.errno))

    def _account(self, errno: str | None) -> None:
        self.done = True
        self.outbox.stats.record(self.syscall.name, time.perf_counter() - self.t0, errno)


def _errno_name(errno: int) -> str:
    try:
        return Errno(errno).name
    except ValueError:
        return str(errno)
