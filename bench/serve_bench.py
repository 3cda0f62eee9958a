"""What llmos serve's HTTP front door costs, in one run: the official openai client
against `llmos serve`, and the same call through the llmos library.

  completion   a 64-token greedy completion (no eos: all 64 made): the openai client
               through serve against osh.infer, alternating, median of --rounds
               (target <= 1.1x); for a model path (serve calls infer) and for a
               deployment (serve sends it to a replica)
  ttft         streaming: time from the call to the first text, openai stream
               against osh.infer(stream=True) (target <= library + 5 ms)

The model is hf_bench's Llama (about 12M parameters, random init, the tests' BPE
tokenizer); the executor and the replica each get this process's torch threads.

    python bench/serve_bench.py [--rounds 15] [--tokens 64] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import openai  # noqa: E402
import torch  # noqa: E402

import userland  # noqa: E402

from hf_bench import PROMPTS, log, model_dir  # noqa: E402
from kernelboot import BenchKernel  # noqa: E402
from serveboot import ServeProcess  # noqa: E402
from userland.serve import deploy  # noqa: E402


def _median_pair(rounds: int, a: Any, b: Any) -> tuple[float, float]:
    xs, ys = [], []
    for _ in range(rounds):  # alternate, so drift hits both alike
        t0 = time.perf_counter()
        a()
        xs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        ys.append(time.perf_counter() - t0)
    return statistics.median(xs), statistics.median(ys)


def completion(osh: Any, client: Any, model: str, tokens: int, rounds: int) -> dict:
    def lib() -> None:
        r = osh.infer("/models/llama", PROMPTS[0], tokens, temperature=0, top_k=0)
        assert r["tokens"] == tokens

    def http() -> None:
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=tokens,
                                      temperature=0)
        assert r.usage.completion_tokens == tokens
    lib(), http()  # warm: the model loaded on both paths
    lib_s, http_s = _median_pair(rounds, lib, http)
    log(f"completion via {model}: library {lib_s * 1000:.1f} ms, openai client through "
        f"serve {http_s * 1000:.1f} ms ({http_s / lib_s:.3f}x)")
    return {"model": model, "library_s": lib_s, "serve_s": http_s, "ratio": http_s / lib_s,
            "tokens": tokens, "target": "<= 1.1"}


def ttft(osh: Any, client: Any, model: str, rounds: int) -> dict:
    def lib() -> None:
        it = osh.infer("/models/llama", PROMPTS[0], 64, temperature=0, stream=True)
        next(it)
        it.close()

    def http() -> None:
        s = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=64,
                                      temperature=0, stream=True)
        for ch in s:
            if ch.choices and ch.choices[0].text:
                break
        s.close()
    lib(), http()
    lib_s, http_s = _median_pair(rounds, lib, http)
    log(f"time to first token via {model}: library {lib_s * 1000:.1f} ms, openai stream "
        f"{http_s * 1000:.1f} ms (+{(http_s - lib_s) * 1000:.1f} ms)")
    return {"model": model, "library_s": lib_s, "serve_s": http_s,
            "extra_ms": (http_s - lib_s) * 1000, "target": "<= +5 ms"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    out: dict[str, Any] = {"torch_threads": threads}
    with tempfile.TemporaryDirectory(prefix="llmos-servebench-") as tmp:
        d = model_dir(Path(tmp))
        b = BenchKernel({"infer_threads": threads})
        try:
            with userland.connect(b.root, uid=0) as osh:
                osh.import_model(d, "/models/llama")
                deploy(osh, "/models/llama", "llama", min=1, max=1, gpu_mem=256 << 20)
            with ServeProcess(b.root, ("--uid", "0", "--replica-threads", str(threads))) as s:
                client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
                s.wait_running("llama")
                with userland.connect(b.root, uid=0) as osh:
                    out["completion"] = [completion(osh, client, m, a.tokens, a.rounds)
                                         for m in ("/models/llama", "llama")]
                    out["ttft"] = [ttft(osh, client, m, a.rounds)
                                   for m in ("/models/llama", "llama")]
                client.close()
        finally:
            b.stop()
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out["completion"]:
            print(f"completion {r['model']:<14} {r['ratio']:.3f}x the library "
                  f"(target {r['target']})")
        for r in out["ttft"]:
            print(f"ttft       {r['model']:<14} {r['extra_ms']:+.1f} ms vs the library "
                  f"(target {r['target']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
