"""Starting programs as llmos processes, and reaping them: the kernel's fork and exec.

spawn() adds the child to the process table, starts its OS process with a
single-use spawn token in its environment (the child attaches with it) and its
output in log/proc/<pid>.log, and keeps its Popen until reap() sees it end.
Nothing here knows about sockets: the kernel's spawn syscall and the
supervisor's `spawns` syscalls (spawn_train) both call it.

A child's Python output is unbuffered unless the caller says otherwise
(PYTHONUNBUFFERED=1), so what a program prints shows in its log as it prints
it. Every child gets PR_SET_PDEATHSIG: a kernel that is SIGKILLed takes its
processes with it (a reboot ends processes).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from syscalls import Errno, Home, SyscallError

from ._proctable import Process, ProcessTable

log = logging.getLogger("llmos.kernel")

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class Spawner:
    """The OS processes the kernel started, and the spawn tokens not yet used."""

    def __init__(self, home: Home, table: ProcessTable, max_processes: int) -> None:
        self.home = home
        self.table = table
        self.max_processes = max_processes
        self.popens: dict[int, subprocess.Popen] = {}   # pid -> OS child not yet reaped
        self.tokens: dict[str, int] = {}                # spawn token -> pid

    def spawn(self, parent: Process, argv: list[str], uid: int | None = None,
              cwd: str | None = None, env: dict[str, str] | None = None) -> Process:
        """Start argv as a child of parent (as uid: root only, when not parent's);
        the child process. SyscallError (EINVAL, EPERM, EAGAIN, ENOENT, EACCES,
        ENAMETOOLONG, EIO) when it cannot, with nothing left behind."""
        if not argv or not argv[0]:
            raise SyscallError(Errno.EINVAL, "spawn: argv must name a program")
        uid = parent.uid if uid is None else uid
        if uid != parent.uid and parent.uid != 0:
            raise SyscallError(Errno.EPERM, f"spawn: uid {parent.uid} may not spawn as "
                               f"uid {uid}")
        if len(self.table) >= self.max_processes:
            raise SyscallError(Errno.EAGAIN, "the process table is full")
        exe = [sys.executable if argv[0] in ("python", "python3") else argv[0], *argv[1:]]
        child = self.table.create(ppid=parent.pid, uid=uid, argv=argv, spawned=True)
        child.token = secrets.token_hex(16)
        try:
            popen = self._start(child, exe, cwd, env or {})
        except SyscallError:
            self.table.end(child.pid, None, "lost", remember=False)
            if child.pid in self.table.procs:
                self.table.reap(child.pid, remember=False)
            raise
        child.os_pid = popen.pid
        self.popens[child.pid] = popen
        self.tokens[child.token] = child.pid
        log.info("pid %d spawned pid %d (os pid %d): %s", parent.pid, child.pid, popen.pid,
                 " ".join(argv)[:80])
        return child

    def _start(self, child: Process, exe: list[str], cwd: str | None,
               extra: dict[str, str]) -> subprocess.Popen:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # a program's prints show as it runs
        env.update(extra)
        env.update(LLMOS_HOME=str(self.home.root), LLMOS_PID=str(child.pid),
                   LLMOS_SPAWN_TOKEN=child.token or "",
                   PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT,
                                                            env.get("PYTHONPATH")])))
        logfile = self.home.proc_log(child.pid)
        try:
            logfile.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SyscallError(Errno.EIO, f"spawn: cannot make {logfile.parent}: "
                               f"{e.strerror}") from None
        try:
            with open(logfile, "wb") as out:
                return subprocess.Popen(exe, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=die_with_kernel)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise SyscallError(Errno.ENOENT, f"spawn: {e.strerror}: {e.filename}") from None
        except PermissionError as e:
            raise SyscallError(Errno.EACCES, f"spawn: {e.strerror}: {e.filename}") from None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise SyscallError(Errno.ENAMETOOLONG, f"spawn: {e.strerror}") from None
            raise SyscallError(Errno.EIO, f"spawn: {e}") from None
        except (ValueError, TypeError) as e:  # e.g. an '=' in an environment name
            raise SyscallError(Errno.EINVAL, f"spawn: {e}") from None

    def claim(self, token: str) -> Process | None:
        """The running process a spawn token names; the token is used up."""
        pid = self.tokens.pop(token, None)
        proc = self.table.get(pid) if pid is not None else None
        return proc if proc is not None and proc.state == "running" else None

    def forget(self, proc: Process) -> None:
        """proc ended: its token can no longer be used."""
        self.tokens.pop(proc.token or "", None)

    def reap(self) -> list[tuple[int, int]]:
        """(pid, exit status) of each OS child that ended since the last call."""
        ended = []
        for pid, popen in list(self.popens.items()):
            rc = popen.poll()
            if rc is not None:
                del self.popens[pid]
                ended.append((pid, rc))
        return ended

    def shutdown(self) -> None:
        """TERM every OS child's process group, then KILL what is left."""
        popens = list(self.popens.values())
        for popen in popens:
            _signal_group(popen, signal.SIGTERM)
        _wait_all(popens, 2.0)
        for popen in popens:
            _signal_group(popen, signal.SIGKILL)
        _wait_all(popens, 2.0)


def die_with_kernel() -> None:
    """In a spawned child, before exec: SIGKILL me if the kernel dies, so a kernel
    that is itself SIGKILLed leaves no process behind (a reboot ends processes)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_all(popens: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in popens:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
