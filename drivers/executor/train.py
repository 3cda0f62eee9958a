"""The training job program: data-parallel training of a byte-level GPT on llmos.

Three ways to run it, one training loop (train_loop) for all:

    python -m drivers.executor.train [--job NAME] the JOB (spawned by spawn_train)
    python -m drivers.executor.train --worker     one WORKER (spawned by the job)
    python -m drivers.executor.train --direct FILE [key=value ...]
                                                  no llmos: torch.multiprocessing
                                                  workers on FILE's bytes (benchmarks)

The job reads its normalized config from LLMOS_TRAIN_CONFIG (JSON), allocates GPUs
for itself when asked (gpus > 0 and no alloc_id from the executor), and runs
1 + restarts attempts. Each attempt spawns `workers` workers through llmos on a
fresh TCP port and waits for them; when one fails the job kills the rest and
relaunches them all from the last complete checkpoint. As DESIGN.md's lessons say,
the job owns restarts (torch's elastic in-place restart hung on gloo; nothing here
uses it), and a wall-clock watchdog (timeout_s) ends a job that runs too long.

Exit statuses: job 0 done, 1 failed (its last report says why), 143 after SIGTERM;
worker 0 done, 1 failed (the traceback is in its llmos log).

Each worker reads its own shard of the dataset (a uint8 1-D tensor), trains a DDP
copy of the model (gloo on CPU, NCCL on a real GPU), and rank 0 reports progress to
the job (`report` syscall, pid = the job) and writes checkpoints in the format of
docs/executor.md: <out>/step-NNNNNN/{config, model (a group of the state_dict's
tensors), optim (a group of AdamW's moments)}, then <out>/latest, then older step
dirs pruned (keep 2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from syscalls import Errno, SyscallError

from ._config import memory_bytes, model_config, normalize
from ._gpt import GPT, GPTConfig

CONFIG_ENV = "LLMOS_TRAIN_CONFIG"
RESUME_ENV = "LLMOS_TRAIN_RESUME"
JOB_ENV = "LLMOS_TRAIN_JOB"  # the job's llmos pid, for its workers to watch
DIST_TIMEOUT = datetime.timedelta(seconds=60)  # rendezvous and every collective
WAIT_SLICE_S = 1.0       # the job's supervision tick: SIGTERM and watchdog latency
REAP_TIMEOUT_S = 10.0
KEEP_CHECKPOINTS = 2
EXIT_TERMINATED = 128 + signal.SIGTERM
OPTIM_TENSORS = ("optim.exp_avg", "optim.exp_avg_sq")
BLAME_GRACE_S = 2.0  # after a worker fails, how long the others get to end (blame)
MODEL_GROUP, OPTIM_GROUP = "model", "optim"  # a checkpoint's two groups (tensorfs)


# -- the training loop (the same in a worker and in direct mode) ----------------------


def lr_at(step: int, cfg: dict) -> float:
    """nanoGPT's schedule: linear warmup, then cosine from lr down to min_lr at steps."""
    lr, min_lr, warmup, steps = cfg["lr"], cfg["min_lr"], cfg["warmup"], cfg["steps"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= steps:
        return min_lr
    ratio = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.AdamW:
    """AdamW as nanoGPT: weight decay 0.1 on matrices and embeddings (2-D and up),
    none on biases and norms."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=(0.9, 0.95))


@dataclass
class Progress:
    """What the loop tells its hooks every log_every steps (and at the end).
    loss: the mean over the last window of the loss averaged over all workers."""

    step: int
    steps: int
    loss: float
    loss0: float
    tokens: int
    tokens_per_s: float
    step_ms: float
    elapsed_s: float
    workers: int

    def info(self) -> dict[str, Any]:
        return {"state": "running", "step": self.step, "steps": self.steps,
                "loss": self.loss, "loss0": self.loss0,
                "tokens_per_s": self.tokens_per_s, "step_ms": self.step_ms,
                "elapsed_s": self.elapsed_s, "workers": self.workers}


class Hooks(Protocol):
    """Where a worker's loop differs by mode: what it does with progress and
    checkpoints. Called on every rank, in the same order (they may use collectives)."""

    def log(self, trainer: Trainer, progress: Progress) -> None: ...

    def checkpoint(self, trainer: Trainer, progress: Progress) -> None: ...


class Trainer:
    """One worker's model (wrapped in DDP), optimizer and data shard."""

    def __init__(self, cfg: dict, shard: torch.Tensor, rank: int, world: int,
                 device: torch.device, start: Checkpoint | None = None) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.model_cfg = model_config(cfg)
        if shard.dim() != 1 or shard.numel() < self.model_cfg.block_size + 1:
            raise ValueError(f"rank {rank}: a shard of {shard.numel()} bytes is shorter "
                             f"than block_size + 1 = {self.model_cfg.block_size + 1}")
        self.step = 0 if start is None else int(start.meta["step"])
        # the untrained model's loss, measured once per model, carried by checkpoints
        self.loss0: float | None = None if start is None else \
            start.meta.get("stats", {}).get("loss0")
        self.tokens = 0 if start is None else int(start.meta.get("tokens", 0))
        # distinct batches per rank, and after a resume not the ones already seen
        torch.manual_seed(cfg["seed"] + rank + 16 * self.step)
        self.shard = shard.to(device=device, dtype=torch.uint8)  # 1 B a token, not 8
        self.model = GPT(self.model_cfg).to(device)
        self.optimizer = make_optimizer(self.model, cfg)
        if start is not None:
            load_state(self.model, self.optimizer, start)
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.offsets = torch.arange(self.model_cfg.block_size + 1, device=device)

    @property
    def batch_tokens(self) -> int:
        """Tokens one step trains on, over all workers."""
        return self.cfg["batch_size"] * self.model_cfg.block_size * self.world

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows of block_size + 1 bytes of this rank's shard."""
        t = self.model_cfg.block_size
        starts = torch.randint(self.shard.numel() - t, (self.cfg["batch_size"],))
        chunk = self.shard[starts.to(self.device)[:, None] + self.offsets].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_step(self) -> torch.Tensor:
        """One optimizer step; this rank's loss (detached, not yet averaged)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        x, y = self.batch()
        _, loss = self.ddp(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg["grad_clip"] > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.optimizer.step()
        self.step += 1
        self.tokens += self.batch_tokens
        return loss.detach()

    @torch.no_grad()
    def first_loss(self) -> torch.Tensor:
        """This rank's loss on a batch before any training (through the bare model:
        a forward without gradients needs nothing from the other ranks)."""
        x, y = self.batch()
        _, loss = self.model(x, y)
        return loss

    def mean_over_workers(self, value: torch.Tensor) -> float:
        """value averaged over all ranks (a collective: every rank calls it)."""
        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return float(total.item()) / self.world


@dataclass
class LoopResult:
    """What a finished loop measured: loss0 and the last window's loss (averaged
    over workers) and every step's seconds."""

    loss0: float
    loss: float
    durations: list[float]


