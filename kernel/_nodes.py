"""The nodes: this kernel's own (the head) and those whose agents joined over TCP.

A node agent (kernel/agent.py, `llmos node join`) holds a node key issued by
`llmos node token NAME`; it joins under that name and no other, heartbeats every
node_heartbeat_s with the llmos pids it runs, starts the programs the kernel
places there, signals them when told, and reports their exits. The kernel keeps
every promise it keeps for local processes: a node process is in the one process
table, its parent waits for it, kill and exit work, and what it held is
reclaimed when it ends.

Epochs: each join of a node starts a new epoch. A node silent for node_timeout_s
is lost: its processes end with reason "node lost" (the parent's wait says so),
its pending spawns fail EHOSTDOWN. Its agent, when heard again, is told to rejoin:
it kills every process of the old epoch before it does, so nothing of the old
epoch is resurrected and a healed partition leaves no process twice. A heartbeat
that names a pid the kernel does not hold running there is answered with a kill.
Each heartbeat is acknowledged: an agent that hears nothing from the head for
node_timeout_s ends its processes itself (fencing), since the head, on its side of
a partition, has declared them lost by then.

Pure bookkeeping over the process table plus the orders it sends through the
outbox; the kernel routes the messages here and calls end_process back.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

from syscalls import Config, Errno, SyscallError, encode, wire

from ._call import Call, Outbox
from ._proctable import INIT_PID, Process, ProcessTable
from ._spawn import Spawner

log = logging.getLogger("llmos.nodes")

SPAWN_TIMEOUT_S = 30.0  # an agent that never answers a spawn order: EHOSTDOWN


@dataclass
class Node:
    name: str
    key: str | None                   # its public key (None: the head)
    epoch: int = 0
    state: str = "ready"              # ready | draining | lost
    conn: bytes | None = None         # its agent's connection (NET + routing id)
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    lost_at: float | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    order: int = 0                    # join order, for pack placement
    drained: bool = False             # drain asked: it rejoins draining

    def record(self, now: float, running: int) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "epoch": self.epoch,
                "head": self.key is None, "joined_at": self.joined_at,
                "heartbeat_age_s": None if self.key is None else round(
                    now - self.last_seen, 3),
                "lost_at": self.lost_at, "processes": running, **{
                    k: self.resources.get(k) for k in ("host", "addr", "cpus", "memory",
                                                       "gpus")}}


@dataclass
class PendingSpawn:
    call: Call
    node: str
    deadline: float
    kill: int | None = None  # a signal sent before the agent said it started it


class Nodes:
    def __init__(self, config: Config, table: ProcessTable, spawner: Spawner,
                 outbox: Outbox, end_process: Callable[[Process, int | None, str], None],
                 revoke: Callable[[str], None], addr: str = "127.0.0.1") -> None:
        self.config, self.table, self.spawner, self.outbox = config, table, spawner, outbox
        self.end_process = end_process
        self.revoke = revoke  # revoke a node's key in the registry
        self.head = config.node_name
        mem = psutil.virtual_memory().total
        self.nodes: dict[str, Node] = {self.head: Node(self.head, None, epoch=1, resources={
            "host": os.uname().nodename, "addr": addr, "cpus": os.cpu_count() or 1,
            "memory": mem, "gpus": None})}
        self.pending: dict[int, PendingSpawn] = {}
        self._joins = 0

    # -- queries ------------------------------------------------------------------------

    def running_on(self, name: str) -> list[Process]:
        return [p for p in self.table.live()
                if p.node == name and p.pid != INIT_PID and not p.system]

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        counts: dict[str, int] = {}
        for p in self.table.live():
            if p.pid != INIT_PID and not p.system:
                counts[p.node] = counts.get(p.node, 0) + 1
        return [n.record(now, counts.get(n.name, 0)) for n in self.nodes.values()]

    def place(self, wanted: str | None, parent: Process) -> str:
        """The node a spawn runs on: the one named (which must take work); else the
        parent's own node when the parent is a program llmos started there (a job's
        workers stay with their job); else by the placement setting."""
        if wanted is None and parent.spawned and parent.pid != INIT_PID:
            home = self.nodes.get(parent.node)
            if home is not None and home.state != "lost":
                return home.name  # even draining: a running job's own processes go on
        if wanted is not None:
            node = self.nodes.get(wanted)
            if node is None:
                raise SyscallError(Errno.ENOENT, f"spawn: no node {wanted!r} (llmos nodes "
                                   "lists them)")
            if node.state == "lost":
                raise SyscallError(Errno.EHOSTDOWN, f"spawn: node {wanted} is lost (silent "
                                   f"since {time.monotonic() - node.last_seen:.1f} s ago)")
            if node.state == "draining":
                raise SyscallError(Errno.EBUSY, f"spawn: node {wanted} is draining; it "
                                   "takes no new processes (llmos node resume)")
            return wanted
        if self.config.placement == "local":
            if self.nodes[self.head].state == "draining":
                raise SyscallError(Errno.EBUSY, f"spawn: the head ({self.head}) is "
                                   "draining; name a node (llmos nodes)")
            return self.head
        ready = [n for n in self.nodes.values() if n.state == "ready"]
        if not ready:
            raise SyscallError(Errno.EBUSY, "spawn: every node is draining or lost")
        load = {n.name: len(self.running_on(n.name)) for n in ready}
        if self.config.placement == "spread":
            return min(ready, key=lambda n: (load[n.name], n.order)).name
        for n in sorted(ready, key=lambda n: n.order):  # pack: fill each to its CPUs
            if load[n.name] < (n.resources.get("cpus") or 1):
                return n.name
        return min(ready, key=lambda n: (load[n.name], n.order)).name

    # -- remote processes ------------------------------------------------------------

    def spawn(self, call: Call, parent: Process, name: str, argv: list[str],
              uid: int | None, cwd: str | None, env: dict[str, str] | None) -> None:
        """Start argv on node name as parent's child; call is answered with its pid
        once the agent started it (or with the agent's errno)."""
        node = self.nodes[name]
        uid = parent.uid if uid is None else uid
        if uid != parent.uid and parent.uid != 0:
            raise SyscallError(Errno.EPERM, f"spawn: uid {parent.uid} may not spawn as "
                               f"uid {uid}")
        if not argv or not argv[0]:
            raise SyscallError(Errno.EINVAL, "spawn: argv must name a program")
        if len(self.table) >= self.config.max_processes:
            raise SyscallError(Errno.EAGAIN, "the process table is full")
        child = self.table.create(ppid=parent.pid, uid=uid, argv=argv, spawned=True,
                                  node=name)
        child.token = secrets.token_hex(16)
        self.spawner.tokens[child.token] = child.pid
        self.pending[child.pid] = PendingSpawn(call, name,
                                               time.monotonic() + SPAWN_TIMEOUT_S)
        self._order(node, wire.node("spawn", epoch=node.epoch, pid=child.pid, argv=argv,
                                    uid=uid, cwd=cwd, env=env or {}, token=child.token))
        log.info("pid %d spawns pid %d on node %s: %s", parent.pid, child.pid, name,
                 " ".join(argv)[:80])

    def _spawn_failed(self, pid: int, errno: int, message: str) -> None:
        p = self.pending.pop(pid, None)
        proc = self.table.get(pid)
        if proc is not None and proc.state == "running":
            self.spawner.forget(proc)
            self.table.end(pid, None, "lost", remember=False)
            if pid in self.table.procs:
                self.table.reap(pid, remember=False)
        if p is not None:
            p.call.fail(errno, message)

    def kill(self, proc: Process, sig: int) -> None:
        """Tell the agent hosting proc to signal it; its exit comes back as a report."""
        node = self.nodes.get(proc.node)
        if node is None or node.state == "lost" or node.conn is None:
            self.end_process(proc, -sig, "killed")
            return
        if proc.pid in self.pending:  # not started yet: signalled as soon as it is
            self.pending[proc.pid].kill = sig
        self._order(node, wire.node("kill", epoch=node.epoch, pid=proc.pid, sig=sig))

    def ended(self, proc: Process) -> None:
        """proc ended in the kernel (exit, lost heartbeats, killed): the agent stops
        its OS process if it still runs; a no-op for the head's processes."""
        node = self.nodes.get(proc.node)
        if node is not None and node.key is not None and node.state != "lost":
            self._order(node, wire.node("kill", epoch=node.epoch, pid=proc.pid, sig=9))

    # -- messages from agents ---------------------------------------------------------

    def on_message(self, conn: bytes, entry: dict[str, Any], key: str, head: dict) -> None:
        kind = head.get(wire.KIND)
        if entry.get("kind") != "node":
            log.warning("a node message (%s) from %s %s's key: dropped", kind,
                        entry.get("kind"), entry.get("name"))
            self.outbox.stats.drop("node_not_a_node")
            return
        if kind == "join":
            self._join(conn, entry, key, head)
            return
        node = self.nodes.get(entry["name"])
        if (node is None or node.key != key or node.conn != conn or node.state == "lost"
                or head.get("epoch") != node.epoch):
            # an agent of an older epoch, or of a node lost or removed: it rejoins
            self.outbox.send(conn, encode(wire.node(
                "rejoin", why=f"node {entry['name']} is not joined with this epoch "
                              f"({'lost' if node and node.state == 'lost' else 'unknown'})")))
            self.outbox.stats.drop("node_stale")
            return
        node.last_seen = time.monotonic()
        if kind == "nhb":  # answered: an agent that hears nothing fences itself
            n = head.get("n")
            self.outbox.send(conn, encode(wire.node("ack", epoch=node.epoch,
                                                    n=n if type(n) is int else None)))
            res = head.get("res")
            if type(res) is dict:
                node.resources.update({k: res[k] for k in ("host", "addr", "cpus",
                                                           "memory", "gpus") if k in res})
            self._reconcile(node, head.get("pids"))
        elif kind == "spawned":
            self._on_spawned(node, head)
        elif kind == "exited":
            self._on_exited(node, head)
        elif kind == "bye":  # llmos node leave: gone now, not at the timeout
            log.info("node %s left (epoch %d)", node.name, node.epoch)
            self._gone(node, "node left")
        else:
            self.outbox.stats.drop("node_malformed")

    def _join(self, conn: bytes, entry: dict, key: str, head: dict) -> None:
        name = head.get("name")
        if name != entry["name"]:
            log.warning("refused a join as node %r with node %s's key", name, entry["name"])
            self._refuse(conn, Errno.EACCES, f"this key is node {entry['name']}'s; it may "
                         f"not join as {name!r}")
            return
        if name == self.head:
            self._refuse(conn, Errno.EINVAL, f"{name} is the head's own name")
            return
        node = self.nodes.get(name)
        if node is not None and node.state != "lost":
            log.warning("refused a second join of node %s (epoch %d is live)", name,
                        node.epoch)
            self._refuse(conn, Errno.EBUSY, f"node {name} is joined already (epoch "
                         f"{node.epoch}, heard {time.monotonic() - node.last_seen:.1f} s "
                         "ago): a second agent with its token is refused")
            return
        self._joins += 1
        epoch = (node.epoch if node is not None else 0) + 1
        drained = node is not None and node.drained
        res = head.get("res") if type(head.get("res")) is dict else {}
        self.nodes[name] = Node(name, key, epoch=epoch, conn=conn, order=self._joins,
                                resources={k: res.get(k) for k in ("host", "addr", "cpus",
                                                                   "memory", "gpus")},
                                state="draining" if drained else "ready", drained=drained)
        log.info("node %s joined (epoch %d, %s)", name, epoch, res.get("host"))
        self.outbox.send(conn, encode(wire.node(
            "joined", name=name, epoch=epoch, head=self.head,
            heartbeat_s=self.config.node_heartbeat_s, timeout_s=self.config.node_timeout_s)))

    def _refuse(self, conn: bytes, errno: Errno, message: str) -> None:
        self.outbox.stats.drop("node_refused")
        self.outbox.send(conn, encode(wire.node("refused", errno=int(errno),
                                                message=message)))

    def _hosted(self, node: Node, pid: Any) -> Process | None:
        proc = self.table.get(pid) if type(pid) is int else None
        if proc is None or proc.node != node.name:
            log.warning("node %s reported on pid %r, which it does not host", node.name, pid)
            self.outbox.stats.drop("node_not_hosted")
            return None
        return proc

    def _on_spawned(self, node: Node, head: dict) -> None:
        pid = head.get("pid")
        p = self.pending.get(pid) if type(pid) is int else None
        if p is None or p.node != node.name:
            self.outbox.stats.drop("node_not_hosted")
            return
        if type(head.get("errno")) is int:
            msg = head.get("message")
            self._spawn_failed(pid, head["errno"],
                               f"{msg if type(msg) is str else 'spawn failed'} (node "
                               f"{node.name})")
            return
        del self.pending[pid]
        proc = self.table.get(pid)
        if proc is not None and type(head.get("os_pid")) is int:
            proc.node_os_pid = head["os_pid"]
        if p.kill is not None:
            self._order(node, wire.node("kill", epoch=node.epoch, pid=pid, sig=p.kill))
        p.call.reply(pid)

    def _on_exited(self, node: Node, head: dict) -> None:
        proc = self._hosted(node, head.get("pid"))
        if proc is None or proc.state != "running":
            return
        status = head.get("status") if type(head.get("status")) is int else None
        self.end_process(proc, status, "killed" if status is not None and status < 0
                         else "exited")

    def _reconcile(self, node: Node, pids: Any) -> None:
        """The agent's pids against the table's: it kills what the kernel does not hold
        running there; the kernel ends what the agent no longer runs."""
        if type(pids) is not list:
            return
        theirs = {p for p in pids if type(p) is int}
        ours = {p.pid for p in self.running_on(node.name)}
        for pid in theirs - ours:
            if pid not in self.pending:
                self._order(node, wire.node("kill", epoch=node.epoch, pid=pid, sig=9))
        for pid in ours - theirs - set(self.pending):
            proc = self.table.get(pid)
            if proc is not None:
                self.end_process(proc, None, "lost")

    # -- administration -----------------------------------------------------------------

    def control(self, caller: Process, name: str, action: str) -> dict[str, Any]:
        if caller.uid != 0:
            raise SyscallError(Errno.EPERM, f"node_ctl: uid {caller.uid} is not uid 0")
        node = self.nodes.get(name)
        if node is None:
            raise SyscallError(Errno.ENOENT, f"node_ctl: no node {name!r}")
        if action == "drain":
            node.drained = True  # kept when it is lost and rejoins
            if node.state == "ready":
                node.state = "draining"
        elif action == "resume":
            node.drained = False
            if node.state == "draining":
                node.state = "ready"
        elif action == "remove":
            if node.key is None:
                raise SyscallError(Errno.EINVAL, "node_ctl: the head cannot be removed")
            for proc in self.running_on(name):
                self.end_process(proc, None, "node removed")
            self._fail_pending(name, "node removed")
            if node.conn is not None and node.state != "lost":
                self._order(node, wire.node("removed", epoch=node.epoch))
            del self.nodes[name]
            self.revoke(name)
            log.info("node %s removed; its key is revoked", name)
            return {"name": name, "state": "removed", "epoch": node.epoch}
        return node.record(time.monotonic(), len(self.running_on(name)))

    # -- periodic work ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for node in self.nodes.values():
            if node.key is not None and node.state != "lost" and \
                    now - node.last_seen > self.config.node_timeout_s:
                self._lost(node, now)
        for pid, p in list(self.pending.items()):
            if now > p.deadline:
                self._spawn_failed(pid, Errno.EHOSTDOWN, f"spawn: node {p.node} did not "
                                   f"start the program in {SPAWN_TIMEOUT_S:g} s")

    def _lost(self, node: Node, now: float) -> None:
        log.warning("node %s is lost (silent for %.1f s, epoch %d)", node.name,
                    now - node.last_seen, node.epoch)
        node.state = "lost"
        node.lost_at = time.time()
        self._fail_pending(node.name, "node lost")
        for proc in self.running_on(node.name):
            self.end_process(proc, None, "node lost")

    def _fail_pending(self, name: str, why: str) -> None:
        for pid, p in list(self.pending.items()):
            if p.node == name:
                self._spawn_failed(pid, Errno.EHOSTDOWN, f"spawn: {why} ({name})")

    def revoked(self, accepted: Callable[[str], Any]) -> None:
        """Keys were revoked: a node whose key is no longer accepted is removed now,
        and its agent told so (on the connection it still has)."""
        for node in list(self.nodes.values()):
            if node.key is not None and not accepted(node.key):
                log.warning("node %s: its key was revoked; removed", node.name)
                if node.state != "lost":
                    self._order(node, wire.node("removed", epoch=node.epoch,
                                                why="its key was revoked"))
                self._gone(node, "key revoked")

    def _gone(self, node: Node, why: str) -> None:
        """node is no longer a node (it left, its key was revoked): its processes end
        with reason why, its parked spawns fail, it leaves the table."""
        node.state = "lost"  # so ending its processes sends it nothing more
        self._fail_pending(node.name, why)
        for proc in self.running_on(node.name):
            self.end_process(proc, None, why)
        self.nodes.pop(node.name, None)

    def stalled(self, lag: float) -> None:
        for node in self.nodes.values():
            node.last_seen += lag
        for p in self.pending.values():
            p.deadline += lag

    def _order(self, node: Node, head: dict) -> None:
        if node.conn is not None:
            self.outbox.send(node.conn, encode(head))

    def shutdown(self) -> None:
        """The kernel goes down: every agent kills its processes and waits to rejoin."""
        for node in self.nodes.values():
            if node.key is not None and node.state != "lost":
                self._order(node, wire.node("rejoin", why="the kernel shut down"))
