"""Checkpoints in tensorfs: write, read, prune and resolve them (docs/executor.md).

A model directory <out>/ holds step directories and a pointer:
    <out>/step-NNNNNN/{config, model, optim, history}    <out>/latest
config is UTF-8 JSON in a uint8 tensor; model and optim are tensorfs groups (the
state_dict's tensors without tied duplicates; AdamW's moments); history is a
float32 [n, 2] tensor of (step, loss averaged over workers), one row per step
since the job's first run. Older layouts still read: one tensor per state_dict
entry in the step directory (before groups), no history (before histories).
A Hugging Face model's checkpoint is a model directory as `llmos import` stores
one, with the job's own state in a subdirectory that export and infer skip:
    <out>/step-NNNNNN/{config.json, model.safetensors, tokenizer.json, ...,
                       llmos/{config, optim, history}}

Shared by the executor driver (infer reads checkpoints) and the training job
(writes them, resumes from them). It must never leave `latest` naming a
checkpoint that is not complete: a job killed at any moment leaves one to resume.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from syscalls import Errno, SyscallError

from ._gpt import GPTConfig

KEEP_CHECKPOINTS = 2
OPTIM_TENSORS = ("optim.exp_avg", "optim.exp_avg_sq")
MODEL_GROUP, OPTIM_GROUP = "model", "optim"  # a checkpoint's two groups (tensorfs)
HISTORY = "history"  # the loss history tensor of a checkpoint
JOB_STATE = "llmos"  # a Hugging Face checkpoint's subdirectory of the job's own state
HF_WEIGHTS = "model.safetensors"  # a Hugging Face checkpoint's weights (a group)


@dataclass
class Checkpoint:
    """A checkpoint read back: where it was, its config JSON, the model's tensors,
    (when saved and asked for) the AdamW moments, concatenated in
    model.parameters() order, and the loss history, [n, 2] rows of (step, loss)."""

    path: str
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor] = field(default_factory=dict)
    history: torch.Tensor | None = None

    @property
    def model_config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.meta["model"])


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_step_dir(name: str) -> bool:
    return name.startswith("step-") and name[5:].isdigit()


def _aliases(model: nn.Module) -> dict[str, str]:
    """state_dict keys that are the same tensor as an earlier key (tied weights:
    lm_head.weight -> wte.weight)."""
    first: dict[int, str] = {}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in first:
            out[key] = first[id(value)]
        else:
            first[id(value)] = key
    return out


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _text(t: Any) -> str:
    return bytes(t.numpy().tobytes() if hasattr(t, "numpy") else t).decode()


def makedirs(osh: Any, path: str) -> None:
    """mkdir -p in tensorfs."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        try:
            osh.mkdir("/" + "/".join(parts[:i]))
        except SyscallError as e:
            if e.errno != Errno.EEXIST:
                raise


def remove_tree(osh: Any, path: str) -> None:
    """rm -r in tensorfs (unlink removes only tensors and empty directories)."""
    for entry in osh.listdir(path):
        if entry["type"] == "dir":
            remove_tree(osh, entry["path"])
        else:
            osh.unlink(entry["path"])
    osh.unlink(path)


def exists(osh: Any, path: str) -> bool:
    try:
        osh.stat(path)
        return True
    except SyscallError as e:
        if e.errno == Errno.ENOENT:
            return False
        raise


def write_checkpoint(osh: Any, out: str, model: nn.Module,
                     optimizer: torch.optim.Optimizer | None, meta: dict[str, Any],
                     history: torch.Tensor | None = None) -> str:
    """Write a complete checkpoint of model (and optimizer, and the loss history)
    under out; returns its path.

    meta holds at least step (int), loss, tokens, dataset, train; the model's config
    is added from model.config. Order, so that a kill at any point leaves `latest`
    naming a complete checkpoint: every tensor of out/step-N (each durable when its
    save returns), then out/latest replaced (atomic), then every other step dir but
    the previous checkpoint removed."""
    name, path = _begin(osh, out, int(meta["step"]))
    osh.save_tensors(f"{path}/{MODEL_GROUP}", state_without_aliases(model))
    _save_job_state(osh, path, model, optimizer, {"model": model.config.to_dict(), **meta},
                    history)
    return _commit(osh, out, name, path)


