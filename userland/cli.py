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
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import IO, Any, NoReturn, Sequence

import psutil

import userland
from syscalls import ABI_VERSION, Errno, Home, SyscallError

NOT_RUNNING = 3
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
WAIT_SLICE_S = 0.1
LOG_TAIL_LINES = 20

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
    if pid is None or not _alive(pid):
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


def _alive(pid: int) -> bool:
    """pid names a process that has not ended (a zombie has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    """Wait until every one of procs has ended; False if some outlive timeout.

    Polls rather than wait()s: they are not our children, and a zombie that
    nobody reaps has ended all the same."""
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def kernel_argv(home: Home, verbose: bool = False) -> list[str]:
    return [sys.executable, "-m", "kernel", "--home", str(home.root),
            *(["-v"] if verbose else [])]


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


def connect(home: Home, uid: int | None = None, heartbeat: bool = False) -> userland.Llmos:
    """Attach to the running kernel; one-shot commands need no heartbeats."""
    require_running(home)
    try:
        return userland.connect(home.root, uid=uid, heartbeat=heartbeat)
    except ValueError as e:  # a home too deep for ipc:// socket paths
        raise CliError(f"llmos: {e}") from None


def kernel_ready(home: Home, pid: int) -> bool:
    """The kernel pid is up on home and every driver says ready."""
    # pidfile first: the client library checks that pid to notice a dead kernel
    if home.kernel_pid() != pid or not home.secretfile.exists():
        return False
    try:
        with userland.connect(home.root, uid=0, heartbeat=False) as osh:
            return all(d["state"] == "ready" for d in osh.sysinfo()["drivers"])
    except SyscallError:
        return False


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
    pid = running_kernel(home)
    if pid is not None:
        raise CliError(f"llmos is already running on {home.root} (pid {pid})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, kernel_argv(home, args.verbose), kernel_env(home))


def cmd_start(home: Home, args: argparse.Namespace) -> int:
    pid = running_kernel(home)
    if pid is not None:
        raise CliError(f"llmos is already running on {home.root} (pid {pid})")
    home.log.mkdir(parents=True, exist_ok=True)
    log_path = home.log / "kernel.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        # its own session: the kernel outlives this command and ignores our terminal;
        # cwd: a daemon must not pin whatever directory it was started from
        kernel = subprocess.Popen(kernel_argv(home), env=kernel_env(home), cwd=home.root,
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while not kernel_ready(home, kernel.pid):
        status = kernel.poll()
        if status is not None:
            tail = _log_tail(log_path, offset)
            raise CliError(f"llmos: the kernel exited with status {status} while starting "
                           f"({log_path}):\n{tail}")
        if time.monotonic() >= deadline:
            raise CliError(f"llmos: the kernel (pid {kernel.pid}) is not ready after "
                           f"{args.timeout:g}s; see {log_path} (stop it with: llmos stop)")
        time.sleep(POLL_S)
    print(f"llmos started on {home.root} (kernel pid {kernel.pid})")
    return 0


def cmd_stop(home: Home, args: argparse.Namespace) -> int:
    pid = running_kernel(home)
    if pid is None:
        raise CliError(f"llmos is not running on {home.root}")
    try:
        kernel = psutil.Process(pid)
        family = kernel.children(recursive=True)
        kernel.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        print("llmos stopped")
        return 0
    # the kernel stops its drivers and children and removes its sockets itself
    if not _wait_gone([kernel], args.timeout):
        print(f"llmos: the kernel did not stop within {args.timeout:g}s: killing it and "
              "its processes", file=sys.stderr)
        for proc in [kernel, *family]:
            try:
                proc.kill()  # psutil refuses a pid that now names another process
            except psutil.NoSuchProcess:
                pass
        if not _wait_gone([kernel, *family], 5.0):
            raise CliError(f"llmos: kernel pid {pid} survived SIGKILL")
    print("llmos stopped")
    return 0


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
             " ".join(p["argv"]) or "?"]
            for p in sorted(procs, key=lambda p: p["pid"])]
    lines = _table(["PID", "PPID", "UID", "STATE", "TIME", "RESOURCES", "COMMAND"], rows,
                   "rrrlrll")
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


def cmd_run(home: Home, args: argparse.Namespace) -> int:
    argv = list(args.command)
    if not argv:
        raise CliError("llmos run: name a program to run", 2)
    if argv[0].endswith(".py"):
        argv.insert(0, "python")
    env = dict(_key_value(s) for s in args.env)
    cwd = os.path.abspath(args.cwd) if args.cwd else None
    with connect(home, heartbeat=True) as osh:
        pid = osh.spawn(argv, uid=args.uid, cwd=cwd, env=env or None)
        if args.no_wait:
            print(pid)
            return 0
        tail = LogTail(home.log / "proc" / f"{pid}.log", sys.stdout.buffer)
        try:
            record = _wait_forwarding(osh, pid, tail)
        finally:
            tail.close()
    status = record["status"]
    if status is None:
        return 1
    return status if status >= 0 else 128 - status


def _wait_forwarding(osh: userland.Llmos, pid: int, tail: "LogTail") -> dict[str, Any]:
    """Wait for child pid while copying its output. Ctrl-C signals the child (TERM,
    then KILL) and the wait goes on, so the child is always reaped.

    SIGINT only counts here instead of raising KeyboardInterrupt: an exception
    could abandon a wait the kernel still holds, and that wait would reap the child
    and take its status with it."""
    interrupts = signalled = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        while True:
            if signalled < interrupts:
                signalled = interrupts
                try:
                    osh.kill(pid, "TERM" if signalled == 1 else "KILL")
                except SyscallError as e:
                    if e.errno != Errno.ESRCH:  # ESRCH: it ended meanwhile
                        raise
            try:
                return osh.wait(pid, timeout=WAIT_SLICE_S)
            except SyscallError as e:
                if e.errno != Errno.ETIMEDOUT:
                    raise
            tail.pump()
    finally:
        signal.signal(signal.SIGINT, previous)


class LogTail:
    """Copies to out what a file gains, from its start (it may not exist yet)."""

    def __init__(self, path: Path, out: IO[bytes]) -> None:
        self.path = path
        self.out = out
        self.file: IO[bytes] | None = None

    def pump(self) -> None:
        if self.file is None:
            try:
                self.file = open(self.path, "rb")
            except FileNotFoundError:
                return
        while chunk := self.file.read(1 << 16):
            self.out.write(chunk)
        self.out.flush()

    def close(self) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    home_help = "LLMOS_HOME to use (default: $LLMOS_HOME, else ~/.llmos)"
    parser = argparse.ArgumentParser(
        prog="llmos", description="Run and inspect an llmos instance.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--home", metavar="PATH", help=home_help)
    # --home is also accepted after the command; SUPPRESS keeps the one given first
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="PATH", default=argparse.SUPPRESS, help=home_help)
    sub = parser.add_subparsers(dest="name", metavar="COMMAND", required=True)

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("boot", cmd_boot, "run the kernel in the foreground, logging to the "
                "terminal; Ctrl-C shuts it down")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p = command("start", cmd_start, "start the kernel in the background and wait until "
                "its drivers are ready")
    p.add_argument("--timeout", type=float, default=START_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for ready (default {START_TIMEOUT_S:g})")
    p = command("stop", cmd_stop, "stop the kernel (SIGTERM, then SIGKILL after the timeout)")
    p.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait before SIGKILL (default {STOP_TIMEOUT_S:g})")
    command("status", cmd_status, "is the kernel up; its pid, uptime, processes, drivers "
            "(exit 3 when not running)")
    command("ps", cmd_ps, "list the processes")
    p = command("sysinfo", cmd_sysinfo, "kernel statistics: processes, drivers, per-syscall "
                "counts and latencies, dropped messages")
    p.add_argument("--json", action="store_true", help="print sysinfo() as JSON")
    p = command("run", cmd_run, "run a program as an llmos process, show its output and "
                "exit with its status")
    p.add_argument("--uid", type=int, help="run as this uid (root only)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = Home.resolve(args.home)
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


if __name__ == "__main__":
    sys.exit(main())
