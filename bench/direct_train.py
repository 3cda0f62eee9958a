"""Training without llmos: the job's loop (drivers/executor/trainer.py) in
torch.multiprocessing gloo workers on a file's bytes, the baseline that
bench/executor_bench.py measures spawn_train against.

    python bench/direct_train.py FILE [key=value ...]     e.g. steps=300 workers=2

It must never make syscalls or need a running llmos.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from drivers.executor import normalize  # noqa: E402
from syscalls import format_size  # noqa: E402
from drivers.executor.trainer import (DIST_TIMEOUT, Progress, Trainer, free_port,  # noqa: E402
                                      set_threads, shard_bounds, train_loop)


class DirectHooks:
    """Direct mode: rank 0 keeps the loss curve; no reports, no checkpoints, no stop."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.curve: list[tuple[int, float]] = []

    def stop_requested(self) -> bool:
        return False

    def log(self, trainer: Trainer, progress: Progress) -> None:
        if trainer.rank == 0:
            self.curve.append((progress.step, progress.loss))
            if self.verbose:
                print(f"step {progress.step}/{progress.steps} loss {progress.loss:.4f} "
                      f"{progress.step_ms:.0f} ms/step {progress.elapsed_s:.1f} s", flush=True)

    def checkpoint(self, trainer: Trainer, progress: Progress) -> None:
        pass


def _direct_worker(rank: int, cfg: dict, data: np.ndarray, port: int, results: Any,
                   verbose: bool) -> None:
    """One torch.multiprocessing worker of run_direct: the shard, the loop, and on
    rank 0 the result put on results."""
    world = cfg["workers"]
    set_threads(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=DIST_TIMEOUT)
    try:
        a, b = shard_bounds(len(data), rank, world)
        shard = torch.from_numpy(np.ascontiguousarray(data[a:b], dtype=np.uint8))
        trainer = Trainer(cfg, shard, rank, world, torch.device("cpu"))
        hooks = DirectHooks(verbose)
        t0 = time.perf_counter()
        result = train_loop(trainer, hooks, cfg["steps"])
        if rank == 0:
            timed = result.durations[3:] or result.durations
            results.put({"step_ms": 1e3 * sum(timed) / len(timed), "loss0": result.loss0,
                         "loss": result.loss, "steps": len(result.durations),
                         "seconds": time.perf_counter() - t0, "workers": world,
                         "tokens_per_s": trainer.batch_tokens * len(timed) / sum(timed),
                         "curve": hooks.curve})
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the process during interpreter finalization ("terminate
    # called without an active exception", seen once in CI): the result is sent, so
    # leave without finalizing (a SimpleQueue's put has written the result already)
    os._exit(0)


def direct_config(config: dict, steps: int) -> dict:
    """A normalized config for direct mode: name and dataset are not needed there."""
    return normalize({"name": "direct", "dataset": "/direct", **config, "steps": steps})


def run_direct(config: dict, data: np.ndarray, steps: int, verbose: bool = False) -> dict:
    """Train on data (uint8 bytes) for steps with config["workers"] gloo processes
    (torch.multiprocessing, no llmos): the same loop as a job's workers.

    Returns {"step_ms": mean step time without the first 3 steps, "loss0", "loss"
    (the last log_every steps' mean), "steps", "seconds", "workers", "tokens_per_s",
    "curve": [(step, loss), ...]}."""
    import torch.multiprocessing as mp

    cfg = direct_config(config, steps)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    need = cfg["workers"] * (cfg["block_size"] + 1)
    if len(data) < need:
        raise ValueError(f"{format_size(len(data))} of data: {cfg['workers']} worker(s) "
                         f"of block_size {cfg['block_size']} need at least {format_size(need)}")
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_direct_worker, args=(cfg, data, free_port(), results, verbose),
             nprocs=cfg["workers"], join=True)
    return results.get()


def _value(text: str) -> Any:
    """A key=value's value: JSON (numbers, true/false) or else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/direct_train.py",
        description="Train on FILE's bytes without llmos (the job's loop, gloo workers).")
    parser.add_argument("file", help="raw bytes to train on")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="training config, e.g. steps=300 workers=2 lr=2e-3")
    args = parser.parse_args(argv)
    config = {}
    for item in args.settings:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: settings are key=value")
        config[key] = _value(text)
    data = np.fromfile(args.file, dtype=np.uint8)
    steps = int(config.pop("steps", 300))
    try:
        result = run_direct(config, data, steps, verbose=True)
    except ValueError as e:
        parser.error(str(e))
    result.pop("curve")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