def train_loop(trainer: Trainer, hooks: Hooks, steps: int) -> LoopResult:
    """Train until trainer.step == steps.

    Every rank: loss0 (the averaged loss before any step; a resumed model keeps
    the one its checkpoint holds), then steps, with
    hooks.log every log_every steps and at the end, hooks.checkpoint every
    checkpoint_every steps and at the end."""
    cfg = trainer.cfg
    loss0 = trainer.loss0
    if loss0 is None:
        loss0 = trainer.loss0 = trainer.mean_over_workers(trainer.first_loss())
    durations: list[float] = []
    window: list[torch.Tensor] = []
    start = window_start = time.perf_counter()
    loss = math.nan
    while trainer.step < steps:
        t0 = time.perf_counter()
        window.append(trainer.train_step())
        durations.append(time.perf_counter() - t0)
        step, last = trainer.step, trainer.step == steps
        logs = step % cfg["log_every"] == 0 or last
        saves = (cfg["checkpoint_every"] > 0 and step % cfg["checkpoint_every"] == 0) or last
        if not (logs or saves):
            continue
        loss = trainer.mean_over_workers(torch.stack(window).mean())
        now = time.perf_counter()
        seconds = (now - window_start) / len(window)
        timed = durations[3:] or durations  # as run_direct measures: the same figure
        progress = Progress(step, steps, loss, loss0, trainer.tokens,
                            trainer.batch_tokens / seconds, 1e3 * sum(timed) / len(timed),
                            now - start, trainer.world)
        hooks_start = time.perf_counter()
        if logs:
            hooks.log(trainer, progress)
        if saves:
            hooks.checkpoint(trainer, progress)
        if logs:
            window, window_start = [], time.perf_counter()
        else:  # a checkpoint's time is not a step's
            window_start += time.perf_counter() - hooks_start
    return LoopResult(loss0, loss, durations)


