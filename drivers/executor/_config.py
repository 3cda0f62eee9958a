"""A training job's configuration: checked once, at the boundary, with defaults filled.

normalize() is the only gate between what a user typed (`llmos train name=... lr=...`,
a dict through spawn_train) and the training job: every key known, every value of its
type and in its range, or a ValueError that names the key. The job and its workers
read only normalized configs, so they never re-check.

It must never import anything heavier than the model's config class: the executor
driver calls it on every spawn_train. (A Hugging Face `arch` is checked against
the installed transformers, imported then: only such a job pays for it.)

A job trains one of two families: the byte-level GPT (no `base`, `arch` absent or
"gpt") or a Hugging Face causal LM (`base`, or `arch` a transformers model_type
with a `tokenizer`); hf_job() says which. A base model's shape comes from its
config.json, so n_layer, n_head, n_embd and ffn are neither defaulted nor
allowed with base; block_size (the training window) is, and the executor checks
it against the model's context (_hftrain.py).
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


def _arch(v: str) -> str | None:
    if re.fullmatch(r"[a-z0-9_]{1,64}", v) is None:
        return "must be gpt or a Hugging Face model_type such as llama, gpt2, qwen2"
    return None


def _nodes(v: str) -> str | None:
    names = v.split(",")
    if not 1 <= len(names) <= 16 or not all(0 < len(n) <= 64 and n.strip() == n
                                            for n in names):
        return "must be 1-16 node names, comma-separated (llmos nodes lists them)"
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
    # the nodes the workers run on ("a,b"), rank r on the r-th; a lost one is left out
    # of the next attempt (docs/scaling.md, Training across nodes)
    "nodes": (str, None, _nodes),
    # Hugging Face models (docs/executor.md, "Training Hugging Face models")
    "base": (str, None, _path),
    "arch": (str, None, _arch),
    "tokenizer": (str, None, _path),
    "ffn": (int, None, _in(1, 1 << 20)),
    # distillation (docs/compression.md): the student learns the teacher's softened
    # distribution too: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE
    "teacher": (str, None, _path),
    "distill_alpha": (float, 0.5, _in(0.0, 1.0)),
    "distill_temperature": (float, 2.0, _over_at_most(0.0, 100.0)),
    # added by the executor (or the job) once GPUs are allocated
    "alloc_id": (str, None, None),
    "devices": (list, None, _devices),
    "simulated": (bool, None, None),
    "gpu_bytes": (int, None, _in(0, 2 ** 60, format_size)),
}
INTERNAL = ("alloc_id", "devices", "simulated", "gpu_bytes")
DISTILL_KEYS = ("distill_alpha", "distill_temperature")  # defaulted only with a teacher
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "ffn")  # a base model's config.json decides
GPT_ONLY = ("dropout",)  # the byte-level GPT's (a Hugging Face config has its own)


def hf_job(cfg: dict) -> bool:
    """Whether a (normalized) config trains a Hugging Face model, not the byte GPT."""
    return bool(cfg.get("base")) or cfg.get("arch", "gpt") != "gpt"


def normalize(config: dict) -> dict:
    """A complete, checked copy of a training config; ValueError naming the key
    for an unknown key, a wrong type or a value out of range."""
    check_keys(config, SPEC, ("name", "dataset"), "training config", INTERNAL)
    hf = hf_job(config)
    unset = (*SHAPE_KEYS, *GPT_ONLY) if "base" in config else \
        GPT_ONLY if hf else ()
    if "teacher" not in config:
        unset = (*unset, *DISTILL_KEYS)
    out = fill(SPEC, config, unset, "training config")
    out.setdefault("out", f"/models/{out['name']}")
    _check_family(out)
    _check_together(out)
    return out


def check_keys(config: Any, spec: dict[str, Any], required: tuple[str, ...], what: str,
               hidden: tuple[str, ...] = ()) -> None:
    """ValueError unless config is a dict of spec's keys with the required ones
    (hidden: keys the error's list of known ones leaves out)."""
    if not isinstance(config, dict):
        raise ValueError(f"a {what} is a dict, not {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in spec)
    if unknown:
        raise ValueError(f"unknown {what} key(s): {', '.join(unknown)} "
                         f"(known: {', '.join(k for k in spec if k not in hidden)})")
    for key in required:
        if key not in config:
            raise ValueError(f"{what}: {key} is required")


def fill(spec: dict[str, tuple[type, Any, Any]], config: dict, unset: Any,
         what: str) -> dict[str, Any]:
    """config's keys typed and checked against spec, with the defaults of the keys
    it lacks (but those in unset); ValueError naming the key (what: "training
    config", ...)."""
    out: dict[str, Any] = {}
    for key, (kind, default, check) in spec.items():
        if key not in config:
            if default is not None and key not in unset:
                out[key] = default
            continue
        value = _typed(key, config[key], kind, what)
        why = check(value) if check is not None else None
        if why is not None:
            raise ValueError(f"{what}: {key} = {value!r} {why}")
        out[key] = value
    return out


def _typed(key: str, value: Any, kind: type, what: str = "training config") -> Any:
    """value as kind: an int is a float too; a bool is never a number."""
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{what}: {key} must be {kind.__name__}, "
                         f"not {type(value).__name__} ({value!r})")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{what}: {key} must be finite, not {value!r}")
    if kind is list:
        value = list(value)
    return value


def _check_family(cfg: dict) -> None:
    """The keys of one family only: base brings its shape and tokenizer; arch other
    than gpt needs a tokenizer that transformers knows; the GPT has neither."""
    def refuse(key: str, why: str) -> ValueError:
        return ValueError(f"training config: {key} = {cfg[key]!r} {why}")
    arch = cfg.get("arch")
    if "base" in cfg:
        if arch is not None:
            raise refuse("arch", f"cannot be set with base = {cfg['base']!r} (base brings "
                         "its own config.json; arch trains a new model from scratch)")
        for key in (*SHAPE_KEYS, "tokenizer"):
            if key in cfg:
                raise refuse(key, "cannot be set with base (its config.json and tokenizer "
                             "decide)")
    elif arch not in (None, "gpt"):
        _check_arch(arch)
        if "tokenizer" not in cfg:
            raise ValueError(f"training config: tokenizer is required with arch = {arch!r} "
                             "(a tensorfs directory of tokenizer.json ...)")
    else:
        for key in ("tokenizer", "ffn"):
            if key in cfg:
                raise refuse(key, "is for Hugging Face models (base, or arch other than "
                             "gpt); the byte-level GPT has neither")
    if "teacher" not in cfg:
        for key in DISTILL_KEYS:
            if key in cfg:
                raise refuse(key, "is for distillation: give a teacher too")
    elif not hf_job(cfg):
        raise refuse("teacher", "distills into a Hugging Face student (base, or arch with "
                     "a tokenizer); the byte-level GPT trains alone")
    if hf_job(cfg) and cfg.get("dropout", 0.0) != 0.0:
        raise refuse("dropout", "is the byte-level GPT's; a Hugging Face model's config "
                     "has its own")


def _check_arch(arch: str) -> None:
    """arch is a model_type the installed transformers builds as a causal LM, and not
    an encoder that it also builds so (bert, roberta, bart ...: a masked LM too)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"training config: arch = {arch!r} is not a model_type the "
                         "installed transformers builds as a causal LM (gpt, or e.g. "
                         "llama, gpt2, qwen2)")
    if arch in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ValueError(f"training config: arch = {arch!r} is an encoder (a masked LM); "
                         "spawn_train trains decoder-only causal LMs (e.g. llama, gpt2, "
                         "qwen2)")


def _check_together(cfg: dict) -> None:
    if "n_embd" in cfg and cfg["n_embd"] % cfg["n_head"]:
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


def dataset_error(cfg: dict, st: dict) -> str | None:
    """Why the dataset st (a stat or open_tensor record) cannot train cfg's model,
    or None: the byte GPT reads a 1-D uint8 tensor of bytes; a Hugging Face model
    one of text (uint8) or of token ids (int32, int64); each of the workers'
    shards holds at least block_size + 1 of them."""
    hf = hf_job(cfg)
    dtypes = ("uint8", "int32", "int64") if hf else ("uint8",)
    shape = st.get("shape") or []
    if st.get("type", "tensor") != "tensor" or st.get("dtype") not in dtypes or \
            len(shape) != 1:
        want = "text (uint8) or token ids (int32, int64)" if hf else "bytes (uint8)"
        return (f"dataset {cfg['dataset']} must be a 1-D tensor of {want}, not "
                f"{st.get('type', 'tensor')} {st.get('dtype')} {shape}")
    least = cfg["workers"] * (cfg["block_size"] + 1)
    if shape[0] < least:
        return (f"dataset {cfg['dataset']} has {shape[0]:,} elements; {cfg['workers']} "
                f"workers of block_size {cfg['block_size']} need at least {least:,}")
    return None


def memory_bytes(cfg: dict, osh: Any = None) -> int:
    """Training memory of one worker (model, gradients, AdamW, activations at
    batch_size): what the job asks alloc_gpu for on each GPU. A Hugging Face
    model's is _hftrain.train_memory's, which checks the job and reads its config
    from tensorfs through osh, as the caller."""
    if hf_job(cfg):
        from ._hftrain import train_memory
        return train_memory(osh, cfg)
    return train_bytes(model_config(cfg), cfg["batch_size"])


def model_identity(cfg: dict) -> dict:
    """What a checkpoint's model must match for a job to resume it: the GPT's
    shape, or a Hugging Face model's source and (from scratch) shape."""
    if not hf_job(cfg):
        return model_config(cfg).to_dict()
    keys = ("base",) if cfg.get("base") else ("arch", "tokenizer", *SHAPE_KEYS, "block_size")
    return {"family": "hf", **{k: cfg.get(k) for k in keys}}
