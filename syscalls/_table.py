"""The syscall table: the single source of truth for the llmos ABI.

One line per syscall, as in xv6's syscall.c and MINIX's table.c: its number, its
name, its arguments (type and bounds), the service that serves it, whether it
blocks, whether it is idempotent (a call in flight to a driver that dies is
retried once when it is, answered EIO when it is not) and whether it streams
(several partial replies before the final one), and whether the driver's reply
is a program for the kernel to spawn as the caller's child (spawns). Numbers are grouped by service:
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
    spawns: bool = False
    returns: str = ""
    errors: tuple[str, ...] = ()
    doc: str = ""
    by_name: dict[str, Arg] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {a.name: a for a in self.args})


TYPES = ("int", "float", "str", "bytes", "bool", "list[str]", "dict[str,str]", "size",
         "list[int]", "slice", "dict")
# "list[int]": ints from 0 to 2**62 (a tensor's shape); "slice": a list of [start, stop]
# pairs of such ints, one per leading dimension (tensorfs, docs/tensorfs.md).
# "size": a byte count, as an int or a string such as "2GiB", "512MiB" or "1.5GB"
# (syscalls._schema.parse_size); handlers receive the int.
# "dict": str keys (at most 64 characters) to scalars: int, float (finite), str
# (at most MAX_STR, no NUL), bool or None; max_len bounds the number of keys.

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
        Arg("heartbeat", "bool", default=False,
            doc="the caller will heartbeat: the kernel expects the first one now"),
    ), returns="{pid, ppid, uid, hb_token, heartbeat_s, kernel_pid, abi}",
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
            doc='program and arguments; "python" and "python3" mean the kernel\'s '
                'interpreter'),
        Arg("uid", "int", default=None, nullable=True, lo=0, hi=2**31,
            doc="run as this uid (root only); default: the caller's"),
        Arg("cwd", "str", default=None, nullable=True, max_len=MAX_STR,
            doc="working directory; the userland library passes the caller's, "
                "the kernel's own is used when None"),
        Arg("env", "dict[str,str]", default=None, nullable=True, max_len=256,
            doc="added to the kernel's environment"),
    ), returns="int (the child's pid)",
        errors=("EINVAL", "ENOENT", "EACCES", "EPERM", "EAGAIN", "ENAMETOOLONG", "EIO"),
        doc="Start a program as a child of the caller: a real OS process with an "
            "llmos pid. Its output goes to log/proc/<pid>.log under LLMOS_HOME."),
    Syscall(5, "wait", "kernel", (
        Arg("pid", "int", default=None, nullable=True, lo=1, hi=2**31,
            doc="a child's pid; None: any child"),
        Arg("timeout", "float", default=None, nullable=True, lo=0, hi=86400 * 365),
    ), blocks=True, returns="{pid, status, reason, info}",
        errors=("ECHILD", "ETIMEDOUT", "EINVAL", "EAGAIN"),
        doc="Wait for a child to end and reap it. status is the exit code, or "
            "minus the signal that killed it; reason is exited, killed or lost; info is "
            "what the child last reported (report). EAGAIN past max_inflight_per_process "
            "parked waits."),
    Syscall(6, "kill", "kernel", (
        Arg("pid", "int", lo=1, hi=2**31),
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
    Syscall(10, "report", "kernel", (
        Arg("info", "dict", max_len=32,
            doc="fields to publish, e.g. {step, loss, tokens_per_s}; merged into the "
                "process's info, a None value removes its key"),
        Arg("pid", "int", default=None, nullable=True, lo=1, hi=2**31,
            doc="the caller (None) or its parent: a training worker reports for its job"),
    ), returns="None", errors=("EINVAL", "EPERM", "ESRCH"),
        doc="Publish a running process's progress: ps and jobs show its info, and "
            "wait returns the last one with the exit status."),
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
    # -- devices driver: CPUs, memory and GPUs (real or simulated) --------------
    Syscall(200, "alloc_gpu", "devices", (
        Arg("mem", "size", lo=1, hi=2**62,
            doc='bytes on each device: an int, or a string such as "2GiB", "512MiB", "1.5GB"'),
        Arg("count", "int", default=1, lo=1, hi=64, doc="how many distinct devices"),
        Arg("exclusive", "bool", default=False,
            doc="share the devices with no other allocation"),
        Arg("wait", "bool", default=False,
            doc="queue until it can be met, instead of failing with ENOMEM"),
        Arg("timeout", "float", default=None, nullable=True, lo=0, hi=86400 * 365,
            doc="with wait: give up with ETIMEDOUT after this many seconds"),
        Arg("priority", "int", default=0, lo=-20, hi=20,
            doc="queue order, higher first; above 0 is for uid 0 only"),
    ), blocks=True, returns="{id, devices, bytes_each, count, exclusive, simulated, capacity}",
        errors=("EINVAL", "ENOMEM", "ETIMEDOUT", "EDQUOT", "EPERM"),
        doc="Allocate mem bytes on each of count GPUs. Fails with ENOMEM when it cannot "
            "be met now (or ever), or waits in the queue with wait=True (docs/devices.md)."),
    Syscall(201, "free_gpu", "devices", (
        Arg("alloc_id", "str", max_len=64, doc="the id alloc_gpu returned"),
    ), idempotent=True, returns="None", errors=("EBADF", "EPERM"),
        doc="Free an allocation of the calling process (uid 0: of any process)."),
    Syscall(202, "devices", "devices", idempotent=True,
            returns="{gpus, cpus, memory, queue, simulated}",
            doc="Every GPU with its capacity, allocated and free bytes and the "
                "allocations on it (pid, uid, bytes), the CPUs and memory, and the queue."),
)

_TENSOR_MODES = ("r", "w", "x", "rw")
_DTYPES = ("float32", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
           "bool")
MAX_TENSOR_FRAME = 1 << 30
MAX_DIMS = 32


def _path(name: str = "path") -> Arg:
    return Arg(name, "str", max_len=MAX_STR, doc="an absolute tensorfs path, e.g. /models/m/wte")


def _fd() -> Arg:
    return Arg("fd", "str", max_len=64, doc="a descriptor open_tensor returned")


TABLE += (
    # -- tensorfs driver: the tensor filesystem (docs/tensorfs.md) --------------
    Syscall(300, "open_tensor", "tensorfs", (
        _path(),
        Arg("mode", "str", choices=_TENSOR_MODES,
            doc="r read; w write (create or replace); x create, EEXIST if it exists; "
                "rw read and update slices"),
        Arg("dtype", "str", default=None, nullable=True, choices=_DTYPES,
            doc="for w and x"),
        Arg("shape", "list[int]", default=None, nullable=True, max_len=MAX_DIMS,
            doc="for w and x"),
        Arg("perm", "int", default=0o644, lo=0, hi=0o1777,
            doc="mode bits of a new tensor (owner rw-, others r--: 0o644)"),
        Arg("shm", "bool", default=False,
            doc="stage a large write in a /dev/shm segment named in the reply, "
                "which the caller maps and fills instead of calling write_tensor"),
    ), returns="{fd, dtype, shape, size, shm}",
        errors=("ENOENT", "EEXIST", "EISDIR", "ENOTDIR", "EACCES", "EFBIG", "EDQUOT",
                "EINVAL", "EIO"),
        doc="Open a tensor. Writes are staged and become visible, durably, at "
            "close_tensor; the descriptor is this process's only."),
    Syscall(301, "read_tensor", "tensorfs", (
        _fd(),
        Arg("slice", "slice", default=None, nullable=True, max_len=MAX_DIMS,
            doc="[[start, stop], ...] for the leading dimensions; None: all"),
        Arg("shm", "bool", default=False,
            doc="large results come as a /dev/shm segment to map (and unlink) "
                "instead of bytes"),
    ), idempotent=True, returns="{dtype, shape, data (bytes) or shm (a segment path)}",
        errors=("EBADF", "EINVAL", "EIO"),
        doc="Read a tensor, or a slice of it, in C order. Checksums are verified."),
    Syscall(302, "write_tensor", "tensorfs", (
        _fd(),
        Arg("data", "bytes", max_len=MAX_TENSOR_FRAME, doc="raw little-endian elements"),
        Arg("slice", "slice", default=None, nullable=True, max_len=MAX_DIMS,
            doc="the region to write; None: the whole tensor"),
    ), idempotent=True, returns="int (bytes written)", errors=("EBADF", "EINVAL"),
        doc="Write the whole staged tensor or a slice of it; data must be exactly "
            "the region's size."),
    Syscall(303, "close_tensor", "tensorfs", (
        _fd(),
        Arg("discard", "bool", default=False, doc="drop the staged write instead"),
    ), returns="None for reads; {size, checksum} for a commit",
        errors=("EBADF", "EEXIST", "ENOENT", "EIO"),
        doc="Close a descriptor. For a write it commits: temporary file, fsync, rename, "
            "fsync of the directory; when it returns, the tensor survives any crash."),
    Syscall(304, "stat", "tensorfs", (_path(),), idempotent=True,
            returns="{path, type, owner, mode, ctime, mtime; dtype, shape, size, checksum}",
            errors=("ENOENT", "ENOTDIR", "EINVAL", "EIO"),
            doc="Metadata of a tensor or a directory."),
    Syscall(305, "listdir", "tensorfs", (_path(),), idempotent=True,
            returns="list of stat records with name", errors=("ENOENT", "ENOTDIR", "EACCES",
                                                              "EINVAL"),
            doc="The entries of a directory, sorted by name."),
    Syscall(306, "mkdir", "tensorfs", (
        _path(), Arg("perm", "int", default=0o755, lo=0, hi=0o1777)),
        returns="None", errors=("EEXIST", "ENOENT", "ENOTDIR", "EACCES", "EINVAL"),
        doc="Make a directory (its parent must exist)."),
    Syscall(307, "unlink", "tensorfs", (_path(),), returns="None",
            errors=("ENOENT", "ENOTEMPTY", "EACCES", "EINVAL"),
            doc="Remove a tensor or an empty directory. Open readers keep what they opened."),
    Syscall(308, "rename", "tensorfs", (_path("src"), _path("dst")), returns="None",
            errors=("ENOENT", "EEXIST", "ENOTDIR", "EACCES", "EINVAL"),
            doc="Move a tensor or directory; dst must not exist."),
    Syscall(309, "chmod", "tensorfs", (
        _path(), Arg("perm", "int", lo=0, hi=0o1777)), returns="None",
        errors=("ENOENT", "EPERM", "EINVAL"),
        doc="Set mode bits (owner or uid 0 only)."),
)

MAX_PROMPT = 1 << 20
MAX_GEN = 1 << 16

TABLE += (
    # -- executor driver: training jobs and inference (docs/executor.md) --------
    Syscall(400, "spawn_train", "executor", (
        Arg("config", "dict", max_len=64,
            doc="the job: name, dataset, model size, steps, workers... "
                "(docs/executor.md lists every key and default)"),
        Arg("alloc_id", "str", default=None, nullable=True, max_len=64,
            doc="train on the GPUs of this allocation of the caller (alloc_gpu)"),
    ), spawns=True, returns="int (the job's pid)",
        errors=("EINVAL", "ENOENT", "ENOMEM", "EACCES", "EBADF", "EAGAIN"),
        doc="Start a data-parallel training job as a child process of the caller. "
            "The config is checked, and its memory estimate against the allocation "
            "(ENOMEM), before anything starts; wait returns its final loss."),
    Syscall(401, "infer", "executor", (
        Arg("model", "str", max_len=MAX_STR,
            doc="a tensorfs model directory (its latest checkpoint) or checkpoint"),
        Arg("prompt", "str", max_len=MAX_PROMPT, doc="text; the model reads its UTF-8 bytes"),
        Arg("max_tokens", "int", default=64, lo=1, hi=MAX_GEN),
        Arg("temperature", "float", default=1.0, lo=0, hi=100, doc="0: greedy"),
        Arg("top_k", "int", default=0, lo=0, hi=1 << 20, doc="0: no top-k filter"),
        Arg("seed", "int", default=None, nullable=True, lo=0, hi=2**63 - 1,
            doc="sampling seed; None: a random one, returned in the result"),
        Arg("stream", "bool", default=False,
            doc="send the text in partial replies as it is generated"),
    ), blocks=True, streams=True,
        returns="{text, tokens, prompt_tokens, finish_reason, seed, time_s}; "
                "partials {text, tokens} when streaming",
        errors=("ENOENT", "EACCES", "EIO", "EINVAL", "EAGAIN"),
        doc="Generate text with a model, batched with other processes' requests "
            "(continuous batching, round robin across processes)."),
    Syscall(402, "models", "executor", idempotent=True,
            returns="{models: [...], engine: {...}, budget}",
            doc="The models the executor holds loaded, and its batching statistics."),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in TABLE}
BY_NUMBER: dict[int, Syscall] = {s.number: s for s in TABLE}
SERVICES: tuple[str, ...] = tuple(dict.fromkeys(s.service for s in TABLE))