def set_threads(workers: int) -> int:
    """Give each worker its share of the cores. torch's intra-op pool defaults to
    every core in each process: W workers on C <= W cores would run W * C busy
    threads that preempt each other (and gloo's allreduce), so each gets C // W
    threads, at least one."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    return threads


# -- checkpoints in tensorfs ------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read back: where it was, its config JSON, the model's tensors and
    (when saved) the AdamW moments, concatenated in model.parameters() order."""

    path: str
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model_config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.meta["model"])


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _is_step_dir(name: str) -> bool:
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


def _exists(osh: Any, path: str) -> bool:
    try:
        osh.stat(path)
        return True
    except SyscallError as e:
        if e.errno == Errno.ENOENT:
            return False
        raise


def write_checkpoint(osh: Any, out: str, model: nn.Module,
                     optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]) -> str:
    """Write a complete checkpoint of model (and optimizer) under out; returns its path.

    meta holds at least step (int), loss, tokens, dataset, train; the model's config
    is added from model.config. Order, so that a kill at any point leaves `latest`
    naming a complete checkpoint: every tensor of out/step-N (each durable when its
    save returns), then out/latest replaced (atomic), then every other step dir but
    the previous checkpoint removed."""
    name = step_dir_name(int(meta["step"]))
    path = f"{out}/{name}"
    makedirs(osh, out)
    if _exists(osh, path):  # left half-written by an attempt that was killed
        remove_tree(osh, path)
    osh.mkdir(path)
    config = {"model": model.config.to_dict(), **meta}
    aliases = _aliases(model)
    osh.save_tensors(f"{path}/{MODEL_GROUP}", {
        key: value for key, value in model.state_dict().items() if key not in aliases})
    if optimizer is not None:
        moments, step = optimizer_moments(model, optimizer)
        if moments:
            osh.save_tensors(f"{path}/{OPTIM_GROUP}", moments)
        config["optim_step"] = step
    osh.save_tensor(f"{path}/config", _bytes_tensor(json.dumps(config).encode()))
    osh.save_tensor(f"{out}/latest", _bytes_tensor(name.encode()))
    prune_checkpoints(osh, out, name)
    return path


def prune_checkpoints(osh: Any, out: str, current: str) -> None:
    """Remove every step dir of out but current and the newest one before it (a
    newer one can only be a half-written leftover of a killed attempt)."""
    steps = sorted(e["name"] for e in osh.listdir(out)
                   if e["type"] == "dir" and _is_step_dir(e["name"]))
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
    return path if _exists(osh, f"{path}/config") else None


def _must_resolve(osh: Any, path: str) -> str:
    where = resolve_checkpoint(osh, path)
    if where is None:
        raise SyscallError(Errno.ENOENT, f"{path}: no checkpoint (neither latest nor config)")
    return where


def read_meta(osh: Any, path: str) -> tuple[str, dict[str, Any]]:
    """(the checkpoint directory path names, its config JSON); ENOENT if none."""
    where = _must_resolve(osh, path)
    return where, json.loads(_text(osh.load_tensor(f"{where}/config")))


