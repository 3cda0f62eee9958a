"""The syscall table: the single source of truth for the llmos ABI.

One line per syscall, as in xv6's syscall.c and MINIX's table.c: its number, its
name, its arguments (type and bounds), the service that serves it, whether it
blocks, whether it is idempotent (a call in flight to a driver that dies is
retried once when it is, answered EIO when it is not) and whether it streams
(several partial replies before the final one), and whether the driver's reply
is a program for the kernel to spawn as the caller's child (spawns). Numbers are grouped by service:
kernel 0-99, echo 100-199, devices 200-299, tensorfs 300-399, executor 400-499.

Each syscall's errors are (errno, when) pairs: every errno its own code can
return and the condition. The errors every call can get (a bad argument, an
unattached connection, a driver that died...) are listed once, in
syscalls/gen.py (GENERIC_ERRORS), and rendered with each syscall in
docs/syscalls.md; tests/conformance checks that each one is produced.

The kernel validates every request against this table before serving or
routing it, so handlers receive arguments of the declared types and bounds.
Nothing here imports anything else of llmos.
"""
from __future__ import annotations

from typing import Any

ABI_VERSION = 1

REQUIRED: Any = object()

MAX_ARGV = 256
MAX_STR = 4096
MAX_ECHO = 16 * 1024 * 1024


class Arg:
    """One argument: `type` is one of TYPES; `lo`/`hi` bound numbers, `max_len`
    bounds the length of strings, bytes, lists and dicts. (A plain class, not a
    dataclass: every llmos command imports the table, and the dataclasses module
    costs more to import than the table itself.)"""

    __slots__ = ("name", "type", "default", "nullable", "lo", "hi", "max_len", "choices",
                 "doc")

    def __init__(self, name: str, type: str, default: Any = REQUIRED,
                 nullable: bool = False, lo: float | None = None, hi: float | None = None,
                 max_len: int | None = None, choices: tuple[str, ...] | None = None,
                 doc: str = "") -> None:
        self.name, self.type, self.default, self.nullable = name, type, default, nullable
        self.lo, self.hi, self.max_len, self.choices, self.doc = lo, hi, max_len, choices, doc

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def __repr__(self) -> str:
        return f"Arg({self.name!r}, {self.type!r})"


class Syscall:
    """One syscall: its number, name and service, its arguments, how it behaves
    (blocks, idempotent, streams, spawns), what it returns, its errors as (errno,
    when) pairs (a bare name is accepted; `errors` then holds the names and
    `error_when` maps each to its condition), and its doc."""

    __slots__ = ("number", "name", "service", "args", "blocks", "idempotent", "streams",
                 "spawns", "returns", "errors", "doc", "by_name", "error_when")

    def __init__(self, number: int, name: str, service: str, args: tuple[Arg, ...] = (),
                 blocks: bool = False, idempotent: bool = False, streams: bool = False,
                 spawns: bool = False, returns: str = "", errors: tuple[Any, ...] = (),
                 doc: str = "") -> None:
        self.number, self.name, self.service, self.args = number, name, service, args
        self.blocks, self.idempotent, self.streams, self.spawns = (blocks, idempotent,
                                                                   streams, spawns)
        self.returns, self.doc = returns, doc
        self.by_name: dict[str, Arg] = {a.name: a for a in args}
        self.error_when: dict[str, str] = dict(
            (e, "") if isinstance(e, str) else (e[0], e[1]) for e in errors)
        self.errors: tuple[str, ...] = tuple(self.error_when)

    def __repr__(self) -> str:
        return f"Syscall({self.number}, {self.name!r}, {self.service!r})"


TYPES = ("int", "float", "str", "bytes", "bool", "list[str]", "dict[str,str]", "size",
         "list[int]", "slice", "dict", "members", "messages")
# "list[int]": ints from 0 to 2**62 (a tensor's shape); "slice": a list of [start, stop]
# pairs of such ints, one per leading dimension (tensorfs, docs/tensorfs.md).
# "size": a byte count, as an int or a string such as "2GiB", "512MiB" or "1.5GB"
# (syscalls._schema.parse_size); handlers receive the int.
# "dict": str keys (at most 64 characters) to scalars: int, float (finite), str
# (at most MAX_STR, no NUL), bool or None; max_len bounds the number of keys.
# "members": a list of [name, dtype, shape] triples, the tensors of a group
# (tensorfs); the driver checks the names and dtypes.
# "messages": a chat, a list of {role, content} maps of str (roles: system, user,
# assistant, tool); max_len bounds the number of messages.

