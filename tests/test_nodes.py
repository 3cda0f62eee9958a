"""Nodes over CURVE TCP (issue 16): a kernel listening on loopback, node agents of
their own homes joined with node keys, remote clients with client keys; every
attack of the issue refused before it reaches a process or a driver.

The agents here run on this host (the cluster of network namespaces is
tests/test_cluster.py); what makes them other nodes is the same as across hosts:
their own home, their own key, and TCP with CURVE to the head."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import zmq

import userland
from bench.kernelboot import NodeAgent
from conftest import Booted, errno_of, wait_until
from syscalls import Errno, Keyring, curve_client, decode, encode, read_credential, wire

HB_S, TIMEOUT_S = 0.2, 1.0
CONFIG = {"node_heartbeat_s": HB_S, "node_timeout_s": TIMEOUT_S}
SLEEPER = ["python", "-c", "import time\nfrom syscalls.client import connect\n"
           "o = connect()\no.report({'node': __import__('os').environ['LLMOS_NODE']})\n"
           "time.sleep(60)"]


@pytest.fixture(scope="module")
def head() -> Iterator[Booted]:
    with Booted(CONFIG, listen="127.0.0.1:0") as b:
        yield b


@pytest.fixture(scope="module")
def n1(head: Booted) -> Iterator[NodeAgent]:
    with NodeAgent(head, "n1", sim_gpus="2x8GiB") as a:
        yield a


def node(osh: Any, name: str) -> dict[str, Any]:
    return next(n for n in osh.nodes() if n["name"] == name)


def raw(cred: dict[str, Any] | None, endpoint: str) -> zmq.Socket:
    """A DEALER on the TCP endpoint: CURVE with cred's keys, or none at all."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if cred is not None:
        curve_client(sock, cred)
    sock.connect(endpoint)
    return sock


def answer(sock: zmq.Socket, timeout_s: float = 1.0) -> dict[str, Any] | None:
    return decode(sock.recv_multipart()) if sock.poll(int(timeout_s * 1000)) else None


def attach_args(**kw: Any) -> dict[str, Any]:
    return {"os_pid": os.getpid(), "argv": ["attacker"], **kw}


def test_a_node_joins_and_runs_processes_its_parent_waits_for(head: Booted,
                                                              n1: NodeAgent) -> None:
    with head.connect(uid=0) as osh:
        nodes = {n["name"]: n for n in osh.nodes()}
        assert set(nodes) == {"head", "n1"} and nodes["head"]["head"]
        assert nodes["n1"]["state"] == "ready" and nodes["n1"]["epoch"] == 1
        assert [g["memory"] for g in nodes["n1"]["gpus"]] == [8 << 30, 8 << 30]
        assert nodes["n1"]["heartbeat_age_s"] < 2 * TIMEOUT_S
        pid = osh.spawn(["python", "-c", "import os, sys\nfrom syscalls.client import "
                         "connect\no = connect()\no.report({'ppid': o.getppid(), 'node': "
                         "os.environ['LLMOS_NODE']})\nprint('on', os.environ['LLMOS_HOME'])"
                         "\nsys.exit(3)"], node="n1")
        procs = {p["pid"]: p for p in osh.ps()}
        assert procs[pid]["node"] == "n1" and procs[osh.pid]["node"] == "head"
        rec = osh.wait(pid, timeout=30)
        assert rec["status"] == 3 and rec["reason"] == "exited", rec
        assert rec["info"] == {"ppid": osh.pid, "node": "n1"}
    # its output is in the node's own home, not the head's
    assert f"on {n1.root}" in (n1.root / "log" / "proc" / f"{pid}.log").read_text()
    assert not head.home.proc_log(pid).exists()


