"""Hugging Face model benchmark: a Llama-config model of about 12M parameters
(random init, the tests' BPE tokenizer) served by infer, against transformers
called in this process, all in one run:

  batching   8 client processes each asking for 128 tokens at once: aggregate
             tokens/s through infer, against the same 8 prompts generated one
             after another with model.generate (target >= 5x) and against one
             batched model.generate of the 8 prompts, left-padded (>= 0.9x)
  latency    one request alone: infer's time against model.generate for the same
             tokens (target <= 1.1x)
  join       a request joining a running batch of 7 streams: time from the call
             to its first token (median of 5 joins), in decode steps of that
             batch (target <= 2)
  load       the first infer of a model (load, tokenizer, one token) against
             from_pretrained of the exported directory, the tokenizer and one
             generated token in this process (target <= 1.2x)

Greedy everywhere, no eos (every request makes all its tokens). The executor
runs with infer_threads = this process's torch threads, so both sides use the
same cores.

    python bench/hf_bench.py [--only batching,latency,join,load] [--tokens 128] [--json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import userland  # noqa: E402
from hf_models import make_hf_dir  # noqa: E402

MODEL = dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
             eos_token_id=None)
PROMPTS = ["def add(a, b):", "class Point:", "for i in range(10):", "import os\n",
           "def norm(self):\n    return", "print(", "x = [", "class Node:\n    def __init__(self"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_dir(where: Path) -> Path:
    d = make_hf_dir(where / "llama12m", "llama", seed=0, **MODEL)
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(d)
    n = sum(p.numel() for p in _load(d)[0].parameters())
    log(f"model: {cfg.architectures[0]}, {n / 1e6:.1f}M parameters")
    return d


def _load(d: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(d, local_files_only=True))


def _generate(model: Any, ids: torch.Tensor, n: int, **kw: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=0, **kw)


def client(home: str, prompt: str, tokens: int, barrier: Any, out: Any) -> None:
    torch.set_num_threads(1)
    with userland.connect(home) as osh:
        osh.infer("/models/llama", "warm", 2, temperature=0)
        barrier.wait()
        t0 = time.perf_counter()
        r = osh.infer("/models/llama", prompt, tokens, temperature=0)
        out.put((r["tokens"], t0, time.perf_counter(), r["text"]))


def batching(b: Any, d: Path, tokens: int) -> dict[str, Any]:
    model, tok = _load(d)
    t0 = time.perf_counter()
    want = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        want.append(tok.decode(_generate(model, ids, tokens)[0, ids.shape[1]:],
                               skip_special_tokens=True))  # as infer's text
    sequential = len(PROMPTS) * tokens / (time.perf_counter() - t0)
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    _generate(model, batch.input_ids, tokens, attention_mask=batch.attention_mask)
    batched = len(PROMPTS) * tokens / (time.perf_counter() - t0)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(PROMPTS)), ctx.Queue()
    procs = [ctx.Process(target=client, args=(str(b.root), p, tokens, barrier, out))
             for p in PROMPTS]
    for p in procs:
        p.start()
    got = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    total = sum(n for n, _, _, _ in got)
    llmos = total / (max(e for _, _, e, _ in got) - min(s for _, s, _, _ in got))
    same = sorted(t for *_, t in got) == sorted(want)
    with b.connect() as osh:
        mean_batch = osh.models()["engine"]["mean_batch"]
    log(f"batching: llmos {llmos:.0f} tokens/s (mean batch {mean_batch:.2f}), generate one "
        f"by one {sequential:.0f}, generate batched {batched:.0f}; same text: {same}")
    return {"llmos_tokens_per_s": llmos, "sequential_tokens_per_s": sequential,
            "batched_generate_tokens_per_s": batched, "ratio": llmos / sequential,
            "ratio_vs_batched_generate": llmos / batched, "same_text_as_generate": same,
            "target": ">= 5 (and >= 0.9 vs batched generate)"}


def latency(b: Any, d: Path, tokens: int, rounds: int) -> dict[str, Any]:
    model, tok = _load(d)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    direct, through = [], []
    with b.connect() as osh:
        osh.infer("/models/llama", PROMPTS[0], 2, temperature=0)
        for _ in range(rounds):  # alternate, so drift hits both alike
            t0 = time.perf_counter()
            _generate(model, ids, tokens)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            osh.infer("/models/llama", PROMPTS[0], tokens, temperature=0)
            through.append(time.perf_counter() - t0)
    d_, t = statistics.median(direct), statistics.median(through)
    log(f"latency: {tokens} tokens, generate {d_ * 1000:.0f} ms, infer {t * 1000:.0f} ms")
    return {"generate_s": d_, "llmos_s": t, "ratio": t / d_, "tokens": tokens,
            "target": "<= 1.1"}


def _stream(home: str, prompt: str, tokens: int, out: Any) -> None:
    with userland.connect(home) as osh:
        times = [time.perf_counter()]
        for _ in osh.infer("/models/llama", prompt, tokens, temperature=0, stream=True):
            times.append(time.perf_counter())
        out.put(times)


def join(b: Any, tokens: int) -> dict[str, Any]:
    import threading
    import queue
    q: queue.Queue = queue.Queue()
    runners = [threading.Thread(target=_stream, args=(str(b.root), p, tokens, q))
               for p in PROMPTS[:7]]
    for t in runners:
        t.start()
    time.sleep(1.5)  # the seven are decoding
    ttfts = []
    with b.connect() as osh:  # connected before: a call's time, not a connection's
        for _ in range(5):  # five joins while they run; the median
            t0 = time.perf_counter()
            it = osh.infer("/models/llama", PROMPTS[7], 4, temperature=0, stream=True)
            next(it)
            ttfts.append(time.perf_counter() - t0)
            list(it)
            time.sleep(0.2)
    ttft = statistics.median(ttfts)
    for t in runners:
        t.join()
    gaps = []
    for _ in runners:
        times = q.get()
        gaps += [b_ - a for a, b_ in zip(times[1:], times[2:])]
    step = statistics.median(gaps)
    log(f"join: first token after {ttft * 1000:.1f} ms; a decode step of the batch "
        f"{step * 1000:.1f} ms")
    return {"ttft_s": ttft, "step_s": step, "ratio": ttft / step, "target": "<= 2"}


def load(b: Any, d: Path, rounds: int) -> dict[str, Any]:
    ours, theirs = [], []
    with b.connect() as osh, tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            osh.import_model(d, f"/models/load{r}")
            out = Path(tmp) / f"x{r}"
            osh.export_model(f"/models/load{r}", out)
            t0 = time.perf_counter()
            model, tok = _load(out)
            _generate(model, tok("def", return_tensors="pt").input_ids, 1)
            theirs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            osh.infer(f"/models/load{r}", "def", 1, temperature=0)
            ours.append(time.perf_counter() - t0)
    o, t = statistics.median(ours), statistics.median(theirs)
    log(f"load: infer's first call {o * 1000:.0f} ms, from_pretrained + tokenizer + one "
        f"token {t * 1000:.0f} ms")
    return {"llmos_s": o, "from_pretrained_s": t, "ratio": o / t, "target": "<= 1.2"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="batching,latency,join,load")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from conftest import Booted
    parts, res = args.only.split(","), {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp, Booted({"infer_threads": threads}) as b:
        d = model_dir(Path(tmp))
        with b.connect() as osh:
            osh.import_model(d, "/models/llama")
        if "batching" in parts:
            res["batching"] = batching(b, d, args.tokens)
        if "latency" in parts:
            res["latency"] = latency(b, d, args.tokens, args.rounds)
        if "join" in parts:
            res["join"] = join(b, args.tokens)
        if "load" in parts:
            res["load"] = load(b, d, args.rounds)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"threads {threads} (this process and the executor)")
        for name, r in res.items():
            print(f"{name:9s} ratio {r['ratio']:.2f}x (target {r['target']})  " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in r.items() if k not in ("ratio", "target")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
