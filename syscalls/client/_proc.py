"""Stopping a kernel from outside it: `llmos stop`, the tests and the benchmarks.

By pid, never by name: psutil checks a pid still names the process it found (by
its start time), so a pid reused by another program is never signalled.
"""
from __future__ import annotations

import os
import time
from typing import Any

POLL_S = 0.02


def stop_kernel(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM kernel pid and wait up to timeout for it to end (it stops its
    drivers and processes itself); then SIGKILL it, if it is still there, and every
    process it had started. True when it stopped by itself."""
    import psutil  # here, not at the top: every llmos command imports this module
    try:
        kernel = psutil.Process(pid)
        family = kernel.children(recursive=True)
        kernel.terminate()
    except psutil.NoSuchProcess:
        return True
    clean = wait_gone([kernel], timeout)
    for proc in [kernel, *family]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    if not wait_gone([kernel, *family], 5.0):
        raise RuntimeError(f"kernel pid {pid} or one of its processes survived SIGKILL")
    return clean


def wait_gone(procs: list[Any], timeout: float) -> bool:
    """Wait until every one of procs has ended; False if some outlive timeout.

    Polls rather than wait()s: they need not be our children, and a zombie that
    nobody reaps has ended all the same."""
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def lock_held(lockfile: Any, unknown: bool = False) -> bool:
    """Some kernel holds this home's lock (run/kernel.lock: it takes it first thing
    and holds it for its whole life); unknown when the file cannot be opened for
    another reason than its absence (another user's home)."""
    import fcntl
    try:
        fd = os.open(lockfile, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return unknown
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock if we got it
    return False


def alive(pid: int) -> bool:
    """pid names a process that has not ended (a zombie has). Reads /proc (psutil
    costs an import of tens of ms that every llmos command would pay)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: the process exists if it can be signalled
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # pid (comm) state ...: comm may hold spaces and parentheses, the state follows
    # the last ")"
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _gone(proc: Any) -> bool:
    import psutil
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
