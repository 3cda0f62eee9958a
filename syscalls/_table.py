"""The syscall table: the single source of truth for the llmos ABI.

One line per syscall, as in xv6's syscall.c and MINIX's table.c: its number, its
name, its arguments (type and bounds), the service that serves it, whether it
blocks, whether it is idempotent (a call in flight to a driver that dies is
retried once when it is, answered EIO when it is not) and whether it streams
(several partial replies before the final one). Numbers are grouped by service:
kernel 0-99, echo 100-199, devices 200-299, tensorfs 300-399, executor 400-499.

The kernel validates every request against this table before serving or
routing it, so handlers receive arguments of the declared types and bounds.
Nothing here imports anything else of llmos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ABI_VERSION = 1

REQUIRED: Any = object()

MAX_ARGV = 256
MAX_STR = 4096
MAX_ECHO = 16 * 1024 * 1024


@dataclass(frozen=True)
class Arg:
    """One argument: `type` is one of TYPES; `lo`/`hi` bound numbers, `max_len`
    bounds the length of strings, bytes, lists and dicts."""

    name: str
    type: str
    default: Any = REQUIRED
    nullable: bool = False
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Syscall:
    number: int
    name: str
    service: str
    args: tuple[Arg, ...] = ()
    blocks: bool = False
    idempotent: bool = False
    streams: bool = False
    returns: str = ""
    errors: tuple[str, ...] = ()
    doc: str = ""
    by_name: dict[str, Arg] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {a.name: a for a in self.args})


TYPES = ("int", "float", "str", "bytes", "bool", "list[str]", "dict[str,str]")

_SIGNALS = ("TERM", "KILL", "INT")

TABLE: tuple[Syscall, ...] = (
    # -- kernel: processes ------------------------------------------------------
    Syscall(0, "attach", "kernel", (
        Arg("os_pid", "int", lo=0, hi=2**31, doc="the caller's OS pid"),
        Arg("argv", "list[str]", default=[], max_len=MAX_ARGV, doc="shown by ps"),
        Arg("secret", "str", default=None, nullable=True, max_len=256,
            doc="the home's secret (run/secret): attaches a new process"),
        Arg("token", "str", default=None, nullable=True, max_len=256,
            doc="a spawn token: binds to the process the kernel spawned"),
        Arg("uid", "int", default=None, nullable=True, lo=0, hi=2**31,
            doc="uid to attach as (with the secret); default: the configured default uid"),
        Arg("host", "str", default="", max_len=256, doc="the caller's hostname"),
    ), returns="{pid, ppid, uid, hb_token, kernel_pid, abi}",
        errors=("EACCES", "EINVAL", "EPROTO", "EBUSY"),
        doc="Bind this connection to an llmos process. The first call on every "
            "connection; the userland library makes it in connect()."),
    Syscall(1, "nop", "kernel", returns="None", idempotent=True,
            doc="Do nothing; the null syscall that benchmarks time."),
    Syscall(2, "getpid", "kernel", returns="int", idempotent=True,
            doc="The caller's llmos pid."),
    Syscall(3, "getppid", "kernel", returns="int", idempotent=True,
            doc="The caller's parent pid (1 once orphaned)."),
    Syscall(4, "spawn", "kernel", (
        Arg("argv", "list[str]", max_len=MAX_ARGV,
            doc='program and arguments; "python" means the kernel\'s interpreter'),
        Arg("uid", "int", default=None, nullable=True, lo=0, hi=2**31,
            doc="run as this uid (root only); default: the caller's"),
        Arg("cwd", "str", default=None, nullable=True, max_len=MAX_STR),
        Arg("env", "dict[str,str]", default=None, nullable=True, max_len=256,
            doc="added to the kernel's environment"),
    ), returns="int (the child's pid)", errors=("EINVAL", "ENOENT", "EACCES", "EPERM", "EAGAIN"),
        doc="Start a program as a child of the caller: a real OS process with an "
            "llmos pid. Its output goes to log/proc/<pid>.log under LLMOS_HOME."),
    Syscall(5, "wait", "kernel", (
        Arg("pid", "int", default=None, nullable=True, lo=1, hi=2**31,
            doc="a child's pid; None: any child"),
        Arg("timeout", "float", default=None, nullable=True, lo=0, hi=86400 * 365),
    ), blocks=True, returns="{pid, status, reason, ...}",
        errors=("ECHILD", "ETIMEDOUT", "EINVAL"),
        doc="Wait for a child to end and reap it. status is the exit code, or "
            "minus the signal that killed it; reason is exited, killed or lost."),
    Syscall(6, "kill", "kernel", (
        Arg("pid", "int", lo=0, hi=2**31),
        Arg("signal", "str", default="TERM", choices=_SIGNALS),
    ), returns="None", errors=("ESRCH", "EPERM", "EINVAL"),
        doc="Send a signal to a process: your own uid's processes only, unless uid 0."),
    Syscall(7, "exit", "kernel", (
        Arg("status", "int", default=0, lo=0, hi=255),
    ), returns="None",
        doc="End the calling process with a status; its parent's wait sees it."),
    Syscall(8, "ps", "kernel", returns="list of process records", idempotent=True,
            doc="The process table: pid, ppid, uid, argv, state, start time, "
                "resources held, exit status."),
    Syscall(9, "sysinfo", "kernel", returns="dict", idempotent=True,
            doc="Uptime, processes, drivers (state, restarts), per-syscall counts "
                "and latency percentiles, dropped messages."),
    # -- echo driver: a small real driver that proves the routing path ----------
    Syscall(100, "echo", "echo", (
        Arg("data", "bytes", max_len=MAX_ECHO),
    ), idempotent=True, returns="bytes", doc="Return data as it came, through a driver."),
    Syscall(101, "ticks", "echo", (
        Arg("count", "int", lo=1, hi=10000),
        Arg("interval", "float", default=0.0, lo=0, hi=10),
    ), streams=True, returns="int per tick, then count",
        doc="Stream count partial replies, interval seconds apart."),
    Syscall(102, "sleep", "echo", (
        Arg("seconds", "float", lo=0, hi=3600),
    ), blocks=True, returns="float (seconds slept)",
        doc="Answer after seconds, without blocking the driver."),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in TABLE}
BY_NUMBER: dict[int, Syscall] = {s.number: s for s in TABLE}
SERVICES: tuple[str, ...] = tuple(dict.fromkeys(s.service for s in TABLE))