def test_kill_and_a_missing_program_across_nodes(head: Booted, n1: NodeAgent) -> None:
    with head.connect(uid=0) as osh:
        pid = osh.spawn(["sleep", "30"], node="n1")
        os_pid = next(p for p in osh.ps() if p["pid"] == pid)["node_os_pid"]
        assert psutil.pid_exists(os_pid)
        osh.kill(pid, "TERM")
        rec = osh.wait(pid, timeout=10)
        assert rec["status"] == -signal.SIGTERM and rec["reason"] == "killed"
        assert wait_until(lambda: not psutil.pid_exists(os_pid), 5)
        with pytest.raises(userland.SyscallError) as e:
            osh.spawn(["/no/such/program"], node="n1")
        assert e.value.errno == Errno.ENOENT and "node n1" in e.value.message
        assert errno_of(osh.spawn, ["true"], node="nowhere") == Errno.ENOENT
        assert not [p for p in osh.ps() if p["node"] == "n1"]  # nothing left behind


def test_a_client_key_attaches_as_its_uid_and_moves_tensors_in_messages(head: Booted) -> None:
    import numpy as np
    cred = head.credential("client", "alice", uid=1234)
    with userland.connect(credential=cred, timeout=10) as r:
        assert r.uid == 1234 and r.getpid() == r.pid
        data = np.arange(300_000, dtype=np.float32)  # over the shm threshold: inline here
        r.save_tensor("/alice.t", data)
        assert np.array_equal(r.load_tensor("/alice.t").numpy(), data)
        pid = r.spawn(["true"])  # no cwd of this host is sent: the kernel's own
        assert r.wait(pid, timeout=10)["status"] == 0
        with head.connect(uid=0) as osh:
            me = next(p for p in osh.ps() if p["pid"] == r.pid)
            assert me["node"] == "client:alice" and me["uid"] == 1234
        assert errno_of(userland.connect, credential=cred, uid=0, timeout=5) == Errno.EACCES


def test_no_key_a_wrong_key_and_the_secret_over_tcp_are_refused(head: Booted) -> None:
    with head.connect(uid=0) as osh:
        before = osh.sysinfo()
    secret = head.home.secretfile.read_text().strip()
    request = encode(wire.request(1, 0, attach_args(secret=secret, uid=0)))
    # no CURVE at all: the handshake itself fails; a key nobody registered: ZAP says no
    stranger = dict(zip(("public", "secret"), (k.decode() for k in zmq.curve_keypair())),
                    server_key=Keyring(head.root).server_keys()[0])
    for cred in (None, stranger):
        sock = raw(cred, head.endpoint)
        try:
            sock.send_multipart(request, flags=zmq.NOBLOCK) if cred is None else None
        except zmq.Again:
            pass
        assert answer(sock, 1.0) is None
        sock.close(0)
    with head.connect(uid=0) as osh:
        after = osh.sysinfo()
        assert after["tcp_refused"] > before["tcp_refused"]
        assert after["processes"]["total"] == before["processes"]["total"] + 0
    # a registered client key that sends the home's secret: EACCES, not a root process
    cred = read_credential(head.credential("client", "mallory", uid=1000))
    sock = raw(cred, head.endpoint)
    sock.send_multipart(request)
    head_ = answer(sock, 5.0)
    sock.close(0)
    assert head_ is not None and head_[wire.ERRNO] == Errno.EACCES, head_


def test_a_revoked_key_ends_its_processes_and_is_refused(head: Booted) -> None:
    cred = head.credential("client", "bob", uid=1000)
    r = userland.connect(credential=cred, timeout=2, heartbeat=False)
    pid = r.pid
    assert r.nop() is None
    Keyring(head.root).revoke("bob")
    with head.connect(uid=0) as osh:
        assert wait_until(lambda: all(p["pid"] != pid for p in osh.ps()), 5)
        ended = [p for p in osh.ps(all=True) if p["pid"] == pid]
        assert ended and ended[0]["reason"] == "key revoked", ended
    assert errno_of(r.nop) == Errno.ETIMEDOUT  # dropped, never answered
    r._closed = True
    r._sock.close(0)
    assert errno_of(userland.connect, credential=cred, timeout=2) == Errno.ETIMEDOUT


