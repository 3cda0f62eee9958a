"""The cluster's network in user space: a TCP proxy between the node namespaces and
the head kernel, with delay, jitter, loss and partitions (docs/cluster.md).

    python -m userland._netproxy --control SOCK --upstream HOST:PORT --host ADDR \
        --link n1 --link n2 [--delay-ms D] [--jitter-ms J] [--loss P]

`tc netem` is not available on the machines llmos is built on, so `llmos cluster`
puts this between each node and the head: one listening port per node (a link) on
ADDR (the cluster's bridge address), each connection it accepts forwarded to the
kernel's TCP endpoint (UPSTREAM). Per link, settable at any time:

  delay_ms   every chunk of bytes waits this long before it is passed on, in each
             direction (so a round trip costs 2 x delay_ms more); chunks keep their
             order and are pipelined, so the delay costs latency, not throughput.
  jitter_ms  plus a uniform random 0..jitter_ms per chunk (order still kept).
  loss       the probability that a chunk is "lost". This is TCP: a lost segment is
             resent by the sender's TCP and everything behind it waits (head-of-line
             blocking), so a lost chunk here is one held back LOSS_RTO_MS (200 ms,
             Linux's minimum retransmission timeout) more, and the chunks behind it
             with it. Bytes are never dropped: the two ends' TCP would resend them.
  partitioned  nothing is forwarded either way, and nothing more is read from either
             end (their socket buffers fill as they would); connections stay open and
             new ones are accepted but not connected onwards. Healing resumes them
             all where they stopped, as after a real partition whose TCP connections
             outlived it.

The control socket (a Unix socket, mode 0600) takes one JSON request per line and
answers one JSON line: {"op": "status"}, or {"op": "set", "links": [NAMES] or
null for all, "delay_ms"?, "jitter_ms"?, "loss"?, "partitioned"?}; both answer
{"ok": true, "upstream", "links": {NAME: {listen, delay_ms, jitter_ms, loss,
partitioned, connections, bytes_up, bytes_down}}}, a refusal {"ok": false,
"error": TEXT}. control() below is the client. SIGTERM or SIGINT ends it.
It imports nothing of llmos: it is a program of its own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
from typing import Any

log = logging.getLogger("llmos.netproxy")

CHUNK = 1 << 16
QUEUE_CHUNKS = 256          # per direction: at most 16 MiB held back by a delay
LOSS_RTO_MS = 200.0         # what a lost segment costs: Linux's minimum RTO
CONNECT_TIMEOUT_S = 5.0
SETTINGS = ("delay_ms", "jitter_ms", "loss", "partitioned")


def check_settings(req: dict[str, Any]) -> dict[str, Any]:
    """The settings of a set request, checked; ValueError saying what is wrong."""
    out: dict[str, Any] = {}
    for key in ("delay_ms", "jitter_ms"):
        if key in req:
            v = req[key]
            if type(v) not in (int, float) or not 0 <= v <= 60_000:
                raise ValueError(f"{key} must be milliseconds in 0..60000, not {v!r}")
            out[key] = float(v)
    if "loss" in req:
        v = req["loss"]
        if type(v) not in (int, float) or not 0 <= v <= 1:
            raise ValueError(f"loss must be a probability in 0..1, not {v!r}")
        out["loss"] = float(v)
    if "partitioned" in req:
        if type(req["partitioned"]) is not bool:
            raise ValueError("partitioned must be true or false")
        out["partitioned"] = req["partitioned"]
    return out


class Link:
    """One node's port and its settings."""

    def __init__(self, name: str, delay_ms: float, jitter_ms: float, loss: float) -> None:
        self.name = name
        self.delay_ms, self.jitter_ms, self.loss = delay_ms, jitter_ms, loss
        self.open = asyncio.Event()   # set: forwarding; clear: partitioned
        self.open.set()
        self.listen = ""
        self.connections = 0
        self.bytes_up = 0             # node -> head
        self.bytes_down = 0           # head -> node
        self.server: Any = None

    @property
    def partitioned(self) -> bool:
        return not self.open.is_set()

    def set(self, settings: dict[str, Any]) -> None:
        for key in ("delay_ms", "jitter_ms", "loss"):
            if key in settings:
                setattr(self, key, settings[key])
        if "partitioned" in settings:
            if settings["partitioned"]:
                self.open.clear()
            else:
                self.open.set()

    def hold_s(self) -> float:
        """How long the next chunk waits (0 when the link is clean)."""
        ms = self.delay_ms
        if self.jitter_ms:
            ms += random.uniform(0, self.jitter_ms)
        if self.loss and random.random() < self.loss:
            ms += LOSS_RTO_MS
        return ms / 1000

    def describe(self) -> dict[str, Any]:
        return {"listen": self.listen, "delay_ms": self.delay_ms,
                "jitter_ms": self.jitter_ms, "loss": self.loss,
                "partitioned": self.partitioned, "connections": self.connections,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


class Pipe:
    """One direction of one connection: read, hold for the link's delay, write; in
    order. A clean link with nothing held back writes at once (no extra hop)."""

    def __init__(self, link: Link, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, up: bool) -> None:
        self.link, self.reader, self.writer, self.up = link, reader, writer, up
        self.queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUE_CHUNKS)
        self.held = 0         # chunks queued or being written by the sender
        self.last_due = 0.0

    def count(self, n: int) -> None:
        if self.up:
            self.link.bytes_up += n
        else:
            self.link.bytes_down += n

    async def run(self) -> None:
        sender = asyncio.create_task(self.send())
        try:
            await self.receive()
        finally:
            await self.queue.put((0.0, None))
            await sender

    async def receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.link.open.wait()
            data = await self.reader.read(CHUNK)
            hold = self.link.hold_s() if data else 0.0
            if data and hold == 0 and self.held == 0 and self.link.open.is_set():
                self.writer.write(data)
                self.count(len(data))
                await self.writer.drain()
                continue
            if not data:
                return
            due = max(self.last_due, loop.time() + hold)
            self.last_due = due
            self.held += 1
            await self.queue.put((due, data))

    async def send(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.link.open.wait()
            self.writer.write(data)
            self.count(len(data))
            self.held -= 1
            await self.writer.drain()
        if self.writer.can_write_eof():
            self.writer.write_eof()


class Proxy:
    def __init__(self, upstream: str, host: str, links: list[Link]) -> None:
        uhost, _, uport = upstream.rpartition(":")
        self.upstream = (uhost.strip("[]"), int(uport))
        self.host = host
        self.links = {link.name: link for link in links}

    async def start(self) -> None:
        for link in self.links.values():
            link.server = await asyncio.start_server(
                lambda r, w, link=link: self.serve(link, r, w), self.host, 0)
            port = link.server.sockets[0].getsockname()[1]
            link.listen = f"{self.host}:{port}"
            log.info("link %s: %s -> %s:%d", link.name, link.listen, *self.upstream)

    async def serve(self, link: Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        link.connections += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            await link.open.wait()  # partitioned: accepted, not connected onwards
            ur, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_S)
            for w in (writer, upstream):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(Pipe(link, reader, upstream, True).run(),
                                 Pipe(link, ur, writer, False).run())
        except (OSError, asyncio.TimeoutError) as e:
            log.debug("link %s: connection ended: %s", link.name, e)
        finally:
            link.connections -= 1
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    def status(self) -> dict[str, Any]:
        return {"ok": True, "upstream": "%s:%d" % self.upstream,
                "links": {n: link.describe() for n, link in self.links.items()}}

    def handle(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict) or req.get("op") not in ("status", "set"):
            return {"ok": False, "error": 'the request must be {"op": "status"|"set", ...}'}
        if req["op"] == "set":
            names = req.get("links")
            if names is None:
                names = list(self.links)
            unknown = [n for n in names if n not in self.links] \
                if isinstance(names, list) else [names]
            if unknown:
                return {"ok": False, "error": f"no link {unknown[0]!r} (the links: "
                        f"{', '.join(self.links)})"}
            try:
                settings = check_settings(req)
            except ValueError as e:
                return {"ok": False, "error": str(e)}
            for n in names:
                self.links[n].set(settings)
            log.info("set %s: %s", ",".join(names), settings)
        return self.status()

    async def control(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                reply = self.handle(json.loads(line))
            except ValueError:
                reply = {"ok": False, "error": "the request is not JSON"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def amain(a: argparse.Namespace) -> int:
    links = [Link(n, a.delay_ms, a.jitter_ms, a.loss) for n in a.link]
    proxy = Proxy(a.upstream, a.host, links)
    await proxy.start()
    try:
        os.unlink(a.control)
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    try:
        server = await asyncio.start_unix_server(proxy.control, a.control)
    finally:
        os.umask(old)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    log.info("ready: control %s", a.control)
    await done.wait()
    server.close()
    for link in links:
        if link.server is not None:
            link.server.close()
    try:
        os.unlink(a.control)
    except FileNotFoundError:
        pass
    return 0


def control(path: str | os.PathLike, request: dict[str, Any],
            timeout: float = 5.0) -> dict[str, Any]:
    """Ask the proxy whose control socket is path; its answer. OSError when no proxy
    answers there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data)
    except ValueError:
        raise OSError(f"the proxy at {path} answered {data[:80]!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m userland._netproxy",
                                description="The llmos cluster's user-space TCP proxy.")
    p.add_argument("--control", required=True, help="the control socket's path")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT",
                   help="where every link forwards to (the kernel's TCP endpoint)")
    p.add_argument("--host", required=True, help="the address the links listen on")
    p.add_argument("--link", action="append", required=True, metavar="NAME",
                   help="a link (one port each), by the node's name")
    p.add_argument("--delay-ms", type=float, default=0.0, help="each way, per chunk")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="plus 0..J per chunk")
    p.add_argument("--loss", type=float, default=0.0,
                   help=f"chance a chunk is held back {LOSS_RTO_MS:g} ms more")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    try:
        check_settings({"delay_ms": a.delay_ms, "jitter_ms": a.jitter_ms, "loss": a.loss})
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(amain(a))
    except OSError as e:
        print(f"netproxy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
