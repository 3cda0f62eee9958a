"""The kernel process: one event loop that answers syscalls and routes the rest.

It must never block on one client and never crash on what a client sends: every
message is decoded and checked at the boundary (syscalls.decode, check_args), bad
ones get an errno reply or are dropped and counted, and every send is
non-blocking. It never imports torch or any driver.

Loop: poll the client and driver sockets, serve what arrived, then run the
periodic work (reap children, expire waits, watch heartbeats, restart drivers).
Blocking syscalls (wait) are parked in `self.waiters` and answered later.
"""
from __future__ import annotations

import ctypes
import errno
import hmac
import logging
import os
import reprlib
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

from syscalls import (ABI_VERSION, BY_NUMBER, Errno, Home, Syscall, SyscallError,
                      WireError, check_args, decode, encode)
from syscalls._wire import MAX_HEADER

from ._proctable import INIT_PID, Process, ProcessTable
from ._send import send_frames
from ._stats import SyscallStats
from ._supervisor import Supervisor

log = logging.getLogger("llmos.kernel")

PARKED = object()  # a handler's answer for "I will reply later"
TICK_S = 0.05
OS_CHECK_S = 0.25
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


MAX_INFO = 2048  # bytes of report() info a process keeps (keys and values)


@dataclass
class Waiter:
    """A parked wait(): who waits, for which child, until when, where to answer."""
    pid: int
    target: int | None
    deadline: float | None
    conn: bytes
    seq: int
    t0: float