def test_a_node_may_not_claim_another_name_or_report_for_processes_it_does_not_host(
        head: Booted, n1: NodeAgent) -> None:
    n2 = read_credential(head.credential("node", "n2"))
    sock = raw(n2, head.endpoint)
    try:
        sock.send_multipart(encode(wire.node("join", name="n1", res={})))
        got = answer(sock, 5.0)
        assert got is not None and got[wire.KIND] == "refused"
        assert got["errno"] == Errno.EACCES and "n2" in got["message"]
        # a node key attaching with no spawn token, or with the home's secret
        sock.send_multipart(encode(wire.request(2, 0, attach_args())))
        got = answer(sock, 5.0)
        assert got is not None and got[wire.ERRNO] == Errno.EACCES, got
        with head.connect(uid=0) as osh:
            pid = osh.spawn(SLEEPER, node="n1")
            assert wait_until(lambda: next(p for p in osh.ps() if p["pid"] == pid)
                              ["attached"], 10)
            # n2 joins as itself, then says n1's process exited: dropped, it runs on
            sock.send_multipart(encode(wire.node("join", name="n2", res={})))
            got = answer(sock, 5.0)
            assert got is not None and got[wire.KIND] == "joined", got
            sock.send_multipart(encode(wire.node("exited", epoch=got["epoch"], pid=pid,
                                                 status=0)))
            time.sleep(0.3)
            assert next(p for p in osh.ps() if p["pid"] == pid)["state"] == "running"
            assert osh.sysinfo()["dropped"].get("node_not_hosted", 0) >= 1
            osh.kill(pid, "KILL")
            assert osh.wait(pid, timeout=10)["reason"] == "killed"
            # the same token again while n1 is live: a second agent is refused
            second = raw(read_credential(n1.token), head.endpoint)
            second.send_multipart(encode(wire.node("join", name="n1", res={})))
            got = answer(second, 5.0)
            second.close(0)
            assert got is not None and got["errno"] == Errno.EBUSY, got
            assert node(osh, "n1")["epoch"] == 1 and node(osh, "n1")["state"] == "ready"
    finally:
        sock.close(0)


def test_an_ipc_peer_cannot_pose_as_a_tcp_connection(head: Booted) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"\xfftcp:x")
    sock.connect(head.home.kernel_endpoint)
    try:
        with head.connect(uid=0) as osh:
            before = osh.sysinfo()["dropped"].get("malformed", 0)
            sock.send_multipart(encode(wire.request(1, 1, {})))
            assert answer(sock, 0.5) is None
            assert osh.sysinfo()["dropped"].get("malformed", 0) == before + 1
    finally:
        sock.close(0)


def test_a_lost_node_ends_its_processes_and_rejoins_with_a_new_epoch(head: Booted) -> None:
    with NodeAgent(head, "n3") as agent, head.connect(uid=0) as osh:
        pid = osh.spawn(SLEEPER, node="n3")
        assert wait_until(lambda: next(p for p in osh.ps() if p["pid"] == pid)["attached"],
                          10)
        os_pid = next(p for p in osh.ps() if p["pid"] == pid)["node_os_pid"]
        os.kill(agent.proc.pid, signal.SIGSTOP)  # silent, as a partition makes it
        t0 = time.monotonic()
        try:
            rec = osh.wait(pid, timeout=10)
            lost_after = time.monotonic() - t0
            assert rec["reason"] == "node lost", rec
            assert lost_after <= 2 * TIMEOUT_S + 0.5, lost_after
            assert node(osh, "n3")["state"] == "lost"
            assert errno_of(osh.spawn, ["true"], node="n3") == Errno.EHOSTDOWN
            assert psutil.pid_exists(os_pid)  # the kernel cannot reach it: not yet
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.wait_joined(10, epoch=2)
        assert wait_until(lambda: node(osh, "n3")["state"] == "ready", 5)
        assert node(osh, "n3")["epoch"] == 2
        # the old epoch's process is gone, never resurrected, and not in the table twice
        assert wait_until(lambda: not psutil.pid_exists(os_pid), 5)
        assert not [p for p in osh.ps() if p["node"] == "n3"]
        pid = osh.spawn(["true"], node="n3")
        assert osh.wait(pid, timeout=10)["status"] == 0


