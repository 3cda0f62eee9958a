"""The kernel as an OS process, seen from outside: is one running on a home, start
one (python -m kernel, never an import of it), stop one, and follow a log file.

A kernel is running when run/kernel.pid names a live process and run/kernel.lock
is locked (the kernel holds an flock on it for its whole life), so a pidfile left
by a SIGKILLed kernel is never mistaken for one. It must never import the kernel.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from syscalls import Home, SyscallError
from syscalls.client import alive, connect, stop_kernel
from syscalls.client import lock_held as client_lock_held

from ._base import CliError, call_timeout

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
TAIL_S = 0.05
LOG_TAIL_LINES = 20

# Where the llmos packages live, put on the kernel's PYTHONPATH so that
# `python -m kernel` works from any directory, installed or not.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def running_kernel(home: Home) -> int | None:
    """The pid of the kernel serving home, or None."""
    pid = home.kernel_pid()
    if pid is None or not alive(pid):
        return None
    return pid if lock_held(home, unknown=True) else None


def local_only(what: str) -> None:
    """CliError when LLMOS_CREDENTIAL names a kernel over TCP: what works on this
    host's LLMOS_HOME (its files, its processes) would act on the wrong kernel."""
    if os.environ.get("LLMOS_CREDENTIAL"):
        raise CliError(f"llmos: EINVAL: {what} works on this host's LLMOS_HOME, and "
                       "LLMOS_CREDENTIAL names a kernel over TCP; unset it for this command")


def require_running(home: Home) -> None:
    """CliError unless a kernel runs on home, or is starting there (connect() waits
    for one that is)."""
    if running_kernel(home) is None and not lock_held(home):
        raise CliError(f"llmos is not running on {home.root} (start it with: llmos start)")


def lock_held(home: Home, unknown: bool = False) -> bool:
    """Some kernel holds home's lock (it takes it before it writes its pidfile);
    unknown when the lock file cannot be opened for another reason than its absence
    (another user's home)."""
    return client_lock_held(home.lockfile, unknown)


def kernel_argv(home: Home, verbose: bool = False, sim_gpus: str | None = None,
                listen: str | None = None) -> list[str]:
    return [sys.executable, "-m", "kernel", "--home", str(home.root),
            *(["-v"] if verbose else []), *(["--sim-gpus", sim_gpus] if sim_gpus else []),
            *(["--listen", listen] if listen else [])]


def kernel_env(home: Home) -> dict[str, str]:
    env = dict(os.environ, LLMOS_HOME=str(home.root))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    for name in ("LLMOS_SPAWN_TOKEN", "LLMOS_PID"):  # ours, if an llmos process runs this
        env.pop(name, None)
    return env


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
        from ._base import os_error
        raise CliError(f"llmos: {os_error(e)}") from None
    for d in (home.root, home.run, home.log):
        if not os.access(d, os.R_OK | os.W_OK | os.X_OK):
            raise CliError(f"llmos: EACCES: {d} is not writable by this user")


class DriverWatch:
    """What start asks a starting kernel: its drivers, as sysinfo() tells, on one
    connection for the whole wait (one process in ps -a, not one per poll)."""

    def __init__(self, home: Home, pid: int) -> None:
        self.home, self.pid = home, pid
        self.osh: Any = None

    def drivers(self, deadline: float) -> list[dict[str, Any]] | None:
        """The drivers, or None while the kernel cannot tell (not up yet)."""
        # pidfile first: the client library checks that pid to notice a dead kernel
        if self.home.kernel_pid() != self.pid or not self.home.secretfile.exists():
            return None
        try:
            if self.osh is None:
                self.osh = connect(self.home.root, uid=0, heartbeat=False,
                                   argv=["llmos", "start"])
            self.osh.timeout = max(POLL_S, min(call_timeout(), deadline - time.monotonic()))
            return self.osh.sysinfo()["drivers"]
        except SyscallError:
            self.close()
            return None

    def close(self) -> None:
        if self.osh is not None:
            osh, self.osh = self.osh, None
            try:
                osh.close()
            except SyscallError:
                pass


def other_kernel(home: Home, ours: int, deadline: float) -> int | None:
    """The pid of another kernel that holds home, once our kernel has exited.

    A kernel takes the lock before it writes its pidfile, so one that holds the lock
    but names no pid yet is given until deadline to do so."""
    while lock_held(home):
        pid = running_kernel(home)
        if pid is not None and pid != ours:
            return pid
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return None


def stop(pid: int, timeout: float) -> bool:
    """SIGTERM kernel pid and wait; after timeout SIGKILL it and every process it had
    started. True when it stopped by itself."""
    try:
        return stop_kernel(pid, timeout)
    except RuntimeError as e:
        raise CliError(f"llmos: {e}") from None


def log_sizes(home: Home) -> dict[Path, int]:
    """The size of each log start may show the end of, so that it shows only what
    this start added."""
    sizes = {}
    for path in [home.kernel_log, *(home.log / "drivers").glob("*.log")]:
        try:
            sizes[path] = path.stat().st_size
        except OSError:
            pass
    return sizes


def log_tail(path: Path, offset: int = 0, lines: int | None = LOG_TAIL_LINES) -> str:
    """The text path holds past offset; its last `lines` lines (None: all)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    kept = text.rstrip("\n").splitlines()
    return "\n".join(kept if lines is None else kept[-lines:]) if kept else ""


class LogTail:
    """Copies to out what a file gains, from its start (it may not exist yet), in a
    thread of its own between start() and stop()."""

    def __init__(self, path: Path, out: IO[bytes], offset: int = 0) -> None:
        self.path = path
        self.out = out
        self.offset = offset
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
            self.file.seek(self.offset)
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