def read_checkpoint(osh: Any, path: str, with_optimizer: bool = True) -> Checkpoint:
    """Read the checkpoint path names (see resolve_checkpoint); ENOENT if none. The
    weights are the `model` group and the moments the `optim` group; a checkpoint of
    one tensor per entry (the layout before groups) reads the same."""
    where, meta = read_meta(osh, path)
    state, optim = {}, {}
    for entry in osh.listdir(where):
        name = entry["name"]
        if entry["type"] == "group" and name == MODEL_GROUP:
            state.update(osh.load_tensors(entry["path"]))
        elif entry["type"] == "group" and name == OPTIM_GROUP:
            if with_optimizer:
                optim.update(osh.load_tensors(entry["path"]))
        elif entry["type"] != "tensor" or name == "config":
            continue
        elif name in OPTIM_TENSORS:
            if with_optimizer:
                optim[name] = osh.load_tensor(entry["path"])
        else:
            state[name] = osh.load_tensor(entry["path"])
    return Checkpoint(where, meta, state, optim)


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


def checkpoint_meta(trainer: Trainer, progress: Progress) -> dict[str, Any]:
    """The config JSON of a checkpoint (model config aside); `stats` carries what the
    job's final report needs."""
    return {"step": trainer.step, "loss": progress.loss, "tokens": trainer.tokens,
            "dataset": trainer.cfg["dataset"], "train": trainer.cfg,
            "stats": {"loss0": progress.loss0, "tokens_per_s": progress.tokens_per_s,
                      "step_ms": progress.step_ms, "elapsed_s": progress.elapsed_s}}


# -- reporting -----------------------------------------------------------------------------


def report(osh: Any, info: dict[str, Any], pid: int | None = None) -> bool:
    """osh.report(info, pid); False where this llmos has no report syscall yet."""
    try:
        osh.report(info, pid=pid)
    except AttributeError:
        return False
    except SyscallError as e:
        if e.errno == Errno.ENOSYS:
            return False
        raise
    return True


# -- worker mode ----------------------------------------------------------------------------


class LlmosHooks:
    """A worker under llmos: rank 0 reports to the job and writes checkpoints; every
    rank stops if its job is gone (it would otherwise train on as an orphan)."""

    def __init__(self, osh: Any, job_pid: int) -> None:
        self.osh, self.job_pid = osh, job_pid
        self.reporting = True

    def log(self, trainer: Trainer, progress: Progress) -> None:
        if self.osh.getppid() != self.job_pid:
            raise SystemExit(f"rank {trainer.rank}: job {self.job_pid} is gone")
        if trainer.rank == 0 and self.reporting:
            self.reporting = report(self.osh, progress.info(), pid=self.job_pid)
        if trainer.rank == 0:
            print(f"step {progress.step}/{progress.steps} loss {progress.loss:.4f} "
                  f"{progress.step_ms:.0f} ms/step", flush=True)

    def checkpoint(self, trainer: Trainer, progress: Progress) -> None:
        if trainer.rank == 0:
            write_checkpoint(self.osh, trainer.cfg["out"], trainer.model, trainer.optimizer,
                             checkpoint_meta(trainer, progress))


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def check_dataset(osh: Any, dataset: str, world: int, block_size: int) -> int:
    """The dataset's length; ENOENT if missing, EINVAL unless a uint8 1-D tensor
    whose every shard holds at least block_size + 1 bytes."""
    st = osh.stat(dataset)
    if st.get("type") != "tensor" or st.get("dtype") != "uint8" or len(st.get("shape", [])) != 1:
        raise SyscallError(Errno.EINVAL, f"dataset {dataset} must be a uint8 1-D tensor of "
                           f"bytes, not {st.get('type')} {st.get('dtype')} {st.get('shape')}")
    n = int(st["shape"][0])
    if n // world < block_size + 1:
        raise SyscallError(Errno.EINVAL, f"dataset {dataset} has {n} bytes: too few for "
                           f"{world} worker(s) of block_size {block_size} (each needs "
                           f"{block_size + 1})")
    return n


