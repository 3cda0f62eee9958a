"""Compression benchmark (docs/compression.md, docs/performance.md): a Llama-config
model of about 10M parameters, trained here for a few minutes on this Python's
standard library sources, then compressed by llmos's own jobs, all in one run:

  int8        quantize: weight bytes of the quantized layers and of the whole
              model, held-out perplexity and decode tokens/s at batch 1 (targets:
              >= 3.5x, >= 2.5x smaller; perplexity within +2%; >= 1.3x tokens/s,
              or the measured ratio with the profile below)
  structured  prune heads=0.25,mlp=0.25 with a recovery fine-tune (targets: >= 1.2x
              tokens/s, perplexity within +10%)
  distill     a student of <= 1/4 the teacher's parameters trained by distillation
              against the same student trained from scratch for the same steps
              (target: lower held-out perplexity, <= 1.25x the teacher's)

Every figure comes from the manifests and eval jobs (the held-out slice is the
corpus's last 5%, which no model trains on). The profile says where a decode
step's time goes, float32 against int8, at batch 1.

    python bench/compress_bench.py [--teacher-steps 600] [--steps 200] [--finetune 150] [--json]
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
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kernelboot import BenchKernel  # noqa: E402

TEACHER = {"n_layer": 4, "n_head": 8, "n_embd": 384, "ffn": 1024}
STUDENT = {"n_layer": 2, "n_head": 4, "n_embd": 192, "ffn": 512}
TRAIN = {"block_size": 128, "batch_size": 8, "workers": 1, "lr": 2e-3, "warmup": 20,
         "log_every": 20, "checkpoint_every": 0}
MEASURE = {"data": "/datasets/py", "split": 0.05, "eval_tokens": 16384, "decode_tokens": 64}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(osh: Any, config: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    record = osh.wait(osh.spawn_train(config))
    if record["status"] != 0:
        raise SystemExit(f"training {config['name']} failed: {record}")
    info = dict(record["info"])
    info["wall_s"] = time.monotonic() - t0
    log(f"  {config['name']}: loss {info['loss0']:.3f} -> {info['loss']:.3f} in "
        f"{info['wall_s']:.0f}s")
    return info


def params(osh: Any, path: str) -> int:
    where = path
    try:
        where = f"{path}/{osh.load_array(f'{path}/latest').tobytes().decode()}"
    except Exception:
        pass
    return sum(t.numel() for t in osh.load_tensors(f"{where}/model.safetensors").values())


def profile(osh: Any) -> dict[str, Any]:
    """Where a batch-1 decode step's time goes, float32 and int8: torch's profiler
    over 32 steps of the Engine in this process: the top operators by self CPU
    time, and how much of the wall time the operators account for at all (the
    rest is Python: transformers' modules, the cache, the engine)."""
    from torch.profiler import ProfilerActivity, profile as prof

    from drivers.executor import ModelCache, decode_rate
    cache = ModelCache(lambda uid: osh, lambda: "cpu", 1 << 40, 1)
    out = {}
    for name in ("/models/teacher", "/models/teacher-int8"):
        m = cache.load(osh.uid, name)
        decode_rate(m.model, [1, 2, 3], 1, 8)
        plain = decode_rate(m.model, [1, 2, 3], 1, 32)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            t0 = time.perf_counter()
            decode_rate(m.model, [1, 2, 3], 1, 32)
            wall_us = (time.perf_counter() - t0) * 1e6
        events = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) or 1
        out[name] = {"tokens_per_s": plain, "ops_share_of_wall": total / wall_us,
                     "ms_per_token_ops": total / 1e3 / 32,
                     "top": [(e.key, round(100 * e.self_cpu_time_total / total, 1))
                             for e in events[:5]]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=600, help="the teacher's steps")
    ap.add_argument("--steps", type=int, default=200, help="each student's steps")
    ap.add_argument("--finetune", type=int, default=150, help="recovery fine-tune steps")
    ap.add_argument("--corpus", type=int, default=3 << 20, help="corpus bytes")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from userland.corpus import read_corpus
    threads = torch.get_num_threads()
    results: dict[str, Any] = {"threads": threads}
    with BenchKernel({"infer_threads": threads}) as k:
        import userland
        with userland.connect(k.root, uid=0) as root:
            root.mkdir("/models", perm=0o1777)
            root.mkdir("/datasets", perm=0o1777)
        with userland.connect(k.root) as osh:
            data = read_corpus(None, a.corpus)
            cut = len(data) - int(MEASURE["split"] * len(data))
            as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa
            osh.save_tensor("/datasets/py", as_tensor(data))
            osh.save_tensor("/datasets/py-train", as_tensor(data[:cut]))
            log(f"corpus: {len(data):,} bytes of Python, the last {len(data) - cut:,} held out")
            osh.train_tokenizer("/datasets/py-train", "/tok", vocab=4096)
            common = {"arch": "llama", "tokenizer": "/tok", "dataset": "/datasets/py-train",
                      **TRAIN, "steps": a.steps}
            log("training the teacher")
            results["teacher_train"] = train(osh, {"name": "teacher", **common, **TEACHER,
                                                   "steps": a.teacher_steps})
            results["teacher_params"] = params(osh, "/models/teacher")

            log("int8")
            m = osh.quantize("/models/teacher", "/models/teacher-int8", **MEASURE)["manifest"]
            results["int8"] = {k: m[k] for k in ("bytes", "layer_bytes", "perplexity",
                                                 "tokens_per_s", "speed", "time_s")}
            log("structured pruning")
            m = osh.prune("/models/teacher", "/models/teacher-slim", heads=0.25, mlp=0.25,
                          finetune_steps=a.finetune, lr=5e-4, **MEASURE)["manifest"]
            results["structured"] = {k: m.get(k) for k in (
                "bytes", "perplexity", "tokens_per_s", "speed", "shape", "finetune",
                "perplexity_before_finetune", "time_s")}
            log("distillation and the same student from scratch")
            student = {**common, **STUDENT}
            results["distilled_train"] = train(osh, {"name": "distilled",
                                                     "teacher": "/models/teacher", **student})
            results["scratch_train"] = train(osh, {"name": "scratch", **student})
            # the same student from scratch for as long as the distillation took
            ratio = results["distilled_train"]["wall_s"] / results["scratch_train"]["wall_s"]
            results["scratch_time_train"] = train(osh, {
                "name": "scratch-time", **student, "steps": int(a.steps * ratio)})
            results["student_params"] = params(osh, "/models/distilled")
            ev = {k: v for k, v in MEASURE.items() if k != "data"}
            for name in ("teacher", "distilled", "scratch", "scratch-time"):
                results[f"{name}_eval"] = osh.evaluate(f"/models/{name}", MEASURE["data"], **ev)
            results["profile"] = profile(osh)
    report(results)
    if a.json:
        print(json.dumps(results, indent=1))
    return 0


