"""nodes, node_ctl, and spawn's node argument, against a kernel listening on TCP with
one node agent joined (issue 16).

The contracts: spawn on a node that does not exist (ENOENT), that drains (EBUSY)
or that is lost (EHOSTDOWN); node_ctl by a uid that is not 0 (EPERM), of a node
that does not exist (ENOENT), removing the head (EINVAL); nodes() lists the head
first and every node agent with its state. tests/test_nodes.py goes through the
rest (attacks, epochs, placement).
"""
from __future__ import annotations

import os
import signal
from typing import Iterator

import pytest

from bench.kernelboot import NodeAgent
from conftest import Booted, wait_until
from syscalls import Errno

from ._util import errno_of

CONFIG = {"node_heartbeat_s": 0.2, "node_timeout_s": 1.0}


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Booted, NodeAgent]]:
    with Booted(CONFIG, listen="127.0.0.1:0") as head, NodeAgent(head, "c1") as agent:
        yield head, agent


def test_nodes_lists_the_head_and_each_agent(cluster: tuple[Booted, NodeAgent]) -> None:
    head, _ = cluster
    with head.connect() as osh:
        nodes = osh.nodes()
    assert [n["name"] for n in nodes] == ["head", "c1"]
    assert nodes[0]["head"] and not nodes[1]["head"]
    assert {n["state"] for n in nodes} == {"ready"}
    for n in nodes:
        assert set(n) >= {"name", "state", "epoch", "heartbeat_age_s", "cpus", "memory",
                          "gpus", "processes"}


def test_node_ctl_refusals(cluster: tuple[Booted, NodeAgent]) -> None:
    head, _ = cluster
    with head.connect(uid=1000) as user, head.connect(uid=0) as root:
        assert errno_of(user.node_ctl, "c1", "drain") == Errno.EPERM
        assert errno_of(root.node_ctl, "c9", "drain") == Errno.ENOENT
        assert errno_of(root.node_ctl, "head", "remove") == Errno.EINVAL
        assert errno_of(root.node_ctl, "c1", "reboot") == Errno.EINVAL  # not a choice
        assert root.node_ctl("c1", "drain")["state"] == "draining"
        assert root.node_ctl("c1", "drain")["state"] == "draining"  # idempotent
        assert root.node_ctl("c1", "resume")["state"] == "ready"


def test_spawn_on_a_node_that_is_missing_draining_or_lost(
        cluster: tuple[Booted, NodeAgent]) -> None:
    head, agent = cluster
    with head.connect(uid=0) as osh:
        assert errno_of(osh.spawn, ["true"], node="c9") == Errno.ENOENT
        osh.node_ctl("head", "drain")
        try:
            assert errno_of(osh.spawn, ["true"], node="head") == Errno.EBUSY
        finally:
            osh.node_ctl("head", "resume")
        pid = osh.spawn(["true"], node="c1")
        assert osh.wait(pid, timeout=10)["status"] == 0
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: osh.nodes()[1]["state"] == "lost", 5)
            assert errno_of(osh.spawn, ["true"], node="c1") == Errno.EHOSTDOWN
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.wait_joined(10, epoch=2)
        assert wait_until(lambda: osh.nodes()[1]["state"] == "ready", 5)


def test_a_data_channel_needs_a_kernel_listening_on_tcp(system: Booted) -> None:
    with system.connect() as osh:
        osh.save_tensor("/conf-channel.t", __import__("numpy").zeros(4, "float32"))
        try:
            fd = osh.open_tensor("/conf-channel.t", "r")["fd"]
            assert errno_of(osh.read_tensor, fd, channel=True) == Errno.ENOTSUP
            osh.close_tensor(fd)
        finally:
            osh.unlink("/conf-channel.t")


def test_a_data_channel_grant_reads_once(cluster: tuple[Booted, NodeAgent]) -> None:
    import numpy as np

    import userland
    head, _ = cluster
    cred = head.credential("client", "conf-ch", uid=1000)
    with userland.connect(credential=cred, timeout=10) as r:
        data = np.arange(1 << 18, dtype=np.float32)
        r.save_tensor("/conf-ch.t", data)
        fd = r.open_tensor("/conf-ch.t", "r")["fd"]
        rep = r.read_tensor(fd, channel=True)
        assert rep["data"] is None and set(rep["channel"]) == {"host", "port", "token"}
        assert bytes(r._fetch(rep["channel"])) == data.tobytes()
        assert errno_of(r._fetch, rep["channel"]) == Errno.EIO  # used once
        r.close_tensor(fd)
        r.unlink("/conf-ch.t")
