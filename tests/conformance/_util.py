"""Helpers shared by the conformance tests: the errno recorder, calls without the
library's conveniences, and the system's configuration."""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable

import zmq
from conftest import examples
from hypothesis import HealthCheck, Phase, settings

from syscalls import BY_NAME, Errno, Home, SyscallError, decode
from userland import Llmos

# One kernel serves most conformance tests (conftest.system). Its GPUs, bypass and
# GPU quota are tests/test_devices_stateful.py's, whose reference model
# test_devices.py reuses; max_inflight_per_process is small so EAGAIN is cheap.
SHARED_CONFIG: dict[str, Any] = {
    "gpus": "sim", "sim_gpus": "2x1GiB", "gpu_max_bypass": 2, "gpu_quota": {"1001": "1GiB"},
    "tensor_max_size": "8MiB", "tensor_quota": {"1002": "256KiB"}, "tensor_cache": "4MiB",
    "tensor_shm_threshold": "64KiB", "infer_max_prompt": 1000, "infer_max_tokens": 3000,
    "max_inflight_per_process": 4,
}
MAX_INFLIGHT = SHARED_CONFIG["max_inflight_per_process"]
TENSOR_MAX = 8 << 20
TENSOR_QUOTA = {1002: 256 << 10}
INFER_MAX_PROMPT = 1000
INFER_MAX_TOKENS = 3000
WAIT_S = 20.0      # liveness bound for something that is ending (a python start-up)

# No shrinking: steps replayed against a real system are not always the same steps
# (which child a wait for any reaps), so the first failing run is reported as is.
FAST = settings(max_examples=examples(20), stateful_step_count=20, deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))
LONG = settings(FAST, max_examples=examples(50), stateful_step_count=25)


# -- the errno recorder ------------------------------------------------------------------

class Recorder:
    """(syscall number, errno) of every error reply this process received while
    `active` (during conformance tests: conftest turns it on and off)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.active = False
        self.tests: set[str] = set()       # nodeids of the conformance tests that ran
        self.collected: set[str] = set()   # conformance modules in this session

    def record(self, number: int | None, errno: Any) -> None:
        if self.active and type(number) is int and type(errno) is int:
            self.seen.add((number, errno))


RECORDER = Recorder()


def install_recorder() -> None:
    """Wrap Llmos._send (remember each sequence number's syscall) and Llmos._recv
    (record the errno of an error reply). Idempotent."""
    if getattr(Llmos, "_conformance_recorder", False):
        return
    send, recv = Llmos._send, Llmos._recv

    def _send(self: Llmos, seq: int, number: int, args: dict) -> None:
        self.__dict__.setdefault("_numbers", {})[seq] = number
        send(self, seq, number, args)

    def _recv(self: Llmos, seq: int) -> dict:
        head = recv(self, seq)
        if "e" in head:
            RECORDER.record(self.__dict__.get("_numbers", {}).get(seq), head["e"])
        return head

    Llmos._send, Llmos._recv = _send, _recv  # type: ignore[method-assign]
    Llmos._conformance_recorder = True  # type: ignore[attr-defined]


# -- calls -------------------------------------------------------------------------------

def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> Errno | None:
    """Make a call: None if it succeeded, else its errno."""
    try:
        fn(*args, **kw)
    except SyscallError as e:
        return Errno(e.errno)
    return None


def outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[str, Any]:
    """("r", result) or ("e", errno name)."""
    try:
        return "r", fn(*args, **kw)
    except SyscallError as e:
        return "e", Errno(e.errno).name


def expect(errno: Errno | None, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
    got = errno_of(fn, *args, **kw)
    name = getattr(fn, "__name__", fn)
    assert got == errno, f"{name}{args}{kw}: got {got and got.name}, " \
                         f"expected {errno and errno.name}"


def send(h: Llmos, name: str, **args: Any) -> int:
    """Send a call without waiting for its answer (one at a time per handle unless
    answers are read with answers())."""
    seq = next(h._seq)
    h._send(seq, BY_NAME[name].number, args)
    return seq


def answer(h: Llmos, seq: int) -> tuple[str, Any]:
    """The final answer to call seq on h: ("r", result) or ("e", errno name)."""
    head = h._recv(seq)
    if "e" in head:
        return "e", Errno(head["e"]).name
    return "r", head.get("r")


def answers(h: Llmos, seqs: list[int], timeout: float = WAIT_S) -> dict[int, tuple[str, Any]]:
    """The final answers to several calls in flight on h at once, by sequence number
    (recorded like any other)."""
    out: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(seqs):
        if not h._sock.poll(100):
            assert time.monotonic() < deadline, f"no answer to {set(seqs) - set(out)}"
            continue
        head = decode(h._sock.recv_multipart())
        seq = head.get("s")
        if seq not in seqs or head.get("p"):
            continue
        if "e" in head:
            RECORDER.record(h.__dict__.get("_numbers", {}).get(seq), head["e"])
            out[seq] = ("e", Errno(head["e"]).name)
        else:
            out[seq] = ("r", head.get("r"))
    return out


def has_answer(h: Llmos) -> bool:
    return bool(h._sock.poll(0))


def unattached(root: Any, timeout: float = 10.0) -> Llmos:
    """A handle whose connection never attached: every call but attach is ENOTCONN.
    Built without Llmos.__init__ (which attaches); close it with ._close()."""
    h = object.__new__(Llmos)
    h.home = Home.resolve(root)
    h.timeout = timeout
    h.kernel_pid = h.home.kernel_pid()
    h.ctx = zmq.Context.instance()
    h._seq = itertools.count(1)
    h._lock = threading.RLock()
    h._streams = {}
    h._sock = h._socket()
    h._closed = False
    h._kernel_gone = False
    h._restarted = None
    h.pid = -1
    h._hb_stop = threading.Event()
    h._hb_thread = None
    h.spawned = False
    return h


def call_number(h: Llmos, number: int, **args: Any) -> Any:
    """A call by number, through the library (and the recorder)."""
    return h._call(number, args)


# -- scripted walks through a state machine ------------------------------------------------

class Draws:
    """Stands in for st.data() when a test calls a machine's rules itself: draw()
    returns the values it was given, in turn."""

    def __init__(self, *values: Any) -> None:
        self.values = list(values)

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.values.pop(0)


def walk(machine: Any, steps: list[tuple[str, dict]], invariants: tuple[str, ...]) -> list:
    """Run a machine's rules in a fixed order, its invariants after each: a walk
    through every errno the machine's model predicts, so that each is produced on
    every run (hypothesis's runs reach most, not all, in a CI-sized budget).
    Returns what each rule returned; tears the machine down."""
    out = []
    try:
        for name, kw in steps:
            # a callable value is computed from what the earlier rules returned
            out.append(getattr(machine, name)(**{k: v(out) if callable(v) else v
                                                  for k, v in kw.items()}))
            for inv in invariants:
                getattr(machine, inv)()
    finally:
        machine.teardown()
    return out