def report(r: dict[str, Any]) -> None:
    q, s = r["int8"], r["structured"]
    t, d, sc = r["teacher_eval"], r["distilled_eval"], r["scratch_eval"]
    lines = [
        f"teacher: {r['teacher_params']:,} parameters, {r['teacher_train']['wall_s']:.0f}s "
        f"of training, held-out perplexity {t['perplexity']:.3f} "
        f"({r['threads']} torch threads)",
        "int8:",
        f"  quantized layers {q['layer_bytes']['ratio']:.2f}x smaller (target >= 3.5x), "
        f"whole model {q['bytes']['ratio']:.2f}x (target >= 2.5x)",
        f"  perplexity {q['perplexity']['before']:.3f} -> {q['perplexity']['after']:.3f} "
        f"({100 * (q['perplexity']['ratio'] - 1):+.2f}%, target <= +2%)",
        f"  decode batch 1 {q['tokens_per_s']['batch1']['ratio']:.2f}x, batch 8 "
        f"{q['tokens_per_s']['batch8']['ratio']:.2f}x float32 (target >= 1.3x at batch 1)",
        "structured (heads 0.25, mlp 0.25, fine-tune "
        f"{s['finetune']['steps']} steps in {s['finetune']['time_s']:.0f}s):",
        f"  shape {s['shape']}",
        f"  perplexity {s['perplexity']['before']:.3f} -> pruned "
        f"{s['perplexity_before_finetune']:.3f} -> fine-tuned {s['perplexity']['after']:.3f} "
        f"({100 * (s['perplexity']['ratio'] - 1):+.2f}%, target <= +10%)",
        f"  decode batch 1 {s['tokens_per_s']['batch1']['ratio']:.2f}x, batch 8 "
        f"{s['tokens_per_s']['batch8']['ratio']:.2f}x (target >= 1.2x); bytes "
        f"{s['bytes']['ratio']:.2f}x smaller",
        f"distillation: student {r['student_params']:,} parameters "
        f"({r['student_params'] / r['teacher_params']:.3f} of the teacher's, target <= 0.25)",
        f"  distilled perplexity {d['perplexity']:.3f} in {r['distilled_train']['wall_s']:.0f}s "
        f"vs from scratch {sc['perplexity']:.3f} in {r['scratch_train']['wall_s']:.0f}s "
        f"(target: lower)",
        f"  from scratch for the distillation's time ({r['scratch_time_train']['steps']} "
        f"steps, {r['scratch_time_train']['wall_s']:.0f}s): perplexity "
        f"{r['scratch-time_eval']['perplexity']:.3f}",
        f"  distilled / teacher perplexity {d['perplexity'] / t['perplexity']:.3f}x "
        f"(target <= 1.25x)",
        "profile of a batch-1 decode (self CPU %, top operators):"]
    for name, p in r["profile"].items():
        lines.append(f"  {name}: {p['tokens_per_s']:.0f} tok/s; operators "
                     f"{p['ms_per_token_ops']:.2f} ms a token, "
                     f"{100 * p['ops_share_of_wall']:.0f}% of the wall time (profiled); "
                     + ", ".join(f"{op} {pct}%" for op, pct in p["top"]))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