def read_shard(osh: Any, dataset: str, rank: int, world: int, block_size: int) -> torch.Tensor:
    """This rank's contiguous share of the dataset: [r*N//W, (r+1)*N//W)."""
    n = check_dataset(osh, dataset, world, block_size)
    a, b = shard_bounds(n, rank, world)
    return torch.as_tensor(osh.load_tensor(dataset, slice=[[a, b]])).clone()


def pick_device(cfg: dict, rank: int) -> tuple[torch.device, str]:
    """cuda (rank modulo the GPUs it sees: NCCL wants one GPU per rank) with NCCL when
    the job holds real GPUs, else the CPU with gloo."""
    real = cfg.get("devices") and not cfg.get("simulated", True)
    if real and torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device, "nccl"
    return torch.device("cpu"), "gloo"


def worker_main() -> int:
    """A worker under llmos: train, then end through exit() so that the kernel has
    the status at once (a process that merely returns keeps its connection's
    threads and sockets to the last moment)."""
    from syscalls.client import connect

    cfg = normalize(json.loads(os.environ[CONFIG_ENV]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    set_threads(world)
    osh = connect()
    try:
        run_worker(osh, cfg, rank, world, os.environ.get(RESUME_ENV, ""))
        status = 0
    except BaseException:  # noqa: B902 - whatever it was, the job must see a failure
        traceback.print_exc()
        status = 1
    osh.exit(status)
    return status


def watch_job(osh: Any, job_pid: int, period: float = 1.0) -> None:
    """End this worker when its job is gone (it was SIGKILLed, so it could not stop
    us): a thread asks for our llmos parent every period seconds; once it is no
    longer the job (we were given to init), the worker exits at once."""
    def watch() -> None:
        while True:
            time.sleep(period)
            try:
                gone = osh.getppid() != job_pid
            except SyscallError:
                gone = True
            if gone:
                print(f"the job {job_pid} is gone; this worker exits", flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="watch-job", daemon=True).start()


def run_worker(osh: Any, cfg: dict, rank: int, world: int, resume: str) -> None:
    """Rendezvous with the other workers (MASTER_ADDR/PORT from the job), read
    this rank's shard (and the checkpoint to resume), train."""
    # the job names itself: a worker orphaned before it attached would see init
    job_pid = int(os.environ.get(JOB_ENV) or osh.getppid())
    if osh.getppid() != job_pid:
        raise SystemExit(f"the job {job_pid} is gone")
    watch_job(osh, job_pid)
    device, backend = pick_device(cfg, rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=DIST_TIMEOUT)
    try:
        shard = read_shard(osh, cfg["dataset"], rank, world, cfg["block_size"])
        start = read_checkpoint(osh, resume) if resume else None
        trainer = Trainer(cfg, shard, rank, world, device, start)
        train_loop(trainer, LlmosHooks(osh, job_pid), cfg["steps"])
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


# -- job mode -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (each attempt takes a fresh one, so a
    rendezvous never meets a previous attempt's survivors)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JobFailed(Exception):
    """The job cannot go on; the message says why, for its final report."""


class Job:
    """One training job: allocation, attempts, supervision, reports."""

    def __init__(self, osh: Any, cfg: dict, stop: threading.Event) -> None:
        self.osh, self.cfg, self.stop = osh, cfg, stop
        self.started = time.monotonic()
        self.deadline = self.started + cfg["timeout_s"]
        self.own_alloc: str | None = None

    def run(self) -> int:
        """The whole job; its exit status."""
        try:
            self.say({"state": "starting", "steps": self.cfg["steps"],
                      "workers": self.cfg["workers"]})
            self.allocate()
            check_dataset(self.osh, self.cfg["dataset"], self.cfg["workers"],
                          self.cfg["block_size"])
            return self.attempts(self.prepare_out())
        except (JobFailed, SyscallError, ValueError) as e:
            terminated = self.stop.is_set()
            self.say({"state": "killed" if terminated else "failed", "error": str(e),
                      "elapsed_s": time.monotonic() - self.started})
            return EXIT_TERMINATED if terminated else 1
        finally:
            self.release()

    def attempts(self, resume: str) -> int:
        """Attempt after attempt, each from the last complete checkpoint, until one
        succeeds (0) or none is left, SIGTERM came or time is up (JobFailed)."""
        total = 1 + self.cfg["restarts"]
        attempt = 1
        while True:
            failure = self.attempt(resume)
            if failure is None:
                return self.done(attempt)
            if self.stop.is_set() or time.monotonic() >= self.deadline or attempt == total:
                raise JobFailed(failure)
            attempt += 1
            resume = resolve_checkpoint(self.osh, self.cfg["out"]) or ""
            self.say({"state": "restarting", "attempt": attempt, "attempts": total,
                      "error": failure, "checkpoint": resume})

    def say(self, info: dict[str, Any]) -> None:
        """Report info as the job's (merged into what its workers reported)."""
        print(json.dumps(info), flush=True)
        report(self.osh, info)

    def allocate(self) -> None:
        """GPUs of the job's own, when it wants some and the executor gave none."""
        if self.cfg["gpus"] == 0 or "alloc_id" in self.cfg:
            return
        alloc = self.osh.alloc_gpu(memory_bytes(self.cfg), count=self.cfg["gpus"])
        self.own_alloc = alloc["id"]
        self.cfg.update(alloc_id=alloc["id"], devices=list(alloc["devices"]),
                        simulated=bool(alloc["simulated"]), gpu_bytes=int(alloc["bytes_each"]))

    def release(self) -> None:
        if self.own_alloc is not None:
            try:
                self.osh.free_gpu(self.own_alloc)
            except SyscallError:
                pass  # the kernel frees it when the job ends anyway
            self.own_alloc = None

    def prepare_out(self) -> str:
        """The checkpoint the first attempt resumes from ("" for none). A fresh run
        (resume false) over an existing model replaces it: its old checkpoints go,
        `latest` first, so nothing reads a half-replaced model. (The executor refuses
        such a run with EEXIST before it starts, unless the model has no checkpoint:
        what is removed here is what a job killed before its first one left.)"""
        out = self.cfg["out"]
        existing = resolve_checkpoint(self.osh, out) if _exists(self.osh, out) else None
        if existing is not None and self.cfg["resume"]:
            saved = read_meta(self.osh, existing)[1]["model"]
            want = model_config(self.cfg).to_dict()
            if saved != want:
                raise JobFailed(f"cannot resume {existing}: its model {saved} is not the "
                                f"configured {want}")
            return existing
        if existing is not None:
            if _exists(self.osh, f"{out}/latest"):
                self.osh.unlink(f"{out}/latest")
            for entry in self.osh.listdir(out):
                if entry["type"] == "dir" and _is_step_dir(entry["name"]):
                    remove_tree(self.osh, entry["path"])
        return ""

    def worker_env(self, rank: int, port: int, resume: str) -> dict[str, str]:
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(self.cfg["workers"]), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), CONFIG_ENV: json.dumps(self.cfg),
               RESUME_ENV: resume, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
               JOB_ENV: str(self.osh.pid)}
        devices = self.cfg.get("devices") or []
        real = devices and not self.cfg.get("simulated", True)
        # no GPU the job does not hold: an empty list hides them all
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices) if real else ""
        return env

    def attempt(self, resume: str) -> str | None:
        """Run the workers once; None when all ended with status 0, else why not."""
        port = free_port()
        pids: dict[int, int] = {}  # llmos pid -> rank
        try:
            for rank in range(self.cfg["workers"]):
                pid = self.osh.spawn(["python", "-m", "drivers.executor.train", "--worker"],
                                     env=self.worker_env(rank, port, resume))
                pids[pid] = rank
            return self.supervise(pids)
        finally:
            self.kill_all(pids)

    def supervise(self, pids: dict[int, int]) -> str | None:
        """Wait for the workers (removing each from pids as it is reaped) until all
        are done, one fails, SIGTERM comes or the watchdog fires."""
        while pids:
            if self.stop.is_set():
                return "terminated (SIGTERM)"
            if time.monotonic() >= self.deadline:
                return f"watchdog: timeout_s = {self.cfg['timeout_s']:g} s passed"
            ended = self.reap(WAIT_SLICE_S)
            if ended is None:
                continue
            rank = pids.pop(ended["pid"], None)
            if rank is not None and ended["status"] != 0:
                return self.blame(pids, rank, ended)
        return None

    def reap(self, timeout: float) -> dict[str, Any] | None:
        """A child that ended within timeout (wait's record), or None."""
        try:
            return self.osh.wait(timeout=timeout)
        except SyscallError as e:
            if e.errno == Errno.ETIMEDOUT:
                return None
            raise

    def blame(self, pids: dict[int, int], rank: int, ended: dict[str, Any]) -> str:
        """Why the attempt failed, after a first worker ended badly. When one worker
        dies of a signal, gloo fails in every other one too, and which the kernel
        reaps first is a race: so a worker that failed with a status is not blamed
        before the others had BLAME_GRACE_S to end, and one killed by a signal
        (status < 0), if any, is the one named."""
        failed = [(rank, ended)]
        deadline = time.monotonic() + BLAME_GRACE_S
        while pids and ended["status"] > 0 and time.monotonic() < deadline:
            other = self.reap(0.2)
            if other is None:
                continue
            r = pids.pop(other["pid"], None)
            if r is not None and other["status"] != 0:
                failed.append((r, other))
                if other["status"] < 0:
                    break
        rank, ended = min(failed, key=lambda f: f[1]["status"] >= 0)  # a signal first
        return (f"worker rank {rank} (pid {ended['pid']}) ended with status "
                f"{ended['status']} ({ended.get('reason', '?')}); its log: "
                f"log/proc/{ended['pid']}.log")

    def kill_all(self, pids: dict[int, int]) -> None:
        """SIGKILL the workers still in pids and reap them."""
        for pid in list(pids):
            try:
                self.osh.kill(pid, "KILL")
            except SyscallError as e:
                if e.errno != Errno.ESRCH:
                    raise
        for pid in list(pids):
            try:
                self.osh.wait(pid=pid, timeout=REAP_TIMEOUT_S)
            except SyscallError as e:
                if e.errno not in (Errno.ECHILD, Errno.ETIMEDOUT):
                    raise
            pids.pop(pid)

    def done(self, attempts: int) -> int:
        where = resolve_checkpoint(self.osh, self.cfg["out"])
        if where is None:
            raise JobFailed(f"the workers ended but {self.cfg['out']} holds no checkpoint")
        where, meta = read_meta(self.osh, where)
        stats = meta.get("stats", {})
        self.say({"state": "done", "step": meta["step"], "loss": meta["loss"],
                  "loss0": stats.get("loss0"), "tokens_per_s": stats.get("tokens_per_s"),
                  "step_ms": stats.get("step_ms"), "checkpoint": where,
                  "elapsed_s": time.monotonic() - self.started, "attempts": attempts,
                  "attempt": None, "error": None})  # None: drop a restart's keys
        return 0


