"""The process commands: ps, jobs, top, run, wait, kill (docs/cli.md)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from syscalls import Errno, SyscallError
from syscalls.client import SIGNAL_NAMES, signal_name

from . import _views
from ._argtypes import key_values, seconds
from ._command import Session, UsageError, arg, command, each
from ._kernelctl import LogTail

PS_JSON = ("[{pid, ppid, uid, argv, state, start_time, end_time, os_pid, attached, "
           "resources, status, reason, info, system, node, node_os_pid}]")


@command("ps", "processes", "the process table",
         arg("-a", "--all", action="store_true",
             help="also the processes that ended (the last ended_kept, 256 by "
                  "default), with how they ended"),
         arg("-f", "--full", action="store_true",
             help="each command line in full (by default: the program's name and "
                  "its arguments)"),
         syscalls=("ps",),
         view=lambda procs, s, a: _views.ps_lines(procs, a.full),
         json_keys=PS_JSON,
         details="STATE is running, zombie, or how an ended one ended (exited N, killed "
                 "N, lost). A system process (a driver's own connection, e.g. the "
                 "executor loading models as a uid) shows in [brackets]; only uid 0 may "
                 "signal it. INFO is what a process published with report (a training "
                 "job's progress).")
def ps(s: Session, a: argparse.Namespace) -> list[dict[str, Any]]:
    return s.osh.ps(all=a.all)


def reporting(procs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in procs if p.get("info")]


@command("jobs", "processes", "the processes that report progress: training jobs, with "
         "how far they are",
         arg("-a", "--all", action="store_true",
             help="also the jobs that ended: how (STATE), steps, final loss and "
                  "checkpoint"),
         syscalls=("ps",),
         view=lambda procs, s, a: _views.jobs_lines(procs), json_keys=PS_JSON,
         details="A job shows from its first report on (state starting); an ended one "
                 "stays listed by -a with its last report.")
def jobs(s: Session, a: argparse.Namespace) -> list[dict[str, Any]]:
    return reporting(s.osh.ps(all=a.all))


class Rates:
    """What top remembers between refreshes: the syscall counts, for rates."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.at: float | None = None

    def __call__(self, info: dict[str, Any]) -> dict[str, float]:
        now = time.monotonic()
        counts = {k: v["count"] for k, v in info["syscalls"].items()}
        rates = {}
        if self.at is not None and now > self.at:
            dt = now - self.at
            rates = {k: max(0, c - self.counts.get(k, 0)) / dt for k, c in counts.items()}
        self.counts, self.at = counts, now
        return rates


def top_lines(s: Session, rates: Rates, height: int | None = None) -> list[str]:
    procs, info = s.osh.ps(), s.osh.sysinfo()
    try:
        devices = s.osh.devices()
    except SyscallError:  # no devices driver: the rest is still worth a look
        devices = None
    p = info["processes"]
    lines = [f"llmos top  {time.strftime('%H:%M:%S')}  up {_views.duration(info['uptime_s'])}"
             f"  processes {p['total']} ({p['running']} running, {p['zombie']} zombie), "
             f"{info['waiting']} waiting", "", *_views.ps_lines(procs), ""]
    if devices is not None:
        lines += [*_views.devices_lines(devices, s.allocs), ""]
    used = len(lines) + 3
    limit = max(3, height - used) if height else None
    return lines + ["syscalls", *_views.indented(_views.syscalls_lines(info, rates(info),
                                                                       limit))]


@command("top", "processes", "a live view: processes, devices and allocations, the GPU "
         "queue, syscall rates and latencies",
         arg("--once", action="store_true", help="print one snapshot and return"),
         syscalls=("ps", "sysinfo", "devices"),
         details="Refreshes every second; q or Ctrl-C leaves. Not on a terminal, or "
                 "with --once, it prints one snapshot. PER S is each syscall's calls per "
                 "second since the last refresh (top's own included).")
