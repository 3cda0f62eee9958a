"""The llmos command: boot, start and stop a kernel on an LLMOS_HOME, look inside
it (status, ps, sysinfo), and run or signal programs through it.

It is a userland program like any other: it speaks to the kernel only through
syscalls, and starts the kernel as a separate OS process (python -m kernel); it
never imports kernel or drivers. A failure is one line on stderr, never a
traceback. See docs/cli.md.

Exit status: 0 done, 1 failed, 2 bad usage, 3 from `status` when no kernel runs
(as systemctl's), and `run` passes on its program's status.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import IO, Any, NoReturn, Sequence


import userland
from syscalls import ABI_VERSION, Errno, Home, SyscallError
from userland._cli_models import add_commands as add_model_commands
from userland._cli_models import progress
from userland._cli_tensors import add_commands as add_tensor_commands
from syscalls.client._proc import alive, stop_kernel

NOT_RUNNING = 3
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
TAIL_S = 0.05
LOG_TAIL_LINES = 20
# how long a command waits for each reply before it calls the kernel hung (a
# SIGSTOPped kernel); LLMOS_CALL_TIMEOUT overrides it
CALL_TIMEOUT_S = 10.0

# Where the llmos packages live, put on the kernel's PYTHONPATH so that
# `python -m kernel` works from any directory, installed or not.
PACKAGE_ROOT = str(Path(userland.__file__).resolve().parent.parent)


class CliError(Exception):
    """A failure the command reports as its message on stderr, exiting with code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- the kernel as an OS process ---------------------------------------------------

def running_kernel(home: Home) -> int | None:
    """The pid of the kernel serving home, or None.

    run/kernel.pid alone proves nothing: a SIGKILLed kernel leaves it behind and
    its pid may be reused. A kernel holds an flock on run/kernel.lock for its
    whole life, so the lock must be held too."""
    pid = home.kernel_pid()
    if pid is None or not alive(pid):
        return None
    try:
        fd = os.open(home.lockfile, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except PermissionError:  # another user's home: trust the pidfile
        return pid
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return pid
    finally:
        os.close(fd)  # also drops the shared lock if we got it
    return None


def kernel_argv(home: Home, verbose: bool = False, sim_gpus: str | None = None) -> list[str]:
    return [sys.executable, "-m", "kernel", "--home", str(home.root),
            *(["-v"] if verbose else []), *(["--sim-gpus", sim_gpus] if sim_gpus else [])]


def kernel_env(home: Home) -> dict[str, str]:
    env = dict(os.environ, LLMOS_HOME=str(home.root))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    for name in ("LLMOS_SPAWN_TOKEN", "LLMOS_PID"):  # ours, if an llmos process runs this
        env.pop(name, None)
    return env


def require_running(home: Home) -> int:
    pid = running_kernel(home)
    if pid is None:
        raise CliError(f"llmos is not running on {home.root} (start it with: llmos start)")
    return pid


def call_timeout() -> float:
    """Seconds a command waits for each reply: CALL_TIMEOUT_S or $LLMOS_CALL_TIMEOUT."""
    text = os.environ.get("LLMOS_CALL_TIMEOUT")
    if not text:
        return CALL_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise CliError(f"llmos: LLMOS_CALL_TIMEOUT wants seconds > 0, not {text!r}", 2)
    return value


def connect(home: Home, uid: int | None = None, heartbeat: bool = False) -> userland.Llmos:
    """Attach to the running kernel. One-shot commands need no heartbeats; a call
    the kernel does not answer within call_timeout() (a stopped kernel) is ETIMEDOUT."""
    require_running(home)
    return userland.connect(home.root, uid=uid, heartbeat=heartbeat, timeout=call_timeout())


def prepare_home(home: Home) -> None:
    """Make sure a kernel can live on home, creating its directories, before one is
    started: a home that cannot be used is one line, never a traceback."""
    try:
        home.kernel_endpoint, home.driver_endpoint
    except ValueError as e:  # ipc:// paths must fit in sun_path
        raise CliError(f"llmos: ENAMETOOLONG: {e}") from None
    try:
        if home.root.exists() and not home.root.is_dir():
            raise CliError(f"llmos: ENOTDIR: {home.root} is not a directory")
        home.root.mkdir(parents=True, exist_ok=True)
        home.run.mkdir(mode=0o700, exist_ok=True)
        home.log.mkdir(exist_ok=True)
    except OSError as e:
        raise CliError(_os_error(e)) from None
    for d in (home.root, home.run, home.log):
        if not os.access(d, os.R_OK | os.W_OK | os.X_OK):
            raise CliError(f"llmos: EACCES: {d} is not writable by this user")


def _os_error(e: OSError) -> str:
    """One line for an OSError: llmos: ENOTDIR: Not a directory: /etc/passwd/log."""
    name = errno.errorcode.get(e.errno or 0, "EIO")
    where = f": {e.filename}" if e.filename is not None else ""
    return f"llmos: {name}: {e.strerror or e}{where}"


def _drivers(home: Home, pid: int, deadline: float) -> list[dict[str, Any]] | None:
    """The drivers of kernel pid on home as sysinfo() tells, or None while it
    cannot tell (not up yet)."""
    # pidfile first: the client library checks that pid to notice a dead kernel
    if home.kernel_pid() != pid or not home.secretfile.exists():
        return None
    timeout = max(POLL_S, min(call_timeout(), deadline - time.monotonic()))
    try:
        with userland.connect(home.root, uid=0, heartbeat=False, timeout=timeout) as osh:
            return osh.sysinfo()["drivers"]
    except SyscallError:
        return None


def _lock_held(home: Home) -> bool:
    """Some kernel holds home's lock (it takes it before it writes its pidfile)."""
    try:
        fd = os.open(home.lockfile, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _log_sizes(home: Home) -> dict[Path, int]:
    """The size of each log start may show the end of, so that it shows only what
    this start added."""
    paths = [home.log / "kernel.log", *(home.log / "drivers").glob("*.log")]
    sizes = {}
    for path in paths:
        try:
            sizes[path] = path.stat().st_size
        except OSError:
            pass
    return sizes


def _log_tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:])


