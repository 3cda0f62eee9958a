"""The kernel's TCP endpoint: CurveZMQ, and only the keys it was given.

Started only when asked (`llmos start --listen HOST:PORT`). A second ROUTER, a
CURVE server with the kernel's keypair (keys/kernel.json), whose handshakes a ZAP
handler (pyzmq's ThreadAuthenticator) checks against keys/registry.json: a peer
with no key, a wrong key or a revoked one never completes its handshake, so not
one of its messages is read. Every message that does arrive carries the sender's
public key (the ZAP User-Id), and is checked again against the registry as it is
now, so a key revoked while its connection is open is refused from the next
message on.

The kernel keeps its one ROUTER and its blocking receive: a relay thread here owns
the TCP socket and passes each message over inproc:// to the kernel's ROUTER as
[relay id, TCP routing id, public key, frames...], and the kernel's answers back
(polling the kernel's two sockets instead cost every ipc syscall 1.47x, measured:
docs/scaling.md). The relay does no work of the kernel's: it reads the key, moves
frames, and never decides anything. Connections on the TCP socket are named
NET + routing id in the kernel's tables, so they can never be confused with (or
claimed from) an ipc connection: an ipc peer whose routing id starts with NET is
dropped. The Outbox sends to such names through the relay.
"""
from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from syscalls import MAX_HEADER, Keyring

from ._call import NET

log = logging.getLogger("llmos.net")

ZAP_DOMAIN = "llmos"


class Listener:
    """The CURVE ROUTER on tcp://HOST:PORT, its relay to the kernel's ROUTER (bound to
    inproc, the relay's routing id `ident`), and the keys it accepts."""

    def __init__(self, ctx: zmq.Context, keyring: Keyring, address: str,
                 kernel: zmq.Socket) -> None:
        self.ctx = ctx
        self.keyring = keyring
        self.keys: dict[str, dict[str, Any]] = {}
        self.generation = 0  # reloads so far: the kernel acts on each once
        self._mtime: float = -1
        self.refused = 0  # handshakes refused (no, wrong or revoked key)
        self._lock = threading.Lock()
        self.reload()
        public, secret = keyring.server_keys(create=True)
        self.public = public
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("llmos.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER + (1 << 30))
        sock.curve_server = True
        sock.curve_secretkey = secret.encode()
        sock.zap_domain = ZAP_DOMAIN.encode()
        host, _, port = address.rpartition(":")
        if host.startswith("["):  # an IPv6 address, as [::1]:7700
            sock.ipv6 = True
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError:
            sock.close(0)
            self.auth.stop()
            raise
        self.sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # unguessable, as a driver's: no ipc peer may speak as the relay
        self.ident = NET + secrets.token_hex(8).encode()
        self.inproc = f"inproc://llmos-net-{secrets.token_hex(4)}"
        kernel.bind(self.inproc)
        self.unroutable = 0  # answers for TCP peers that had gone
        self._stop = threading.Event()
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._relay, name="llmos-net", daemon=True)
        self.thread.start()
        self._started.wait(5)
        log.info("listening on %s (CURVE; %d keys accepted)", self.endpoint,
                 sum(not e.get("revoked") for e in self.keys.values()))

    # -- the registry ---------------------------------------------------------------

    def reload(self) -> None:
        """Read keys/registry.json again if it changed (each tick: one stat; and in
        the ZAP thread, before a key is refused)."""
        with self._lock:
            mtime = self.keyring.mtime()
            if mtime == self._mtime:
                return
            try:
                keys = self.keyring.load()
            except ValueError as e:
                log.error("keeping the keys read before: %s", e)
                return
            self._mtime = mtime
            self.keys = keys
            self.generation += 1

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP, in the authenticator's thread: is this public key one we accept?"""
        name = key.decode("ascii", "replace")
        entry = self.keys.get(name)
        if entry is None:  # added a moment ago, before the kernel's tick read it?
            self.reload()
            entry = self.keys.get(name)
        ok = entry is not None and not entry.get("revoked")
        if not ok:
            with self._lock:
                self.refused += 1
            log.warning("refused a TCP handshake: %s key %s",
                        "revoked" if entry else "unknown", key[:8].decode("ascii", "replace"))
        return ok

    def entry(self, key: str | None) -> dict[str, Any] | None:
        """The registry's entry for a message's key, if it is still accepted."""
        e = self.keys.get(key) if key else None
        return e if e is not None and not e.get("revoked") else None

    # -- the relay (its own thread: the TCP socket is used there only) ----------------

    def _relay(self) -> None:
        kernel = self.ctx.socket(zmq.DEALER)
        kernel.setsockopt(zmq.LINGER, 0)
        kernel.setsockopt(zmq.ROUTING_ID, self.ident)
        kernel.setsockopt(zmq.SNDHWM, 100000)
        kernel.setsockopt(zmq.RCVHWM, 100000)
        kernel.connect(self.inproc)
        tcp = self.sock
        poller = zmq.Poller()
        poller.register(tcp, zmq.POLLIN)
        poller.register(kernel, zmq.POLLIN)
        self._started.set()
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(100):
                    if sock is tcp:
                        msg = tcp.recv_multipart(copy=False)
                        key = msg[-1].get("User-Id") if len(msg) > 1 else None
                        try:  # the kernel's queue full: dropped, as a flood on ipc is
                            kernel.send_multipart([msg[0], (key or "").encode(), *msg[1:]],
                                                  flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            pass
                    else:
                        frames = kernel.recv_multipart(copy=False)
                        try:
                            tcp.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                        except zmq.ZMQError:  # gone (ROUTER_MANDATORY) or full
                            self.unroutable += 1
            # stopping: what the kernel sent last (its agents' rejoin orders) still goes
            while kernel.poll(50):
                try:
                    tcp.send_multipart(kernel.recv_multipart(copy=False), flags=zmq.NOBLOCK,
                                       copy=False)
                except zmq.ZMQError:
                    self.unroutable += 1
        finally:
            kernel.close(0)
            tcp.close(500)  # and has half a second to leave

    @staticmethod
    def unwrap(frames: list[bytes]) -> tuple[bytes, str | None, list[bytes]]:
        """A relayed message, [relay id, routing id, key, frames...]: (connection name,
        the sender's public key, frames)."""
        return NET + frames[1], frames[2].decode("ascii", "replace") or None, frames[3:]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.auth.stop()