def top(s: Session, a: argparse.Namespace) -> None:
    rates = Rates()
    if a.once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        s.lines(top_lines(s, rates))
        return
    import select
    import shutil
    import termios
    import tty
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        sys.stdout.write("\x1b[?1049h")  # the alternate screen, as top's
        while True:
            size = shutil.get_terminal_size()
            frame = [line[:size.columns] for line in top_lines(s, rates, size.lines - 1)]
            frame = frame[:size.lines - 2] + ["q or Ctrl-C leaves"]
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(frame))
            sys.stdout.flush()
            if select.select([fd], [], [], 1.0)[0] and os.read(fd, 32)[:1] in (b"q", b"Q",
                                                                               b"\x04"):
                break
    except KeyboardInterrupt:
        pass
    finally:
        sys.stdout.write("\x1b[?1049l")
        sys.stdout.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def program(words: list[str]) -> list[str]:
    """A command line to run: "--" first dropped, a .py file run with python."""
    argv = list(words)
    if argv[:1] == ["--"]:
        del argv[0]
    if not argv:
        raise UsageError("name a program to run")
    if argv[0].endswith(".py"):
        argv.insert(0, "python")
    return argv


def exit_status(record: dict[str, Any]) -> int:
    """A shell's exit status for a process's end: its status, 128 + a signal, 1 lost."""
    status = record["status"]
    if status is None:
        return 1
    return status if status >= 0 else 128 - status


@command("run", "processes", "run a program as an llmos process (a child of this one), "
         "show its output and exit with its status",
         arg("-d", "--detach", "--no-wait", action="store_true",
             help="print the new pid and return at once (wait reaps it later, in the "
                  "shell)"),
         arg("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
             help="add to the program's environment (repeatable)"),
         arg("--cwd", metavar="DIR", complete="local",
             help="working directory (default: this one)"),
         arg("--node", metavar="NAME",
             help="run it on this node (llmos nodes); its output stays in that node's "
                  "log/proc/PID.log"),
         arg("command", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS...]",
             complete="local",
             help='"python" is the kernel\'s interpreter; a .py file runs with it'),
         syscalls=("spawn", "wait", "kill"),
         remainder=True,
         details="Its output (log/proc/PID.log) is copied here as it grows; Python "
                 "programs run unbuffered (PYTHONUNBUFFERED=1) unless -e says otherwise. "
                 "Ctrl-C, SIGTERM and SIGHUP send it TERM (a second Ctrl-C: KILL) and "
                 "the wait goes on, so its status is always passed on.")
def run(s: Session, a: argparse.Namespace) -> None:
    argv = program(a.command)
    env = key_values(a.env, "--env values")
    cwd = os.path.abspath(os.path.expanduser(a.cwd)) if a.cwd else None
    osh = s.osh
    pid = osh.spawn(argv, cwd=cwd, env=env or None, node=a.node)
    if a.detach:
        s.line(str(pid))
        return None
    sys.stdout.flush()
    # a process on another node, or on a kernel over TCP, writes its log there:
    # nothing to follow here
    remote = a.node is not None or bool(os.environ.get("LLMOS_CREDENTIAL"))
    if remote:
        s.note(f"pid {pid}: its output is in log/proc/{pid}.log of the LLMOS_HOME of "
               f"{'node ' + a.node if a.node else 'the kernel'} it runs on")
    log = Path(os.devnull) if remote else s.home.proc_log(pid)
    tail = LogTail(log, sys.stdout.buffer)
    with s.unbounded():
        try:
            record = wait_forwarding(s, pid, tail)
        finally:
            tail.stop()
    if tail.broken:  # the reader left: keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    s.status = exit_status(record)
    if s.status and (s.shell or remote):
        s.note(_views.wait_line(record))
    return None


def wait_forwarding(s: Session, pid: int, tail: LogTail) -> dict[str, Any]:
    """Wait for child pid in one blocking wait() while tail copies its output.
    SIGTERM, SIGHUP and Ctrl-C send the child SIGTERM (a second Ctrl-C: SIGKILL) and
    the wait goes on, so the child is always reaped and its status passed on.

    The handlers only queue the signal for a thread with a connection of its own:
    they run in this thread, which is inside wait(). They never raise: an exception
    would abandon a wait the kernel still holds, and that wait would reap the child
    and take its status with it."""
    import signal
    forwarder = Forwarder(s, pid)
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
        return s.osh.wait(pid)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        forwarder.close()


