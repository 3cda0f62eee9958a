"""The kernel process: one event loop that answers syscalls and routes the rest.

It must never block on one client and never crash on what a client sends: every
message is decoded and checked at the boundary (syscalls.decode, check_args), bad
ones get an errno reply or are dropped and counted, and every send is
non-blocking. It never imports torch or any driver.

Loop: receive what arrived (clients and drivers on one ROUTER), serve it, then
run the periodic work (reap children, expire waits, watch heartbeats, restart
drivers). A syscall is a Call (_call.py): kernel handlers take it and return a
result, raise SyscallError, or park it (wait) and answer it later; syscalls of
a driver's service go to the Supervisor.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import reprlib
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import zmq

from syscalls import (ABI_VERSION, BY_NUMBER, MAX_HEADER, Config, Errno, Home, Keyring,
                      SyscallError, WireError, check_args, decode, encode, wire)

from ._attach import Attachments
from ._call import NET, PARKED, Call, Outbox
from ._net import Listener
from ._nodes import Nodes
from ._proctable import INIT_PID, Process, ProcessTable
from ._spawn import Spawner
from ._stats import SyscallStats
from ._supervisor import Supervisor

log = logging.getLogger("llmos.kernel")

TICK_S = 0.05
OS_CHECK_S = 0.25
STALL_S = 1.0  # a tick this late means the kernel itself did not run (stopped, swapped)
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}
MAX_INFO = 2048  # bytes of report() info a process keeps (keys and values)
PID_BLOCK = 1024  # pids reserved in kernel.state at a time: a crash skips, never reuses


@dataclass
class Waiter:
    """A parked wait(): whose, for which child, until when; answered through call."""
    call: Call
    target: int | None
    deadline: float | None

    @property
    def pid(self) -> int:
        return self.call.pid


class Kernel:
    def __init__(self, home: Home, config: Config, listen: str | None = None) -> None:
        self.home = home
        self.config = config
        self.boot_time = time.time()
        self.t_boot = time.monotonic()
        self.hostname = socket.gethostname()
        self.table = ProcessTable(init_os_pid=os.getpid(), first_pid=_next_pid(home),
                                  keep_ended=config.ended_kept, node=config.node_name)
        self.pids_reserved = 0
        self._reserve_pids()
        self.stats = SyscallStats()
        self.waiters: list[Waiter] = []
        self.running = True
        self._next_os_check = 0.0
        self._last_tick = time.monotonic()
        self.stalls, self.longest_stall = 0, 0.0  # times the kernel itself did not run
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
        self.outbox = Outbox(self.sock, self.stats)
        self.spawner = Spawner(home, self.table, config.max_processes)
        self.supervisor = Supervisor(home, config, self.outbox, self.table, self.spawner)
        self.attachments = Attachments(self.table, self.spawner, config, self.hostname,
                                       self.supervisor.os_pids, self._protected_pids)
        self.secret = self.attachments.secret
        self.keyring = Keyring(home.root)
        # the TCP endpoint, only when asked: CURVE is per socket, so it is a socket
        # of its own, and the loop polls both (kernel/_net.py)
        self.net: Listener | None = None
        self._keys_seen = 0  # the key registry's generation acted on (_reload_keys)
        self._warned: set[str | None] = set()  # revoked keys whose messages were logged
        if listen is not None:
            self.net = Listener(self.ctx, self.keyring, listen, self.sock)
            self.outbox.relay = self.net.ident
            # tensorfs serves data channels on the same host (drivers/tensorfs/_channel.py)
            host = listen.rpartition(":")[0].strip("[]")
            self.supervisor.extra_env["LLMOS_NET_HOST"] = "0.0.0.0" if host == "*" else host
        host = listen.rpartition(":")[0].strip("[]") if listen else ""
        self.nodes = Nodes(config, self.table, self.spawner, self.outbox, self.end_process,
                           self._revoke_node,
                           addr=host if host not in ("", "*", "0.0.0.0", "::") else
                           "127.0.0.1")
        self.handlers: dict[str, Callable[[Call], Any]] = {
            "nop": self.sys_nop, "getpid": self.sys_getpid, "getppid": self.sys_getppid,
            "spawn": self.sys_spawn, "wait": self.sys_wait, "kill": self.sys_kill,
            "exit": self.sys_exit, "ps": self.sys_ps, "sysinfo": self.sys_sysinfo,
            "report": self.sys_report, "nodes": self.sys_nodes,
            "node_ctl": self.sys_node_ctl,
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

    def _reserve_pids(self) -> None:
        """Record in kernel.state that the pids below next + PID_BLOCK may be in use,
        so the next boot of this home starts past them."""
        if self.table.next_pid < self.pids_reserved:
            return
        self.pids_reserved = self.table.next_pid + PID_BLOCK
        tmp = self.home.statefile.with_name(self.home.statefile.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"next_pid": self.pids_reserved}))
            os.replace(tmp, self.home.statefile)
        except OSError as e:  # pids then restart at 2 next boot: worth a line, no more
            log.error("cannot write %s: %s", self.home.statefile, e)

    # -- the loop ---------------------------------------------------------------

    def serve(self) -> None:
        """Receive (libzmq fair-queues all peers, clients and drivers alike), serve,
        and run the periodic work at least every TICK_S."""
        self.supervisor.start_all()
        recv = self.sock.recv_multipart
        drivers = self.supervisor.by_ident
        relay = self.net.ident if self.net is not None else None
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
                    elif frames[0] == relay and len(frames) > 2:
                        self.on_net(*Listener.unwrap(frames))
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

    def on_net(self, conn: bytes, key: str | None, frames: list[bytes]) -> None:
        """A message on the TCP endpoint: from a key accepted now, or dropped."""
        entry = self.net.entry(key) if self.net is not None else None
        if entry is None:  # revoked since its handshake
            if key not in self._warned:  # once a key: it may go on sending
                self._warned.add(key)
                log.warning("dropping TCP messages from a key no longer accepted (%s)",
                            (key or "none")[:8])
            self.stats.drop("revoked_key")
            return
        self.on_client([conn, *frames], (entry, key or ""))

    def tick(self, now: float) -> None:
        lag = now - self._last_tick - TICK_S
        self._last_tick = now
        if lag > STALL_S:
            self._stalled(lag)
        for pid, rc in self.spawner.reap():
            proc = self.table.get(pid)
            if proc is not None and proc.state == "running":
                self.end_process(proc, rc, "killed" if rc < 0 else "exited")
        if now >= self._next_os_check:  # psutil costs ~50 us a process: not every tick
            self._next_os_check = now + OS_CHECK_S
            self._check_os_liveness()
        self._check_heartbeats(now)
        self._expire_waiters(now)
        self.supervisor.tick(now)
        self.nodes.tick(now)
        if self.net is not None:
            self._reload_keys()
        self._reserve_pids()

    def _reload_keys(self) -> None:
        """keys/registry.json changed: a key revoked ends what attached with it now."""
        self.net.reload()
        if self.net.generation == self._keys_seen:
            return
        self._keys_seen = self.net.generation
        for proc in self.table.live():
            if proc.key is not None and self.net.entry(proc.key) is None:
                self.end_process(proc, None, "key revoked")
        self.nodes.revoked(self.net.entry)

    def _revoke_node(self, name: str) -> None:
        self.keyring.revoke(name, "node")
        if self.net is not None:
            self._reload_keys()
    # -- dispatch ---------------------------------------------------------------

    def on_client(self, frames: list[bytes],
                  peer: tuple[dict[str, Any], str] | None = None) -> None:
        """A client's message; peer is (registry entry, public key) over TCP."""
        t0 = time.perf_counter()
        conn = frames[0]
        if peer is None and conn[:5] == NET:  # an ipc peer posing as a TCP one
            self.stats.drop("malformed")
            return
        try:
            head = decode(frames[1:], refs=True)
        except WireError as e:
            log.debug("dropped a malformed message: %s", e)
            self.stats.drop("malformed")
            return
        seq = head.get(wire.SEQ)
        if type(seq) is not int:
            kind = head.get(wire.KIND)
            if kind == wire.HEARTBEAT and wire.TOKEN in head:
                self.attachments.heartbeat(head, self.stats)
            elif peer is not None and kind in wire.NODE_KINDS:
                self.nodes.on_message(conn, peer[0], peer[1], head)
            elif kind == wire.CANCEL:
                self._on_cancel(conn, head)
            elif kind in (wire.READY, wire.REPLY, wire.HEARTBEAT):  # an old driver instance
                self.stats.drop("stale_driver")
            else:
                self.stats.drop("no_sequence")
            return
        number = head.get(wire.NUMBER)
        syscall = BY_NUMBER.get(number) if type(number) is int else None
        version = head.get(wire.VERSION)
        if type(version) is not int or version != ABI_VERSION:  # not True, not 1.0
            self.outbox.send(conn, encode(wire.error(
                seq, Errno.EPROTO, f"ABI version mismatch: client speaks "
                f"{_quote(version)}, kernel speaks {ABI_VERSION}")))
            return
        if syscall is None:
            self.stats.drop("unknown_syscall")
            self.outbox.send(conn, encode(wire.error(seq, Errno.ENOSYS,
                                                     f"no syscall number {_quote(number)}")))
            return
        pid = self.attachments.conns.get(conn)
        call = Call(self.outbox, syscall, self.table.procs[pid] if pid is not None else None,
                    conn, seq, {}, frames[2:], t0)
        try:
            if pid is None and syscall.number != 0:
                raise SyscallError(Errno.ENOTCONN, "this connection is not attached to a "
                                   "process (it never attached, its process ended, or the "
                                   "kernel restarted)")
            call.args = check_args(syscall, head.get(wire.ARGS, {}))
            if syscall.number == 0:
                result = self.sys_attach(call, peer)
            elif syscall.service == "kernel":
                result = self.handlers[syscall.name](call)
                if result is PARKED:
                    return
            else:
                self.supervisor.route(call)
                return
        except SyscallError as e:
            call.fail(e)
            return
        call.reply(result)

    # -- attach --------------------------------------------------------------------

    def sys_attach(self, call: Call, peer: tuple[dict[str, Any], str] | None = None) -> dict:
        proc = self.attachments.attach(call, peer)
        log.info("pid %d attached (uid %d, %s)", proc.pid, proc.uid, " ".join(proc.argv)[:80])
        return {"pid": proc.pid, "ppid": proc.ppid, "uid": proc.uid, "hb_token": proc.hb_token,
                "kernel_pid": os.getpid(), "abi": ABI_VERSION,
                "heartbeat_s": self.config.client_heartbeat_s}

    # -- process syscalls ---------------------------------------------------------

    def sys_nop(self, call: Call) -> None:
        return None

    def sys_getpid(self, call: Call) -> int:
        return call.pid

    def sys_getppid(self, call: Call) -> int:
        assert call.proc is not None
        return call.proc.ppid

    def sys_spawn(self, call: Call) -> Any:
        assert call.proc is not None
        a = call.args
        node = self.nodes.place(a["node"], call.proc)
        if node != self.nodes.head:  # answered when the node's agent started it
            self.nodes.spawn(call, call.proc, node, a["argv"], a["uid"], a["cwd"], a["env"])
            return PARKED
        return self.spawner.spawn(call.proc, a["argv"], a["uid"], a["cwd"], a["env"]).pid

    def sys_wait(self, call: Call) -> Any:
        proc = call.proc
        assert proc is not None
        target = call.args["pid"]
        if target is not None and target not in proc.children:
            raise SyscallError(Errno.ECHILD, f"wait: {target} is not a child of {proc.pid}")
        if not proc.children:
            raise SyscallError(Errno.ECHILD, f"wait: process {proc.pid} has no children")
        zombie = self.table.zombie_child(proc.pid, target)
        if zombie is not None:
            return self.table.reap(zombie.pid).exit_record()
        timeout = call.args["timeout"]
        if timeout == 0:
            raise SyscallError(Errno.ETIMEDOUT, "wait: no child has ended")
        parked = sum(1 for w in self.waiters if w.pid == proc.pid)
        if parked >= self.config.max_inflight_per_process:
            raise SyscallError(Errno.EAGAIN, f"wait: process {proc.pid} has {parked} waits "
                               "parked already")
        deadline = None if timeout is None else time.monotonic() + timeout
        self.waiters.append(Waiter(call, target, deadline))
        return PARKED

    def _wake_waiters(self, parent: Process, child: Process) -> None:
        for w in self.waiters:
            if w.pid == parent.pid and w.target in (None, child.pid):
                self.waiters.remove(w)
                self.table.reap(child.pid)
                w.call.reply(child.exit_record())
                break
        else:
            return
        # the parent's other waits that no child can answer any more: ECHILD, as POSIX
        for w in [w for w in self.waiters if w.pid == parent.pid and (
                not parent.children or (w.target is not None
                                        and w.target not in parent.children))]:
            self.waiters.remove(w)
            w.call.fail(Errno.ECHILD, "wait: no child left to wait for")

    def _on_cancel(self, conn: bytes, head: dict) -> None:
        """The client gave up on call seq (its timeout, Ctrl-C): forget a parked
        wait, so it does not reap a child whose status nobody would read, and tell
        the driver serving it (it may stop a generation)."""
        seq = head.get(wire.CANCELS)
        self.waiters = [w for w in self.waiters
                        if not (w.call.conn == conn and w.call.seq == seq)]
        if type(seq) is int:
            self.supervisor.cancel(conn, seq)

    def _expire_waiters(self, now: float) -> None:
        for w in [w for w in self.waiters if w.deadline is not None and now >= w.deadline]:
            self.waiters.remove(w)
            w.call.fail(Errno.ETIMEDOUT, "wait: timed out")

    def sys_kill(self, call: Call) -> None:
        proc = call.proc
        assert proc is not None
        target = self.table.get(call.args["pid"])
        if target is None or target.state != "running":
            raise SyscallError(Errno.ESRCH, f"kill: no running process {call.args['pid']}")
        if target.pid == INIT_PID:
            raise SyscallError(Errno.EPERM, "kill: init cannot be killed")
        if proc.uid != 0 and target.uid != proc.uid:
            raise SyscallError(Errno.EPERM, f"kill: uid {proc.uid} may not signal process "
                               f"{target.pid} of uid {target.uid}")
        if proc.uid != 0 and target.system:
            raise SyscallError(Errno.EPERM, f"kill: process {target.pid} is a system "
                               f"process ({' '.join(target.argv)[:60]}); only uid 0 may "
                               "end it")
        sig = SIGNALS[call.args["signal"]]
        if target.node in self.nodes.nodes and target.node != self.nodes.head:
            self.nodes.kill(target, sig)  # its agent signals it and reports its end
            return None
        if target.os_pid is None:  # remote, or a driver's: the kernel can only forget it
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

    def sys_exit(self, call: Call) -> None:
        assert call.proc is not None
        self.end_process(call.proc, call.args["status"], "exited")
        return None

    def sys_report(self, call: Call) -> None:
        proc = call.proc
        assert proc is not None
        args = call.args
        target = proc
        if args["pid"] is not None and args["pid"] != proc.pid:
            if args["pid"] != proc.ppid:
                raise SyscallError(Errno.EPERM, f"report: process {proc.pid} may report "
                                   f"for itself or its parent, not {args['pid']}")
            parent = self.table.get(proc.ppid)
            if parent is None or parent.state != "running":
                raise SyscallError(Errno.ESRCH, f"report: parent {proc.ppid} is not running")
            if parent.uid != proc.uid and proc.uid != 0:
                raise SyscallError(Errno.EPERM, f"report: parent {parent.pid} has another uid")
            target = parent
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

    def sys_ps(self, call: Call) -> list:
        procs = [p.record() for p in self.table.procs.values()]
        if call.args["all"]:
            return [{**r, "state": "ended"} for r in self.table.ended] + procs
        return procs

    def sys_nodes(self, call: Call) -> list:
        return self.nodes.describe()

    def sys_node_ctl(self, call: Call) -> dict:
        assert call.proc is not None
        return self.nodes.control(call.proc, call.args["name"], call.args["action"])

    def sys_sysinfo(self, call: Call) -> dict:
        procs = list(self.table.procs.values())
        return {
            "uptime_s": round(time.monotonic() - self.t_boot, 3),
            "boot_time": self.boot_time, "kernel_pid": os.getpid(), "abi": ABI_VERSION,
            "home": str(self.home.root), "hostname": self.hostname,
            "node": self.nodes.head, "nodes": len(self.nodes.nodes),
            "listen": self.net.endpoint if self.net is not None else None,
            "tcp_refused": self.net.refused if self.net is not None else 0,
            "tcp_unroutable": self.net.unroutable if self.net is not None else 0,
            "processes": {"total": len(procs),
                          "running": sum(p.state == "running" for p in procs),
                          "zombie": sum(p.state == "zombie" for p in procs)},
            "drivers": self.supervisor.describe(),
            "waiting": len(self.waiters),
            "stalls": {"count": self.stalls, "longest_s": round(self.longest_stall, 3)},
            **self.stats.snapshot(),
        }

    # -- process lifecycle ----------------------------------------------------------

    def end_process(self, proc: Process, status: int | None, reason: str) -> None:
        """A process is gone: release what it held, tell the drivers, wake its parent."""
        if proc.state != "running":
            return
        log.info("pid %d ended: %s, status %s", proc.pid, reason, status)
        self.attachments.forget(proc)
        self.spawner.forget(proc)
        self.waiters = [w for w in self.waiters if w.pid != proc.pid]
        parent = self.table.get(proc.ppid)
        self.table.end(proc.pid, status, reason)
        self.nodes.ended(proc)
        self.supervisor.notify_exit(proc.pid)
        if parent is not None and proc.pid in self.table.procs:
            self._wake_waiters(parent, proc)

    def _stalled(self, lag: float) -> None:
        """The kernel did not run for lag seconds (SIGSTOP, Ctrl-Z, swapping, a paused
        VM): the heartbeats that were sent meanwhile wait unread in its socket, so
        every liveness deadline moves by lag before any is judged. A stall of the
        kernel is never blamed on the processes and drivers it could not hear."""
        log.warning("the kernel did not run for %.1f s; liveness deadlines moved by as "
                    "much", lag)
        self.stalls += 1
        self.longest_stall = max(self.longest_stall, lag)
        for proc in self.table.live():
            if proc.hb_deadline is not None:
                proc.hb_deadline += lag
        self.supervisor.stalled(lag)
        self.nodes.stalled(lag)

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
        self.nodes.shutdown()
        self.spawner.shutdown()
        self.supervisor.stop_all()
        if self.net is not None:  # first: its relay forwards what was sent last
            self.net.close()
        self.sock.close(0)
        self.ctx.term()
        for name in ("kernel", "drivers"):
            Path(self.home.socket(name)[len("ipc://"):]).unlink(missing_ok=True)


def _next_pid(home: Home) -> int:
    """The first pid of this boot: past every pid an earlier boot of home handed out."""
    try:
        state = json.loads(home.statefile.read_text())
        return max(INIT_PID + 1, int(state["next_pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return INIT_PID + 1


def _quote(value: Any) -> str:
    """repr() of a value a client sent, bounded: msgpack nests 1024 deep, too deep
    for repr() without a RecursionError, and a string may be a megabyte long."""
    return reprlib.repr(value)

