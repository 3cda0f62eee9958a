"""A wire fuzzer for the llmos kernel: random and mutated frames on both of its sockets.

    python bench/fuzz.py [--seconds S | --messages N] [--seed N] [--home DIR]
                         [--rss-bound-mib M] [--warmup F] [--no-oversized]
                         [--reserved-ids N] [--tcp] [--json]

docs/fuzz-and-load.md says how to run it, what it checks and what it found.

Without --home it boots its own kernel (`python -m kernel`, in a new session) on a
temporary LLMOS_HOME under /tmp and stops it at the end by pid (SIGTERM, then
SIGKILL for it and everything under it). With --home it fuzzes the kernel already
running there (it attaches with run/secret: it needs to read it).

What it sends, from a pool of connections to the kernel's socket (unattached ones,
and ones attached as uid 4242 and uid 0 from a made-up remote host) and to the
drivers' socket (under identities that look like drivers' and random ones):
  - valid requests for every syscall in the table (syscalls/_table.py), with
    arguments built from the table and from what earlier replies returned
    (descriptors, allocations, child pids);
  - the same, mutated: fields and arguments replaced by values of other types or at
    and past their bounds, fields dropped or added, other syscall numbers and ABI
    versions, duplicated and edge sequence numbers, bytes where strings belong and
    the reverse, bad frame references, and frame-level damage (truncated or
    bit-flipped headers, trailing bytes, extra, missing and empty frames);
  - oversized messages: headers just under, at and over 1 MiB (MAX_HEADER), huge
    lists and maps, nesting as deep as msgpack allows, bulk frames of megabytes;
  - random bytes; heartbeats and cancels with real and made-up tokens and seqs;
  - on the drivers' socket: ready, hb, rep, welcome and req messages with wrong
    tokens and made-up routing ids, and junk;
  - connection churn: sockets closed and new ones opened (with random routing ids).
It reads every reply and checks it is a well-formed reply to a seq it sent. Every
few hundred messages it makes sure each connection is still answered (a nop; one
peer's messages are served in order, so its reply comes after everything before it).

Meanwhile a well-behaved client in another process (userland.connect) calls nop,
getpid and echo (random bytes, compared byte for byte) in a loop.

It fails (exit status 1) when the kernel dies or is replaced, when a connection gets
no answer for 10 s while the kernel lives, when the kernel sends something that is
not a well-formed reply to a sent seq, when the well-behaved client gets a wrong
answer or waits more than 10 s, when the kernel counts an internal error or a
driver had to be restarted, or when the kernel's RSS grows by more than
--rss-bound-mib between the end of the warm-up and the end of the run. Whether the
kernel died is decided by its pid, never by how fast it answered.

It keeps its side effects small and to itself: spawn names a program that does not
exist (or /bin/true, rarely), kill reaches only processes the fuzzer attached or
spawned, attach with the real secret only from a made-up remote host (so no OS
process is ever signalled) or with an OS pid the kernel refuses, tensors are written
under /fuzz only and kept small, sleep, ticks, wait and queued alloc_gpu calls end
within seconds, spawn_train names a dataset and infer a model that do not exist, a
syscall added to the table after this file was written gets only an argument it
refuses, and it never stops the kernel. A mutated message that would break these
rules is not sent (defuse()). It ends every process it attached, and at the end the
root handle ends any it lost track of.

--tcp fuzzes the kernel's CURVE TCP endpoint instead of its ipc socket for clients
(its own kernel boots with --listen 127.0.0.1:0; with --home, the kernel there must
listen): the fuzzer's connections attach with a uid-0 client key it registers, and
send node-protocol messages too (a client's key may not: dropped); and two
strangers, one with no CURVE at all and one with a key nobody registered, send
valid and junk messages that must never be answered.

--reserved-ids N also holds N connections under the routing ids libzmq will hand
the next peers that connect without one: that aborts the kernel today (a libzmq
assertion), so it is off by default; tests/test_fuzz.py keeps it as an xfail.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import socket as _socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402

import userland  # noqa: E402
from syscalls import (ABI_VERSION, BY_NAME, BY_NUMBER, MAX_HEADER, SERVICES, TABLE,  # noqa: E402
                      Arg, Errno, Home, Keyring, Syscall, SyscallError, WireError,
                      curve_client, decode, encode, read_credential, wire,
                      write_credential)

sys.path.insert(0, str(ROOT / "bench"))
from kernelboot import BenchKernel  # noqa: E402

FUZZ_UID = 4242                  # uid of the fuzzer's processes (and uid 0, one connection)
REMOTE_HOST = "llmos-fuzz.invalid"  # attach "from another host": no OS pid, never signalled
NO_SUCH_PROGRAM = "/nonexistent/llmos-fuzz-no-such-program"
TRUE = shutil.which("true") or "/bin/true"
NO_SUCH_PID = 2**31 - 1          # within kill's bounds, never a live llmos pid
NO_SUCH_OS_PID = 2**31 - 1       # over any pid_max: psutil finds no such process
FUZZ_DIR = "/fuzz"
NO_SUCH_DATASET = FUZZ_DIR + "/no-such-dataset"  # never created
NO_SUCH_MODEL = FUZZ_DIR + "/no-such-model"
# The syscalls whose side effects defuse() knows how to keep small. Any other (one
# added to the table later) is only sent with an argument it must refuse.
REVIEWED = frozenset({
    "attach", "nop", "getpid", "getppid", "spawn", "wait", "kill", "exit", "ps", "sysinfo",
    "echo", "ticks", "sleep", "alloc_gpu", "free_gpu", "devices", "open_tensor",
    "read_tensor", "write_tensor", "close_tensor", "stat", "listdir", "mkdir", "unlink",
    "rename", "chmod", "spawn_train", "infer", "models"})
UNREVIEWED_ARG = "llmos_fuzz_unreviewed"
MAX_TENSOR_BYTES = 64 * 1024     # tensors the fuzzer creates stay this small
HANG_S = 10.0                    # no answer for this long while the kernel lives: hung
SYNC_EVERY = 300                 # messages between two checks that every connection is served
MSGPACK_MAX_DEPTH = 1024
DEFAULT_RSS_BOUND_MIB = 64.0
# libzmq's ROUTER numbers peers without a routing id from its first rand(), which is
# glibc's 0x6b8b4567 in a process that never called srand (the kernel). Only
# --reserved-ids uses it (tests/test_fuzz.py: a peer claiming those ids aborts the kernel).
LIBZMQ_FIRST_AUTO_ID = 0x6B8B4567

# the fuzzer's own seqs: far from the small and edge ints random values bring
_SEQ = itertools.count(2**48)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the report --------------------------------------------------------------------------


@dataclass
class FuzzReport:
    seed: int
    seconds: float = 0.0
    sent: Counter = field(default_factory=Counter)       # per target: kernel, drivers
    kinds: Counter = field(default_factory=Counter)      # per case
    valid: Counter = field(default_factory=Counter)      # unmutated requests per syscall
    calls: Counter = field(default_factory=Counter)      # decodable requests per syscall
    replies: int = 0                                     # reply messages received
    answered: int = 0        # messages that expected an answer and got one
    unanswered: int = 0      # expected an answer, none by the end (a late driver reply,
    #                          a call of a process that ended meanwhile, a full queue)
    unanswerable: int = 0    # messages the kernel must drop (undecodable, no seq)
    results: int = 0                                     # replies with a result
    errors: Counter = field(default_factory=Counter)     # error replies by errno name
    driver_exceptions: Counter = field(default_factory=Counter)  # EIO from a handler's bug
    samples: dict = field(default_factory=dict)          # errno name -> a few messages
    kernel_dropped: dict = field(default_factory=dict)   # sysinfo()["dropped"], this run's
    syncs: int = 0
    well_behaved_calls: int = 0
    well_behaved_max_s: float = 0.0
    rss_start_mib: float = 0.0
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_bound_mib: float = DEFAULT_RSS_BOUND_MIB
    driver_rss_mib: dict = field(default_factory=dict)
    processes_left: int = 0
    left: list = field(default_factory=list)
    kernel_pid: int = 0
    failures: list = field(default_factory=list)

    @property
    def messages(self) -> int:
        return sum(self.sent.values())

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, why: str) -> None:
        if why not in self.failures and len(self.failures) < 50:
            self.failures.append(why)
            log(f"FAILURE: {why}")

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "seconds": round(self.seconds, 2), "messages": self.messages,
                "sent": dict(self.sent), "kinds": dict(self.kinds.most_common()),
                "valid": dict(sorted(self.valid.items())),
                "calls": dict(sorted(self.calls.items())),
                "replies": self.replies, "answered": self.answered,
                "unanswered": self.unanswered, "unanswerable": self.unanswerable,
                "results": self.results, "errors": dict(self.errors.most_common()),
                "driver_exceptions": dict(self.driver_exceptions), "samples": self.samples,
                "kernel_dropped": self.kernel_dropped, "syncs": self.syncs,
                "well_behaved_calls": self.well_behaved_calls,
                "well_behaved_max_s": round(self.well_behaved_max_s, 4),
                "rss_mib": {"start": self.rss_start_mib, "warm": self.rss_warm_mib,
                            "end": self.rss_end_mib, "peak": self.rss_peak_mib,
                            "growth": round(self.rss_end_mib - self.rss_warm_mib, 2),
                            "bound": self.rss_bound_mib},
                "driver_rss_mib": self.driver_rss_mib, "processes_left": self.processes_left,
                "left": self.left,
                "kernel_pid": self.kernel_pid, "ok": self.ok, "failures": self.failures}

    def render(self) -> str:
        rate = self.messages / self.seconds if self.seconds else 0.0
        errs = ", ".join(f"{k} {v}" for k, v in self.errors.most_common()) or "none"
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.kernel_dropped.items())) or "none"
        lines = [
            f"llmos fuzz: seed {self.seed}, {self.seconds:.1f} s, {self.messages} messages "
            f"({rate:.0f}/s), kernel pid {self.kernel_pid}",
            "  sent:          " + ", ".join(f"{k} socket {v}" for k, v in sorted(self.sent.items())),
            f"  replies:       {self.replies} ({self.results} results, "
            f"{sum(self.errors.values())} errors); {self.answered} messages answered, "
            f"{self.unanswered} unanswered, {self.unanswerable} unanswerable (dropped by design)",
            f"  errors:        {errs}",
            f"  kernel drops:  {drops}",
            f"  well-behaved:  {self.well_behaved_calls} calls, slowest "
            f"{self.well_behaved_max_s * 1000:.1f} ms; {self.syncs} liveness checks",
            f"  kernel RSS:    {self.rss_start_mib:.1f} MiB at start, {self.rss_warm_mib:.1f} "
            f"after warm-up, {self.rss_end_mib:.1f} at the end "
            f"({self.rss_end_mib - self.rss_warm_mib:+.1f} MiB, bound {self.rss_bound_mib:g}); "
            f"peak {self.rss_peak_mib:.1f}",
        ]
        if self.driver_rss_mib:
            lines.append("  driver RSS:    " + ", ".join(
                f"{k} {v:.1f} MiB" for k, v in sorted(self.driver_rss_mib.items())))
        if self.driver_exceptions:
            lines.append("  driver EIO:    " + "; ".join(
                f"{k} x{v}" for k, v in self.driver_exceptions.most_common(8)))
        lines.append("  cases:         " + ", ".join(
            f"{k} {v}" for k, v in self.kinds.most_common()))
        lines.append("  result:        " + ("OK" if self.ok else "FAILED: " + "; ".join(
            self.failures)))
        return "\n".join(lines)


# -- random values ------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1,
             2**64 - 1, -2**31, -2**63]
EDGE_FLOATS = [0.0, -0.0, 0.5, -1.5, 1e308, -1e308, 5e-324, float("nan"), float("inf"),
               float("-inf")]
EDGE_STRS = ["", " ", "x", "/", "//", "/.", "/..", "/fuzz/..", "a\x00b", "\u263a" * 3,
             "\U0001f600", "%s%n", "../../etc/passwd", "TERM", "KILL", "rw", "float32",
             "2GiB", "1.5GB", "-1", "nan", "x" * 257, "x" * 4097]


class Gen:
    """Random values, seeded, of every shape msgpack carries (and some it carries
    only as raw bytes)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self) -> int:
        r = self.rng
        return r.choice(EDGE_INTS) if r.random() < 0.6 else r.randint(-2**40, 2**40)

    def float(self) -> float:
        r = self.rng
        return r.choice(EDGE_FLOATS) if r.random() < 0.6 else r.uniform(-1e6, 1e6)

    def str(self, max_len: int = 64) -> str:
        r = self.rng
        if r.random() < 0.4:
            return r.choice(EDGE_STRS)
        alphabet = "abcXYZ019/._-=~ \t\n\x00\u00e9\u263a"
        return "".join(r.choice(alphabet) for _ in range(r.randrange(max_len)))

    def bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 3, 16, 100, 4096]))

    def key(self) -> Any:
        r = self.rng.random()
        if r < 0.8:
            return self.str(12)
        if r < 0.9:
            return self.bytes()[:8]
        return self.int()  # not a str or bin: the kernel cannot decode the map

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(12 if depth < 3 else 8)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind in (2, 3):
            return self.int()
        if kind == 4:
            return self.float()
        if kind in (5, 6):
            return self.str()
        if kind == 7:
            return self.bytes()
        if kind in (8, 9):
            return [self.value(depth + 1) for _ in range(r.randrange(5))]
        if kind == 10:
            return {self.str(8): self.value(depth + 1) for _ in range(r.randrange(4))}
        if r.random() < 0.2:
            return msgpack.Timestamp(r.randrange(2**34), r.randrange(10**9))
        return msgpack.ExtType(r.choice([1, 1, 2, 42, 127]),
                               r.randbytes(r.choice([0, 2, 4, 4, 8])))

    def identity(self) -> bytes:
        """A routing id a client may choose: 1-64 random bytes, never starting with a
        zero byte (libzmq's own ids do: see --reserved-ids)."""
        n = self.rng.randrange(1, 64)
        return bytes([self.rng.randrange(1, 256)]) + self.rng.randbytes(n - 1)