def test_drain_resume_remove(head: Booted) -> None:
    with NodeAgent(head, "n4") as agent, head.connect(uid=0) as osh:
        pid = osh.spawn(SLEEPER, node="n4")
        assert osh.node_ctl("n4", "drain")["state"] == "draining"
        assert errno_of(osh.spawn, ["true"], node="n4") == Errno.EBUSY
        assert next(p for p in osh.ps() if p["pid"] == pid)["state"] == "running"
        assert osh.node_ctl("n4", "resume")["state"] == "ready"
        with head.connect(uid=1000) as user:
            assert errno_of(user.node_ctl, "n4", "drain") == Errno.EPERM
        assert errno_of(osh.node_ctl, "head", "remove") == Errno.EINVAL
        assert errno_of(osh.node_ctl, "nobody", "drain") == Errno.ENOENT
        assert osh.node_ctl("n4", "remove")["state"] == "removed"
        assert osh.wait(pid, timeout=10)["reason"] == "node removed"
        assert agent.proc.wait(10) == 0  # told to stop
        assert "n4" not in {n["name"] for n in osh.nodes()}
        keys = Keyring(head.root).load().values()
        assert all(k["revoked"] for k in keys if k["name"] == "n4")
    # its token is worth nothing now: the handshake is refused
    with NodeAgent(head, "n4", token=agent.token, timeout=0) as again:
        assert wait_until(lambda: "no connection" in again.agent_log(), 10)
        assert again.joined() is None and again.proc.poll() is None


def test_placement_spreads_when_asked(tmp_path: Path) -> None:
    with Booted({**CONFIG, "placement": "spread"}, listen="127.0.0.1:0") as b, \
            NodeAgent(b, "s1"), b.connect(uid=0) as osh:
        pids = [osh.spawn(["sleep", "30"]) for _ in range(4)]
        where = sorted(p["node"] for p in osh.ps() if p["pid"] in pids)
        # the head runs this client already: s1 takes the first, then they alternate
        assert where.count("s1") >= 2 and where.count("head") >= 1, where
        for pid in pids:
            osh.kill(pid, "KILL")
            osh.wait(pid, timeout=10)


def test_an_agent_that_hears_nothing_from_the_head_fences_its_processes() -> None:
    """The head stopped (as a partition looks from the node): after node_timeout_s
    the agent ends its processes itself, and the head, back, reports them lost."""
    with Booted(CONFIG, listen="127.0.0.1:0") as b, NodeAgent(b, "f1") as agent, \
            b.connect(uid=0) as osh:
        pid = osh.spawn(SLEEPER, node="f1")
        assert wait_until(lambda: next(p for p in osh.ps() if p["pid"] == pid)["attached"],
                          10)
        os_pid = next(p for p in osh.ps() if p["pid"] == pid)["node_os_pid"]
        os.kill(b.pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: not psutil.pid_exists(os_pid), 3 * TIMEOUT_S + 2)
            time.sleep(1.5)  # a stall the kernel sees as one (STALL_S): it blames nobody
        finally:
            os.kill(b.pid, signal.SIGCONT)
        rec = osh.wait(pid, timeout=10)
        assert rec["reason"] == "lost", rec  # the agent's next heartbeat no longer has it
        assert "no word from the head" in agent.agent_log()
        assert node(osh, "f1")["state"] == "ready" and node(osh, "f1")["epoch"] == 1


def test_a_spawn_ordered_before_a_silence_never_runs(head: Booted, tmp_path: Path) -> None:
    """The caller was told EHOSTDOWN: the order, still queued for the stopped agent,
    must not start the program once the agent runs again (at most once)."""
    marker = tmp_path / "ran"
    with NodeAgent(head, "n5") as agent, head.connect(uid=0) as osh:
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(userland.SyscallError) as e:
                osh.spawn(["sh", "-c", f"echo ran > {marker}"], node="n5")
            assert e.value.errno == Errno.EHOSTDOWN
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.wait_joined(10, epoch=2)
        time.sleep(0.5)
        assert not marker.exists()
        assert "ordered before a silence" in agent.agent_log()
        pid = osh.spawn(["sh", "-c", f"echo ran > {marker}"], node="n5")
        assert osh.wait(pid, timeout=10)["status"] == 0 and marker.exists()


