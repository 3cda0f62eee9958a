"""A raw zmq client for tests that must send what userland never would.

It speaks the wire format by hand (or not at all: send() takes any frames), so
tests can hand the kernel garbage, wrong versions, wrong types and floods over a
real socket. It never sends heartbeats: a raw client attached with this test
process's os_pid must not arm the kernel's liveness check, which would SIGKILL
the test process once the heartbeats stopped.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Sequence

import zmq

from syscalls import ABI_VERSION, BY_NAME, Home, decode, encode

TIMEOUT_MS = 5000
NO_ARGS: Any = object()  # request(): send no "a" key at all


class NoReply(AssertionError):
    """The peer did not answer within the client's timeout."""


class RawClient:
    """One DEALER socket to a kernel endpoint (LINGER 0, RCVTIMEO timeout_ms)."""

    def __init__(self, endpoint: str, identity: bytes | None = None,
                 timeout_ms: int = TIMEOUT_MS) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)
        self._seq = itertools.count(1)

    def send(self, frames: Sequence[Any], flags: int = 0) -> None:
        self.sock.send_multipart(list(frames), flags, copy=False)

    def request(self, number: Any, args: Any = NO_ARGS, v: Any = ABI_VERSION,
                seq: int | None = None, bulk: Sequence[bytes] = ()) -> int:
        """Send a request header (no "a" key when args is NO_ARGS); return its seq."""
        seq = next(self._seq) if seq is None else seq
        head: dict[str, Any] = {"v": v, "s": seq, "n": number}
        if args is not NO_ARGS:
            head["a"] = args
        self.send(encode(head, bulk))
        return seq

    def recv(self) -> dict:
        try:
            return decode(self.sock.recv_multipart())
        except zmq.Again:
            raise NoReply("no reply within the timeout") from None

    def reply_to(self, seq: int) -> dict:
        """The reply to seq, skipping replies to earlier requests."""
        while True:
            head = self.recv()
            if head.get("s") == seq:
                return head

    def call(self, number: Any, args: Any = NO_ARGS, **kw: Any) -> dict:
        return self.reply_to(self.request(number, args, **kw))

    def attach(self, home: Home, **args: Any) -> dict:
        """Attach as this OS process with the home's secret unless args say otherwise."""
        args.setdefault("os_pid", os.getpid())
        if "token" not in args:
            args.setdefault("secret", home.secretfile.read_text().strip())
        return self.call(BY_NAME["attach"].number, args)

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
