"""A load ramp through llmos serve: 1 to 32 concurrent streaming clients and back,
against a deployment that scales with load (min 1, max 4 replicas, target 4 ongoing
requests each; delays shortened so that a run of a few minutes shows them).

Each client (an asyncio task with the official AsyncOpenAI client, its retries on:
a 429 it retried and then completed is not a failure) asks for --tokens tokens,
streamed, again and again while its stage lasts. Per stage: requests/s, tokens/s,
p50/p99 time to first token, 429s seen, failures. Every 0.5 s the deployment's
replicas (desired, running) and ongoing requests are sampled from serve; --png
draws clients, replicas and tokens/s over time (matplotlib, if installed).

    python bench/serve_load.py [--stage-s 12] [--tokens 32] [--png serve_load.png] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import httpx  # noqa: E402
import openai  # noqa: E402

import userland  # noqa: E402
from hf_models import make_hf_dir  # noqa: E402
from kernelboot import BenchKernel  # noqa: E402
from serveboot import ServeProcess  # noqa: E402
from userland.serve import deploy  # noqa: E402

STAGES = [1, 2, 4, 8, 16, 32, 16, 8, 4, 2, 1]
MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             eos_token_id=None)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one(client: Any, tokens: int, done: list, retried: list) -> None:
    t0 = time.perf_counter()
    first = None
    try:
        raw = await client.completions.with_raw_response.create(
            model="loadtest", prompt="def add(a, b):", max_tokens=tokens, temperature=0,
            stream=True)
        retried.append(int(raw.retries_taken))
        stream = raw.parse()
        if inspect.isawaitable(stream):  # openai versions differ here
            stream = await stream
        n = 0
        async for ch in stream:
            if ch.choices and ch.choices[0].text:
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
        done.append((time.perf_counter(), first, tokens, None))
    except Exception as e:  # a failure: counted, the ramp goes on
        done.append((time.perf_counter(), first, 0, f"{type(e).__name__}: {e}"))


async def client_loop(client: Any, tokens: int, until: float, done: list,
                      retried: list) -> None:
    while time.perf_counter() < until:
        await one(client, tokens, done, retried)


async def sampler(home: Path, samples: list, stop: asyncio.Event, clients: list) -> None:
    while not stop.is_set():
        try:
            live = json.loads((home / "run" / "serve.json").read_text())
            d = live["deployments"][0]
            samples.append((time.perf_counter(), clients[0], d["desired"], d["running"],
                            d["ongoing"] + d["queued"]))
        except (OSError, ValueError, IndexError, KeyError):
            pass
        await asyncio.sleep(0.5)


async def ramp(url: str, home: Path, stage_s: float, tokens: int) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=8,
                                timeout=300, http_client=httpx.AsyncClient(
                                    limits=httpx.Limits(max_connections=64)))
    samples: list = []
    stop = asyncio.Event()
    current = [0]
    sample_task = asyncio.create_task(sampler(home, samples, stop, current))
    stages = []
    t_start = time.perf_counter()
    for n in STAGES:
        current[0] = n
        done: list = []
        retried: list = []
        t0 = time.perf_counter()
        until = t0 + stage_s
        await asyncio.gather(*(client_loop(client, tokens, until, done, retried)
                               for _ in range(n)))
        elapsed = time.perf_counter() - t0
        ok = [d for d in done if d[3] is None]
        ttfts = [d[1] for d in ok if d[1] is not None]
        st = {"clients": n, "seconds": elapsed, "requests": len(ok),
              "requests_per_s": len(ok) / elapsed, "tokens_per_s": sum(d[2] for d in ok) / elapsed,
              "ttft_p50_ms": (pct(ttfts, 50) or 0) * 1000,
              "ttft_p99_ms": (pct(ttfts, 99) or 0) * 1000,
              "retries_after_429": sum(retried), "failed": len(done) - len(ok),
              "errors": sorted({d[3] for d in done if d[3]})[:3]}
        stages.append(st)
        log(f"{n:>3} clients: {st['requests_per_s']:6.1f} req/s {st['tokens_per_s']:7.0f} "
            f"tok/s  ttft p50 {st['ttft_p50_ms']:6.0f} ms p99 {st['ttft_p99_ms']:6.0f} ms  "
            f"retries {st['retries_after_429']}  failed {st['failed']}  replicas "
            f"{samples[-1][3] if samples else '?'}")
    stop.set()
    await sample_task
    await client.close()
    timeline = [{"t": round(t - t_start, 2), "clients": c, "desired": d, "running": r,
                 "ongoing": o} for t, c, d, r, o in samples]
    return {"stages": stages, "timeline": timeline,
            "failed": sum(s["failed"] for s in stages),
            "max_replicas": max((s["running"] for s in timeline), default=0)}


def plot(result: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--png: matplotlib is not installed (pip install matplotlib); no plot")
        return False
    tl = result["timeline"]
    t = [s["t"] for s in tl]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.step(t, [s["clients"] for s in tl], where="post", label="clients")
    ax.step(t, [s["ongoing"] for s in tl], where="post", label="ongoing + queued", alpha=.6)
    ax.set_xlabel("seconds")
    ax.set_ylabel("clients, requests")
    ax2 = ax.twinx()
    ax2.step(t, [s["running"] for s in tl], where="post", color="black", lw=2,
             label="replicas running")
    ax2.step(t, [s["desired"] for s in tl], where="post", color="red", ls="--",
             label="replicas desired")
    ax2.set_ylabel("replicas")
    ax2.set_ylim(0, max(5, result["max_replicas"] + 1))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title("llmos serve: a load ramp, 1 to 32 streaming clients and back")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage-s", type=float, default=12.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--png", default="")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llmos-serveload-") as tmp:
        d = make_hf_dir(Path(tmp) / "m", "llama", seed=0, **MODEL)
        b = BenchKernel({"sim_gpus": "1x16GiB"})
        try:
            with userland.connect(b.root, uid=0) as osh:
                osh.import_model(d, "/models/m")
                deploy(osh, "/models/m", "loadtest", min=1, max=4, target_ongoing=4,
                       max_ongoing=8, max_queued=16, upscale_delay_s=3,
                       downscale_delay_s=10, look_back_s=3)
            with ServeProcess(b.root, ("--uid", "0")) as s:
                s.wait_running("loadtest")
                result = asyncio.run(ramp(s.url, b.root, a.stage_s, a.tokens))
        finally:
            b.stop()
    if a.png and plot(result, a.png):
        log(f"wrote {a.png}")
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"failed requests: {result['failed']} (target 0); replicas at most "
              f"{result['max_replicas']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