class Forwarder:
    """Sends signals to llmos process pid from a thread, over a connection of its own
    attached as the session's uid (opened at the first signal)."""

    def __init__(self, s: Session, pid: int) -> None:
        import queue
        import threading
        self.session, self.pid = s, pid
        self.uid = s.osh.uid
        self.queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="llmos-signals")
        self.thread.start()

    def send(self, signal_name: str) -> None:
        self.queue.put(signal_name)  # SimpleQueue.put is safe in a signal handler

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(15.0)

    def _run(self) -> None:
        osh = None
        try:
            while (name := self.queue.get()) is not None:
                try:
                    if osh is None:
                        osh = self.session.connect(uid=self.uid)
                    osh.kill(self.pid, name)
                except SyscallError as e:
                    if e.errno != Errno.ESRCH:  # ESRCH: it ended meanwhile
                        self.session.error(f"{e.errno.name}: {e.message}")
                except Exception as e:  # the kernel went away, say: one line
                    self.session.error(f"cannot signal {self.pid}: {e}")
        finally:
            if osh is not None:
                osh.close()


WAIT_POLL_S = 0.25


@command("wait", "processes", "wait for a process to end and show how it ended",
         arg("pid", nargs="?", type=int, complete="pid",
             help="the process (default: any child of this session)"),
         arg("--timeout", type=seconds, metavar="S",
             help="give up after S seconds (ETIMEDOUT)"),
         syscalls=("wait", "ps"),
         view=lambda r, s, a: [_views.wait_line(r)],
         json_keys="{pid, status, reason, info}",
         details="A child of this session (run -d, train -d in the shell) is reaped "
                 "with the wait syscall; any other process is watched until it ends and "
                 "its status shown when ps still knows it (ps -a). It fails when the "
                 "status is not 0, as sh's wait does; ECHILD when no PID is given and "
                 "this session has no child.")
def wait(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    osh = s.osh
    procs = {p["pid"]: p for p in osh.ps(all=True)}
    if a.pid is None or (a.pid in procs and procs[a.pid]["ppid"] == osh.pid
                         and procs[a.pid]["state"] != "ended"):
        with s.unbounded():
            record = osh.wait(a.pid, a.timeout)
    else:
        record = watch(s, a.pid, a.timeout)
    s.status = 0 if record["status"] == 0 else 1
    return record


def watch(s: Session, pid: int, timeout: float | None) -> dict[str, Any]:
    """The record of process pid (not this session's child) once it has ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = False
    while True:
        p = next((p for p in s.osh.ps(all=True) if p["pid"] == pid), None)
        if p is None and not seen:
            raise SyscallError(Errno.ESRCH, f"wait: no process {pid}")
        seen = True
        if p is None:  # reaped and forgotten (ended_kept): how is not known
            return {"pid": pid, "status": None, "reason": "ended", "info": {}}
        if p["state"] != "running":
            return {k: p[k] for k in ("pid", "status", "reason", "info")}
        if deadline is not None and time.monotonic() >= deadline:
            raise SyscallError(Errno.ETIMEDOUT, f"wait: process {pid} still runs")
        time.sleep(WAIT_POLL_S)


def signal_arg(text: str) -> str:
    try:
        return signal_name(int(text) if text.isdigit() else text)
    except SyscallError as e:
        raise argparse.ArgumentTypeError(e.message.removeprefix("kill: ")) from None


@command("kill", "processes", "send a signal (default TERM) to processes",
         arg("-s", "--signal", type=signal_arg, default="TERM", complete="signal",
             metavar="SIG", help=f"{', '.join(SIGNAL_NAMES)}, with or without SIG, "
                                 "or its number (15, 9, 2)"),
         arg("pids", nargs="+", type=int, metavar="PID", complete="pid"),
         syscalls=("kill",),
         details="Your own uid's processes only (uid 0: anyone's, system processes "
                 "too); init cannot be signalled. A failure is one line per pid and the "
                 "others are still signalled.")
def kill(s: Session, a: argparse.Namespace) -> None:
    each(s, a.pids, lambda pid: s.osh.kill(pid, a.signal))