def deep_list(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"


def raw_map(fields: dict[str, bytes]) -> bytes:
    """A msgpack map of already-packed values (for values packb cannot make)."""
    out = bytes([0x80 | len(fields)])
    for k, packed in fields.items():
        out += msgpack.packb(k) + packed
    return out


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- connections --------------------------------------------------------------------------


@dataclass
class Pending:
    """A message that expects an answer: what it was, for the reply's bookkeeping."""
    call: str | None
    kind: str


class Conn:
    """One DEALER to one of the kernel's endpoints, and what the fuzzer knows of it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, target: str, role: str,
                 identity: bytes | None = None, curve: dict | None = None) -> None:
        self.target, self.role, self.identity = target, role, identity
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if curve is not None:
            curve_client(self.sock, curve)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)
        self.pending: dict[int, list[Pending]] = {}
        self.used_seqs: list[int] = []
        self.pid: int | None = None
        self.uid: int | None = None
        self.want_uid = FUZZ_UID  # the uid its valid attaches ask for
        self.hb_token: str | None = None
        self.fds: list[str] = []
        self.allocs: list[str] = []
        self.children: list[int] = []
        self.sent = 0
        self.recycle_at = 0
        self.attaching = False  # a re-attach is on its way

    def close(self) -> None:
        self.sock.close(0)


# -- the fuzzer --------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, home: Home, seed: int, report: FuzzReport,
                 reserved_ids: int = 0, oversized: bool = True,
                 tcp: dict | None = None) -> None:
        self.home = home
        self.tcp = tcp  # a uid-0 client credential: the kernel's socket is its TCP one
        self.strangers: dict[zmq.Socket, str] = {}  # TCP peers no answer may reach
        self.oversized = oversized
        self.rng = random.Random(seed)
        self.gen = Gen(self.rng)
        self.report = report
        self.secret = home.secretfile.read_text().strip()
        self.kernel_pid = home.kernel_pid() or 0
        self.hostname = _socket.gethostname()
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.conns: list[Conn] = []
        self.by_sock: dict[zmq.Socket, Conn] = {}
        self.owned: set[int] = set()     # llmos pids of our own processes and children
        self.names = [f"{FUZZ_DIR}/t{i}" for i in range(8)] + [f"{FUZZ_DIR}/d{i}"
                                                                for i in range(3)]
        self.names += [f"{FUZZ_DIR}/d0/t{i}" for i in range(3)]
        self.reserved: list[zmq.Socket] = []
        if reserved_ids:
            self.ctx.setsockopt(zmq.MAX_SOCKETS, reserved_ids + 1024)
        for k in range(reserved_ids):
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, b"\x00" + struct.pack(">I", LIBZMQ_FIRST_AUTO_ID + k))
            s.connect(home.kernel_endpoint)
            self.reserved.append(s)
        if reserved_ids:
            time.sleep(0.5)  # let the handshakes finish: the ids are taken from then on
        self._big_cache: dict[str, bytes] = {}

    # -- connection pool -----------------------------------------------------------

    def open(self, target: str, role: str, identity: bytes | None = None) -> Conn:
        endpoint = self.home.kernel_endpoint if target == "kernel" else self.home.driver_endpoint
        tcp = self.tcp if target == "kernel" else None
        c = Conn(self.ctx, tcp["endpoint"] if tcp else endpoint, target, role, identity,
                 curve=tcp)
        self.conns.append(c)
        self.by_sock[c.sock] = c
        self.poller.register(c.sock, zmq.POLLIN)
        return c

    def drop_conn(self, c: Conn) -> None:
        self.poller.unregister(c.sock)
        del self.by_sock[c.sock]
        self.conns.remove(c)
        self.report.unanswered += sum(len(v) for v in c.pending.values())
        c.close()

    def setup(self) -> None:
        for uid in (FUZZ_UID, FUZZ_UID, FUZZ_UID, 0):
            c = self.open("kernel", "attached", self.gen.identity() if uid else None)
            self.attach(c, uid)
        for _ in range(3):
            self.open("kernel", "unattached", self.rng.choice([None, self.gen.identity()]))
        for ident in (b"echo.1." + self.rng.randbytes(8).hex().encode(), b"echo.0",
                      b"tensorfs.7", self.gen.identity(), None):
            self.open("drivers", "driver", ident)
        c = self.open("drivers", "attached", self.gen.identity())
        self.attach(c, FUZZ_UID)
        if self.tcp:  # no CURVE at all; a key nobody registered
            public, secret = (k.decode() for k in zmq.curve_keypair())
            for name, curve in (("no key", None), ("unknown key", {
                    "server_key": self.tcp["server_key"], "public": public,
                    "secret": secret})):
                s = self.ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 100)
                if curve is not None:
                    curve_client(s, curve)
                s.connect(self.tcp["endpoint"])
                self.strangers[s] = name
                self.poller.register(s, zmq.POLLIN)

    def attach(self, c: Conn, uid: int) -> None:
        """A valid attach, from the remote host (no OS pid), waited for."""
        c.want_uid = uid
        seq = self.send_request(c, "attach", self.attach_args(uid, c.target), "setup")
        self.wait_for(c, seq)
        if c.pid is None:
            self.report.fail(f"a valid attach on the {c.target} socket failed")
        c.recycle_at = c.sent + self.rng.randrange(200, 1200)

    def attach_args(self, uid: int, target: str = "kernel") -> dict[str, Any]:
        # over TCP the key is the credential (the secret is refused there)
        cred = {} if self.tcp and target == "kernel" else {"secret": self.secret}
        return {"os_pid": os.getpid(), "argv": ["llmos-fuzz"], **cred,
                "uid": uid, "host": REMOTE_HOST, "heartbeat": False}

    def churn(self) -> None:
        """Close a connection and open a new one in its place (a fresh routing id:
        a reused one would be refused while the old pipe lingers in the kernel)."""
        c = self.rng.choice(self.conns)
        # settle what it sent first: an attach still on its way would leave a process
        # behind (a remote process without heartbeats lives until it exits or is killed)
        self.wait_for(c, self.send_request(c, "nop", {}, "sync"))
        # exit even when we know of no process here: a mutated attach whose reply we
        # misattributed (a duplicated seq) may have made one (ENOTCONN if not)
        self.exit_process(c)
        target, role = c.target, c.role
        uid = c.want_uid
        self.drop_conn(c)
        new = self.open(target, role, self.rng.choice([None, self.gen.identity()]))
        self.report.kinds["churn"] += 1
        if role == "attached":
            self.attach(new, uid)

    def exit_process(self, c: Conn) -> None:
        seq = self.send_request(c, "exit", {"status": 0}, "setup")
        self.wait_for(c, seq)
        c.pid = None
        c.fds.clear()
        c.allocs.clear()

    # -- sending and receiving -------------------------------------------------------

    def send_frames(self, c: Conn, frames: list, kind: str, expect: Any = None) -> None:
        """Send frames; `expect` is what decoding them gives (the kernel decodes with
        the same function), or None to compute it. Blocks at most HANG_S for room."""
        if expect is None:
            try:
                expect = decode(frames)
            except WireError:
                expect = False
        seq = expect.get("s") if type(expect) is dict else None
        if type(seq) is int:
            call = None
            n = expect.get("n")
            if type(n) is int and n in BY_NUMBER:
                call = BY_NUMBER[n].name
                self.report.calls[call] += 1
                if kind == "valid":
                    self.report.valid[call] += 1
            c.pending.setdefault(seq, []).append(Pending(call, kind))
            c.used_seqs.append(seq)
            if len(c.used_seqs) > 64:
                del c.used_seqs[:32]
        else:
            self.report.unanswerable += 1
        deadline = time.monotonic() + HANG_S
        while True:
            try:
                c.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                self.pump(0.05)
                if time.monotonic() > deadline:
                    self.report.fail(f"the kernel read nothing from a {c.target}-socket "
                                     f"connection for {HANG_S:g} s")
                    raise Hung()
        c.sent += 1
        self.report.sent[c.target] += 1
        for k in kind.split("+"):
            self.report.kinds[k] += 1

    def send_request(self, c: Conn, name: str, args: dict, kind: str) -> int:
        seq = next(_SEQ)
        head = {"v": ABI_VERSION, "s": seq, "n": BY_NAME[name].number, "a": args}
        self.send_frames(c, encode(head), kind, head)
        return seq

    def pump(self, timeout_s: float = 0.0) -> int:
        """Read every reply waiting (waiting up to timeout_s for the first)."""
        got = 0
        events = dict(self.poller.poll(int(timeout_s * 1000)))
        while events:
            for sock in events:
                c = self.by_sock.get(sock)
                if c is None:
                    if sock in self.strangers:
                        frames = sock.recv_multipart()
                        self.report.fail(f"a TCP peer with {self.strangers[sock]} got an "
                                         f"answer: {frames[0][:80]!r}")
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_reply(c, frames)
                    got += 1
            events = dict(self.poller.poll(0))
        return got

    def on_reply(self, c: Conn, frames: list[bytes]) -> None:
        rep = self.report
        rep.replies += 1
        try:
            head = decode(frames)
        except WireError as e:
            rep.fail(f"the kernel sent an undecodable reply ({e}): {frames[0][:80]!r}")
            return
        seq = head.get("s")
        if type(seq) is not int:
            rep.fail(f"a reply without a seq: {_short(head)}")
            return
        waiting = c.pending.get(seq)
        if not waiting:
            rep.fail(f"a reply to seq {seq}, which this connection never sent "
                     f"(or was already answered): {_short(head)}")
            return
        p = waiting[0]
        partial = head.get("p") == 1
        if "e" in head:
            e, m = head.get("e"), head.get("m")
            if type(e) is not int or type(m) is not str or "r" in head or partial:
                rep.fail(f"a malformed error reply: {_short(head)}")
            try:
                name = Errno(e).name
            except ValueError:
                rep.fail(f"an error reply with an unknown errno: {_short(head)}")
                name = f"errno {e}"
            rep.errors[name] += 1
            seen = rep.samples.setdefault(name, [])
            if len(seen) < 5 and type(m) is str and m[:100] not in seen:
                seen.append(m[:100])
            if name == "EIO" and type(m) is str and " driver: " in m:
                # drivers/_loop.py: a handler raised something other than SyscallError
                rep.driver_exceptions[f"{p.call}: {m[:120]}"] += 1
            if name == "ENOTCONN":
                self.forget_process(c)
            if name == "EBUSY" and p.call == "attach" and type(m) is str:
                # "this connection is already process N": a reply we misattributed
                # (duplicated seqs) made us think it had ended
                tail = m.rsplit(" ", 1)[-1]
                if tail.isdigit():
                    c.pid = int(tail)
            if p.kind == "reattach":
                c.attaching = False
        elif "r" in head:
            rep.results += 1
            self.learn(c, p.call, head["r"])
            if p.kind == "reattach":
                c.attaching = False
            if p.call == "exit":
                self.forget_process(c)
        else:
            rep.fail(f"a reply with neither a result nor an errno: {_short(head)}")
        if not partial:
            waiting.pop(0)
            if not waiting:
                del c.pending[seq]
            rep.answered += 1

    def forget_process(self, c: Conn) -> None:
        c.pid = None
        c.fds.clear()
        c.allocs.clear()

    def learn(self, c: Conn, call: str | None, r: Any) -> None:
        """Remember what a successful reply handed out, for later valid requests."""
        if call == "attach" and type(r) is dict and type(r.get("pid")) is int:
            c.pid, c.uid, c.hb_token = r["pid"], r.get("uid"), r.get("hb_token")
            self.owned.add(r["pid"])
        elif call == "spawn" and type(r) is int:
            c.children.append(r)
            self.owned.add(r)
            del c.children[:-16]
        elif call == "open_tensor" and type(r) is dict and type(r.get("fd")) is str:
            c.fds.append(r["fd"])
            del c.fds[:-16]
        elif call == "alloc_gpu" and type(r) is dict and type(r.get("id")) is str:
            c.allocs.append(r["id"])
            del c.allocs[:-8]

    def wait_for(self, c: Conn, seq: int) -> bool:
        """Pump until seq is answered on c; a failure after HANG_S while the kernel lives."""
        deadline = time.monotonic() + HANG_S
        while seq in c.pending:
            self.pump(0.05)
            if seq not in c.pending:
                break
            if not self.kernel_alive():
                self.report.fail("the kernel died")
                raise Hung()
            if time.monotonic() > deadline:
                self.report.fail(f"a {c.target}-socket connection ({c.role}) got no answer "
                                 f"for {HANG_S:g} s while the kernel is alive")
                raise Hung()
        return True

    def kernel_alive(self) -> bool:
        try:
            p = psutil.Process(self.kernel_pid)
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def sync(self) -> None:
        """Every connection is still answered: a nop on each, in order after all it sent."""
        seqs = [(c, self.send_request(c, "nop", {}, "sync")) for c in list(self.conns)]
        for c, seq in seqs:
            self.wait_for(c, seq)
        self.report.syncs += 1
        for c in list(self.conns):
            # processes end now and then (their descriptors and allocations with them);
            # one a mutated attach made on another connection ends at once
            if c.pid is not None and (c.role != "attached" or c.sent >= c.recycle_at):
                self.exit_process(c)
            if c.role == "attached" and c.pid is None:
                self.attach(c, c.want_uid)

    # -- messages ------------------------------------------------------------------------

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.004:
            self.churn()
            return
        if r < 0.010:
            if self.oversized:
                self.big_message()
            return
        if r < 0.020 and self.strangers:
            self.stranger_message()
            return
        pool = self.rng.random()
        if pool < 0.62:
            cands = [c for c in self.conns if c.role == "attached" and c.target == "kernel"]
        elif pool < 0.78:
            cands = [c for c in self.conns if c.role == "unattached"]
        else:
            cands = [c for c in self.conns if c.target == "drivers"]
        c = self.rng.choice(cands or self.conns)
        if c.role == "attached" and c.pid is None and not c.attaching:
            # its process ended (exit, kill, lost): attach again, without waiting
            c.attaching = True
            self.send_request(c, "attach", self.attach_args(c.want_uid, c.target),
                              "reattach")
            return
        r = self.rng.random()
        if c.role == "driver" and r < 0.5:
            self.driver_message(c)
        elif r < 0.07:
            self.junk_message(c)
        elif r < 0.12:
            self.control_message(c)
        else:
            self.request_message(c)

    def request_message(self, c: Conn) -> None:
        call = self.rng.choice(TABLE)
        args = self.valid_args(call, c)
        seq = next(_SEQ)
        head: dict[Any, Any] = {"v": ABI_VERSION, "s": seq, "n": call.number, "a": args}
        if self.rng.random() < 0.25:
            self.defuse(head)
            self.send_frames(c, encode(head), "valid", head)
            return
        ops = []
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            op = self.rng.choice(STRUCT_MUTATIONS)
            op(self, head, call, c)
            ops.append(op.__name__.removeprefix("m_"))
        self.defuse(head)
        try:
            frames = encode(head)
        except (TypeError, ValueError, OverflowError):
            frames = [_pack(head)]  # only reached with exotic keys; packb takes them
        if self.rng.random() < 0.3:
            fop = self.rng.choice(FRAME_MUTATIONS)
            damaged = fop(self, list(frames))
            if self.harmless(damaged):
                frames = damaged
                ops.append(fop.__name__.removeprefix("f_"))
        self.send_frames(c, frames, "+".join(sorted(set(ops))))

    def harmless(self, frames: list) -> bool:
        """Damaged frames that still decode must not have become a harmful request."""
        try:
            head = decode(frames)
        except WireError:
            return True
        return not self.defuse(copy.deepcopy(head))

    # -- valid arguments, from the table and from what the fuzzer holds ------------------

    def valid_args(self, call: Syscall, c: Conn) -> dict[str, Any]:
        r, g = self.rng, self.gen
        name = call.name
        if name == "attach":
            return {"os_pid": os.getpid(), "argv": ["llmos-fuzz", g.str(16)],
                    "secret": r.choice([self.secret, "0" * 64, g.str(20)]),
                    "uid": r.choice([FUZZ_UID, FUZZ_UID, 0, None]), "host": REMOTE_HOST,
                    "heartbeat": r.random() < 0.2}
        if name == "spawn":
            prog = TRUE if r.random() < 0.03 else NO_SUCH_PROGRAM
            return {"argv": [prog, *[g.str(8) for _ in range(r.randrange(3))]],
                    "uid": r.choice([None, None, FUZZ_UID, 0]),
                    "cwd": r.choice([None, "/", "/nonexistent", "/tmp"]),
                    "env": r.choice([None, {}, {"LLMOS_FUZZ": g.str(8).replace("\x00", "")}])}
        if name == "wait":
            pid = r.choice(c.children) if c.children and r.random() < 0.5 else None
            return {"pid": pid, "timeout": r.choice([0, 0.01, 0.2])}
        if name == "kill":
            x = r.random()
            if x < 0.5 and c.children:
                pid = r.choice(c.children)
            elif x < 0.6 and self.owned:
                pid = r.choice(sorted(self.owned))  # one of the fuzzer's own: it ends
            else:
                pid = r.choice([1, NO_SUCH_PID])
            return {"pid": pid, "signal": r.choice(["TERM", "KILL", "INT"])}
        if name == "exit":
            return {"status": r.randrange(256)}
        if name == "echo":
            return {"data": r.randbytes(r.choice([0, 1, 16, 1000, 4096, 65536]))}
        if name == "ticks":
            return {"count": r.randrange(1, 6), "interval": r.choice([0.0, 0.001, 0.01])}
        if name == "sleep":
            return {"seconds": r.choice([0, 0.001, 0.05])}
        if name == "alloc_gpu":
            return {"mem": r.choice([1, 4096, "1MiB", "1GiB", "15GiB", "64GiB", 2**62]),
                    "count": r.choice([1, 1, 2, 3, 64]), "exclusive": r.random() < 0.3,
                    "wait": r.random() < 0.3, "timeout": r.choice([None, 0, 0.1]),
                    "priority": r.choice([0, 0, -5, 5, 20])}
        if name == "free_gpu":
            return {"alloc_id": r.choice(c.allocs) if c.allocs and r.random() < 0.7
                    else r.randbytes(12).hex()}
        if name == "open_tensor":
            mode = r.choice(["r", "w", "x", "rw"])
            dtype, shape = r.choice(["float32", "int8", "bfloat16", "bool"]), \
                [r.randrange(0, 8) for _ in range(r.randrange(0, 4))]
            args: dict[str, Any] = {"path": r.choice(self.names), "mode": mode,
                                    "perm": r.choice([0o644, 0o600, 0o666, 0o1777])}
            if r.random() < 0.2:  # a group: named members instead of dtype and shape
                names = ["a", "b", "a", "__metadata__", ""]
                args["members"] = [[r.choice(names), r.choice([dtype, "int64", "nope"]),
                                    shape] for _ in range(r.randrange(0, 4))]
            elif mode in ("w", "x") or r.random() < 0.1:
                args.update(dtype=dtype, shape=shape)
            if r.random() < 0.2:
                args["shm"] = True
            return args
        if name in ("read_tensor", "write_tensor", "close_tensor"):
            fd = r.choice(c.fds) if c.fds and r.random() < 0.8 else r.randbytes(12).hex()
            args = {"fd": fd}
            if name == "write_tensor":
                args["data"] = r.randbytes(r.choice([0, 1, 4, 8, 32, 128]))
            if name != "close_tensor" and r.random() < 0.3:
                args["slice"] = [[0, r.randrange(0, 4)] for _ in range(r.randrange(1, 3))]
            if name == "read_tensor" and r.random() < 0.2:
                args["shm"] = True
            if name != "close_tensor" and r.random() < 0.2:
                args["member"] = r.choice(["a", "b", "nope"])
            if name == "close_tensor":
                args["discard"] = r.random() < 0.3
            return args
        if name in ("stat", "listdir"):
            return {"path": r.choice([*self.names, "/", FUZZ_DIR, "/nonexistent"])}
        if name == "mkdir":
            return {"path": r.choice(self.names), "perm": r.choice([0o755, 0o777, 0o1777])}
        if name == "unlink":
            return {"path": r.choice(self.names)}
        if name == "rename":
            return {"src": r.choice(self.names), "dst": r.choice(self.names)}
        if name == "chmod":
            return {"path": r.choice(self.names), "perm": r.choice([0o644, 0o600, 0o777, 0])}
        if name == "spawn_train":
            return {"config": {"name": "fuzz", "dataset": NO_SUCH_DATASET,
                               "steps": r.choice([1, 10]), "workers": r.choice([1, 2])},
                    "alloc_id": r.choice([None, *c.allocs[-1:]])}
        if name == "infer":
            return {"model": NO_SUCH_MODEL, "prompt": r.choice(["hi", g.str(40) or "x"]),
                    "max_tokens": r.choice([1, 8]), "stream": r.random() < 0.5}
        # the rest take no arguments, or only ones with defaults: fill those in at random
        return {a.name: a.default for a in call.args if not a.required and r.random() < 0.3}

    # -- the rules no message may break -----------------------------------------------

    def defuse(self, head: Any) -> bool:
        """Make a request harmless in place (see the module's docstring); True if it
        changed. Only values that could pass the kernel's checks need it: anything of a
        wrong type or out of bounds is refused before it runs."""
        if type(head) is not dict:
            return False
        n, a = head.get("n"), head.get("a")
        call = BY_NUMBER.get(n) if type(n) is int else None
        if call is None or type(a) is not dict:
            return False
        name, changed = call.name, False
        if name not in REVIEWED:
            # a syscall added to the table after this fuzzer was written: its side
            # effects are unknown, so it only ever gets an argument it refuses (EINVAL)
            if a.get(UNREVIEWED_ARG) != 1:
                a[UNREVIEWED_ARG] = 1
                return True
            return False

        def put(key: str, value: Any) -> None:
            nonlocal changed
            a[key] = value
            changed = True

        def num(key: str) -> Any:
            v = a.get(key)
            return v if type(v) in (int, float) and v == v else None

        if name == "attach":
            # with the real secret from this host, the kernel would take os_pid for a
            # process of ours, to signal: only OS pids it refuses (EPERM, EINVAL) may stay
            local = a.get("host", "") in ("", self.hostname)
            os_pid = a.get("os_pid")
            if a.get("secret") == self.secret and a.get("token") is None and local and \
                    type(os_pid) is int and os_pid not in (1, self.kernel_pid, NO_SUCH_OS_PID):
                put("host", REMOTE_HOST)
        elif name == "spawn":
            argv = a.get("argv")
            if type(argv) is list and argv and type(argv[0]) is str:
                if argv[0] not in (NO_SUCH_PROGRAM, TRUE, ""):
                    put("argv", [NO_SUCH_PROGRAM, *argv[1:]])
        elif name == "kill":
            pid = a.get("pid")
            if type(pid) is int and 1 < pid < 2**31 and pid not in self.owned \
                    and pid != NO_SUCH_PID:
                put("pid", NO_SUCH_PID)
        elif name == "sleep":
            s = num("seconds")
            if s is not None and s > 1:
                put("seconds", 0.2)
        elif name == "ticks":
            count, interval = a.get("count", 0), num("interval") or 0.0
            if type(count) is int and count > 200:
                put("count", 200)
                count = 200
            if type(count) is int and count * interval > 1:
                put("interval", 0.0)
        elif name == "wait":
            t = num("timeout")
            if "timeout" not in a or a.get("timeout") is None or (t is not None and t > 1):
                put("timeout", 0.5)
        elif name == "alloc_gpu":
            t = num("timeout")
            if a.get("wait") is True and (a.get("timeout") is None or (t is not None and t > 1)):
                put("timeout", 0.5)
        elif name == "open_tensor":
            changed |= self._confine(a, "path")
            shape = a.get("shape")
            if type(shape) is list and all(type(x) is int and x >= 0 for x in shape):
                size = 8
                for x in shape:
                    size *= x
                if MAX_TENSOR_BYTES < size <= 2**40:  # over 2**40: EFBIG, keep it
                    put("shape", [min(x, 4) for x in shape][:4])
        elif name in ("mkdir", "unlink", "chmod"):
            changed |= self._confine(a, "path")
        elif name == "spawn_train":
            # the config is checked before anything starts, the dataset last: one that
            # does not exist ends every config that got that far (ENOENT)
            cfg = a.get("config")
            if type(cfg) is dict and cfg.get("dataset") != NO_SUCH_DATASET:
                cfg["dataset"] = NO_SUCH_DATASET
                changed = True
        elif name == "infer":
            m = a.get("model")
            if type(m) is str and m != NO_SUCH_MODEL:
                put("model", NO_SUCH_MODEL)
        elif name == "rename":
            changed |= self._confine(a, "src")
            changed |= self._confine(a, "dst")
        return changed

    @staticmethod
    def _confine(a: dict, key: str) -> bool:
        p = a.get(key)
        if type(p) is str and not (p == FUZZ_DIR or p.startswith(FUZZ_DIR + "/")):
            a[key] = FUZZ_DIR + (p if p.startswith("/") else "/" + p)
            return True
        return False

    # -- other kinds of message -----------------------------------------------------------

    def junk_message(self, c: Conn) -> None:
        r, g = self.rng, self.gen
        k = r.randrange(8)
        if k == 0:
            frames = [r.randbytes(r.randrange(1, 200))]
        elif k == 1:
            frames = [r.randbytes(r.randrange(0, 40)) for _ in range(r.randrange(1, 20))]
        elif k == 2:
            frames = [b""] * r.randrange(1, 30)
        elif k == 3:
            frames = [_pack(g.value())]  # a map only by chance
        elif k == 4:
            frames = [_pack({g.key(): g.value() for _ in range(r.randrange(5))})]
        elif k == 5:
            frames = [_pack({"v": ABI_VERSION, "n": 1})]  # no seq
        elif k == 6:
            frames = [r.randbytes(r.choice([1000, 65536]))]
        else:
            frames = [_pack([ABI_VERSION, next(_SEQ), 1, {}])]  # the right fields, as a list
        if not self.harmless(frames):
            frames = [b"\xc1"]
        self.send_frames(c, frames, f"junk{k}")

    def stranger_message(self) -> None:
        """A valid request, or junk, from a TCP peer that must never be answered."""
        sock = self.rng.choice(list(self.strangers))
        head = {"v": ABI_VERSION, "s": next(_SEQ), "n": self.rng.choice(TABLE).number,
                "a": {}}
        frames = encode(head) if self.rng.random() < 0.5 else \
            [self.rng.randbytes(self.rng.randrange(1, 64))]
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # its queue is full of what never went anywhere
            pass
        self.report.kinds["stranger"] += 1

    def node_message(self, c: Conn) -> None:
        """What a node agent sends, from a client's key: dropped, never answered."""
        r, g = self.rng, self.gen
        kind = r.choice(wire.NODE_KINDS)
        head = wire.node(kind, name=r.choice(["n1", g.str(8)]), epoch=g.value(),
                         pid=r.choice([g.int(), *self.owned][:8]), res=g.value(),
                         pids=[g.int()], status=g.value())
        self.send_frames(c, encode(head), "node")

    def control_message(self, c: Conn) -> None:
        """Heartbeats and cancels, with real and made-up tokens and seqs."""
        r, g = self.rng, self.gen
        if self.tcp and c.target == "kernel" and r.random() < 0.2:
            self.node_message(c)
            return
        if r.random() < 0.5:
            token = c.hb_token if c.hb_token and r.random() < 0.3 else r.choice(
                [g.str(32), g.value(), secret_like(r)])
            head: dict[Any, Any] = {"t": "hb", "k": token}
            kind = "heartbeat"
        else:
            seqs = list(c.pending) or [0]
            head = {"t": "cancel", "c": r.choice(seqs) if r.random() < 0.6 else g.value()}
            kind = "cancel"
        if r.random() < 0.2:
            head[g.key()] = g.value()
        if r.random() < 0.1:
            head["s"] = g.value()  # with an int seq it is a request: EPROTO or ENOSYS
        try:
            frames = encode(head)
        except (TypeError, ValueError, OverflowError):
            frames = [_pack(head)]
        self.send_frames(c, frames, kind)

    def driver_message(self, c: Conn) -> None:
        """What a driver (or something posing as one) might send."""
        r, g = self.rng, self.gen
        k = r.randrange(7)
        if k == 0:
            head: dict[Any, Any] = {"t": "ready", "services": [r.choice(SERVICES)],
                                    "token": secret_like(r), "os_pid": g.int()}
        elif k == 1:
            head = {"t": "hb", "info": {g.str(8): g.value() for _ in range(r.randrange(6))}}
        elif k == 2:
            head = {"t": "rep", "i": r.randrange(1, 100000)}
            if r.random() < 0.5:
                head["r"] = g.value()
            else:
                head.update(e=g.value(), m=g.value())
            if r.random() < 0.3:
                head["p"] = 1
            if r.random() < 0.3:
                head["res"] = [[r.choice("+-"), "gpu", g.str(8), g.int()]]
        elif k == 3:
            head = {"t": r.choice(["welcome", "req", "exit", "stop"]), "i": g.int(),
                    "pid": g.int(), "live": [g.int()], "n": 100, "a": {"data": b"x"},
                    "c": {"pid": 1, "uid": 0}}
        elif k == 4:
            head = {"t": g.value()}
        elif k == 5:
            head = {"t": "rep", "i": r.randrange(1, 100000), "r": r.randbytes(64)}
            frames = encode(head)
            frames = frames[:1] if r.random() < 0.5 else frames + [b"extra"]
            self.send_frames(c, frames, "driver-rep-frames")
            return
        else:
            self.junk_message(c)
            return
        try:
            frames = encode(head)
        except (TypeError, ValueError, OverflowError):
            frames = [_pack(head)]
        t = head.get("t")
        self.send_frames(c, frames, f"driver-{t if t in DRIVER_KINDS else 'junk'}")

    def big(self, name: str, make: Callable[[], bytes]) -> bytes:
        if name not in self._big_cache:
            self._big_cache[name] = make()
        return self._big_cache[name]

    def big_message(self, which: int | None = None) -> None:
        """Oversized messages: headers near and over MAX_HEADER, huge lists and maps,
        deep nesting, megabytes of bulk."""
        r = self.rng
        c = self.rng.choice([x for x in self.conns if x.role == "attached"] or self.conns)
        k = r.randrange(len(BIG_CASES)) if which is None else which
        name = BIG_CASES[k]
        nop = BY_NAME["nop"].number
        seq = next(_SEQ)
        if name.startswith("header_"):
            size = MAX_HEADER + {"header_under": -1, "header_at": 0, "header_over": 1,
                                 "header_2mib": MAX_HEADER}[name]
            frames = [padded_header(seq, nop, size)]
        elif name == "huge_list":
            # spawn's argv with 300k items: a header under 1 MiB, refused for its length
            items = self.big(name, lambda: b"\xdd" + struct.pack(">I", 300_000)
                             + b"\xa1x" * 300_000)
            frames = [raw_map({"v": _pack(ABI_VERSION), "s": _pack(seq),
                               "n": _pack(BY_NAME["spawn"].number),
                               "a": b"\x81" + _pack("argv") + items})]
        elif name == "huge_int_list":
            # open_tensor's shape with 900k items: a header just under 1 MiB
            items = self.big(name, lambda: b"\xdd" + struct.pack(">I", 900_000)
                             + b"\x01" * 900_000)
            frames = [raw_map({"v": _pack(ABI_VERSION), "s": _pack(seq),
                               "n": _pack(BY_NAME["open_tensor"].number),
                               "a": b"\x84" + _pack("path") + _pack(FUZZ_DIR + "/t0")
                               + _pack("mode") + _pack("w") + _pack("dtype") + _pack("int8")
                               + _pack("shape") + items})]
        elif name == "huge_map":
            env = self.big(name, lambda: _pack({f"K{i}": "v" for i in range(60_000)}))
            frames = [raw_map({"v": _pack(ABI_VERSION), "s": _pack(seq),
                               "n": _pack(BY_NAME["spawn"].number),
                               "a": b"\x82" + _pack("argv") + _pack([NO_SUCH_PROGRAM])
                               + _pack("env") + env})]
        elif name == "deep":
            frames = [raw_map({"v": _pack(ABI_VERSION), "s": _pack(seq), "n": _pack(nop),
                               "a": deep_list(r.choice([MSGPACK_MAX_DEPTH - 2,
                                                        MSGPACK_MAX_DEPTH + 1]))})]
        elif name == "many_frames":
            frames = [encode({"v": ABI_VERSION, "s": seq, "n": nop})[0]] + [b"f"] * 5000
        else:  # bulk_2mib: a valid echo of 2 MiB
            data = self.big(name, lambda: r.randbytes(2 << 20))
            frames = encode({"v": ABI_VERSION, "s": seq, "n": BY_NAME["echo"].number,
                             "a": {"data": data}})
        self.send_frames(c, frames, f"big-{name}")


DRIVER_KINDS = ("ready", "hb", "rep", "welcome", "req", "exit", "stop")
BIG_CASES = ["header_under", "header_at", "header_over", "header_2mib", "huge_list",
             "huge_int_list", "huge_map", "deep", "many_frames", "bulk_2mib"]


def padded_header(seq: int, number: int, size: int) -> bytes:
    """A request header of exactly `size` bytes (an unknown argument pads it)."""
    head = msgpack.packb({"v": ABI_VERSION, "s": seq, "n": number, "a": {"pad": ""}})
    pad = "x" * (size - len(head) - 4)  # str8 -> str32: 4 bytes more of length
    out = msgpack.packb({"v": ABI_VERSION, "s": seq, "n": number, "a": {"pad": pad}})
    assert len(out) == size, (len(out), size)
    return out


def secret_like(r: random.Random) -> str:
    return r.randbytes(32).hex()


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) < 300 else text[:300] + "..."


class Hung(Exception):
    """The kernel died or stopped answering: the run ends."""


# -- structural mutations (on the header dict) ----------------------------------------------


def _args(head: dict) -> dict | None:
    a = head.get("a")
    return a if type(a) is dict else None


def m_flip_field(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    head[f.rng.choice(["v", "s", "n", "a"])] = f.gen.value()


def m_flip_arg(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    a = _args(head)
    if a:
        a[f.rng.choice(list(a))] = f.gen.value()
    else:
        m_add_arg(f, head, call, c)


def m_edge_arg(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    """An argument at or just past one of its bounds in the table."""
    a = _args(head)
    if a is None or not call.args:
        return
    arg: Arg = f.rng.choice(call.args)
    a[arg.name] = f.rng.choice(edge_values(arg, f.gen))


def edge_values(arg: Arg, g: Gen) -> list[Any]:
    out: list[Any] = [None]
    for bound in (arg.lo, arg.hi):
        if bound is not None:
            b = int(bound) if arg.type in ("int", "size") else bound
            out += [b, b - 1, b + 1] if arg.type != "float" else [b, b - 1e-9, b + 1e-9]
    if arg.type == "float":
        out += [float("nan"), float("inf"), -0.0]
    if arg.max_len is not None:
        n = min(arg.max_len + 1, 5000)
        if arg.type == "str":
            out += ["x" * arg.max_len, "x" * (arg.max_len + 1)]
        elif arg.type in ("list[str]", "list[int]", "slice"):
            item = "x" if arg.type == "list[str]" else (1 if arg.type == "list[int]" else [0, 1])
            out += [[item] * n]
        elif arg.type == "dict[str,str]":
            out += [{f"k{i}": "v" for i in range(n)}]
        elif arg.type == "bytes" and arg.max_len <= 1 << 20:
            out += [b"\x00" * (arg.max_len + 1)]
    if arg.choices:
        out += [arg.choices[0].upper(), arg.choices[-1] + " ", "", g.str(6)]
    if arg.type == "size":
        out += ["0B", "1.5B", "1 GiB", "1GIB", "99999999999999999999TiB", "-1", 0, -5]
    if arg.type == "slice":
        out += [[[3, 1]], [[0, 2**62]], [[0]], [[-1, 2]], [[0, 1, 2]], [[0, 1]] * 40]
    if arg.type == "list[int]":
        out += [[2**62 - 1, 2**62 - 1], [-1], [2**31] * 3, [0] * 33]
    if arg.type == "members":
        out += [[], [[1, 2, 3]], [["a", "uint8"]], [["a", "uint8", [-1]]],
                [["a", "uint8", [1] * 40]], [["a", "float32", [2**61, 2**61]]],
                [["x" * 300, "uint8", [1]]], [["a", "uint8", [1]]] * 2, [None]]
    if arg.type == "messages":
        out += [[], [{"role": "user"}], [{"role": "robot", "content": "x"}],
                [{"role": "user", "content": 1}], [{"role": "user", "content": "x", "n": 1}],
                [{"role": "user", "content": "x"}] * (min(arg.max_len or 8, 5000) + 1)]
    if arg.type == "str":
        out += ["a\x00b", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
    return out


def m_drop_field(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    head.pop(f.rng.choice(["v", "s", "n", "a"]), None)


def m_drop_arg(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    a = _args(head)
    if a:
        del a[f.rng.choice(list(a))]


def m_add_field(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    head[f.gen.key()] = f.gen.value()


def m_add_arg(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    a = _args(head)
    if a is not None:
        a[f.gen.key()] = f.gen.value()


def m_other_number(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    r = f.rng.random()
    if r < 0.6:
        head["n"] = f.rng.choice(TABLE).number  # these args, another syscall's
    elif r < 0.8:
        head["n"] = f.rng.choice([-1, 10, 99, 103, 199, 203, 310, 399, 400, 2**63 - 1])
    else:
        head["n"] = f.gen.value()


def m_version(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    head["v"] = f.rng.choice([0, ABI_VERSION + 1, -1, float(ABI_VERSION), True, "1", None,
                              [ABI_VERSION], 2**64 - 1])


def m_dup_seq(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    if c.used_seqs:
        head["s"] = f.rng.choice(c.used_seqs)


def m_seq_edge(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    head["s"] = f.rng.choice([0, -1, 2**63 - 1, 2**64 - 1, -2**63, 1.0, "1", True, None,
                              [1], b"\x01"])


def m_args_not_map(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    a = head.get("a")
    head["a"] = f.rng.choice([list(a.items()) if type(a) is dict else [], None, 1, "a",
                              b"a", True, [[k, v] for k, v in (a or {}).items()]
                              if type(a) is dict else {}])


def m_bytes_for_str(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    """bytes where a str belongs (a frame reference) and a str where bytes belong."""
    a = _args(head)
    if not a:
        return
    k = f.rng.choice(list(a))
    v = a[k]
    if type(v) is str:
        a[k] = v.encode()
    elif type(v) is bytes:
        a[k] = v.decode("latin-1")
    else:
        a[k] = f.gen.bytes()


def m_bad_ref(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    """A frame reference that points past the frames, is short, or of another ext type."""
    a = _args(head)
    target = a if a is not None else head
    key = f.rng.choice(list(target) or ["x"])
    target[key] = f.rng.choice([
        msgpack.ExtType(1, (7).to_bytes(4, "little")), msgpack.ExtType(1, b"\xff\xff\xff\xff"),
        msgpack.ExtType(1, b"\x00\x00"), msgpack.ExtType(1, b""), msgpack.ExtType(2, b"\0" * 4),
        msgpack.Timestamp(2**34, 999_999_999)])  # ext type -1, which msgpack decodes itself


def m_nest(f: Fuzzer, head: dict, call: Syscall, c: Conn) -> None:
    a = _args(head)
    if a:
        k = f.rng.choice(list(a))
        a[k] = {"x": [a[k]]} if f.rng.random() < 0.5 else [[a[k]]]


STRUCT_MUTATIONS = [m_flip_field, m_flip_arg, m_flip_arg, m_edge_arg, m_edge_arg, m_edge_arg,
                    m_drop_field, m_drop_arg, m_add_field, m_add_arg, m_other_number,
                    m_other_number, m_version, m_dup_seq, m_dup_seq, m_seq_edge,
                    m_args_not_map, m_bytes_for_str, m_bad_ref, m_nest]


# -- frame mutations (on the encoded frames) --------------------------------------------------


def f_truncate(f: Fuzzer, frames: list) -> list:
    head = bytes(frames[0])
    frames[0] = head[:f.rng.randrange(len(head))] if head else head
    return frames


def f_bitflip(f: Fuzzer, frames: list) -> list:
    head = bytearray(frames[0])
    for _ in range(f.rng.choice([1, 1, 2, 4, 8])):
        if head:
            i = f.rng.randrange(len(head))
            head[i] ^= 1 << f.rng.randrange(8)
    frames[0] = bytes(head)
    return frames


def f_byte_set(f: Fuzzer, frames: list) -> list:
    head = bytearray(frames[0])
    if head:
        head[f.rng.randrange(len(head))] = f.rng.choice([0x00, 0xc1, 0xff, 0xdd, 0xdf, 0x7f])
    frames[0] = bytes(head)
    return frames


def f_trailing(f: Fuzzer, frames: list) -> list:
    frames[0] = bytes(frames[0]) + f.rng.randbytes(f.rng.randrange(1, 9))
    return frames


def f_extra_frames(f: Fuzzer, frames: list) -> list:
    return frames + [f.rng.randbytes(f.rng.randrange(0, 64))
                     for _ in range(f.rng.randrange(1, 40))]


def f_missing_frames(f: Fuzzer, frames: list) -> list:
    return frames[:-1] if len(frames) > 1 else frames + [b""]


def f_swap_frames(f: Fuzzer, frames: list) -> list:
    if len(frames) > 1:
        return frames[::-1]
    return [b"", *frames]


def f_double(f: Fuzzer, frames: list) -> list:
    """Two headers in one message: the second is surplus bulk."""
    return [frames[0], *frames]


FRAME_MUTATIONS = [f_truncate, f_truncate, f_bitflip, f_bitflip, f_byte_set, f_trailing,
                   f_extra_frames, f_missing_frames, f_swap_frames, f_double]


# -- the well-behaved client, in its own process ---------------------------------------------


def well_behaved_main(root: str, stop: Any, results: Any, seed: int) -> None:
    """nop, getpid and echo (random bytes, compared byte for byte) until told to stop;
    report calls, wrong answers and the slowest call. A call unanswered for HANG_S
    raises ETIMEDOUT (userland's timeout), which is reported as a hang."""
    rng = random.Random(seed)
    out: dict[str, Any] = {"calls": 0, "wrong": [], "error": None, "max_s": 0.0}
    try:
        with userland.connect(root, heartbeat=False, timeout=HANG_S) as osh:
            pid = osh.pid
            out["pid"] = pid
            results.put(("ready", pid))
            while not stop.is_set():
                k = out["calls"] % 3
                t0 = time.monotonic()
                if k == 0:
                    got, want = osh.nop(), None
                elif k == 1:
                    got, want = osh.getpid(), pid
                else:
                    want = rng.randbytes(rng.choice([0, 1, 100, 4096, 65536]))
                    got = osh.echo(want)
                dt = time.monotonic() - t0
                out["max_s"] = max(out["max_s"], dt)
                out["calls"] += 1
                if got != want or type(got) is not type(want):
                    out["wrong"].append(f"{['nop', 'getpid', 'echo'][k]}: got {_short(got)}, "
                                        f"wanted {_short(want)}")
                    if len(out["wrong"]) > 10:
                        break
    except SyscallError as e:
        out["error"] = str(e)
    except Exception as e:  # reported, not lost
        out["error"] = f"{type(e).__name__}: {e}"
    results.put(("done", out))


# -- one run ------------------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 2)
    except psutil.Error:
        return 0.0


def run_fuzz(home: str | os.PathLike | Home, seconds: float | None = None,
             messages: int | None = None, seed: int = 0,
             rss_bound_mib: float = DEFAULT_RSS_BOUND_MIB, warmup: float = 0.15,
             reserved_ids: int = 0, oversized: bool = True,
             progress: bool = False, tcp: bool = False) -> FuzzReport:
    """Fuzz the kernel running on home for `seconds` or `messages` (whichever comes
    first; at least one must be given) and return the report; report.ok says whether
    every check held. The first `warmup` fraction of the run (which starts with every
    oversized case once) is warm-up: the RSS bound applies from its end."""
    if seconds is None and messages is None:
        raise ValueError("give seconds or messages")
    home = home if isinstance(home, Home) else Home.resolve(home)
    report = FuzzReport(seed=seed, rss_bound_mib=rss_bound_mib)
    kernel_pid = home.kernel_pid()
    if kernel_pid is None:
        raise RuntimeError(f"no kernel is running on {home.root}")
    report.kernel_pid = kernel_pid
    report.rss_start_mib = report.rss_peak_mib = _rss_mib(kernel_pid)

    ctx = mp.get_context("spawn")  # a clean process: no inherited zmq context
    stop, results = ctx.Event(), ctx.Queue()
    fz = Fuzzer(home, seed, report, reserved_ids, oversized, tcp_credential(home) if tcp
                else None)
    control: userland.Llmos | None = None
    wb = None
    before: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        control = userland.connect(home.root, uid=0, heartbeat=False, timeout=HANG_S)
        before = control.sysinfo()
        try:
            control.mkdir(FUZZ_DIR, 0o1777)
        except SyscallError as e:
            if e.errno != Errno.EEXIST:
                raise
        wb = ctx.Process(target=well_behaved_main, name="llmos-fuzz-well-behaved",
                         args=(str(home.root), stop, results, seed + 1), daemon=True)
        wb.start()
        kind, _ = results.get(timeout=60)
        if kind != "ready":
            raise RuntimeError("the well-behaved client did not start")
        fz.setup()
        t0 = time.monotonic()
        for k in range(len(BIG_CASES) if oversized else 0):  # the warm-up starts with
            fz.big_message(k)                                 # every oversized case
            fz.pump(0)
        fz.sync()
        warm_at = (messages or 0) * warmup
        warm_until = t0 + (seconds or 0) * warmup
        warm = False
        n = 0
        while True:
            now = time.monotonic()
            if (seconds is not None and now - t0 >= seconds) or \
                    (messages is not None and report.messages >= messages):
                break
            if not warm and (report.messages >= warm_at if messages is not None else True) \
                    and (now >= warm_until if seconds is not None else True):
                fz.sync()
                fz.pump(0.2)
                report.rss_warm_mib = _rss_mib(kernel_pid)
                warm = True
            fz.step()
            fz.pump(0)
            n += 1
            if n % SYNC_EVERY == 0:
                fz.sync()
                report.rss_peak_mib = max(report.rss_peak_mib, _rss_mib(kernel_pid))
                if not wb.is_alive():
                    report.fail("the well-behaved client ended early")
                    break
                if progress and n % (SYNC_EVERY * 20) == 0:
                    log(f"{time.monotonic() - t0:.0f} s: {report.messages} messages, "
                        f"RSS {_rss_mib(kernel_pid):.1f} MiB")
        if not warm:
            report.rss_warm_mib = _rss_mib(kernel_pid)
        fz.sync()
        deadline = time.monotonic() + 1.0  # late driver replies (sleep, ticks, alloc timeouts)
        while any(c.pending for c in fz.conns) and time.monotonic() < deadline:
            fz.pump(0.05)
    except Hung:
        pass
    except (SyscallError, zmq.ZMQError, RuntimeError, queue.Empty) as e:
        report.fail(f"{type(e).__name__}: {e}")
    finally:
        report.seconds = time.monotonic() - t0
        stop.set()
        alive = fz.kernel_alive() and home.kernel_pid() == kernel_pid
        if alive:
            try:
                for c in list(fz.conns):
                    fz.exit_process(c)  # known process or not (see churn)
            except Hung:
                pass
        for c in list(fz.conns):
            fz.drop_conn(c)
        for s in [*fz.reserved, *fz.strangers]:
            s.close(0)
        fz.ctx.term()
        _collect_well_behaved(report, wb, results)
        if not fz.kernel_alive():
            report.fail(f"the kernel (pid {kernel_pid}) died")
        elif home.kernel_pid() != kernel_pid:
            report.fail(f"the kernel was replaced: pid {home.kernel_pid()}, not {kernel_pid}")
        elif control is None:
            report.fail("could not attach to the kernel as root with run/secret")
        else:
            _final_checks(report, control, before, kernel_pid)
        if control is not None:
            try:
                control.close()
            except Exception:
                pass
    return report


def _collect_well_behaved(report: FuzzReport, wb: Any, results: Any) -> None:
    if wb is None:
        return
    out = None
    deadline = time.monotonic() + HANG_S + 5
    while time.monotonic() < deadline:
        try:
            kind, value = results.get(timeout=0.5)
        except Exception:
            if not wb.is_alive():
                try:
                    kind, value = results.get(timeout=1)
                except Exception:
                    break
            else:
                continue
        if kind == "done":
            out = value
            break
    wb.join(5)
    if wb.is_alive():
        wb.kill()
        wb.join()
    if out is None:
        report.fail("the well-behaved client reported nothing (it died or hung)")
        return
    report.well_behaved_calls = out["calls"]
    report.well_behaved_max_s = out["max_s"]
    for w in out["wrong"]:
        report.fail(f"the well-behaved client got a wrong answer: {w}")
    if out["error"]:
        report.fail(f"the well-behaved client failed: {out['error']}")
    if out["calls"] == 0:
        report.fail("the well-behaved client made no call")


def tcp_credential(home: Home) -> dict:
    """A uid-0 client key for the fuzzer, registered with the kernel listening on
    home (RuntimeError if it does not listen)."""
    try:
        endpoint = (home.run / "endpoint").read_text().strip()
    except OSError:
        raise RuntimeError(f"the kernel on {home.root} does not listen on TCP "
                           "(llmos start --listen)") from None
    path = home.run / f"fuzz-{os.getpid()}.client.json"
    ring = Keyring(home.root)
    ring.revoke(f"fuzz-{os.getpid()}")
    write_credential(path, ring.issue("client", f"fuzz-{os.getpid()}", endpoint, 0))
    return read_credential(path)


def _final_checks(report: FuzzReport, control: Any, before: dict, kernel_pid: int) -> None:
    try:
        after = control.sysinfo()
        procs = control.ps()
    except SyscallError as e:
        report.fail(f"sysinfo after the run failed: {e}")
        return
    report.rss_end_mib = _rss_mib(kernel_pid)
    report.rss_peak_mib = max(report.rss_peak_mib, report.rss_end_mib)
    d0 = before.get("dropped", {})
    report.kernel_dropped = {k: v - d0.get(k, 0) for k, v in after["dropped"].items()
                             if v - d0.get(k, 0)}
    if report.kernel_dropped.get("internal_error"):
        report.fail(f"the kernel counted {report.kernel_dropped['internal_error']} internal "
                    "errors (an exception in a handler: see its log)")
    restarts0 = {d["name"]: d["restarts"] for d in before.get("drivers", [])}
    for d in after["drivers"]:
        if d["restarts"] != restarts0.get(d["name"], d["restarts"]):
            report.fail(f"driver {d['name']} was restarted during the run "
                        f"({d['last_exit']})")
        if d.get("os_pid"):
            report.driver_rss_mib[d["name"]] = _rss_mib(d["os_pid"])
    # processes the fuzzer attached and did not end (a mutated attach that got
    # through on a connection it then closed): shown, then ended, by the root handle
    left = [p for p in procs if p["state"] == "running" and p["os_pid"] is None
            and p["pid"] != 1 and p["argv"][:1] == ["llmos-fuzz"]]
    report.processes_left = len(left)
    report.left = [{k: p[k] for k in ("pid", "uid", "argv", "attached")} for p in left[:10]]
    for p in left:
        try:
            control.kill(p["pid"], "KILL")
        except SyscallError:
            pass
    if report.rss_end_mib - report.rss_warm_mib > report.rss_bound_mib:
        report.fail(f"the kernel's RSS grew by {report.rss_end_mib - report.rss_warm_mib:.1f} "
                    f"MiB after the warm-up (bound {report.rss_bound_mib:g} MiB)")


# -- the command --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, help="run this long (default 10 s)")
    ap.add_argument("--messages", type=int, help="send this many messages")
    ap.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    ap.add_argument("--home", help="fuzz the kernel running on this LLMOS_HOME "
                    "(default: boot one on a temporary home)")
    ap.add_argument("--rss-bound-mib", type=float, default=DEFAULT_RSS_BOUND_MIB,
                    help="most the kernel's RSS may grow after the warm-up "
                    f"(default {DEFAULT_RSS_BOUND_MIB:g})")
    ap.add_argument("--warmup", type=float, default=0.15,
                    help="fraction of the run before the RSS baseline (default 0.15)")
    ap.add_argument("--reserved-ids", type=int, default=0, metavar="N",
                    help="also hold N connections under the routing ids libzmq will give "
                    "the next peers without one (known to abort the kernel: "
                    "docs/fuzz-and-load.md)")
    ap.add_argument("--no-oversized", action="store_true",
                    help="leave out the oversized messages (headers near 1 MiB, huge "
                    "lists, megabytes of bulk)")
    ap.add_argument("--tcp", action="store_true",
                    help="fuzz the CURVE TCP endpoint (see above)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None or args.messages else 10.0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    log(f"fuzz: seed {seed}")
    own: BenchKernel | None = None
    try:
        if args.home:
            home = Home.resolve(args.home)
        else:
            own = BenchKernel(prefix="llmos-fuzz-",
                              listen="127.0.0.1:0" if args.tcp else None)
            home = own.home
            log(f"fuzz: booted kernel pid {own.pid} on {own.root}")
        report = run_fuzz(home, seconds=seconds, messages=args.messages, seed=seed,
                          rss_bound_mib=args.rss_bound_mib, warmup=args.warmup,
                          reserved_ids=args.reserved_ids,
                          oversized=not args.no_oversized, progress=True, tcp=args.tcp)
    except RuntimeError as e:
        log(f"fuzz: {e}")
        return 2
    finally:
        if own is not None:
            own.stop()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
