"""The node agent: what `llmos node join` runs on a host that is to be an llmos node.

    python -m kernel.agent --token NODE.json [--home DIR] [--sim-gpus 2x16GiB]

It connects to the head's TCP endpoint with the node key of its token (CURVE),
joins under the token's name, and then does what the kernel orders
(kernel/_nodes.py): start a program as an llmos process (its output in the node's
own LLMOS_HOME, log/proc/<pid>.log; it attaches back over TCP with the node key and
its spawn token), signal one, stop everything. It heartbeats every
node_heartbeat_s with the pids it runs and the node's resources, and reports each
exit. Told to rejoin (it was declared lost, or the kernel restarted), it kills
every process of the old epoch first, so none outlives its epoch; and when it hears
nothing from the head (each heartbeat is acknowledged) for the head's node_timeout_s,
it ends its processes itself, since the head has declared them lost. It exits on
SIGTERM or SIGINT (its processes with it), or when the kernel removes the node.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import zmq

from syscalls import (CredentialError, Errno, Home, SyscallError, WireError, curve_client,
                      decode, encode, parse_sim_spec, read_credential, send_frames, wire,
                      write_credential)

from ._proctable import Process
from ._spawn import PROJECT_ROOT, Spawner

log = logging.getLogger("llmos.agent")

JOIN_RETRY_S = 1.0
POLL_MS = 50


class Agent:
    def __init__(self, cred_path: Path, home: Home, sim_gpus: str,
                 state: Path | None = None, endpoint: str | None = None) -> None:
        self.state = state  # where it writes {name, epoch, pid} once joined
        self.cred = read_credential(cred_path)
        if self.cred["kind"] != "node":
            raise CredentialError(f"{cred_path} is a {self.cred['kind']}'s credential, "
                                  "not a node's (llmos node token NAME makes one)")
        self.cred_path = cred_path.absolute()
        if endpoint is not None:  # the head at another address than the token says:
            self.cred["endpoint"] = endpoint  # a copy of its own for its processes
            home.run.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.cred_path = home.run / "node-credential.json"
            write_credential(self.cred_path, self.cred)
        self.name = self.cred["name"]
        self.home = home
        self.sim_gpus = sim_gpus
        self.spawner = Spawner(home, None, 0)  # type: ignore[arg-type]  # only _start
        self.children: dict[int, subprocess.Popen] = {}  # llmos pid -> OS process
        self.epoch: int | None = None
        self.hb_s = 1.0
        self.timeout_s = 5.0      # the head's node_timeout_s, from joined
        self.heard = 0.0          # when the head last said anything
        self.beats = 0            # heartbeats sent; the head's ack names the one it read
        self.probe: int | None = None  # after a silence: the heartbeat an ack must name
        self.addr, self.iface = self._address()
        self.running = True
        self.removed = False
        self.ctx = zmq.Context()
        self.sock = self._socket()

    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing before a handshake succeeded
        curve_client(sock, self.cred)
        sock.connect(self.cred["endpoint"])
        return sock

    def resources(self) -> dict[str, Any]:
        count, size = parse_sim_spec(self.sim_gpus)
        gpus = [{"index": i, "name": "simulated", "memory": size} for i in range(count)]
        return {"host": os.uname().nodename, "cpus": os.cpu_count() or 1,
                "memory": psutil.virtual_memory().total, "gpus": gpus, "addr": self.addr}

    def _address(self) -> tuple[str, str | None]:
        """This node's address as the head sees it (the one its route to the head
        leaves from) and that interface's name, for torch.distributed's gloo."""
        host, _, port = self.cred["endpoint"].removeprefix("tcp://").rpartition(":")
        try:
            with socket.socket(socket.AF_INET6 if ":" in host.strip("[]")
                               else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host.strip("[]"), int(port)))
                addr = s.getsockname()[0]
        except OSError:
            return "127.0.0.1", None
        for name, addrs in psutil.net_if_addrs().items():
            if any(a.address == addr for a in addrs):
                return addr, name
        return addr, None

    def send(self, kind: str, **fields: Any) -> bool:
        """Send to the head; False when no connection is up (the head is down or
        refused our handshake: the message is dropped, and a join is retried)."""
        try:
            send_frames(self.sock, encode(wire.node(kind, **fields)))
            return True
        except zmq.Again:
            return False

    # -- joining -------------------------------------------------------------------------

    def join(self) -> bool:
        """Join (again) until the kernel says joined; False if it refuses for good."""
        self.kill_all()
        self.epoch = None
        while self.running:
            if not self.send("join", name=self.name, res=self.resources()):
                # the handshake takes a moment; one that does not come is worth a line
                if not self.sock.poll(int(JOIN_RETRY_S * 1000), zmq.POLLOUT):
                    log.warning("no connection to %s yet (head down, or our key "
                                "refused)", self.cred["endpoint"])
                continue
            deadline = time.monotonic() + max(JOIN_RETRY_S, 2 * self.hb_s)
            while self.running and time.monotonic() < deadline:
                head = self.recv(POLL_MS)
                if head is None:
                    continue
                kind = head.get(wire.KIND)
                if kind == "joined":
                    self.epoch = head.get("epoch")
                    self.hb_s = float(head.get("heartbeat_s") or 1.0)
                    self.timeout_s = float(head.get("timeout_s") or 5.0)
                    self.heard = time.monotonic()
                    self.probe = None
                    log.info("joined as node %s, epoch %s (head %s)", self.name, self.epoch,
                             head.get("head"))
                    if self.state is not None:
                        tmp = self.state.with_name(self.state.name + ".tmp")
                        tmp.write_text(json.dumps({"name": self.name, "epoch": self.epoch,
                                                   "pid": os.getpid()}))
                        os.replace(tmp, self.state)
                    return True
                if kind == "refused":
                    log.warning("join refused: %s", head.get("message"))
                    if head.get("errno") != Errno.EBUSY:
                        return False
                    break  # the node's last epoch is not lost yet: try again
            time.sleep(JOIN_RETRY_S)
        return False

    def recv(self, timeout_ms: int) -> dict | None:
        if not self.sock.poll(timeout_ms):
            return None
        try:
            return decode(self.sock.recv_multipart())
        except WireError:
            return None

    # -- serving -------------------------------------------------------------------------

    def serve(self) -> int:
        if not self.join():
            return 1
        next_hb = 0.0
        while self.running:
            now = time.monotonic()
            if self.silent(now):
                next_hb = now
            if now >= next_hb:
                next_hb = now + self.hb_s
                self.beats += 1
                self.send("nhb", epoch=self.epoch, res=self.resources(),
                          pids=sorted(self.children), n=self.beats)
            head = self.recv(POLL_MS)
            if head is not None:
                # a message that ends a silence (this agent stopped, or partitioned,
                # while it waited here) is judged after the silence, not before
                self.silent(time.monotonic())
                self.heard = time.monotonic()
                kind = head.get(wire.KIND)
                if kind == "ack" and self.probe is not None and \
                        type(head.get("n")) is int and head["n"] >= self.probe:
                    self.probe = None  # the head read a heartbeat sent after the silence
                elif kind == "spawn" and self.probe is not None:
                    # sent before the silence: its caller was told EHOSTDOWN by now
                    log.warning("not starting pid %s: ordered before a silence",
                                head.get("pid"))
                elif kind == "spawn" and head.get("epoch") == self.epoch:
                    self.spawn(head)
                elif kind == "kill" and head.get("epoch") == self.epoch:
                    self.kill(head.get("pid"), head.get("sig"))
                elif kind == "rejoin":
                    log.warning("told to rejoin: %s", head.get("why"))
                    if not self.join():
                        return 1
                    next_hb = 0.0
                elif kind == "removed":
                    log.warning("node %s was removed by the head: %s", self.name,
                                head.get("why") or "llmos node remove")
                    self.kill_all()
                    self.removed = True
                    return 0
            self.reap()
        self.kill_all()
        return 0

    def silent(self, now: float) -> bool:
        """Whether the head has been silent past its node_timeout_s (and this is news):
        it has declared us lost by now, so fence (end this epoch's processes) and start
        nothing it ordered before the silence, until it acknowledges a heartbeat sent
        after it."""
        if now - self.heard <= self.timeout_s or self.probe is not None:
            return False
        if self.children:
            log.warning("no word from the head for %.1f s: ending this epoch's %d "
                        "processes", now - self.heard, len(self.children))
            self.kill_all()
        self.probe = self.beats + 1
        return True

    def spawn(self, order: dict) -> None:
        pid, argv = order.get("pid"), order.get("argv")
        if type(pid) is not int or type(argv) is not list or not argv:
            return
        exe = [sys.executable if argv[0] in ("python", "python3") else argv[0], *argv[1:]]
        cwd = order.get("cwd")
        if type(cwd) is not str or not os.path.isdir(cwd):
            cwd = str(self.home.root)  # the caller's directory is not on this host
        env = {k: v for k, v in (order.get("env") or {}).items()
               if type(k) is str and type(v) is str}
        env.update(LLMOS_CREDENTIAL=str(self.cred_path), LLMOS_NODE=self.name,
                   LLMOS_NODE_ADDR=self.addr)
        if self.iface:  # gloo binds where this node is reached, not where its name is
            env["GLOO_SOCKET_IFNAME"] = self.iface
        env.pop("LLMOS_SPAWN_TOKEN", None)
        child = Process(pid=pid, ppid=0, uid=order.get("uid") or 0, argv=argv,
                        token=order.get("token"))
        try:
            popen = self.spawner._start(child, exe, cwd, env)
        except SyscallError as e:
            self.send("spawned", epoch=self.epoch, pid=pid, errno=int(e.errno),
                      message=e.message)
            return
        self.children[pid] = popen
        log.info("pid %d started (os pid %d): %s", pid, popen.pid, " ".join(argv)[:80])
        self.send("spawned", epoch=self.epoch, pid=pid, os_pid=popen.pid)

    def kill(self, pid: Any, sig: Any) -> None:
        popen = self.children.get(pid) if type(pid) is int else None
        if popen is None or type(sig) is not int or popen.poll() is not None:
            return
        try:
            os.killpg(popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self) -> None:
        for pid, popen in list(self.children.items()):
            rc = popen.poll()
            if rc is not None:
                del self.children[pid]
                self.send("exited", epoch=self.epoch, pid=pid, status=rc)

    def kill_all(self) -> None:
        """Every process of this epoch ends (SIGKILL to its process group)."""
        for popen in self.children.values():
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for popen in self.children.values():
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()

    def leave(self) -> None:
        """Tell the head this node goes (its processes end now, not at the timeout)."""
        if self.epoch is not None:
            self.send("bye", epoch=self.epoch)

    def close(self) -> None:
        self.sock.close(200)  # the bye, if any, has a moment to leave
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernel.agent",
                                description="Run an llmos node agent in the foreground.")
    p.add_argument("--token", required=True, help="the node's credential (llmos node token)")
    p.add_argument("--home", help="this node's LLMOS_HOME, for its logs (default: "
                   "$LLMOS_HOME or ~/.llmos)")
    p.add_argument("--sim-gpus", default="0x1GiB", metavar="NxSIZE",
                   help="simulated GPUs this node reports (default none)")
    p.add_argument("--endpoint", metavar="tcp://HOST:PORT",
                   help="the head's endpoint, if not the token's")
    p.add_argument("--state", metavar="FILE",
                   help="write {name, epoch, pid} there each time it joins")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        parse_sim_spec(a.sim_gpus)
    except ValueError as e:
        p.error(f"--sim-gpus: {e}")
    home = Home.resolve(a.home)
    for d in (home.root, home.log):
        d.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT,
                                                            os.environ.get("PYTHONPATH")]))
    try:
        agent = Agent(Path(a.token), home, a.sim_gpus,
                      Path(a.state) if a.state else None, a.endpoint)
    except CredentialError as e:
        print(f"llmos: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        agent.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        rc = agent.serve()
        if rc == 0 and not agent.removed:
            agent.leave()
        return rc
    finally:
        agent.kill_all()
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
