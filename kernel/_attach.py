"""Who is who: which connection is which process, and how a process proves it.

A connection becomes a process by attaching: with the home's secret (a program
attaching from the host, or a driver making syscalls of its own: a system
process) or with a single-use spawn token (a program the kernel spawned). The
attach hands out a heartbeat token; heartbeats with it keep a process alive.
Pure bookkeeping over the process table: no sockets (the kernel answers).
"""
from __future__ import annotations

import hmac
import logging
import secrets
import time
from typing import Any, Callable

import psutil

from syscalls import Config, Errno, SyscallError, wire

from ._call import Call
from ._proctable import INIT_PID, Process, ProcessTable
from ._spawn import Spawner
from ._stats import SyscallStats

log = logging.getLogger("llmos.kernel")


class Attachments:
    def __init__(self, table: ProcessTable, spawner: Spawner, config: Config,
                 hostname: str, driver_pids: Callable[[], list[int]],
                 protected_pids: Callable[[], set[int]]) -> None:
        self.table, self.spawner, self.config = table, spawner, config
        self.hostname = hostname
        self.driver_pids = driver_pids          # the drivers' OS pids, now
        self.protected_pids = protected_pids    # OS pids no process may claim
        self.secret = secrets.token_hex(32)     # run/secret: an administrator's credential
        self.conns: dict[bytes, int] = {}       # routing id -> pid
        self.hb_tokens: dict[str, int] = {}     # heartbeat token -> pid

    def attach(self, call: Call, peer: tuple[dict[str, Any], str] | None = None) -> Process:
        """Bind call's connection to a process: the one its spawn token names, or a
        new one (with the secret, or over TCP with a client's key: peer is its
        registry entry and public key). EBUSY, EACCES, EAGAIN, EINVAL, EPERM."""
        args, conn = call.args, call.conn
        if call.proc is not None:
            raise SyscallError(Errno.EBUSY, f"this connection is already process "
                               f"{call.proc.pid}")
        if peer is not None:
            proc = self._remote(args, *peer)
        elif args["token"] is not None:
            proc = self.spawner.claim(args["token"])
            if proc is None:
                raise SyscallError(Errno.EACCES, "unknown or used spawn token")
        elif args["secret"] is not None:
            proc = self._new_process(args)
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
            self._beat(proc)    # frozen before it is lost too
        return proc

    def _remote(self, args: dict[str, Any], entry: dict[str, Any], key: str) -> Process:
        """An attach over TCP: a node's key binds a process that node runs (by its spawn
        token); a client's key makes a new process of the key's uid."""
        who = f"{entry['kind']} {entry['name']}"
        if args["secret"] is not None:
            raise SyscallError(Errno.EACCES, "over TCP a key attaches, not the home's secret")
        if entry["kind"] == "node":
            pid = self.spawner.tokens.get(args["token"]) if args["token"] else None
            proc = self.table.get(pid) if pid is not None else None
            if proc is None or proc.state != "running":
                raise SyscallError(Errno.EACCES, f"{who}: a node's key attaches only the "
                                   "processes its node runs, with their spawn token; this "
                                   "token is unknown or used")
            if proc.node != entry["name"]:
                log.warning("%s tried to attach process %d of node %s", who, proc.pid,
                            proc.node)
                raise SyscallError(Errno.EACCES, f"{who} does not host process {proc.pid}")
            self.spawner.claim(args["token"])
            proc.key = key
            return proc
        if args["token"] is not None:
            raise SyscallError(Errno.EACCES, f"{who}: a client's key attaches a new process; "
                               "spawn tokens are for the programs a node runs")
        uid = entry.get("uid") if type(entry.get("uid")) is int else self.config.default_uid
        if args["uid"] is not None and args["uid"] != uid:
            if uid != 0:
                raise SyscallError(Errno.EACCES, f"{who}'s key attaches as uid {uid} only")
            uid = args["uid"]
        if len(self.table) >= self.config.max_processes:
            raise SyscallError(Errno.EAGAIN, "the process table is full")
        return self.table.create(ppid=INIT_PID, uid=uid, argv=args["argv"],
                                 node=f"client:{entry['name']}", key=key)

    def _new_process(self, args: dict[str, Any]) -> Process:
        """A new process for a program that attaches from the host (or from a driver)."""
        # as bytes: compare_digest raises TypeError on non-ASCII str
        if not hmac.compare_digest(args["secret"].encode(), self.secret.encode()):
            raise SyscallError(Errno.EACCES, "wrong secret for this LLMOS_HOME")
        if len(self.table) >= self.config.max_processes:
            raise SyscallError(Errno.EAGAIN, "the process table is full")
        uid = args["uid"] if args["uid"] is not None else self.config.default_uid
        local = args["host"] in ("", self.hostname)
        os_pid, ctime = args["os_pid"], None
        driver = local and os_pid in self.driver_pids()
        if driver and not args["heartbeat"]:
            raise SyscallError(Errno.EINVAL, "attach: a driver attaches with heartbeat")
        if local and not driver and os_pid in self.protected_pids():
            raise SyscallError(Errno.EPERM, f"attach: OS pid {os_pid} is the kernel's "
                               "or the OS's init")
        if driver:
            # a driver making syscalls of its own (the executor loading a model): a
            # system process, never signalled, ended when its heartbeats stop
            local = False
        elif local:
            try:
                ctime = psutil.Process(os_pid).create_time()
            except psutil.Error:
                raise SyscallError(Errno.EINVAL, f"no OS process {os_pid} on this host")
        return self.table.create(ppid=INIT_PID, uid=uid, argv=args["argv"], system=driver,
                                 os_pid=os_pid if local else None, os_create_time=ctime)

    def heartbeat(self, head: dict, stats: SyscallStats) -> None:
        """A heartbeat message: its process lives on (a stale token is counted)."""
        token = head.get(wire.TOKEN)
        pid = self.hb_tokens.get(token) if type(token) is str else None
        proc = self.table.get(pid) if pid is not None else None
        if proc is None or proc.state != "running":
            stats.drop("stale_heartbeat")
            return
        if head.get(wire.BYE) is True and proc.spawned:
            # a spawned process that detached: its exit is seen through its OS
            # process, and it will not heartbeat while it finishes
            proc.hb_deadline = None
            return
        self._beat(proc)

    def _beat(self, proc: Process) -> None:
        proc.hb_deadline = time.monotonic() + (
            self.config.client_heartbeat_s * self.config.client_liveness)

    def forget(self, proc: Process) -> None:
        """proc ended: its connection and heartbeat token name nobody now."""
        if proc.conn is not None:
            self.conns.pop(proc.conn, None)
        self.hb_tokens.pop(proc.hb_token or "", None)
