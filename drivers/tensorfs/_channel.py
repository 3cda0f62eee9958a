"""Data channels: a tensor's bytes to a process on another host, off the CURVE path.

CurveZMQ moves 0.5-0.7 GiB/s here against 1.8-4.4 GiB/s for plain TCP (bench/
net_bench.py), so a read over TCP is answered with a grant instead of the data:
{host, port, token}. The client opens a plain TCP connection to this driver's
channel socket, sends the 32-byte token, and receives an 8-byte length and the
bytes. The grant was made by a syscall the kernel checked like any other (the
caller's key, its descriptor, its permissions); the token is unguessable (256
bits), used once, bound to the process that asked, gone when that process ends or
after GRANT_S unread. A connection with any other token gets nothing and is
closed. The bytes themselves are not encrypted: as NFS without krb5p, the channel
trusts the network between the nodes and protects who may read, not what passes
(docs/scaling.md says so).

One thread accepts and serves connections one at a time (each a sendall of a
buffer already in memory); it never touches the driver's state but the grants, under
a lock.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time
from typing import Any

log = logging.getLogger("llmos.tensorfs")

GRANT_S = 30.0     # a grant not used by then is dropped
TOKEN_BYTES = 32
READ_TOKEN_S = 5.0  # a connection must say its token this fast


class Channels:
    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0), backlog=64,
                                         family=socket.AF_INET6 if ":" in host
                                         else socket.AF_INET)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.grants: dict[bytes, tuple[int, Any, float]] = {}  # token -> pid, data, until
        self.lock = threading.Lock()
        self.refused = 0
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, name="tensorfs-channels",
                                       daemon=True)
        self.thread.start()
        log.info("data channels on %s:%d", host, self.port)

    def grant(self, pid: int, data: Any) -> dict[str, Any]:
        """A single-use grant to process pid of data: bytes-like (kept until sent),
        or (path, offset, count) of a file, opened now and sent with sendfile (the
        cache's /dev/shm segment: no copy, and an eviction meanwhile unlinks a file
        this grant still holds open)."""
        if isinstance(data, tuple):
            path, offset, count = data
            data = (os.open(path, os.O_RDONLY), offset, count)
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        with self.lock:
            for t, (_, old, until) in list(self.grants.items()):
                if until < now:
                    _drop(self.grants.pop(t)[1])
            self.grants[token] = (pid, data, now + GRANT_S)
        return {"host": self.host, "port": self.port, "token": token.hex()}

    def revoke(self, pid: int) -> None:
        """Process pid ended: its grants are worth nothing now."""
        with self.lock:
            for t in [t for t, g in self.grants.items() if g[0] == pid]:
                _drop(self.grants.pop(t)[1])

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                self._one(conn)
            except OSError as e:
                log.info("a data channel broke: %s", e)
            finally:
                conn.close()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TOKEN_S)
        token = b""
        while len(token) < TOKEN_BYTES:
            chunk = conn.recv(TOKEN_BYTES - len(token))
            if not chunk:
                break
            token += chunk
        with self.lock:
            g = self.grants.pop(token, None)
        if g is None or g[2] < time.monotonic():
            if g is not None:
                _drop(g[1])
            self.refused += 1
            log.warning("refused a data channel: an unknown, used or expired token")
            return
        conn.settimeout(None)
        if isinstance(g[1], tuple):
            fd, offset, count = g[1]
            try:
                conn.sendall(struct.pack("<Q", count))
                while count:
                    n = os.sendfile(conn.fileno(), fd, offset, min(count, 1 << 30))
                    if n == 0:
                        raise ConnectionError("the file ended early")
                    offset, count, self.sent = offset + n, count - n, self.sent + n
            finally:
                os.close(fd)
            return
        data = memoryview(g[1]).cast("B")
        conn.sendall(struct.pack("<Q", len(data)))
        conn.sendall(data)
        self.sent += len(data)

    def close(self) -> None:
        self.sock.close()


def _drop(data: Any) -> None:
    """A grant not sent: close the file it holds open, if any."""
    if isinstance(data, tuple):
        os.close(data[0])