def write_hf_checkpoint(osh: Any, out: str, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None, meta: dict[str, Any],
                        history: torch.Tensor | None, files: dict[str, bytes]) -> str:
    """write_checkpoint for a Hugging Face model, in the layout `llmos import`
    writes: model.safetensors (a group of the state_dict without tied duplicates,
    named as save_pretrained names them) and files (config.json, the tokenizer's
    ...: name -> bytes, each a uint8 tensor), with the job's config, moments and
    history in the subdirectory llmos/. The same order and guarantee."""
    name, path = _begin(osh, out, int(meta["step"]))
    osh.save_tensors(f"{path}/{HF_WEIGHTS}", {
        key: value.contiguous() for key, value in state_without_aliases(model).items()})
    for file, data in files.items():
        osh.save_tensor(f"{path}/{file}", _bytes_tensor(data))
    osh.mkdir(f"{path}/{JOB_STATE}")
    _save_job_state(osh, f"{path}/{JOB_STATE}", model, optimizer, dict(meta), history)
    return _commit(osh, out, name, path)


def state_without_aliases(model: nn.Module) -> dict[str, torch.Tensor]:
    """model's state_dict without tied duplicates (the first name of each tensor)."""
    aliases = _aliases(model)
    return {key: value for key, value in model.state_dict().items() if key not in aliases}


def _begin(osh: Any, out: str, step: int) -> tuple[str, str]:
    """(name, path) of a new, empty step directory under out (a half-written one a
    killed attempt left there goes first)."""
    name = step_dir_name(step)
    path = f"{out}/{name}"
    makedirs(osh, out)
    if exists(osh, path):
        remove_tree(osh, path)
    osh.mkdir(path)
    return name, path


def _save_job_state(osh: Any, where: str, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, config: dict[str, Any],
                    history: torch.Tensor | None) -> None:
    """The optimizer's moments, the loss history and the config JSON, into where."""
    if optimizer is not None:
        moments, step = optimizer_moments(model, optimizer)
        if moments:
            osh.save_tensors(f"{where}/{OPTIM_GROUP}", moments)
        config["optim_step"] = step
    if history is not None:
        osh.save_tensor(f"{where}/{HISTORY}", history)
    osh.save_tensor(f"{where}/config", _bytes_tensor(json.dumps(config).encode()))


def _commit(osh: Any, out: str, name: str, path: str) -> str:
    """Point out/latest at the complete checkpoint name, then prune; its path."""
    osh.save_tensor(f"{out}/latest", _bytes_tensor(name.encode()))
    prune_checkpoints(osh, out, name)
    return path


def prune_checkpoints(osh: Any, out: str, current: str) -> None:
    """Remove every step dir of out but current and the newest one before it (a
    newer one can only be a half-written leftover of a killed attempt)."""
    steps = sorted(e["name"] for e in osh.listdir(out)
                   if e["type"] == "dir" and is_step_dir(e["name"]))
    older = [s for s in steps if s < current]
    keep = {current, *older[-(KEEP_CHECKPOINTS - 1):]}
    for name in steps:
        if name not in keep:
            remove_tree(osh, f"{out}/{name}")


def optimizer_moments(model: nn.Module,
                      optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], int]:
    """AdamW's exp_avg and exp_avg_sq of every parameter, concatenated (float32,
    1-D) in model.parameters() order, and its step count."""
    states = [optimizer.state.get(p, {}) for p in model.parameters()]
    if not all(states):
        return {}, 0
    moments = {key: torch.cat([s[key.removeprefix("optim.")].detach().float().reshape(-1).cpu()
                               for s in states]) for key in OPTIM_TENSORS}
    return moments, int(states[0]["step"])


def resolve_checkpoint(osh: Any, path: str) -> str | None:
    """The checkpoint directory `path` names: path/<latest> if path/latest exists,
    path itself if it holds a config, else None."""
    try:
        return f"{path}/{_text(osh.load_tensor(f'{path}/latest'))}"
    except SyscallError as e:
        if e.errno not in (Errno.ENOENT, Errno.ENOTDIR):
            raise
    return path if exists(osh, f"{path}/config") or \
        exists(osh, f"{path}/{JOB_STATE}/config") else None