_SIGNALS = ("TERM", "KILL", "INT")

TABLE: tuple[Syscall, ...] = (
    # -- kernel: processes ------------------------------------------------------
    Syscall(0, "attach", "kernel", (
        Arg("os_pid", "int", lo=0, hi=2**31 - 1, doc="the caller's OS pid"),
        Arg("argv", "list[str]", default=[], max_len=MAX_ARGV, doc="shown by ps"),
        Arg("secret", "str", default=None, nullable=True, max_len=256,
            doc="the home's secret (run/secret): attaches a new process"),
        Arg("token", "str", default=None, nullable=True, max_len=256,
            doc="a spawn token: binds to the process the kernel spawned"),
        Arg("uid", "int", default=None, nullable=True, lo=0, hi=2**31 - 1,
            doc="uid to attach as (with the secret); default: the configured default uid"),
        Arg("host", "str", default="", max_len=256, doc="the caller's hostname"),
        Arg("heartbeat", "bool", default=False,
            doc="the caller will heartbeat: the kernel expects the first one now"),
    ), returns="{pid, ppid, uid, hb_token, heartbeat_s, kernel_pid, abi}",
        errors=(
            ("EBUSY", "this connection is attached already"),
            ("EACCES", "neither the home's secret nor a spawn token, a wrong secret, or a "
                       "spawn token that is unknown or used already; over TCP: the secret "
                       "(a key attaches instead), a node's key without a token, or a "
                       "token of a process that key's node does not host"),
            ("EAGAIN", "with the secret: the process table is full (max_processes)"),
            ("EINVAL", "os_pid names no OS process on this host, or names a driver "
                       "attaching without heartbeat=True"),
            ("EPERM", "os_pid is the kernel's own OS pid or the OS's init (1)"),
        ),
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
        Arg("uid", "int", default=None, nullable=True, lo=0, hi=2**31 - 1,
            doc="run as this uid (root only); default: the caller's"),
        Arg("cwd", "str", default=None, nullable=True, max_len=MAX_STR,
            doc="working directory; the userland library passes the caller's, "
                "the kernel's own is used when None"),
        Arg("env", "dict[str,str]", default=None, nullable=True, max_len=256,
            doc="added to the kernel's environment"),
        Arg("node", "str", default=None, nullable=True, max_len=64,
            doc="the node to run it on (nodes lists them); None: placed by the "
                "placement setting (local: the head)"),
    ), returns="int (the child's pid)",
        errors=(
            ("EINVAL", "argv is empty or its program is an empty string, or env cannot be "
                       "used (an '=' in a name)"),
            ("EPERM", "uid is not the caller's and the caller is not uid 0"),
            ("EAGAIN", "the process table is full (max_processes)"),
            ("ENOENT", "the program or cwd does not exist, or cwd is not a directory; or "
                       "node names no node"),
            ("EBUSY", "node is draining (it takes no new processes), or no node is ready "
                      "for placement"),
            ("EHOSTDOWN", "node is lost, or it did not start the program in time"),
            ("EACCES", "the OS refuses to execute the program (no x bit) or enter cwd"),
            ("ENAMETOOLONG", "the program's path, or one of its components, is too long "
                             "for the OS"),
            ("EIO", "the OS refused to start it for another reason, e.g. a file that is "
                    "no executable format (ENOEXEC) or arguments over its limit (E2BIG)"),
        ),
        doc="Start a program as a child of the caller: a real OS process with an "
            "llmos pid, on this node or another (docs/scaling.md). Its output goes to "
            "log/proc/<pid>.log under the LLMOS_HOME of the node it runs on."),
    Syscall(5, "wait", "kernel", (
        Arg("pid", "int", default=None, nullable=True, lo=1, hi=2**31 - 1,
            doc="a child's pid; None: any child"),
        Arg("timeout", "float", default=None, nullable=True, lo=0, hi=86400 * 365),
    ), blocks=True, returns="{pid, status, reason, info}",
        errors=(
            ("ECHILD", "pid is not a child of the caller, or the caller has no children; "
                       "or, parked, no child is left that could answer it (another wait "
                       "reaped it)"),
            ("ETIMEDOUT", "no child it waits for ended within timeout (at once for 0)"),
            ("EAGAIN", "the caller has max_inflight_per_process waits parked already"),
        ),
        doc="Wait for a child to end and reap it. status is the exit code, or "
            "minus the signal that killed it; reason is exited, killed or lost; info is "
            "what the child last reported (report)."),
    Syscall(6, "kill", "kernel", (
        Arg("pid", "int", lo=1, hi=2**31 - 1),
        Arg("signal", "str", default="TERM", choices=_SIGNALS),
    ), returns="None", errors=(
        ("ESRCH", "no running process has pid: it never did, or it ended (a zombie, "
                  "or reaped)"),
        ("EPERM", "pid is init (1), or a process of another uid and the caller is not "
                  "uid 0, or a system process (a driver's own connection, shown in "
                  "brackets by ps) and the caller is not uid 0, or an OS process the "
                  "kernel may not signal"),
    ),
        doc="Send a signal to a process: your own uid's processes only, unless uid 0. "
            "The library also takes a signal.Signals or its number and sends the name."),
    Syscall(7, "exit", "kernel", (
        Arg("status", "int", default=0, lo=0, hi=255),
    ), returns="None",
        doc="End the calling process with a status; its parent's wait sees it."),
    Syscall(8, "ps", "kernel", (
        Arg("all", "bool", default=False,
            doc="also the processes that ended and were reaped, the last ended_kept "
                "of them (state ended), oldest first"),
    ), returns="list of process records {pid, ppid, uid, argv, state, start_time, "
               "os_pid, attached, resources, status, reason, info, system, end_time, "
               "node, node_os_pid}",
        idempotent=True,
        doc="The process table: pid, ppid, uid, argv, state (running, zombie; ended "
            "with all), start time, resources held, exit status; system is true for a "
            "driver's own connection."),
    Syscall(9, "sysinfo", "kernel", returns="dict", idempotent=True,
            doc="Uptime, processes, drivers (state, restarts, the last restart's "
                "delay), the kernel's own stalls, per-syscall counts, latency "
                "percentiles and histogram (cumulative counts per latency_buckets_s "
                "bound) and errors by errno, dropped messages."),
    Syscall(10, "report", "kernel", (
        Arg("info", "dict", max_len=32,
            doc="fields to publish, e.g. {step, loss, tokens_per_s}; merged into the "
                "process's info, a None value removes its key"),
        Arg("pid", "int", default=None, nullable=True, lo=1, hi=2**31 - 1,
            doc="the caller (None) or its parent: a training worker reports for its job"),
    ), returns="None", errors=(
        ("EPERM", "pid is neither the caller nor its parent, or the parent is another "
                  "uid's and the caller is not uid 0"),
        ("EINVAL", "the process's info would have more than 64 keys, or more than 2048 "
                   "bytes of keys and values"),
    ),
        doc="Publish a running process's progress: ps and jobs show its info, and "
            "wait returns the last one with the exit status."),
    Syscall(11, "nodes", "kernel", returns="list of {name, state, epoch, head, joined_at, "
            "heartbeat_age_s, lost_at, processes, host, addr, cpus, memory, gpus}",
            idempotent=True,
            doc="The nodes: the head (this kernel's own) and every node agent that "
                "joined over TCP, with its state (ready, draining, lost), heartbeat age "
                "and resources."),
    Syscall(12, "node_ctl", "kernel", (
        Arg("name", "str", max_len=64),
        Arg("action", "str", choices=("drain", "resume", "remove")),
    ), returns="the node's record (state removed after remove)", errors=(
        ("EPERM", "the caller is not uid 0"),
        ("ENOENT", "no node has that name"),
        ("EINVAL", "remove names the head"),
    ),
        doc="drain: the node takes no new processes (those running go on); resume: it "
            "takes them again; remove: its processes end (reason node removed), its agent "
            "stops and its key is revoked."),
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
        errors=(
            ("EPERM", "priority > 0 and the caller is not uid 0"),
            ("ENOMEM", "fewer than count devices are as large as mem (at once, even with "
                       "wait); or, without wait, it cannot be met now"),
            ("EDQUOT", "what the caller's uid holds and waits for, plus mem x count, is "
                       "over its gpu_quota (at once: a quota is not waited for)"),
            ("ETIMEDOUT", "wait with a timeout, and it was not met in time"),
        ),
        doc="Allocate mem bytes on each of count GPUs. Fails with ENOMEM when it cannot "
            "be met now (or ever), or waits in the queue with wait=True (docs/devices.md)."),
    Syscall(201, "free_gpu", "devices", (
        Arg("alloc_id", "str", max_len=64, doc="the id alloc_gpu returned"),
    ), idempotent=True, returns="None", errors=(
        ("EBADF", "alloc_id is no allocation: never was, or freed by another process "
                  "(freeing one's own again succeeds)"),
        ("EPERM", "the allocation is another process's and the caller is not uid 0"),
    ),
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
MAX_MEMBERS = 65536


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
        Arg("whole", "bool", default=False,
            doc="with shm, w or x: the caller writes every byte through the segment, "
                "so a reused one comes as it is (this process's previous staged "
                "write) instead of zeroed"),
        Arg("members", "members", default=None, nullable=True, max_len=MAX_MEMBERS,
            doc="w or x: make a group, one safetensors file of named tensors, "
                "[[name, dtype, shape], ...], instead of one tensor (no dtype, shape)"),
        Arg("key", "str", default=None, nullable=True, max_len=64,
            doc="w, x or rw: an idempotency key, recorded in the committed file's header "
                "and shown by stat, so a caller whose close failed (the driver died "
                "mid-commit: EIO) can tell whether its write committed; rw without one "
                "keeps the tensor's key"),
    ), returns="{fd, dtype, shape, size, shm, members: None, or [[name, dtype, shape, "
               "offset], ...] for a group}",
        errors=(
            ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; a backslash; a name over 200 bytes; deeper than 64, or the root; dtype or shape with "
                       "mode r or rw; mode w or x without both; members with mode r or "
                       "rw, or with dtype or shape; a member name empty, over 200 "
                       "bytes, repeated or __metadata__, an unknown dtype; a group's "
                       "member (PATH[name]) with mode w, x or rw; a key with mode r, or "
                       "an empty key"),
            ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with .safetensors) would be over PATH_MAX, 4096 bytes"),
            ("ENOENT", "the parent directory does not exist; or mode r or rw and no tensor "
                       "is at path; or PATH[name] and the group at PATH has no member name"),
            ("ENOTDIR", "the parent is a tensor"),
            ("EISDIR", "path is a directory"),
            ("EEXIST", "mode x and a tensor exists at path"),
            ("EACCES", "r: no read permission on the tensor; rw: no read and write; w over "
                       "an existing tensor: no write on it; a new tensor: no write on its "
                       "directory"),
            ("EMFILE", "the caller has tensor_max_open descriptors open already"),
            ("EFBIG", "w, x or rw: the tensor's size is over tensor_max_size"),
            ("EDQUOT", "w, x or rw: the owner's tensors, plus its staged writes, plus this "
                       "one, less the one it replaces, are over its tensor_quota (an owner "
                       "with a quota: checked once the driver's scan of the store, after "
                       "it starts, has counted usage; the open waits for it)"),
            ("EIO", "the tensor on disk is damaged: its header is unreadable, or (rw) its "
                    "data fails its checksum"),
        ),
        doc="Open a tensor. Writes are staged and become visible, durably, at "
            "close_tensor; the descriptor is this process's only. PATH[name] opens "
            "member name of the group at PATH (mode r only): the reply and "
            "read_tensor without member are that member's."),
    Syscall(301, "read_tensor", "tensorfs", (
        _fd(),
        Arg("slice", "slice", default=None, nullable=True, max_len=MAX_DIMS,
            doc="[[start, stop], ...] for the leading dimensions; None: all"),
        Arg("shm", "bool", default=False,
            doc="large results come as a /dev/shm segment to map (and unlink) "
                "instead of bytes"),
        Arg("member", "str", default=None, nullable=True, max_len=MAX_STR,
            doc="of a group: this tensor; None: the group's data as uint8 bytes (the "
                "member, for a descriptor opened as PATH[name])"),
        Arg("channel", "bool", default=False,
            doc="the data by a data channel, for a caller on another host: a single-use "
                "grant {host, port, token} to fetch it over plain TCP (docs/scaling.md)"),
    ), idempotent=True, returns="{dtype, shape, data (bytes) or shm (a segment path) and "
                                "offset (where the data starts in the segment) or channel "
                                "({host, port, token})}",
        errors=(
            ("EBADF", "fd is not an open descriptor of the caller, or is open for writing "
                      "only (w, x)"),
            ("EINVAL", "slice has more dimensions than the tensor, or a pair that is not "
                       "0 <= start <= stop <= the dimension; member on a tensor that is "
                       "not a group"),
            ("ENOENT", "the group has no member of that name"),
            ("EIO", "the tensor's data fails its checksum (damaged on disk)"),
            ("ENOTSUP", "channel, and the kernel does not listen on TCP (no data channels)"),
        ),
        doc="Read a tensor, or a slice of it, in C order. Checksums are verified."),
    Syscall(302, "write_tensor", "tensorfs", (
        _fd(),
        Arg("data", "bytes", max_len=MAX_TENSOR_FRAME, doc="raw little-endian elements"),
        Arg("slice", "slice", default=None, nullable=True, max_len=MAX_DIMS,
            doc="the region to write; None: the whole tensor"),
        Arg("member", "str", default=None, nullable=True, max_len=MAX_STR,
            doc="of a group: this tensor; None: the group's data as uint8 bytes"),
    ), idempotent=True, returns="int (bytes written)", errors=(
        ("EBADF", "fd is not an open descriptor of the caller, or is open for reading "
                  "only (r)"),
        ("EINVAL", "a bad slice (as for read_tensor), or data that is not exactly the "
                   "region's size in bytes; member on a tensor that is not a group"),
        ("ENOENT", "the group has no member of that name"),
    ),
        doc="Write the whole staged tensor or a slice of it; data must be exactly "
            "the region's size."),
    Syscall(303, "close_tensor", "tensorfs", (
        _fd(),
        Arg("discard", "bool", default=False, doc="drop the staged write instead"),
    ), returns="None for reads; {size, checksum} for a commit",
        errors=(
            ("EBADF", "fd is not an open descriptor of the caller"),
            ("EEXIST", "committing a mode x write: another writer created the tensor "
                       "since the open"),
            ("ENOENT", "committing: the parent directory was removed on disk, behind "
                       "tensorfs's back (tensorfs's own unlink refuses a directory "
                       "with a write in progress, and its rename moves the write along)"),
            ("ENOTDIR", "committing: the parent directory was removed on disk, behind "
                        "tensorfs's back, and a tensor took its name"),
            ("EISDIR", "committing: a directory was made at the path since the open; the "
                       "write is discarded"),
            ("EINVAL", "committing: a bool tensor or member holds a byte other than 0 "
                       "or 1; the write is discarded"),
            ("ENOSPC", "committing: the file system holding the store has no room for the "
                       "file (full, or the driver's disk quota on it used up); the write "
                       "is discarded, nothing of it is left, the old version is intact"),
        ),
        doc="Close a descriptor. For a write it commits: temporary file, fsync, rename, "
            "fsync of the directory; when it returns, the tensor survives any crash."),
    Syscall(304, "stat", "tensorfs", (_path(),), idempotent=True,
            returns="{path, type (dir, tensor, group or member), owner, mode, ctime, "
                    "mtime; dtype, shape, size, checksum, key for a tensor; size, "
                    "checksum, key, members [{name, dtype, shape, size}] for a group; "
                    "group, name, dtype, shape, size and the group's checksum and key for "
                    "a member}",
            errors=(
                ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; a backslash; a name over 200 bytes; deeper than 64"),
                ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with .safetensors) would be over PATH_MAX, 4096 bytes"),
                ("ENOENT", "nothing is at path, or its parent directory does not exist; "
                           "or PATH[name] and the group at PATH has no member name"),
                ("ENOTDIR", "the parent is a tensor"),
                ("EIO", "the tensor's header is damaged"),
            ),
            doc="Metadata of a tensor, a directory, or (PATH[name]) member name of the "
                "group at PATH; where PATH is not a group, PATH[name] is an ordinary "
                "name."),
    Syscall(305, "listdir", "tensorfs", (_path(),), idempotent=True,
            returns="list of stat records with name (a group's: n_members, not "
                    "members)", errors=(
                ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; a backslash; a name over 200 bytes; deeper than 64; a group's member (PATH[name])"),
                ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with .safetensors) would be over PATH_MAX, 4096 bytes"),
                ("ENOENT", "nothing is at path, or its parent directory does not exist"),
                ("ENOTDIR", "path is a tensor, or its parent is"),
                ("EACCES", "no read permission on the directory"),
            ),
            doc="The entries of a directory, sorted by name."),
    Syscall(306, "mkdir", "tensorfs", (
        _path(), Arg("perm", "int", default=0o755, lo=0, hi=0o1777)),
        returns="None", errors=(
            ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; a backslash; a name over 200 bytes; deeper than 64, or the root; a group's member (PATH[name])"),
            ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with .safetensors) would be over PATH_MAX, 4096 bytes"),
            ("ENOENT", "the parent directory does not exist"),
            ("ENOTDIR", "the parent is a tensor"),
            ("EEXIST", "a directory or a tensor is at path"),
            ("EACCES", "no write permission on the parent directory"),
        ),
        doc="Make a directory (its parent must exist)."),
    Syscall(307, "unlink", "tensorfs", (_path(),), returns="None",
            errors=(
                ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; a backslash; a name over 200 bytes; deeper than 64, or the root; a group's member (PATH[name])"),
                ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with .safetensors) would be over PATH_MAX, 4096 bytes"),
                ("ENOENT", "nothing is at path, or its parent directory does not exist"),
                ("ENOTDIR", "the parent is a tensor"),
                ("EACCES", "no write permission on the parent directory, or it is sticky "
                           "and the caller owns neither it nor the entry (uid 0 may)"),
                ("ENOTEMPTY", "a directory that has entries, or a write in progress below "
                              "it (a descriptor open in mode w, x or rw, not yet closed)"),
            ),
            doc="Remove a tensor or an empty directory. Open readers keep what they "
                "opened; a staged write keeps its directory (POSIX: a file exists from "
                "its open)."),
    Syscall(308, "rename", "tensorfs", (_path("src"), _path("dst")), returns="None",
            errors=(
                ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; a backslash; a name over 200 bytes; deeper than 64, or the root; or dst is inside the "
                           "directory src; src or dst a group's member (PATH[name])"),
                ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with .safetensors) would be over PATH_MAX, 4096 bytes"),
                ("ENOENT", "nothing is at src, or the parent directory of src or dst does "
                           "not exist"),
                ("ENOTDIR", "the parent of src or dst is a tensor"),
                ("EEXIST", "something is at dst (rename never replaces)"),
                ("EACCES", "the caller may not remove src from its directory (as for "
                           "unlink), or has no write permission on dst's directory"),
            ),
            doc="Move a tensor or directory; dst must not exist. Writes staged below a "
                "directory move with it: they commit at the new place."),
    Syscall(309, "chmod", "tensorfs", (
        _path(), Arg("perm", "int", lo=0, hi=0o1777)), returns="None",
        errors=(
            ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; a backslash; a name over 200 bytes; deeper than 64; a group's member (PATH[name])"),
            ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with .safetensors) would be over PATH_MAX, 4096 bytes"),
            ("ENOENT", "nothing is at path, or its parent directory does not exist"),
            ("ENOTDIR", "the parent is a tensor"),
            ("EPERM", "the caller is neither the owner nor uid 0"),
            ("EIO", "the tensor is damaged: its header is unreadable or its data fails "
                    "its checksum"),
            ("ENOSPC", "a tensor (rewritten whole: the mode is in its header) and the file "
                       "system holding the store has no room for the copy; the tensor "
                       "is unchanged"),
        ),
        doc="Set mode bits (owner or uid 0 only)."),
    Syscall(310, "fsck", "tensorfs", (
        Arg("path", "str", default="/", max_len=MAX_STR,
            doc="check the tensors under this directory (or this one tensor); from /, "
                "all but /lost+found"),
        Arg("repair", "bool", default=False,
            doc="move each damaged file into /lost+found (uid 0's, mode 0700), named "
                "after its path, / as %2F"),
    ), blocks=True, returns="{checked, damaged: [{path, why}], moved: [{path, to}]}",
        errors=(
            ("EPERM", "the caller is not uid 0"),
            ("EINVAL", "a bad path: not absolute; an empty, '.', '..' or hidden component; "
                       "a backslash; a name over 200 bytes; deeper than 64; a group's "
                       "member (PATH[name])"),
            ("ENAMETOOLONG", "the path's file on disk (under $LLMOS_HOME/tensors, with "
                             ".safetensors) would be over PATH_MAX, 4096 bytes"),
            ("ENOENT", "nothing is at path, or its parent directory does not exist"),
            ("ENOTDIR", "the parent is a tensor"),
            ("EEXIST", "repair, and a tensor (not a directory) is at /lost+found"),
        ),
        doc="Check every tensor and group under path: its header, its size and its "
            "data's CRC-32 against the header; repair moves each damaged file aside "
            "into /lost+found, so the namespace stays usable. uid 0 only. Reads every "
            "byte: the answer comes when all is read."),
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
        errors=(
            ("EINVAL", "the config: an unknown, missing (name, dataset), mistyped or "
                       "out-of-range key, n_embd not a multiple of n_head, min_lr over lr, "
                       "a key only the executor sets, a bad dataset path; a dataset that "
                       "is not a 1-D uint8 tensor, or too short for its workers"),
            ("ENOENT", "no dataset tensor, or no directory holding it"),
            ("ENOTDIR", "the dataset's parent is a tensor, or a tensor is in the way of "
                        "the out directory"),
            ("EISDIR", "the dataset is a directory"),
            ("EACCES", "the caller's uid may not read the dataset, or make the out "
                       "directory"),
            ("EBUSY", "a running job trains into the same out directory"),
            ("EEXIST", "out holds a trained model (its latest) and resume is false"),
            ("EBADF", "alloc_id is no allocation"),
            ("EPERM", "alloc_id is another process's allocation"),
            ("ENOMEM", "a worker's memory estimate is over the allocation's bytes per "
                       "device; with gpus = N, fewer than N GPUs are that large; with "
                       "neither, the workers together need more than the memory available"),
            ("EAGAIN", "the process table is full (max_processes) when the job is "
                       "spawned, or when the executor attaches to check it (as the "
                       "caller's uid, or as uid 0 for GPUs and running jobs)"),
            ("EIO", "the dataset tensor is damaged (its header)"),
            ("ECANCELED", "the caller cancelled the call before the job was spawned and "
                          "still waits for the answer: nothing was started (its out "
                          "directory may have been made)"),
        ),
        doc="Start a data-parallel training job as a child process of the caller. "
            "The config is checked, and its memory estimate against the allocation "
            "(ENOMEM), before anything starts; wait returns its final loss. SIGTERM "
            "stops it at the next step with a checkpoint of that step (status 143)."),
    Syscall(401, "infer", "executor", (
        Arg("model", "str", max_len=MAX_STR,
            doc="a tensorfs model directory (its latest checkpoint) or checkpoint"),
        Arg("prompt", "str", default=None, nullable=True, max_len=MAX_PROMPT,
            doc="text (the byte-level GPT reads its UTF-8 bytes; a Hugging Face model, "
                "its tokens); give it or messages"),
        Arg("max_tokens", "int", default=200, lo=1, hi=MAX_GEN,
            doc="new tokens at most"),
        Arg("temperature", "float", default=0.8, lo=0, hi=100,
            doc="sampling temperature; 0: greedy"),
        Arg("top_k", "int", default=40, lo=0, hi=1 << 20,
            doc="sample among the k likeliest tokens; 0: no top-k filter"),
        Arg("seed", "int", default=None, nullable=True, lo=0, hi=2**63 - 1,
            doc="sampling seed; None: a random one, returned in the result"),
        Arg("stream", "bool", default=False,
            doc="send the text in partial replies as it is generated"),
        Arg("messages", "messages", default=None, nullable=True, max_len=1024,
            doc="a chat, [{role, content}...] (roles: system, user, assistant, tool), "
                "rendered with the model's chat template; instead of prompt"),
        Arg("stop", "list[str]", default=[], max_len=16,
            doc="stop strings: generation ends before the first one the text holds "
                "(finish_reason stop)"),
        Arg("top_p", "float", default=1.0, lo=0, hi=1,
            doc="sample among the likeliest tokens whose probabilities reach top_p; 1: "
                "no nucleus filter"),
        Arg("truncate", "bool", default=False,
            doc="a prompt longer than a Hugging Face model's context keeps its last "
                "tokens; False: EINVAL"),
    ), blocks=True, streams=True,
        returns="{text, tokens, prompt_tokens, finish_reason, seed, time_s}; "
                "streaming: partials {text (new), tokens, finish_reason: None}, then the "
                "final {text (the rest, often empty), tokens, prompt_tokens, "
                "finish_reason, seed, time_s}",
        errors=(
            ("EINVAL", "neither or both of prompt and messages, an empty prompt, a prompt "
                       "over infer_max_prompt bytes, max_tokens over infer_max_tokens, a "
                       "byte-level GPT whose vocabulary is not bytes (256), messages to a "
                       "model with no chat template (or a role outside the four), a prompt "
                       "over a Hugging Face model's context without truncate, a Hugging Face "
                       "model whose architecture transformers does not know, whose weights "
                       "do not match its config (naming the first) or that has no "
                       "tokenizer, or a bad tensorfs path (the root included)"),
            ("ENOENT", "no model at model: nothing there, a tensor, or a directory with no "
                       "config (in its latest checkpoint)"),
            ("EISDIR", "the checkpoint's config is a directory"),
            ("EACCES", "the caller's uid may not list the checkpoint or read one of its "
                       "tensors"),
            ("EIO", "a corrupt checkpoint: latest is a directory or names no checkpoint, "
                    "its config is not JSON or not a model's, its tensors do not match it "
                    "or fail their checksums; or the model failed mid-generation"),
            ("ENOMEM", "the model is larger than the executor's model_cache budget"),
            ("EAGAIN", "the process table is full (max_processes) when the executor "
                       "attaches for the caller's uid (its first call as that uid)"),
            ("ECANCELED", "the caller cancelled the call (the library does when it gives "
                          "up on one: its timeout, Ctrl-C, a stream closed) and still waits "
                          "for the answer"),
        ),
        doc="Generate text with a model, batched with other processes' requests "
            "(continuous batching, round robin across processes). With stream=True "
            "an iterator of chunks {text, tokens, finish_reason}: each chunk's text is "
            "new text only, and the last has finish_reason set and the totals."),
    Syscall(402, "models", "executor", idempotent=True,
            returns="{models: [...], engine: {...}, budget}",
            doc="The models the executor holds loaded that the caller may read (uid 0: "
                "all), and its batching statistics."),
    Syscall(403, "spawn_compress", "executor", (
        Arg("config", "dict", max_len=64,
            doc="the job: task (eval, quantize, prune), model, out, data and the "
                "task's settings (docs/compression.md lists every key and default)"),
    ), spawns=True, returns="int (the job's pid)",
        errors=(
            ("EINVAL", "the config: an unknown, missing, mistyped or out-of-range key, a "
                       "key of another task, out equal to model, prune with both or "
                       "neither of sparsity and heads/mlp, heads or mlp that would "
                       "remove every head or neuron; a model already int8; data that is "
                       "not a 1-D tensor of text or token ids"),
            ("ENOENT", "no model at model (or no config in it), no data tensor"),
            ("EISDIR", "data is a directory"),
            ("ENOTDIR", "a tensor is in the way of out"),
            ("EACCES", "the caller's uid may not read the model or the data, or make "
                       "out"),
            ("EEXIST", "out exists and force is false"),
            ("EBUSY", "a running training or compression job writes into out"),
            ("ENOTSUP", "a method the installed libraries cannot run on this machine "
                        "(int4), or structured pruning of a model whose config cannot "
                        "hold it (the byte-level GPT; GPT-2's heads)"),
        ),
        doc="Start a compression job as a child process of the caller: eval measures "
            "a model (held-out perplexity, decode tokens/s at batch 1 and 8, bytes); "
            "quantize and prune write a new model, with its manifest "
            "(compression.json), into out atomically. Everything is checked before "
            "the job starts; wait returns its final report."),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in TABLE}
BY_NUMBER: dict[int, Syscall] = {s.number: s for s in TABLE}
SERVICES: tuple[str, ...] = tuple(dict.fromkeys(s.service for s in TABLE))
