"""A data-parallel step with its workers on two nodes against both on one, same run.

    python bench/train_nodes_bench.py [--steps N] [--rounds R] [--width W]

A kernel listening on loopback TCP and two node agents (their own homes and keys,
as on two hosts; docs/scaling.md). The same byte-GPT job (2 workers, gloo, seed 7)
runs with both workers on the head (`nodes` unset) and with one on each node
(`nodes: "b1,b2"`), alternately, --rounds times; the figure is the job's own
step_ms (its median step, reported by rank 0), best round each. It also checks the
two runs' loss histories agree (the largest difference is printed). Timing never
fails anything. Every process it starts is ended by pid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import userland  # noqa: E402
from kernelboot import BenchKernel, NodeAgent  # noqa: E402

TEXT = b"the quick brown fox jumps over the lazy dog. " * 2000


def run(osh: userland.Llmos, name: str, steps: int, width: int, nodes: str | None) -> dict:
    cfg = {"name": name, "dataset": "/datasets/fox", "n_layer": 2, "n_head": 4,
           "n_embd": width, "block_size": 64, "batch_size": 16, "workers": 2,
           "steps": steps, "checkpoint_every": 0, "log_every": 10, "seed": 7,
           "warmup": 2}
    if nodes:
        cfg["nodes"] = nodes
    end = osh.wait(osh.spawn_train(cfg), timeout=1800)
    if end["status"] != 0:
        raise RuntimeError(f"{name}: {end}")
    hist = osh.load_tensor(f"/models/{name}/step-{steps:06d}/history").tolist()
    return {"step_ms": end["info"]["step_ms"], "losses": [v for _, v in hist]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    a = p.parse_args(argv)
    best: dict[str, float] = {}
    diff = 0.0
    with BenchKernel(config={"node_heartbeat_s": 0.5}, listen="127.0.0.1:0") as k, \
            NodeAgent(k, "b1"), NodeAgent(k, "b2"), \
            userland.connect(k.root, heartbeat=False) as osh:
        osh.mkdir("/datasets")
        osh.save_tensor("/datasets/fox", torch.frombuffer(bytearray(TEXT),
                                                          dtype=torch.uint8))
        for r in range(a.rounds):
            one = run(osh, f"one{r}", a.steps, a.width, None)
            two = run(osh, f"two{r}", a.steps, a.width, "b1,b2")
            for key, res in (("one_node", one), ("two_nodes", two)):
                best[key] = min(best.get(key, float("inf")), res["step_ms"])
            diff = max(diff, max(abs(x - y) for x, y in zip(one["losses"], two["losses"])))
            print(f"round {r + 1}: one node {one['step_ms']:.1f} ms/step, two nodes "
                  f"{two['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
    print(f"train across nodes: {a.steps} steps, width {a.width}, best of {a.rounds}")
    print(f"  both workers on one node   {best['one_node']:8.1f} ms/step")
    print(f"  one worker on each node    {best['two_nodes']:8.1f} ms/step")
    print(f"  ratio (target <= 1.15)     {best['two_nodes'] / best['one_node']:8.2f}")
    print(f"  largest loss difference    {diff:.2e} (target <= 1e-4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