def job_state_dir(osh: Any, where: str) -> str:
    """Where the checkpoint directory where keeps the job's config, moments and
    history: its llmos/ subdirectory (a Hugging Face model's), or itself."""
    return f"{where}/{JOB_STATE}" if exists(osh, f"{where}/{JOB_STATE}/config") else where


def read_meta(osh: Any, path: str) -> tuple[str, dict[str, Any]]:
    """(the checkpoint directory path names, its config JSON); ENOENT if none."""
    where = resolve_checkpoint(osh, path)
    if where is None:
        raise SyscallError(Errno.ENOENT, f"{path}: no checkpoint (neither latest nor config)")
    state = job_state_dir(osh, where)
    return where, json.loads(_text(osh.load_tensor(f"{state}/config")))


def history_len(osh: Any, where: str) -> int:
    """How many steps the checkpoint directory where has in its loss history (0 for
    one written before histories)."""
    try:
        return int(osh.stat(f"{job_state_dir(osh, where)}/{HISTORY}")["shape"][0])
    except SyscallError as e:
        if e.errno == Errno.ENOENT:
            return 0
        raise


def read_checkpoint(osh: Any, path: str, for_resume: bool = True) -> Checkpoint:
    """Read the checkpoint path names (see resolve_checkpoint); ENOENT if none. The
    weights are the `model` group; for_resume also reads what only resuming needs:
    the moments (the `optim` group) and the loss history. A checkpoint of one
    tensor per entry (the layout before groups) reads the same, and so does a
    Hugging Face model's (its *.safetensors groups; the rest in llmos/)."""
    where, meta = read_meta(osh, path)
    state, optim, history = {}, {}, None
    job = job_state_dir(osh, where)
    if job != where:
        for entry in osh.listdir(where):
            if entry["type"] == "group" and entry["name"].endswith(".safetensors"):
                state.update(osh.load_tensors(entry["path"]))
    for entry in osh.listdir(job):
        name = entry["name"]
        if entry["type"] == "group" and name == MODEL_GROUP:
            state.update(osh.load_tensors(entry["path"]))
        elif entry["type"] == "group" and name == OPTIM_GROUP:
            if for_resume:
                optim.update(osh.load_tensors(entry["path"]))
        elif entry["type"] != "tensor" or name in ("config", "compression.json"):
            continue  # compression.json: a compressed model's manifest
        elif name == HISTORY:
            if for_resume:
                history = torch.as_tensor(osh.load_tensor(entry["path"])).reshape(-1, 2)
        elif name in OPTIM_TENSORS:
            if for_resume:
                optim[name] = osh.load_tensor(entry["path"])
        else:
            state[name] = osh.load_tensor(entry["path"])
    return Checkpoint(where, meta, state, optim, history)


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
               ckpt: Checkpoint) -> None:
    """Load a checkpoint into model (tied weights re-tied: their duplicates were not
    saved) and, when both have them, the AdamW moments into optimizer."""
    state = dict(ckpt.state)
    for key, source in _aliases(model).items():
        if key not in state and source in state:
            state[key] = state[source]
    model.load_state_dict(state, strict=True)
    if optimizer is None or set(ckpt.optim) != set(OPTIM_TENSORS):
        return
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    if any(ckpt.optim[k].numel() != sum(sizes) for k in OPTIM_TENSORS):
        raise ValueError(f"{ckpt.path}: optimizer moments do not match the model's "
                         f"{sum(sizes)} parameters")
    pieces = {k: torch.split(ckpt.optim[k].float(), sizes) for k in OPTIM_TENSORS}
    by_param = {p: i for i, p in enumerate(params)}
    sd = optimizer.state_dict()
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            i = by_param[p]
            sd["state"][index] = {
                "step": torch.tensor(float(ckpt.meta.get("optim_step", 0))),
                "exp_avg": pieces["optim.exp_avg"][i].reshape(p.shape).clone(),
                "exp_avg_sq": pieces["optim.exp_avg_sq"][i].reshape(p.shape).clone()}
            index += 1
    optimizer.load_state_dict(sd)