def job_main() -> int:
    """The job under llmos; ends through exit() with Job.run's status."""
    from syscalls.client import connect

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    osh = connect()
    try:
        status = Job(osh, normalize(json.loads(os.environ[CONFIG_ENV])), stop).run()
    except BaseException:  # noqa: B902 - a bug here must still end the job as failed
        traceback.print_exc()
        status = 1
    osh.exit(status)
    return status


# -- direct mode (no llmos) -----------------------------------------------------------------


class DirectHooks:
    """Direct mode: rank 0 keeps the loss curve; no reports, no checkpoints."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.curve: list[tuple[int, float]] = []

    def log(self, trainer: Trainer, progress: Progress) -> None:
        if trainer.rank == 0:
            self.curve.append((progress.step, progress.loss))
            if self.verbose:
                print(f"step {progress.step}/{progress.steps} loss {progress.loss:.4f} "
                      f"{progress.step_ms:.0f} ms/step {progress.elapsed_s:.1f} s", flush=True)

    def checkpoint(self, trainer: Trainer, progress: Progress) -> None:
        pass


def _direct_worker(rank: int, cfg: dict, data: np.ndarray, port: int, results: Any,
                   verbose: bool) -> None:
    """One torch.multiprocessing worker of run_direct: the shard, the loop, and on
    rank 0 the result put on results."""
    world = cfg["workers"]
    set_threads(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=DIST_TIMEOUT)
    try:
        a, b = shard_bounds(len(data), rank, world)
        shard = torch.from_numpy(np.ascontiguousarray(data[a:b], dtype=np.uint8))
        trainer = Trainer(cfg, shard, rank, world, torch.device("cpu"))
        hooks = DirectHooks(verbose)
        t0 = time.perf_counter()
        result = train_loop(trainer, hooks, cfg["steps"])
        if rank == 0:
            timed = result.durations[3:] or result.durations
            results.put({"step_ms": 1e3 * sum(timed) / len(timed), "loss0": result.loss0,
                         "loss": result.loss, "steps": len(result.durations),
                         "seconds": time.perf_counter() - t0, "workers": world,
                         "tokens_per_s": trainer.batch_tokens * len(timed) / sum(timed),
                         "curve": hooks.curve})
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the process during interpreter finalization ("terminate
    # called without an active exception", seen once in CI): the result is sent, so
    # leave without finalizing (a SimpleQueue's put has written the result already)
    os._exit(0)


def direct_config(config: dict, steps: int) -> dict:
    """A normalized config for direct mode: name and dataset are not needed there."""
    return normalize({"name": "direct", "dataset": "/direct", **config, "steps": steps})


def run_direct(config: dict, data: np.ndarray, steps: int, verbose: bool = False) -> dict:
    """Train on data (uint8 bytes) for steps with config["workers"] gloo processes
    (torch.multiprocessing, no llmos): the same loop as a job's workers.

    Returns {"step_ms": mean step time without the first 3 steps, "loss0", "loss"
    (the last log_every steps' mean), "steps", "seconds", "workers", "tokens_per_s",
    "curve": [(step, loss), ...]}."""
    import torch.multiprocessing as mp

    cfg = direct_config(config, steps)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    need = cfg["workers"] * (cfg["block_size"] + 1)
    if len(data) < need:
        raise ValueError(f"{len(data)} bytes of data: {cfg['workers']} worker(s) of "
                         f"block_size {cfg['block_size']} need at least {need}")
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_direct_worker, args=(cfg, data, free_port(), results, verbose),
             nprocs=cfg["workers"], join=True)
    return results.get()


def _value(text: str) -> Any:
    """A key=value's value: JSON (numbers, true/false) or else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def direct_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drivers.executor.train --direct",
        description="Train on FILE's bytes without llmos (the job's loop, gloo workers).")
    parser.add_argument("file", help="raw bytes to train on")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="training config, e.g. steps=300 workers=2 lr=2e-3")
    args = parser.parse_args(argv)
    config = {}
    for item in args.settings:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: settings are key=value")
        config[key] = _value(text)
    data = np.fromfile(args.file, dtype=np.uint8)
    steps = int(config.pop("steps", 300))
    try:
        result = run_direct(config, data, steps, verbose=True)
    except ValueError as e:
        parser.error(str(e))
    result.pop("curve")
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main()
    if argv[:1] == ["--direct"]:
        return direct_cli(argv[1:])
    if argv[:1] in ([], ["--job"]):  # the executor adds "--job NAME" for ps to show
        return job_main()
    print("usage: python -m drivers.executor.train [--job [NAME] | --worker | "
          "--direct FILE [key=value ...]]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