def test_leaving_drains_and_placement_follow_the_node(head: Booted) -> None:
    with NodeAgent(head, "n6") as agent, head.connect(uid=0) as osh:
        # a program on n6 spawns its own child on n6, not where placement would put it
        pid = osh.spawn(["python", "-c", "from syscalls.client import connect\n"
                         "o = connect()\nc = o.spawn(['true'])\n"
                         "o.report({'child': c, 'rec': o.wait(c, timeout=20)['status']})"],
                        node="n6")
        info = osh.wait(pid, timeout=30)["info"]
        assert info["rec"] == 0
        child = next(p for p in osh.ps(all=True) if p["pid"] == info["child"])
        assert child["node"] == "n6"
        # a drain outlives the node being lost: it rejoins draining
        osh.node_ctl("n6", "drain")
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: node(osh, "n6")["state"] == "lost", 5)
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.wait_joined(10, epoch=2)
        assert wait_until(lambda: node(osh, "n6")["epoch"] == 2, 5)
        assert node(osh, "n6")["state"] == "draining"
        osh.node_ctl("n6", "resume")
        # leaving tells the head: its processes end now, with the reason
        pid = osh.spawn(SLEEPER, node="n6")
        agent.stop()
        assert osh.wait(pid, timeout=5)["reason"] == "node left"
        assert "n6" not in {n["name"] for n in osh.nodes()}


def test_names_and_kinds_of_keys(head: Booted) -> None:
    ring = Keyring(head.root)
    head.credential("node", "k1")
    with pytest.raises(ValueError, match="has a key already"):
        ring.issue("client", "k1", head.endpoint)
    assert ring.revoke("k1", "client") == 0  # access revoke leaves a node's key alone
    assert ring.revoke("k1", "node") == 1


def test_commands_of_this_home_refuse_a_remote_credential(head: Booted) -> None:
    import subprocess
    import sys
    cred = head.credential("client", "cli1", uid=1000)
    env = dict(os.environ, LLMOS_HOME=str(head.root), LLMOS_CREDENTIAL=str(cred))
    for argv in (["start"], ["stop"], ["status"], ["access"], ["node", "token", "x1"]):
        r = subprocess.run([sys.executable, "-m", "userland.cli", *argv], env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "LLMOS_CREDENTIAL" in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "userland.cli", "ps", "--json"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert any(p["node"] == "client:cli1" for p in __import__("json").loads(r.stdout))
    assert head.home.kernel_pid() == head.pid  # no second kernel was started


def test_tensors_over_tcp_come_by_a_data_channel_granted_once(head: Booted) -> None:
    import numpy as np
    cred = head.credential("client", "carol", uid=1000)
    data = np.random.default_rng(1).standard_normal(1 << 20, dtype=np.float32)  # 4 MiB
    with userland.connect(credential=cred, timeout=10) as r:
        r.save_tensor("/carol.t", data)
        assert np.array_equal(r.load_tensor("/carol.t").numpy(), data)  # by a channel
        fd = r.open_tensor("/carol.t", "r")["fd"]
        grant = r.read_tensor(fd, channel=True)["channel"]
        forged = {**grant, "token": os.urandom(32).hex()}
        assert errno_of(r._fetch, forged) == Errno.EIO  # a token nobody granted
        later = r.read_tensor(fd, channel=True)["channel"]
        assert bytes(r._fetch(grant)) == data.tobytes()
        r.close_tensor(fd)
        pid = r.pid
    # the process that was granted it ended: its grant is worth nothing now
    with head.connect(uid=0) as osh:
        assert wait_until(lambda: all(p["pid"] != pid for p in osh.ps()), 5)
    with userland.connect(credential=cred, timeout=10) as r2:
        assert errno_of(r2._fetch, later) == Errno.EIO
