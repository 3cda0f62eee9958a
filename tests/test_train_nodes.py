"""Training across nodes (issue 16): spawn_train with `nodes` puts its workers on
node agents (joined over CURVE TCP, here on loopback), gloo rendezvous at rank 0's
node; the same seed trains the same losses as on one node; a node lost mid-job
makes the job relaunch on the nodes left, from its last checkpoint."""
from __future__ import annotations

import os
import signal
from typing import Any, Iterator

import pytest
import torch

from bench.kernelboot import NodeAgent
from conftest import Booted, wait_until

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "batch_size": 8,
        "workers": 2, "log_every": 5, "checkpoint_every": 10, "warmup": 2, "lr": 3e-3,
        "seed": 7}
TEXT = b"the quick brown fox jumps over the lazy dog. " * 200
CONFIG = {"node_heartbeat_s": 0.2, "node_timeout_s": 1.0}


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Booted, NodeAgent, NodeAgent]]:
    with Booted(CONFIG, listen="127.0.0.1:0") as b, NodeAgent(b, "t1") as a1, \
            NodeAgent(b, "t2") as a2:
        with b.connect() as osh:
            osh.mkdir("/datasets")
            osh.save_tensor("/datasets/fox",
                            torch.frombuffer(bytearray(TEXT), dtype=torch.uint8))
        yield b, a1, a2


def history(osh: Any, model: str, step: int) -> list[float]:
    return [v for _, v in osh.load_tensor(f"{model}/step-{step:06d}/history").tolist()]


def test_two_nodes_train_the_losses_one_node_trains(
        cluster: tuple[Booted, NodeAgent, NodeAgent]) -> None:
    b, _, _ = cluster
    with b.connect() as osh:
        here = osh.spawn_train({**TINY, "name": "one", "dataset": "/datasets/fox",
                                "steps": 20})
        there = osh.spawn_train({**TINY, "name": "two", "dataset": "/datasets/fox",
                                 "steps": 20, "nodes": "t1,t2"})
        seen: set[str] = set()

        def placed() -> bool:
            seen.update(p["node"] for p in osh.ps() if p["ppid"] == there)
            return seen >= {"t1", "t2"}
        assert wait_until(placed, 60), seen  # rank 0 on t1, rank 1 on t2
        for job in (here, there):
            end = osh.wait(job, timeout=300)
            assert end["status"] == 0, end
        assert end["info"]["nodes"] == "t1,t2"
        one, two = history(osh, "/models/one", 20), history(osh, "/models/two", 20)
        assert len(one) == len(two) == 20
        assert max(abs(x - y) for x, y in zip(one, two)) <= 1e-4, (one, two)


def test_a_node_lost_mid_job_relaunches_on_the_nodes_left(
        cluster: tuple[Booted, NodeAgent, NodeAgent]) -> None:
    b, a1, a2 = cluster
    with b.connect() as osh:
        job = osh.spawn_train({**TINY, "name": "lossy", "dataset": "/datasets/fox",
                               "steps": 60, "restarts": 1, "nodes": "t1,t2"})

        def checkpointed() -> bool:
            info = next((p["info"] for p in osh.ps() if p["pid"] == job), {})
            return bool(info.get("checkpoint"))
        assert wait_until(checkpointed, 120)
        os.kill(a2.proc.pid, signal.SIGKILL)  # the node dies, its workers with it
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0, end
        assert end["info"]["step"] == 60 and end["info"]["nodes"] == "t1"
        assert len(history(osh, "/models/lossy", 60)) == 60
        assert {n["name"]: n["state"] for n in osh.nodes()}["t2"] == "lost"
