"""Executor benchmark: batching, single-request latency and training step time.

Every figure is a ratio against a baseline measured in the same run:
  batching   aggregate tokens/s of 8 client processes generating at once, with
             continuous batching (infer_max_batch 16) against the same executor with
             batching off (infer_max_batch 1)                       target >= 3x
  latency    one infer through llmos against generate_direct, the same prefill,
             decode and sampling called in this process, for a model whose
             forward takes >= 10 ms                                 target <= 1.1x
  training   spawn_train's mean step time against the same DDP loop launched
             directly with torch.multiprocessing (bench/direct_train.py)
                                                                    target <= 1.05x

    python bench/executor_bench.py [--only batching,latency,training] [--json]

Each part boots its own kernel on a temporary home. docs/performance.md has results.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import torch  # noqa: E402

import userland  # noqa: E402
from drivers.executor import GPT, GPTConfig, generate_direct  # noqa: E402

DEMO = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128)
BIG = GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=128)   # forward >= 10 ms


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_model(osh: Any, path: str, cfg: GPTConfig, seed: int = 0) -> GPT:
    from test_executor import write_model as write
    return write(osh, path, cfg, seed=seed)


def client(home: str, model: str, tokens: int, requests: int, i: int, barrier: Any,
           out: Any) -> None:
    torch.set_num_threads(1)
    with userland.connect(home) as osh:
        osh.infer(model, "warm", 2, seed=i)
        barrier.wait()
        t0 = time.perf_counter()
        n = sum(osh.infer(model, f"def f{i}(x):", tokens, seed=i * 100 + r)["tokens"]
                for r in range(requests))
        out.put((n, t0, time.perf_counter()))


def batching(tokens: int, requests: int, clients: int = 8) -> dict[str, Any]:
    from conftest import Booted
    rates = {}
    for max_batch in (16, 1):
        with Booted({"infer_max_batch": max_batch}) as b:
            with b.connect() as osh:
                write_model(osh, "/models/demo", DEMO)
            ctx = mp.get_context("spawn")
            barrier, out = ctx.Barrier(clients), ctx.Queue()
            procs = [ctx.Process(target=client, args=(str(b.root), "/models/demo", tokens,
                                                      requests, i, barrier, out))
                     for i in range(clients)]
            for p in procs:
                p.start()
            got = [out.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
            total = sum(n for n, _, _ in got)
            wall = max(e for _, _, e in got) - min(s for _, s, _ in got)
            rates[max_batch] = total / wall
            with b.connect() as osh:
                engine = osh.models()["engine"]
            log(f"max_batch {max_batch}: {total} tokens in {wall:.2f}s = "
                f"{rates[max_batch]:.0f} tokens/s, mean batch {engine['mean_batch']:.2f}")
    return {"tokens_per_s_batched": rates[16], "tokens_per_s_unbatched": rates[1],
            "ratio": rates[16] / rates[1], "clients": clients, "target": ">= 3"}


def latency(tokens: int, rounds: int) -> dict[str, Any]:
    from conftest import Booted
    threads = max(1, (os.cpu_count() or 2) // 2)  # what the executor uses (infer_threads 0)
    torch.set_num_threads(threads)
    with Booted() as b:
        with b.connect() as osh:
            model = write_model(osh, "/models/big", BIG).eval()
            prompt = "def main():"
            with torch.inference_mode():
                cache = model.new_cache(1)
                model.prefill(torch.tensor(list(prompt.encode())), cache, 0)
                t0 = time.perf_counter()
                for i in range(10):
                    model.decode(torch.tensor([1]), torch.tensor([0]),
                                 torch.tensor([len(prompt) + i]), cache)
                forward_ms = (time.perf_counter() - t0) / 10 * 1000
            osh.infer("/models/big", prompt, 4, temperature=0)  # load and warm the cache
            direct, through = [], []
            for _ in range(rounds):  # alternate, so drift hits both alike
                t0 = time.perf_counter()
                with torch.inference_mode():
                    ref = generate_direct(model, list(prompt.encode()), tokens, 0.0)
                direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = osh.infer("/models/big", prompt, tokens, temperature=0)
                through.append(time.perf_counter() - t0)
                if r["text"] != bytes(ref).decode("utf-8", errors="replace"):
                    raise SystemExit("llmos and the direct loop generated different text")
    d, t = statistics.median(direct), statistics.median(through)
    log(f"latency: forward {forward_ms:.1f} ms; {tokens} tokens direct {d * 1000:.0f} ms, "
        f"through llmos {t * 1000:.0f} ms")
    return {"forward_ms": forward_ms, "direct_s": d, "llmos_s": t, "ratio": t / d,
            "tokens": tokens, "threads": threads, "target": "<= 1.1"}


def training(steps: int, rounds: int) -> dict[str, Any]:
    """The demo config (2 workers) on the standard library's sources, alternating a
    direct run and a spawn_train job; best of rounds each."""
    import numpy as np

    from conftest import Booted
    from direct_train import run_direct
    from userland.corpus import read_corpus
    data = np.frombuffer(read_corpus(None, 4 << 20), dtype=np.uint8)
    direct, through = [], []
    with Booted() as b:
        with b.connect() as osh:
            osh.mkdir("/datasets")
            osh.save_tensor("/datasets/corpus", data)
            for r in range(rounds):
                direct.append(run_direct({"workers": 2}, data, steps)["step_ms"])
                job = osh.spawn_train({"name": f"bench{r}", "dataset": "/datasets/corpus",
                                       "steps": steps, "checkpoint_every": 0})
                end = osh.wait(job)
                if end["status"] != 0:
                    raise SystemExit(f"the training job failed: {end}")
                through.append(end["info"]["step_ms"])
                log(f"training round {r}: direct {direct[-1]:.0f} ms/step, "
                    f"spawn_train {through[-1]:.0f} ms/step")
    d, t = min(direct), min(through)
    return {"direct_step_ms": d, "llmos_step_ms": t, "ratio": t / d, "steps": steps,
            "target": "<= 1.05"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="batching,latency,training")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per batching request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--latency-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="training steps per run")
    ap.add_argument("--train-rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    parts = args.only.split(",")
    res: dict[str, Any] = {}
    if "batching" in parts:
        res["batching"] = batching(args.tokens, args.requests)
    if "latency" in parts:
        res["latency"] = latency(args.latency_tokens, args.rounds)
    if "training" in parts:
        res["training"] = training(args.steps, args.train_rounds)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for name, r in res.items():
            print(f"{name:9s} ratio {r['ratio']:.2f}x (target {r['target']})  " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in r.items() if k not in ("ratio", "target")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
