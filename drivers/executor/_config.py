"""A training job's configuration: checked once, at the boundary, with defaults filled.

normalize() is the only gate between what a user typed (`llmos train name=... lr=...`,
a dict through spawn_train) and the training job: every key known, every value of its
type and in its range, or a ValueError that names the key. The job and its workers
read only normalized configs, so they never re-check.

It must never import anything heavier than the model's config class: the executor
driver calls it on every spawn_train.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from syscalls import bounds, format_size, number

from ._gpt import GPTConfig, train_bytes

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
_MAX_INT = 2 ** 62  # any count or seed past this is a typo, and overflows torch's int64

# key: (type, default, check(value) -> error text or None). name/dataset have no default
# (required); out's default depends on name.
_Check = Callable[[Any], "str | None"]


def _in(lo: float, hi: float, fmt: Callable[[Any], str] = number) -> _Check:
    """lo <= v <= hi, said as "must be at least 1" or "must be between 1 and 16"."""
    return lambda v: None if lo <= v <= hi else f"must be {bounds(lo, hi, fmt)}"


def _at_least_under(lo: float, hi: float) -> _Check:
    """lo <= v < hi."""
    return lambda v: None if lo <= v < hi else \
        f"must be at least {number(lo)} and under {number(hi)}"


def _over_at_most(lo: float, hi: float) -> _Check:
    """lo < v <= hi."""
    return lambda v: None if lo < v <= hi else \
        f"must be over {number(lo)} and at most {number(hi)}"


def _path(v: str) -> str | None:
    """A tensorfs path: absolute, no empty, '.' or '..' component, no hidden name."""
    if not v.startswith("/") or v == "/":
        return "must be an absolute tensorfs path such as /datasets/corpus"
    if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\x00" in p
           for p in v[1:].split("/")):
        return "has an empty, '.', '..', hidden or NUL/backslash component"
    return None


def _name(v: str) -> str | None:
    if _NAME.fullmatch(v) is None:
        return "must be 1-100 of [A-Za-z0-9_.-], not starting with '.'"
    return None


def _devices(v: list) -> str | None:
    if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in v):
        return "must be a list of GPU indexes (int) or ids (str)"
    return None


SPEC: dict[str, tuple[type, Any, _Check | None]] = {
    "name": (str, None, _name),
    "dataset": (str, None, _path),
    "out": (str, None, _path),
    "n_layer": (int, 4, _in(1, 256)),
    "n_head": (int, 4, _in(1, 256)),
    "n_embd": (int, 128, _in(1, 65536)),
    "block_size": (int, 128, _in(1, 8192)),
    "dropout": (float, 0.0, _at_least_under(0.0, 1.0)),
    "batch_size": (int, 12, _in(1, 65536)),
    "lr": (float, 1e-3, _over_at_most(0.0, 10.0)),
    "min_lr": (float, 1e-4, _in(0.0, 10.0)),
    "warmup": (int, 20, _in(0, _MAX_INT)),
    "steps": (int, 300, _in(1, _MAX_INT)),
    "workers": (int, 2, _in(1, 16)),
    "checkpoint_every": (int, 100, _in(0, _MAX_INT)),  # 0: only at the end
    "resume": (bool, False, None),
    "restarts": (int, 0, _in(0, 10)),
    "seed": (int, 0, _in(0, _MAX_INT)),
    "grad_clip": (float, 1.0, _in(0.0, 1e6)),  # 0: no clipping
    "log_every": (int, 10, _in(1, _MAX_INT)),
    "timeout_s": (float, 3600.0, _over_at_most(0.0, 1e7)),
    "gpus": (int, 0, _in(0, 16)),
    # added by the executor (or the job) once GPUs are allocated
    "alloc_id": (str, None, None),
    "devices": (list, None, _devices),
    "simulated": (bool, None, None),
    "gpu_bytes": (int, None, _in(0, 2 ** 60, format_size)),
}
INTERNAL = ("alloc_id", "devices", "simulated", "gpu_bytes")
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")


def normalize(config: dict) -> dict:
    """A complete, checked copy of a training config; ValueError naming the key
    for an unknown key, a wrong type or a value out of range."""
    if not isinstance(config, dict):
        raise ValueError(f"a training config is a dict, not {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in SPEC)
    if unknown:
        raise ValueError(f"unknown training config key(s): {', '.join(unknown)} "
                         f"(known: {', '.join(k for k in SPEC if k not in INTERNAL)})")
    for key in ("name", "dataset"):
        if key not in config:
            raise ValueError(f"training config: {key} is required")
    out: dict[str, Any] = {}
    for key, (kind, default, check) in SPEC.items():
        if key not in config:
            if default is not None:
                out[key] = default
            continue
        value = _typed(key, config[key], kind)
        why = check(value) if check is not None else None
        if why is not None:
            raise ValueError(f"training config: {key} = {value!r} {why}")
        out[key] = value
    out.setdefault("out", f"/models/{out['name']}")
    _check_together(out)
    return out


def _typed(key: str, value: Any, kind: type) -> Any:
    """value as kind: an int is a float too; a bool is never a number."""
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"training config: {key} must be {kind.__name__}, "
                         f"not {type(value).__name__} ({value!r})")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"training config: {key} must be finite, not {value!r}")
    if kind is list:
        value = list(value)
    return value


def _check_together(cfg: dict) -> None:
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"training config: n_embd = {cfg['n_embd']} must be a multiple "
                         f"of n_head = {cfg['n_head']}")
    if cfg["min_lr"] > cfg["lr"]:
        raise ValueError(f"training config: min_lr = {cfg['min_lr']:g} must be at most "
                         f"lr = {cfg['lr']:g}")
    devices = cfg.get("devices")
    if devices is not None and cfg["gpus"] and len(devices) != cfg["gpus"]:
        raise ValueError(f"training config: devices has {len(devices)} GPU(s), "
                         f"gpus = {cfg['gpus']}")


def model_config(cfg: dict) -> GPTConfig:
    """The GPTConfig of a normalized training config (byte-level: vocab 256)."""
    return GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})


def memory_bytes(cfg: dict) -> int:
    """Training memory of one worker (model, gradients, AdamW, activations at
    batch_size): what the job asks alloc_gpu for on each GPU."""
    return train_bytes(model_config(cfg), cfg["batch_size"])
