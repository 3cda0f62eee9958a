"""A compression job's configuration (spawn_compress; docs/compression.md):
checked once, with defaults filled, like a training job's (_config.py). It must
never import torch: the executor calls it on every spawn_compress.

    task      eval | quantize | prune
    model     the source: a model directory (its latest checkpoint) or a checkpoint
    out       quantize, prune: the new model's directory (EEXIST unless force)
    data      a 1-D tensorfs dataset (text, or token ids): eval's yardstick, the
              manifest's perplexity, structured pruning's calibration, the
              fine-tune's data; its last `split` is the held-out slice
"""
from __future__ import annotations

from typing import Any

from ._config import _in, _over_at_most, _path, check_keys, fill

TASKS = ("eval", "quantize", "prune")
METHODS = ("int8", "int4")
# int4 is named so that it is refused with its reason (ENOTSUP), not as unknown
INT4_WHY = ("int4 weight-only has no CPU kernel in the installed libraries: torch.ao "
            "quantizes int8 only, and torchao's Int4WeightOnlyConfig needs the mslk "
            "package, which has no CPU build")


def _fraction(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be at least 0 and under 1"


SPEC: dict[str, tuple[type, Any, Any]] = {
    "task": (str, None, lambda v: None if v in TASKS else f"must be one of {', '.join(TASKS)}"),
    "model": (str, None, _path),
    "out": (str, None, _path),
    "data": (str, None, _path),
    "split": (float, 0.05, _over_at_most(0.0, 0.5)),
    "force": (bool, None, None),  # absent: False
    "method": (str, "int8", lambda v: None if v in METHODS else
               f"must be one of {', '.join(METHODS)}"),
    "sparsity": (float, None, _fraction),
    "heads": (float, None, _fraction),
    "mlp": (float, None, _fraction),
    "finetune_steps": (int, 0, _in(0, 100_000)),
    "lr": (float, None, _over_at_most(0.0, 1.0)),  # absent: FINETUNE's
    "batch_size": (int, None, _in(1, 1024)),
    "block_size": (int, 128, _in(2, 8192)),
    "eval_tokens": (int, 16384, _in(16, 1 << 24)),
    "decode_tokens": (int, 64, _in(1, 4096)),
    "measure": (bool, True, None),
    "seed": (int, 0, _in(0, 2 ** 62)),
}


FINETUNE = {"lr": 1e-4, "batch_size": 8}  # the fine-tune's defaults (only with its steps)
# keys of one task only (no default is filled for another task)
ONLY = {"quantize": {"method"}, "prune": {"sparsity", "heads", "mlp", "finetune_steps", "lr",
                                          "batch_size"}}


class NotSupported(ValueError):
    """What this machine's libraries cannot do (ENOTSUP for the caller)."""


def normalize(config: dict) -> dict:
    """A complete, checked copy of a compression config: ValueError naming the
    key (EINVAL), NotSupported (ENOTSUP) for int4."""
    check_keys(config, SPEC, ("task", "model"), "compression config")
    task = config["task"]
    foreign = set().union(*(keys for t, keys in ONLY.items() if t != task))
    out = fill(SPEC, config, foreign, "compression config")
    _check_task(out, set(config))
    return out


def _check_task(cfg: dict, given: set[str]) -> None:
    task = cfg["task"]

    def refuse(why: str) -> ValueError:
        return ValueError(f"compression config: {why}")
    for other, keys in ONLY.items():
        if other != task and given & keys:
            raise refuse(f"{', '.join(sorted(given & keys))} is for {other}, not {task}")
    if task == "eval":
        if "out" in given or "force" in given:
            raise refuse("eval writes no model: out and force are for quantize and prune")
        if "data" not in cfg:
            raise refuse("eval needs data (a tensorfs dataset: its last split is held out)")
        return
    if "out" not in cfg:
        raise refuse(f"{task} needs out (where the new model goes, e.g. /models/NAME-{task})")
    if cfg["out"].rstrip("/") == cfg["model"].rstrip("/"):
        raise refuse("out must differ from model (the source is never overwritten)")
    if task == "quantize" and cfg["method"] == "int4":
        raise NotSupported(f"compression config: method = 'int4': {INT4_WHY}")
    if task == "prune":
        structured = [k for k in ("heads", "mlp") if k in cfg]
        if ("sparsity" in cfg) == bool(structured):
            raise refuse("prune takes either sparsity (unstructured: --sparsity) or heads "
                         "and/or mlp (structured: --structured), not both and not neither")
        if cfg.get("sparsity") == 0:
            raise refuse("sparsity = 0 prunes nothing")
        if not cfg["finetune_steps"] and given & {"lr", "batch_size"}:
            raise refuse(f"{', '.join(sorted(given & {'lr', 'batch_size'}))} is the "
                         "fine-tune's: give finetune_steps too")
        if structured and not any(cfg[k] > 0 for k in structured):
            raise refuse("heads and mlp are both 0: nothing to prune")
        if cfg["finetune_steps"] and "data" not in cfg:
            raise refuse("finetune_steps needs data (the fine-tune trains on it)")


def structured(cfg: dict) -> bool:
    return cfg["task"] == "prune" and "sparsity" not in cfg


LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")  # q/k/v/o_proj, gate/up/down_proj


def model_kind(config: dict) -> str:
    """"llama" (LLAMA_STYLE) or "gpt2" from a config.json's model_type;
    NotSupported for another (fused projections, experts ...)."""
    kind = config.get("model_type")
    if kind == "gpt2":
        return "gpt2"
    if kind in LLAMA_STYLE:
        return "llama"
    raise NotSupported(f"structured pruning knows {', '.join(LLAMA_STYLE)} and gpt2 "
                       f"models, not model_type {kind!r}")


def shape_of(config: dict) -> tuple[str, int, int, int, int]:
    """(kind, heads, key/value heads, hidden size, MLP neurons) of a config.json."""
    kind = model_kind(config)
    if kind == "gpt2":
        hidden, heads = config["n_embd"], config["n_head"]
        return kind, heads, heads, hidden, config.get("n_inner") or 4 * hidden
    heads = config["num_attention_heads"]
    return (kind, heads, config.get("num_key_value_heads") or heads, config["hidden_size"],
            config["intermediate_size"])


def plan(kind: str, heads: int, kv_heads: int, hidden: int, neurons: int,
         heads_frac: float, mlp_frac: float) -> tuple[int, int]:
    """(query heads kept, MLP neurons kept) per layer: whole key/value groups go
    (round(heads_frac * kv_heads) of them) and round(mlp_frac * neurons) neurons.
    LlamaConfig refuses a hidden_size the head count does not divide, even with
    head_dim stated, so fewer heads are kept until it does. ValueError (EINVAL)
    when every head or neuron would go; NotSupported for GPT-2's heads."""
    keep_heads = heads
    if heads_frac > 0:
        if kind == "gpt2":
            raise NotSupported("GPT-2's attention derives head_dim from n_embd / n_head, so "
                               "its config cannot hold fewer heads of the same width; "
                               "prune its MLP (mlp=...) instead")
        group = heads // kv_heads
        keep_kv = kv_heads - round(heads_frac * kv_heads)
        while keep_kv > 0 and hidden % (keep_kv * group):
            keep_kv -= 1
        if keep_kv < 1:
            raise ValueError(f"heads = {heads_frac:g} would remove every attention head "
                             f"({heads} heads in {kv_heads} key/value groups, hidden size "
                             f"{hidden})")
        keep_heads = keep_kv * group
        if keep_heads == heads:
            raise ValueError(f"heads = {heads_frac:g} removes no head: heads go in whole "
                             f"key/value groups, and {kv_heads} groups x {heads_frac:g} "
                             "rounds to 0")
    keep_mlp = neurons - round(mlp_frac * neurons)
    if keep_mlp < 1:
        raise ValueError(f"mlp = {mlp_frac:g} would remove every MLP neuron ({neurons})")
    if mlp_frac > 0 and keep_mlp == neurons:
        raise ValueError(f"mlp = {mlp_frac:g} removes no neuron of {neurons}")
    return keep_heads, keep_mlp
