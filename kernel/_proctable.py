"""The process table: who runs, who is whose child, who holds what.

Pure bookkeeping: no sockets, no OS calls. The kernel loop owns the one table and
is its only user (single-threaded, so no lock). Invariants:
  - pid 1 is init; it never ends, and orphans are given to it.
  - a process is "running" until it ends, then a "zombie" until its parent
    reaps it with wait; a zombie whose parent is init is reaped at once.
  - every pid in `parent.children` names a process whose ppid is parent.
  - pids only grow: the table starts at first_pid (the kernel keeps it across
    boots of a home, so a pid and its log name one process, ever).
  - `ended` holds the records of the last reaped processes, newest last, at most
    `keep_ended` (ps -a, jobs -a).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

INIT_PID = 1


@dataclass
class Process:
    pid: int
    ppid: int
    uid: int
    argv: list[str]
    start_time: float = field(default_factory=time.time)
    state: str = "running"            # running | zombie
    os_pid: int | None = None         # the OS process, where it is on this host
    os_create_time: float | None = None
    spawned: bool = False             # started by the kernel (so the kernel reaps it)
    system: bool = False              # a driver's own connection: not the user's to signal
    token: str | None = None          # spawn token, until the child attaches with it
    hb_token: str | None = None
    conn: bytes | None = None         # routing id of its attached connection
    hb_deadline: float | None = None  # monotonic; None until it heartbeats
    children: set[int] = field(default_factory=set)
    resources: dict[str, set[str]] = field(default_factory=dict)
    status: int | None = None         # exit status once a zombie
    reason: str | None = None         # exited | killed | lost
    end_time: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # report(): progress, final loss
    node: str = ""                    # the node it runs on (kernel/_nodes.py)
    node_os_pid: int | None = None    # its OS pid there, for a process on another node
    key: str | None = None            # the public key it attached with, over TCP

    def record(self) -> dict[str, Any]:
        """The process as ps shows it."""
        return {
            "pid": self.pid, "ppid": self.ppid, "uid": self.uid, "argv": self.argv,
            "state": self.state, "start_time": self.start_time, "os_pid": self.os_pid,
            "attached": self.conn is not None,
            "resources": {k: sorted(v) for k, v in self.resources.items() if v},
            "status": self.status, "reason": self.reason, "info": self.info,
            "system": self.system, "end_time": self.end_time, "node": self.node,
            "node_os_pid": self.node_os_pid,
        }

    def exit_record(self) -> dict[str, Any]:
        """What wait returns for this process."""
        return {"pid": self.pid, "status": self.status, "reason": self.reason,
                "info": self.info}


class ProcessTable:
    def __init__(self, init_os_pid: int | None = None, first_pid: int = INIT_PID + 1,
                 keep_ended: int = 256, node: str = "head") -> None:
        self.node = node  # where a process runs unless created with another node
        self._next_pid = INIT_PID
        self.procs: dict[int, Process] = {}
        self.ended: deque[dict[str, Any]] = deque(maxlen=keep_ended)
        init = self.create(ppid=0, uid=0, argv=["init"], os_pid=init_os_pid)
        assert init.pid == INIT_PID
        self._next_pid = max(first_pid, INIT_PID + 1)

    @property
    def next_pid(self) -> int:
        return self._next_pid

    def __len__(self) -> int:
        return len(self.procs)

    def get(self, pid: int) -> Process | None:
        return self.procs.get(pid)

    def live(self) -> list[Process]:
        return [p for p in self.procs.values() if p.state == "running"]

    def create(self, ppid: int, uid: int, argv: list[str], **kw: Any) -> Process:
        """Add a running process, child of ppid (which must be running)."""
        pid = self._next_pid
        self._next_pid += 1
        kw.setdefault("node", self.node)
        proc = Process(pid=pid, ppid=ppid, uid=uid, argv=list(argv), **kw)
        self.procs[pid] = proc
        parent = self.procs.get(ppid)
        if parent is not None:
            parent.children.add(pid)
        return proc

    def end(self, pid: int, status: int | None, reason: str,
            remember: bool = True) -> list[int]:
        """Make a running process a zombie; give its children to init.

        Returns the pids reaped as a result (itself if its parent is init, and
        its zombie children), so the caller can forget them too."""
        proc = self.procs[pid]
        assert proc.state == "running" and pid != INIT_PID
        proc.state, proc.status, proc.reason = "zombie", status, reason
        proc.end_time = time.time()
        proc.conn = None
        proc.token = None
        proc.hb_deadline = None
        proc.resources.clear()
        reaped: list[int] = []
        init = self.procs[INIT_PID]
        for cpid in sorted(proc.children):
            child = self.procs[cpid]
            child.ppid = INIT_PID
            init.children.add(cpid)
            if child.state == "zombie":
                self.reap(cpid)
                reaped.append(cpid)
        proc.children.clear()
        if proc.ppid == INIT_PID:
            self.reap(pid, remember)
            reaped.append(pid)
        return reaped

    def reap(self, pid: int, remember: bool = True) -> Process:
        """Remove a zombie from the table and from its parent's children; remember
        its record in `ended` unless it never ran."""
        proc = self.procs.pop(pid)
        assert proc.state == "zombie"
        parent = self.procs.get(proc.ppid)
        if parent is not None:
            parent.children.discard(pid)
        if remember and self.ended.maxlen:
            self.ended.append(proc.record())
        return proc

    def zombie_child(self, ppid: int, pid: int | None = None) -> Process | None:
        """A zombie child of ppid (pid itself if given), or None."""
        parent = self.procs[ppid]
        for cpid in sorted(parent.children) if pid is None else [pid]:
            child = self.procs.get(cpid)
            if child is not None and child.ppid == ppid and child.state == "zombie":
                return child
        return None