class Kernel:
    def __init__(self, home: Home, config: dict[str, Any]) -> None:
        self.home = home
        self.config = config
        self.boot_time = time.time()
        self.t_boot = time.monotonic()
        self.hostname = socket.gethostname()
        self.secret = secrets.token_hex(32)
        self.table = ProcessTable(init_os_pid=os.getpid())
        self.stats = SyscallStats()
        self.conns: dict[bytes, int] = {}          # routing id -> pid
        self.hb_tokens: dict[str, int] = {}        # heartbeat token -> pid
        self.spawn_tokens: dict[str, int] = {}     # spawn token -> pid
        self.popens: dict[int, subprocess.Popen] = {}  # pid -> OS child not yet reaped
        self.waiters: list[Waiter] = []
        self.inflight: dict[int, int] = {}         # pid -> driver calls in flight
        self.running = True
        self._next_os_check = 0.0
        # libzmq names peers that set no routing id 0x00 + a counter that starts at
        # rand(), and aborts when that name is already a peer's chosen id: an unseeded
        # rand() made the names predictable, so a client could crash the kernel by
        # taking them first (bench/fuzz.py found it; docs/fuzz-and-load.md)
        ctypes.CDLL(None).srand(secrets.randbits(32))
        self.ctx = zmq.Context()
        # One ROUTER bound to both endpoints: a blocking recv on one socket costs a
        # third fewer system calls per message than polling two (bench/, docs/
        # performance.md). Drivers are told apart by their unguessable routing ids.
        self.sock = self._router(home.kernel_endpoint, home.driver_endpoint)
        self.supervisor = Supervisor(self, self.sock)
        self.handlers: dict[str, Callable[[Process, dict, bytes, int, float], Any]] = {
            "nop": self.sys_nop, "getpid": self.sys_getpid, "getppid": self.sys_getppid,
            "spawn": self.sys_spawn, "wait": self.sys_wait, "kill": self.sys_kill,
            "exit": self.sys_exit, "ps": self.sys_ps, "sysinfo": self.sys_sysinfo,
            "report": self.sys_report,
        }

    def _router(self, *endpoints: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable -> error, not silence
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 1000)         # per peer: a flooder blocks itself
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER + (1 << 30))
        sock.setsockopt(zmq.RCVTIMEO, int(TICK_S * 1000))
        for endpoint in endpoints:
            sock.bind(endpoint)
            os.chmod(endpoint[len("ipc://"):], 0o600)
        return sock

    # -- the loop ---------------------------------------------------------------

    def serve(self) -> None:
        """Receive (libzmq fair-queues all peers, clients and drivers alike), serve,
        and run the periodic work at least every TICK_S."""
        self.supervisor.start_all()
        recv = self.sock.recv_multipart
        drivers = self.supervisor.by_ident
        next_tick = 0.0
        while self.running:
            try:
                frames = recv()  # RCVTIMEO is TICK_S: an idle kernel still ticks
            except zmq.Again:
                frames = None
            if frames is not None:
                try:
                    if frames[0] in drivers:
                        self.supervisor.on_message(frames)
                    else:
                        self.on_client(frames)
                except Exception:  # a bug must cost one request, never the kernel
                    log.exception("internal error handling a message")
                    self.stats.drop("internal_error")
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                try:
                    self.tick(now)
                except Exception:  # nor may a bug in the periodic work
                    log.exception("internal error in the periodic work")
                    self.stats.drop("internal_error")

    def tick(self, now: float) -> None:
        self._reap_os_children()
        if now >= self._next_os_check:  # psutil costs ~50 us a process: not every tick
            self._next_os_check = now + OS_CHECK_S
            self._check_os_liveness()
        self._check_heartbeats(now)
        self._expire_waiters(now)
        self.supervisor.tick(now)

    # -- replies ----------------------------------------------------------------

    def send_client(self, conn: bytes, frames: list) -> bool:
        try:
            send_frames(self.sock, conn, frames)
            return True
        except zmq.Again:
            self.stats.drop("reply_queue_full")
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.stats.drop("reply_unroutable")
        return False

    def reply(self, conn: bytes, seq: int, result: Any = None, bulk: list = (),
              partial: bool = False) -> None:
        head: dict[str, Any] = {"s": seq, "r": result}
        if partial:
            head["p"] = 1
        frames = encode(head, bulk)
        if len(frames[0]) > MAX_HEADER:  # the client would refuse it, and wait forever
            self.stats.drop("reply_too_big")
            frames = encode({"s": seq, "e": int(Errno.E2BIG),
                             "m": f"the reply's header is {len(frames[0])} bytes, over "
                                  f"{MAX_HEADER}"})
        self.send_client(conn, frames)

    def reply_error(self, conn: bytes, seq: int, errno: int, message: str) -> None:
        self.send_client(conn, encode({"s": seq, "e": int(errno), "m": message}))

    def finish(self, call: Syscall, conn: bytes, seq: int, t0: float, result: Any = None,
               error: SyscallError | None = None, bulk: list = ()) -> None:
        """Send the final reply to a call and account for it."""
        if error is None:
            self.reply(conn, seq, result, bulk)
        else:
            self.reply_error(conn, seq, error.errno, error.message)
        self.stats.record(call.name, time.perf_counter() - t0, error is not None)

    # -- dispatch ---------------------------------------------------------------

    def on_client(self, frames: list[bytes]) -> None:
        t0 = time.perf_counter()
        conn = frames[0]
        try:
            head = decode(frames[1:], refs=True)
        except WireError as e:
            log.debug("dropped a malformed message: %s", e)
            self.stats.drop("malformed")
            return
        seq = head.get("s")
        if type(seq) is not int:
            kind = head.get("t")
            if kind == "hb" and "k" in head:
                self._on_heartbeat(conn, head)
            elif kind == "cancel":
                self._on_cancel(conn, head)
            elif kind in ("ready", "rep", "hb"):  # a driver instance that is not current
                self.stats.drop("stale_driver")
            else:
                self.stats.drop("no_sequence")
            return
        number = head.get("n")
        call = BY_NUMBER.get(number) if type(number) is int else None
        if type(head.get("v")) is not int or head["v"] != ABI_VERSION:  # not True, not 1.0
            self.reply_error(conn, seq, Errno.EPROTO,
                             f"ABI version mismatch: client speaks {_quote(head.get('v'))}, "
                             f"kernel speaks {ABI_VERSION}")
            return
        if call is None:
            self.stats.drop("unknown_syscall")
            self.reply_error(conn, seq, Errno.ENOSYS, f"no syscall number {_quote(number)}")
            return
        try:
            pid = self.conns.get(conn)
            if pid is None and call.number != 0:
                raise SyscallError(Errno.EPERM, "this connection is not attached: "
                                   "call attach first")
            args = check_args(call, head.get("a", {}))
            if call.number == 0:
                result = self.sys_attach(pid, args, conn)
            elif call.service == "kernel":
                result = self.handlers[call.name](self.table.procs[pid], args, conn, seq, t0)
                if result is PARKED:
                    return
            else:
                self.supervisor.route(call, self.table.procs[pid], args, frames[2:],
                                      conn, seq, t0)
                return
        except SyscallError as e:
            self.finish(call, conn, seq, t0, error=e)
            return
        self.finish(call, conn, seq, t0, result)

    # -- attach and heartbeats ----------------------------------------------------

    def sys_attach(self, pid: int | None, args: dict, conn: bytes) -> dict:
        if pid is not None:
            raise SyscallError(Errno.EBUSY, f"this connection is already process {pid}")
        if args["token"] is not None:
            cpid = self.spawn_tokens.pop(args["token"], None)
            proc = self.table.get(cpid) if cpid is not None else None
            if proc is None or proc.state != "running":
                raise SyscallError(Errno.EACCES, "unknown or used spawn token")
        elif args["secret"] is not None:
            # as bytes: compare_digest raises TypeError on non-ASCII str
            if not hmac.compare_digest(args["secret"].encode(), self.secret.encode()):
                raise SyscallError(Errno.EACCES, "wrong secret for this LLMOS_HOME")
            if len(self.table) >= self.config["max_processes"]:
                raise SyscallError(Errno.EAGAIN, "the process table is full")
            uid = args["uid"] if args["uid"] is not None else self.config["default_uid"]
            local = args["host"] in ("", self.hostname)
            os_pid, ctime = args["os_pid"], None
            driver = local and os_pid in self.supervisor.os_pids()
            if driver and not args["heartbeat"]:
                raise SyscallError(Errno.EINVAL, "attach: a driver attaches with heartbeat")
            if local and not driver and os_pid in self._protected_pids():
                raise SyscallError(Errno.EPERM, f"attach: OS pid {os_pid} is the kernel's "
                                   "or the OS's init")
            if driver:
                # a driver making syscalls of its own (the executor loading a model):
                # never signalled, ended when its heartbeats stop, like a remote one
                local = False
            elif local:
                try:
                    ctime = psutil.Process(os_pid).create_time()
                except psutil.Error:
                    raise SyscallError(Errno.EINVAL, f"no OS process {os_pid} on this host")
            proc = self.table.create(ppid=INIT_PID, uid=uid, argv=args["argv"],
                                     os_pid=os_pid if local else None, os_create_time=ctime)
        else:
            raise SyscallError(Errno.EACCES, "attach needs the home's secret or a spawn token")
        if proc.conn is not None:
            self.conns.pop(proc.conn, None)
        proc.conn = conn
        if args["argv"] and not proc.spawned:
            proc.argv = args["argv"]
        self.conns[conn] = proc.pid
        proc.hb_token = secrets.token_hex(16)
        self.hb_tokens[proc.hb_token] = proc.pid
        if args["heartbeat"]:  # from now on, not from its first heartbeat: a process
            self._on_heartbeat(conn, {"k": proc.hb_token})  # frozen before it is lost too
        log.info("pid %d attached (uid %d, %s)", proc.pid, proc.uid, " ".join(proc.argv)[:80])
        return {"pid": proc.pid, "ppid": proc.ppid, "uid": proc.uid, "hb_token": proc.hb_token,
                "kernel_pid": os.getpid(), "abi": ABI_VERSION,
                "heartbeat_s": self.config["client_heartbeat_s"]}

    def _on_heartbeat(self, conn: bytes, head: dict) -> None:
        token = head.get("k")
        pid = self.hb_tokens.get(token) if type(token) is str else None
        proc = self.table.get(pid) if pid is not None else None
        if proc is None or proc.state != "running":
            self.stats.drop("stale_heartbeat")
            return
        if head.get("bye") is True and proc.spawned:
            # a spawned process that detached: its exit is seen through its OS
            # process, and it will not heartbeat while it finishes
            proc.hb_deadline = None
            return
        proc.hb_deadline = time.monotonic() + (
            self.config["client_heartbeat_s"] * self.config["client_liveness"])

    # -- process syscalls ---------------------------------------------------------

    def sys_nop(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> None:
        return None

    def sys_getpid(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> int:
        return proc.pid

    def sys_getppid(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> int:
        return proc.ppid

    def sys_spawn(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> int:
        argv = args["argv"]
        if not argv or not argv[0]:
            raise SyscallError(Errno.EINVAL, "spawn: argv must name a program")
        uid = proc.uid if args["uid"] is None else args["uid"]
        if uid != proc.uid and proc.uid != 0:
            raise SyscallError(Errno.EPERM, f"spawn: uid {proc.uid} may not spawn as uid {uid}")
        if len(self.table) >= self.config["max_processes"]:
            raise SyscallError(Errno.EAGAIN, "the process table is full")
        exe = [sys.executable if argv[0] in ("python", "python3") else argv[0], *argv[1:]]
        child = self.table.create(ppid=proc.pid, uid=uid, argv=argv, spawned=True)
        child.token = secrets.token_hex(16)
        env = dict(os.environ)
        env.update(args["env"] or {})
        env.update(LLMOS_HOME=str(self.home.root), LLMOS_PID=str(child.pid),
                   LLMOS_SPAWN_TOKEN=child.token,
                   PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT,
                                                            env.get("PYTHONPATH")])))
        logdir = self.home.log / "proc"
        try:
            logdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._forget(child)
            raise SyscallError(Errno.EIO, f"spawn: cannot make {logdir}: {e.strerror}")
        try:
            # "wb": pids restart at 1 each boot, and a log left by an earlier boot's
            # process of the same pid is not this one's
            with open(logdir / f"{child.pid}.log", "wb") as out:
                popen = subprocess.Popen(exe, cwd=args["cwd"], env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_kernel)
        except (FileNotFoundError, NotADirectoryError) as e:
            self._forget(child)
            raise SyscallError(Errno.ENOENT, f"spawn: {e.strerror}: {e.filename}")
        except PermissionError as e:
            self._forget(child)
            raise SyscallError(Errno.EACCES, f"spawn: {e.strerror}: {e.filename}")
        except OSError as e:
            self._forget(child)
            if e.errno == errno.ENAMETOOLONG:
                raise SyscallError(Errno.ENAMETOOLONG, f"spawn: {e.strerror}")
            raise SyscallError(Errno.EIO, f"spawn: {e}")
        except (ValueError, TypeError) as e:  # e.g. an '=' in an environment name
            self._forget(child)
            raise SyscallError(Errno.EINVAL, f"spawn: {e}")
        child.os_pid = popen.pid
        self.popens[child.pid] = popen
        self.spawn_tokens[child.token] = child.pid
        log.info("pid %d spawned pid %d (os pid %d): %s", proc.pid, child.pid, popen.pid,
                 " ".join(argv)[:80])
        return child.pid

    def _forget(self, child: Process) -> None:
        """Undo a create() whose process never started."""
        self.table.end(child.pid, None, "lost")
        if child.pid in self.table.procs:
            self.table.reap(child.pid)

    def sys_wait(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> Any:
        target = args["pid"]
        if target is not None and target not in proc.children:
            raise SyscallError(Errno.ECHILD, f"wait: {target} is not a child of {proc.pid}")
        if not proc.children:
            raise SyscallError(Errno.ECHILD, f"wait: process {proc.pid} has no children")
        zombie = self.table.zombie_child(proc.pid, target)
        if zombie is not None:
            return self.table.reap(zombie.pid).exit_record()
        timeout = args["timeout"]
        if timeout == 0:
            raise SyscallError(Errno.ETIMEDOUT, "wait: no child has ended")
        parked = sum(1 for w in self.waiters if w.pid == proc.pid)
        if parked >= self.config["max_inflight_per_process"]:
            raise SyscallError(Errno.EAGAIN, f"wait: process {proc.pid} has {parked} waits "
                               "parked already")
        deadline = None if timeout is None else time.monotonic() + timeout
        self.waiters.append(Waiter(proc.pid, target, deadline, conn, seq, t0))
        return PARKED

    def _wake_waiters(self, parent: Process, child: Process) -> None:
        for w in self.waiters:
            if w.pid == parent.pid and w.target in (None, child.pid):
                self.waiters.remove(w)
                self.table.reap(child.pid)
                self.finish(BY_NAME_WAIT, w.conn, w.seq, w.t0, child.exit_record())
                break
        else:
            return
        # the parent's other waits that no child can answer any more: ECHILD, as POSIX
        for w in [w for w in self.waiters if w.pid == parent.pid and (
                not parent.children or (w.target is not None
                                        and w.target not in parent.children))]:
            self.waiters.remove(w)
            self.finish(BY_NAME_WAIT, w.conn, w.seq, w.t0,
                        error=SyscallError(Errno.ECHILD, "wait: no child left to wait for"))

    def _on_cancel(self, conn: bytes, head: dict) -> None:
        """The client gave up on call seq (its timeout, Ctrl-C): forget a parked
        wait, so it does not reap a child whose status nobody would read, and tell
        the driver serving it (it may stop a generation)."""
        seq = head.get("c")
        for w in [w for w in self.waiters if w.conn == conn and w.seq == seq]:
            self.waiters.remove(w)
        if type(seq) is int:
            self.supervisor.cancel(conn, seq)

    def _expire_waiters(self, now: float) -> None:
        for w in [w for w in self.waiters if w.deadline is not None and now >= w.deadline]:
            self.waiters.remove(w)
            self.finish(BY_NAME_WAIT, w.conn, w.seq, w.t0,
                        error=SyscallError(Errno.ETIMEDOUT, "wait: timed out"))

    def sys_kill(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> None:
        target = self.table.get(args["pid"])
        if target is None or target.state != "running":
            raise SyscallError(Errno.ESRCH, f"kill: no running process {args['pid']}")
        if target.pid == INIT_PID:
            raise SyscallError(Errno.EPERM, "kill: init cannot be killed")
        if proc.uid != 0 and target.uid != proc.uid:
            raise SyscallError(Errno.EPERM, f"kill: uid {proc.uid} may not signal process "
                               f"{target.pid} of uid {target.uid}")
        sig = SIGNALS[args["signal"]]
        if target.os_pid is None:  # remote: the kernel can only forget it
            self.end_process(target, -sig, "killed")
            return None
        if not self._signal_os(target, sig):
            self.end_process(target, None, "lost")
        return None

    def _protected_pids(self) -> set[int]:
        """OS pids no process may claim, and the kernel never signals: its own, its
        drivers', and the OS's init."""
        return {os.getpid(), 1, *self.supervisor.os_pids()}

    def _signal_os(self, proc: Process, sig: int) -> bool:
        """Signal proc's OS process; False if it is gone. A host-attached process's
        OS pid is only signalled while it names the process that attached (same
        start time), and never when it names the kernel or one of its own."""
        if proc.os_pid in self._protected_pids():
            raise SyscallError(Errno.EPERM, f"OS pid {proc.os_pid} is the kernel's own")
        try:
            target = psutil.Process(proc.os_pid)
            if not proc.spawned and target.create_time() != proc.os_create_time:
                return False  # the pid was reused: that is someone else now
            target.send_signal(sig)
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            raise SyscallError(Errno.EPERM, f"not permitted to signal OS pid {proc.os_pid}")
        return True

    def sys_exit(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> None:
        self.end_process(proc, args["status"], "exited")
        return None

    def sys_report(self, proc: Process, args: dict, conn: bytes, seq: int,
                   t0: float) -> None:
        target = proc
        if args["pid"] is not None and args["pid"] != proc.pid:
            if args["pid"] != proc.ppid:
                raise SyscallError(Errno.EPERM, f"report: process {proc.pid} may report "
                                   f"for itself or its parent, not {args['pid']}")
            target = self.table.get(proc.ppid)
            if target is None or target.state != "running":
                raise SyscallError(Errno.ESRCH, f"report: parent {proc.ppid} is not running")
            if target.uid != proc.uid and proc.uid != 0:
                raise SyscallError(Errno.EPERM, f"report: parent {target.pid} has another uid")
        info = dict(target.info)
        for k, v in args["info"].items():
            if v is None:
                info.pop(k, None)
            else:
                info[k] = v
        if len(info) > 64:
            raise SyscallError(Errno.EINVAL, "report: a process keeps at most 64 info keys")
        size = sum(len(k) + (len(v) if type(v) is str else 8) for k, v in info.items())
        if size > MAX_INFO:  # ps carries every process's info in one reply
            raise SyscallError(Errno.EINVAL, f"report: a process keeps at most {MAX_INFO} "
                               f"bytes of info; this would be {size}")
        target.info = info
        return None

    def sys_ps(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> list:
        return [p.record() for p in self.table.procs.values()]

    def sys_sysinfo(self, proc: Process, args: dict, conn: bytes, seq: int, t0: float) -> dict:
        procs = list(self.table.procs.values())
        return {
            "uptime_s": round(time.monotonic() - self.t_boot, 3),
            "boot_time": self.boot_time, "kernel_pid": os.getpid(), "abi": ABI_VERSION,
            "home": str(self.home.root), "hostname": self.hostname,
            "processes": {"total": len(procs),
                          "running": sum(p.state == "running" for p in procs),
                          "zombie": sum(p.state == "zombie" for p in procs)},
            "drivers": self.supervisor.describe(),
            "waiting": len(self.waiters),
            **self.stats.snapshot(),
        }

    # -- process lifecycle ----------------------------------------------------------

    def end_process(self, proc: Process, status: int | None, reason: str) -> None:
        """A process is gone: release what it held, tell the drivers, wake its parent."""
        if proc.state != "running":
            return
        log.info("pid %d ended: %s, status %s", proc.pid, reason, status)
        if proc.conn is not None:
            self.conns.pop(proc.conn, None)
        self.hb_tokens.pop(proc.hb_token or "", None)
        self.spawn_tokens.pop(proc.token or "", None)
        self.inflight.pop(proc.pid, None)
        self.waiters = [w for w in self.waiters if w.pid != proc.pid]
        parent = self.table.get(proc.ppid)
        self.table.end(proc.pid, status, reason)
        self.supervisor.notify_exit(proc.pid)
        if parent is not None and proc.pid in self.table.procs:
            self._wake_waiters(parent, proc)

    def _reap_os_children(self) -> None:
        for pid, popen in list(self.popens.items()):
            rc = popen.poll()
            if rc is None:
                continue
            del self.popens[pid]
            proc = self.table.get(pid)
            if proc is not None and proc.state == "running":
                self.end_process(proc, rc, "killed" if rc < 0 else "exited")

    def _check_heartbeats(self, now: float) -> None:
        for proc in self.table.live():
            if proc.hb_deadline is not None and now > proc.hb_deadline:
                log.warning("pid %d missed its heartbeats", proc.pid)
                if proc.os_pid is not None:
                    try:
                        self._signal_os(proc, signal.SIGKILL)
                    except SyscallError as e:
                        log.warning("pid %d: %s", proc.pid, e.message)
                self.end_process(proc, -signal.SIGKILL, "lost")

    def _check_os_liveness(self) -> None:
        """Host-attached processes whose OS process is gone (spawned ones are reaped
        through their Popen)."""
        for proc in self.table.live():
            if (proc.pid != INIT_PID and not proc.spawned and proc.os_pid is not None
                    and not self._os_alive(proc)):
                self.end_process(proc, None, "lost")

    @staticmethod
    def _os_alive(proc: Process) -> bool:
        try:
            p = psutil.Process(proc.os_pid)
            return p.create_time() == proc.os_create_time and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    # -- shutdown ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """End every process and driver, close and remove the sockets."""
        for pid, popen in self.popens.items():
            _signal_group(popen, signal.SIGTERM)
        _wait_all(list(self.popens.values()), 2.0)
        for popen in self.popens.values():
            _signal_group(popen, signal.SIGKILL)
        _wait_all(list(self.popens.values()), 2.0)
        self.supervisor.stop_all()
        self.sock.close(0)
        self.ctx.term()
        for name in ("kernel", "drivers"):
            Path(self.home.socket(name)[len("ipc://"):]).unlink(missing_ok=True)


def _quote(value: Any) -> str:
    """repr() of a value a client sent, bounded: msgpack nests 1024 deep, too deep
    for repr() without a RecursionError, and a string may be a megabyte long."""
    return reprlib.repr(value)


def _die_with_kernel() -> None:
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


BY_NAME_WAIT = next(s for s in BY_NUMBER.values() if s.name == "wait")