# -- commands ----------------------------------------------------------------------

def cmd_boot(home: Home, args: argparse.Namespace) -> NoReturn:
    """Become the kernel: exec, so that Ctrl-C reaches the kernel itself."""
    prepare_home(home)
    pid = running_kernel(home)
    if pid is not None:
        raise CliError(f"llmos is already running on {home.root} (pid {pid})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, kernel_argv(home, args.verbose, args.sim_gpus), kernel_env(home))


def cmd_start(home: Home, args: argparse.Namespace) -> int:
    prepare_home(home)
    pid = running_kernel(home)
    if pid is not None:
        raise CliError(f"llmos is already running on {home.root} (pid {pid})")
    log_path = home.log / "kernel.log"
    offsets = _log_sizes(home)
    with open(log_path, "ab") as out:
        # its own session: the kernel outlives this command and ignores our terminal;
        # cwd: a daemon must not pin whatever directory it was started from
        kernel = subprocess.Popen(kernel_argv(home, sim_gpus=args.sim_gpus),
                                  env=kernel_env(home), cwd=home.root,
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while True:
        drivers = _drivers(home, kernel.pid, deadline)
        if drivers is not None:
            if all(d["state"] == "ready" for d in drivers):
                break
            # a driver that died before it was ever ready is crash-looping (a bad
            # drivers setting, a driver that cannot import): do not wait it out
            failed = [d for d in drivers if d["state"] != "ready"
                      and (d["restarts"] > 0 or d["last_exit"])]
            if failed:
                _stop_kernel(kernel.pid, STOP_TIMEOUT_S)
                kernel.wait()
                raise CliError(_drivers_failed(home, kernel.pid, failed, offsets))
        status = kernel.poll()
        if status is not None:
            # lost the race with another start on this home: its kernel holds the lock
            other = _other_kernel(home, kernel.pid, deadline)
            if other is not None:
                raise CliError(f"llmos is already running on {home.root} (pid {other})")
            tail = _log_tail(log_path, offsets.get(log_path, 0))
            raise CliError(f"llmos: the kernel exited with status {status} while starting "
                           f"({log_path}):\n{tail}")
        if time.monotonic() >= deadline:
            raise CliError(f"llmos: the kernel (pid {kernel.pid}) is not ready after "
                           f"{args.timeout:g}s; see {log_path} (stop it with: llmos stop)")
        time.sleep(POLL_S)
    print(f"llmos started on {home.root} (kernel pid {kernel.pid})")
    return 0


def _drivers_failed(home: Home, kernel_pid: int, failed: list[dict[str, Any]],
                    offsets: dict[Path, int]) -> str:
    lines = []
    for d in failed:
        path = home.log / "drivers" / f"{d['name']}.log"
        lines.append(f"llmos: driver {d['name']} failed while starting "
                     f"({d['last_exit'] or 'restarting'}); the end of {path}:")
        lines.append(_log_tail(path, offsets.get(path, 0)) or "(empty)")
    lines.append(f"llmos: stopped the kernel (pid {kernel_pid}); fix the driver or the "
                 f"drivers setting in {home.root / 'config.toml'}")
    return "\n".join(lines)


def _other_kernel(home: Home, ours: int, deadline: float) -> int | None:
    """The pid of another kernel that holds home, once our kernel has exited.

    A kernel takes the lock before it writes its pidfile, so one that holds the lock
    but names no pid yet is given until deadline to do so."""
    while _lock_held(home):
        pid = running_kernel(home)
        if pid is not None and pid != ours:
            return pid
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return None


def cmd_stop(home: Home, args: argparse.Namespace) -> int:
    pid = running_kernel(home)
    if pid is None:
        print(f"llmos is not running on {home.root}")  # stopped already: done, as systemctl
        return 0
    _stop_kernel(pid, args.timeout)
    print("llmos stopped")
    return 0


def _stop_kernel(pid: int, timeout: float) -> None:
    """SIGTERM kernel pid and wait; after timeout SIGKILL it and every process it had
    started."""
    try:
        if not stop_kernel(pid, timeout):
            print(f"llmos: the kernel did not stop within {timeout:g}s: killed it and "
                  "its processes", file=sys.stderr)
    except RuntimeError as e:
        raise CliError(f"llmos: {e}") from None


def cmd_status(home: Home, args: argparse.Namespace) -> int:
    if running_kernel(home) is None:
        print(f"llmos is not running on {home.root}")
        return NOT_RUNNING
    with connect(home) as osh:
        info = osh.sysinfo()
    procs = info["processes"]
    print(f"llmos is running on {info['home']}")
    print(f"  kernel pid  {info['kernel_pid']}")
    print(f"  uptime      {_duration(info['uptime_s'])}")
    print(f"  processes   {procs['total']} ({procs['running']} running, "
          f"{procs['zombie']} zombie)")
    print("  drivers")
    rows = [[d["name"], d["state"], _dash(d["os_pid"]), d["restarts"]]
            for d in info["drivers"]]
    for line in _table(["NAME", "STATE", "OS PID", "RESTARTS"], rows, "llrr"):
        print(f"    {line}")
    return 0


def cmd_ps(home: Home, args: argparse.Namespace) -> int:
    with connect(home) as osh:
        procs = osh.ps()
    now = time.time()
    rows = [[p["pid"], p["ppid"], p["uid"], p["state"],
             _clock(now - p["start_time"]), _resources(p["resources"]),
             " ".join(map(_printable, p["argv"])) or "?"]
            for p in sorted(procs, key=lambda p: p["pid"])]
    headers = ["PID", "PPID", "UID", "STATE", "TIME", "RESOURCES", "COMMAND"]
    if any(p.get("info") for p in procs):  # what report() published: a job's progress
        headers.append("INFO")
        for row, p in zip(rows, sorted(procs, key=lambda p: p["pid"])):
            row.append(progress(p["info"]) if p.get("info") else "")
    lines = _table(headers, rows, "rrrlrlll")
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    for line in lines:
        print(line[:width] if width else line)
    return 0


def cmd_sysinfo(home: Home, args: argparse.Namespace) -> int:
    with connect(home) as osh:
        info = osh.sysinfo()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    procs = info["processes"]
    print(f"kernel     pid {info['kernel_pid']} on {info['hostname']}, ABI {info['abi']}")
    print(f"home       {info['home']}")
    print(f"uptime     {_duration(info['uptime_s'])}")
    print(f"processes  {procs['total']} ({procs['running']} running, {procs['zombie']} "
          f"zombie), {info['waiting']} waiting")
    print("\ndrivers")
    rows = [[d["name"], d["state"], _dash(d["os_pid"]), d["restarts"],
             _duration(d["uptime_s"]) if d["uptime_s"] is not None else "-",
             d["inflight"], d["backlog"], d["last_exit"] or "-"] for d in info["drivers"]]
    _print_indented(_table(["NAME", "STATE", "OS PID", "RESTARTS", "UPTIME", "IN FLIGHT",
                            "BACKLOG", "LAST EXIT"], rows, "llrrrrrl"))
    print("\nsyscalls")
    rows = [[name, s["count"], s["errors"], _dash(s["p50_us"]), _dash(s["p90_us"]),
             _dash(s["p99_us"])] for name, s in sorted(info["syscalls"].items())]
    _print_indented(_table(["NAME", "COUNT", "ERRORS", "P50 us", "P90 us", "P99 us"], rows,
                           "lrrrrr"))
    print("\ndropped")
    dropped = sorted(info["dropped"].items())
    _print_indented(_table(["WHY", "COUNT"], dropped, "lr") if dropped else ["(none)"])
    return 0


def cmd_devices(home: Home, args: argparse.Namespace) -> int:
    with connect(home) as osh:
        info = osh.devices()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    cpus, mem = info["cpus"], info["memory"]
    print(f"cpus    {cpus['logical']} logical, {_dash(cpus['physical'])} physical, "
          f"{cpus['percent']}% busy")
    print(f"memory  {_bytes(mem['total'])} total, {_bytes(mem['available'])} available")
    kind = "simulated" if info["simulated"] else "real"
    print(f"\ngpus ({kind})")
    rows = [[g["index"], g["id"], g["name"] + (" (simulated)" if g["simulated"] else ""),
             _bytes(g["capacity"]), _bytes(g["allocated"]), _bytes(g["free"]),
             "yes" if g["exclusive"] else "-",
             _dash(g.get("utilization")) if not g["simulated"] else "-"]
            for g in info["gpus"]]
    _print_indented(_table(["#", "ID", "NAME", "CAPACITY", "ALLOCATED", "FREE", "EXCL",
                            "UTIL%"], rows, "rllrrrlr") if rows else ["(none)"])
    print("\nallocations")
    rows = [[a["id"], a["pid"], a["uid"], g["id"], _bytes(a["bytes"]),
             "yes" if a["exclusive"] else "-"]
            for g in info["gpus"] for a in g["allocations"]]
    _print_indented(_table(["ID", "PID", "UID", "GPU", "BYTES", "EXCL"], rows, "lrrlrl")
                    if rows else ["(none)"])
    print("\nwaiting")
    rows = [[w["pid"], w["uid"], _bytes(w["mem"]), w["count"], w["priority"],
             f"{w['waited_s']:.1f}s"] for w in info["queue"]]
    _print_indented(_table(["PID", "UID", "BYTES", "COUNT", "PRIORITY", "WAITED"], rows,
                           "rrrrrr") if rows else ["(none)"])
    return 0


def _bytes(n: int) -> str:
    """1536 -> 1.5KiB; whole numbers without decimals."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + unit
    return f"{n}B"


def cmd_run(home: Home, args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv[:1] == ["--"]:  # llmos run [OPTIONS] -- PROGRAM ARGS...
        del argv[0]
    if not argv:
        raise CliError("llmos run: name a program to run", 2)
    if argv[0].endswith(".py"):
        argv.insert(0, "python")
    env = dict(_key_value(s) for s in args.env)
    cwd = os.path.abspath(args.cwd) if args.cwd else None
    # attached as --uid (with the home's secret, an administrator's credential), so
    # the program runs as that uid, as `kill --uid` acts as it
    with connect(home, uid=args.uid, heartbeat=True) as osh:
        pid = osh.spawn(argv, cwd=cwd, env=env or None)
        if args.no_wait:
            print(pid)
            return 0
        osh.timeout = None  # the wait lasts as long as the program
        tail = LogTail(home.log / "proc" / f"{pid}.log", sys.stdout.buffer)
        try:
            record = _wait_forwarding(osh, home, pid, tail)
        finally:
            tail.stop()
            osh.timeout = call_timeout()  # for the exit() that detaching makes
        if tail.broken:  # the reader left: keep Python from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    status = record["status"]
    if status is None:
        return 1
    return status if status >= 0 else 128 - status


def _wait_forwarding(osh: userland.Llmos, home: Home, pid: int,
                     tail: "LogTail") -> dict[str, Any]:
    """Wait for child pid in one blocking wait() while tail copies its output.
    SIGTERM, SIGHUP and Ctrl-C send the child SIGTERM (a second Ctrl-C: SIGKILL) and
    the wait goes on, so the child is always reaped and its status passed on.

    The handlers only queue the signal for a thread with a connection of its own:
    they run in this thread, which is inside wait() on osh. They never raise: an
    exception would abandon a wait the kernel still holds, and that wait would reap
    the child and take its status with it."""
    forwarder = _Forwarder(home, osh.uid, pid)
    interrupts = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
        forwarder.send("KILL" if interrupts > 1 else "TERM")

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup llmos run ...
            previous[signum] = signal.signal(signum, on_signal)
    try:
        tail.start()  # once the handlers are in: its output may prompt a signal
        return osh.wait(pid)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        forwarder.close()


class _Forwarder:
    """Sends signals to llmos process pid from a thread, over a connection of its own
    attached as uid (opened at the first signal)."""

    def __init__(self, home: Home, uid: int, pid: int) -> None:
        self.home, self.uid, self.pid = home, uid, pid
        self.queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="llmos-signals")
        self.thread.start()

    def send(self, signal_name: str) -> None:
        self.queue.put(signal_name)  # SimpleQueue.put is safe in a signal handler

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(call_timeout() + 1.0)

    def _run(self) -> None:
        osh = None
        try:
            while (signal_name := self.queue.get()) is not None:
                try:
                    if osh is None:
                        osh = userland.connect(self.home.root, uid=self.uid, heartbeat=False,
                                               timeout=call_timeout())
                    osh.kill(self.pid, signal_name)
                except SyscallError as e:
                    if e.errno != Errno.ESRCH:  # ESRCH: it ended meanwhile
                        _print_error(e)
                except CliError as e:
                    print(e, file=sys.stderr)
        finally:
            if osh is not None:
                osh.close()


class LogTail:
    """Copies to out what a file gains, from its start (it may not exist yet), in a
    thread of its own between start() and stop()."""

    def __init__(self, path: Path, out: IO[bytes]) -> None:
        self.path = path
        self.out = out
        self.file: IO[bytes] | None = None
        self.broken = False  # out failed (a closed pipe, a hung-up terminal)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="llmos-tail")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TAIL_S):
            self.pump()

    def pump(self) -> None:
        if self.broken:
            return
        if self.file is None:
            try:
                self.file = open(self.path, "rb")
            except FileNotFoundError:
                return
        try:
            while chunk := self.file.read(1 << 16):
                self.out.write(chunk)
            self.out.flush()
        except OSError:
            self.broken = True

    def stop(self) -> None:
        """Stop the thread (if it started), then copy what is left."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        self.pump()
        if self.file is not None:
            self.file.close()


def cmd_kill(home: Home, args: argparse.Namespace) -> int:
    failed = False
    with connect(home, uid=args.uid) as osh:
        for pid in args.pids:
            try:
                osh.kill(pid, args.signal)
            except SyscallError as e:
                _print_error(e)
                failed = True
    return 1 if failed else 0


# -- formatting --------------------------------------------------------------------

def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    """Rows as aligned text; align has one letter per column, l or r."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
    return lines


def _print_indented(lines: list[str]) -> None:
    for line in lines:
        print(f"  {line}")


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def _duration(seconds: float) -> str:
    """12.3s, 4m 05s, 3h 04m, 2d 03h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _clock(seconds: float) -> str:
    """Elapsed time as ps shows it: MM:SS, HH:MM:SS, D-HH:MM:SS."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{s:02d}"
    if hours:
        return f"{hours:02d}:{minutes:02d}:{s:02d}"
    return f"{minutes:02d}:{s:02d}"


def _printable(text: str) -> str:
    """text on one line: a newline, tab or other control character as its escape
    (\\n, \\t, \\x1b), so that one process stays one row."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _resources(held: dict[str, list[str]]) -> str:
    return ",".join(f"{kind}:{len(names)}" for kind, names in sorted(held.items())) or "-"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CliError(f"llmos run: --env wants KEY=VALUE, not {text!r}", 2)
    return key, value


def _print_error(e: SyscallError) -> None:
    print(f"llmos: {e.errno.name}: {e.message}", file=sys.stderr)


# -- the parser --------------------------------------------------------------------

def _version() -> str:
    try:
        version = metadata.version("llmos")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"llmos {version} (ABI {ABI_VERSION})"


def _home_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("wants a path, not an empty string")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"wants seconds >= 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    home_help = "LLMOS_HOME to use (default: $LLMOS_HOME, else ~/.llmos)"
    parser = argparse.ArgumentParser(
        prog="llmos", description="Run and inspect an llmos instance.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--home", metavar="PATH", type=_home_arg, help=home_help)
    # --home is also accepted after the command; SUPPRESS keeps the one given first
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="PATH", type=_home_arg, default=argparse.SUPPRESS,
                        help=home_help)
    sub = parser.add_subparsers(dest="name", metavar="COMMAND", required=True)

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("boot", cmd_boot, "run the kernel in the foreground, logging to the "
                "terminal; Ctrl-C shuts it down")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--sim-gpus", metavar="NxSIZE", help="simulated GPUs when there is no "
                   "real one, e.g. 4x24GiB (overrides sim_gpus in config.toml)")
    p = command("start", cmd_start, "start the kernel in the background and wait until "
                "its drivers are ready")
    p.add_argument("--timeout", type=_seconds, default=START_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for ready (default {START_TIMEOUT_S:g})")
    p.add_argument("--sim-gpus", metavar="NxSIZE", help="simulated GPUs when there is no "
                   "real one, e.g. 4x24GiB (overrides sim_gpus in config.toml)")
    p = command("stop", cmd_stop, "stop the kernel (SIGTERM, then SIGKILL after the timeout)")
    p.add_argument("--timeout", type=_seconds, default=STOP_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait before SIGKILL (default {STOP_TIMEOUT_S:g})")
    command("status", cmd_status, "is the kernel up; its pid, uptime, processes, drivers "
            "(exit 3 when not running)")
    command("ps", cmd_ps, "list the processes")
    p = command("sysinfo", cmd_sysinfo, "kernel statistics: processes, drivers, per-syscall "
                "counts and latencies, dropped messages")
    p.add_argument("--json", action="store_true", help="print sysinfo() as JSON")
    p = command("devices", cmd_devices, "CPUs, memory, GPUs (real or simulated), their "
                "allocations and the requests waiting for one")
    p.add_argument("--json", action="store_true", help="print devices() as JSON")
    p = command("run", cmd_run, "run a program as an llmos process, show its output and "
                "exit with its status")
    p.add_argument("--uid", type=int, help="attach and run as this uid (default: "
                   "default_uid in config.toml)")
    p.add_argument("--cwd", metavar="DIR", help="working directory (default: this one)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="add to the program's environment (repeatable)")
    p.add_argument("--no-wait", action="store_true",
                   help="print the new pid and return at once")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS...]",
                   help='"python" is the kernel\'s interpreter; a .py file runs with it')
    p = command("kill", cmd_kill, "send a signal to processes")
    p.add_argument("-s", "--signal", choices=["TERM", "KILL", "INT"], default="TERM")
    p.add_argument("--uid", type=int, help="act as this uid (0 may signal anyone's)")
    p.add_argument("pids", type=int, nargs="+", metavar="PID")
    add_tensor_commands(command, connect)
    add_model_commands(command, connect)
    p = command("shell", cmd_shell, "the interactive shell (docs/shell.md); -c runs "
                "commands, a script comes on stdin")
    p.add_argument("-c", dest="commands", metavar="COMMANDS",
                   help='commands separated by ";", e.g. "ps; ls /"')
    return parser


def cmd_shell(home: Home, args: argparse.Namespace) -> int:
    from userland.shell import main as shell_main
    return shell_main(home, args.commands)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        home = Home.resolve(args.home)
    except RuntimeError as e:  # ~nosuchuser/...
        print(f"llmos: ENOENT: {e}", file=sys.stderr)
        return 1
    try:
        return int(args.func(home, args))
    except SyscallError as e:
        _print_error(e)
        return 1
    except CliError as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader left (llmos ps | head); keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the home or a log under it is unusable: one line all the same
        print(_os_error(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
