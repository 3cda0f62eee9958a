"""The compression commands: eval, quantize, prune (docs/compression.md): each
starts a spawn_compress job and follows it as train follows a training job.
Distillation is train's --teacher (_cmd_models.py).
"""
from __future__ import annotations

import argparse
from typing import Any

from . import _views
from ._cmd_models import run_job
from ._command import Session, arg, command


def run_compress(s: Session, a: argparse.Namespace, config: dict[str, Any]) -> Any:
    """spawn_compress(config), then follow the job as train does; its final report
    (with a new model's manifest), or its pid with -d."""
    pid, record = run_job(s, a, lambda: s.osh.spawn_compress(config),
                          lambda pid: f"{config['task']} job {pid}: {config['model']}"
                          + (f" -> {config['out']}" if config.get("out") else ""))
    if record is None:
        return pid if s.json else None
    info = dict(record.get("info") or {})
    if info.get("state") == "done" and info.get("checkpoint"):
        info["manifest"] = s.osh.read_manifest(info["checkpoint"])
    if s.json:
        return {**record, "info": info}
    if info.get("state") != "done":
        s.note(_views.wait_line(record))
    elif info.get("manifest"):
        s.line(f"{info['checkpoint']}: {_views.compression_summary(info['manifest'])}")
        for line in _views.manifest_lines(info["manifest"]):
            s.line(line)
    else:
        s.line(_views.eval_line(info))
    return None


def _compress_args(measure: bool = True) -> list[Any]:
    """The arguments every compression command shares (measure: and that writes
    a model)."""
    return [
        *([arg("--force", action="store_true",
               help="replace DST once the new model is complete")] if measure else []),
        arg("--split", type=float, metavar="F",
            help="the held-out fraction: the dataset's last F (default 0.05)"),
        arg("--eval-tokens", type=int, metavar="N",
            help="held-out tokens measured at most (default 16384)"),
        arg("--decode-tokens", type=int, metavar="N",
            help="tokens each decode-speed run makes (default 64)"),
        *([arg("--no-measure", action="store_true",
               help="write the model without measuring it (the manifest says so)")]
          if measure else []),
        arg("-d", "--detach", action="store_true",
            help="print the job's pid and return (jobs shows it, wait reaps it)")]


def _compress_config(s: Session, a: argparse.Namespace, task: str, model: str,
                     **keys: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"task": task, "model": s.resolve(model)}
    for key, value in (("data", getattr(a, "data", None)), ("out", getattr(a, "out", None))):
        if value:
            config[key] = s.resolve(value)
    for key in ("split", "eval_tokens", "decode_tokens"):
        if getattr(a, key, None) is not None:
            config[key] = getattr(a, key)
    if getattr(a, "no_measure", False):
        config["measure"] = False
    if getattr(a, "force", False):
        config["force"] = True
    config.update({k: v for k, v in keys.items() if v is not None})
    return config


COMPRESS_SYSCALLS = ("spawn_compress", "wait", "ps", "kill", "open_tensor", "read_tensor",
                     "close_tensor")
COMPRESS_JSON = ("the job's wait record {pid, status, reason, info}; info of a new model "
                 "has its manifest (compression.json); with -d, its pid")


@command("eval", "compression", "measure a model: held-out perplexity, decode tokens/s at batch "
         "1 and 8, and its size (a job: jobs shows it)",
         arg("model", metavar="MODEL", complete="tensor"),
         arg("--data", required=True, metavar="PATH", complete="tensor",
             help="a 1-D dataset of text (uint8) or token ids: its last --split is held out"),
         *_compress_args(measure=False),
         syscalls=COMPRESS_SYSCALLS,
         json_keys="the job's wait record {pid, status, reason, info: {perplexity, "
                   "eval_tokens, tokens_per_s_b1, tokens_per_s_b8, bytes, ...}}; with -d, "
                   "its pid",
         details="The same yardstick quantize and prune put in a manifest; decode runs "
                 "through the executor's batching engine, on this machine's CPUs.")
def eval_model(s: Session, a: argparse.Namespace) -> Any:
    return run_compress(s, a, _compress_config(s, a, "eval", a.model))


@command("quantize", "compression", "write an int8 copy of a model, with a manifest of what it "
         "gained and cost, measured here",
         arg("model", metavar="SRC", complete="tensor"),
         arg("out", metavar="DST", complete="tensor", help="the new model's directory"),
         arg("--method", default="int8", metavar="METHOD",
             help="int8 (int4 is refused: no CPU kernel here)"),
         arg("--data", metavar="PATH", complete="tensor",
             help="a dataset whose held-out slice measures perplexity before and after"),
         *_compress_args(),
         syscalls=COMPRESS_SYSCALLS, json_keys=COMPRESS_JSON,
         details="Weights of every linear layer become int8 with a float32 scale per "
                 "output row; infer runs them with torch.ao's dynamic int8 kernels. DST is "
                 "written as DST.compressing and renamed when complete. export writes it "
                 "back as float32 weights (docs/compression.md).")
def quantize(s: Session, a: argparse.Namespace) -> Any:
    return run_compress(s, a, _compress_config(s, a, "quantize", a.model, method=a.method))


def fractions(text: str) -> dict[str, float]:
    """--structured heads=0.25,mlp=0.25 as {heads: 0.25, mlp: 0.25}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("heads", "mlp") or not value:
            raise argparse.ArgumentTypeError(f"{part!r}: give heads=F and/or mlp=F")
        if key.strip() in out:
            raise argparse.ArgumentTypeError(f"{key.strip()} given twice")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    return out


@command("prune", "compression", "write a pruned copy of a model (unstructured magnitude, or "
         "whole heads and MLP neurons), optionally fine-tuned to recover",
         arg("model", metavar="SRC", complete="tensor"),
         arg("out", metavar="DST", complete="tensor", help="the new model's directory"),
         arg("--sparsity", type=float, metavar="F",
             help="zero the fraction F of all linear weights with the smallest magnitude"),
         arg("--structured", type=fractions, metavar="heads=F,mlp=F",
             help="remove that fraction of each layer's attention heads and MLP neurons, "
                  "least important first; the config and matrices shrink"),
         arg("--finetune-steps", type=int, metavar="N", help="recovery fine-tune steps"),
         arg("--lr", type=float, metavar="X", help="the fine-tune's learning rate (1e-4)"),
         arg("--data", metavar="PATH", complete="tensor",
             help="the fine-tune's data and the held-out perplexity's (its last --split)"),
         *_compress_args(),
         syscalls=COMPRESS_SYSCALLS, json_keys=COMPRESS_JSON,
         details="Unstructured zeros keep every matrix its shape: they gain no speed on "
                 "dense kernels, and the manifest says so. Structured pruning needs a "
                 "Hugging Face model (Llama-style, or GPT-2's MLP).")
def prune(s: Session, a: argparse.Namespace) -> Any:
    keys: dict[str, Any] = {"sparsity": a.sparsity, "finetune_steps": a.finetune_steps,
                            "lr": a.lr, **(a.structured or {})}
    return run_compress(s, a, _compress_config(s, a, "prune", a.model, **keys))
