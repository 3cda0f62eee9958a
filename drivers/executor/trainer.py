"""One data-parallel worker's training: the model in DDP, AdamW, the learning-rate
schedule, batches from its shard, and the loop (train_loop) that every way of
running workers shares: a job's workers under llmos (_worker.py) and the
benchmark's direct mode (bench/direct_train.py).

Every rank runs the same loop in lockstep: each step ends with one all-reduce of
the step's loss and of a stop flag, so all ranks log, checkpoint and stop at the
same step (their hooks may use collectives). It must never make syscalls: what a
worker does with progress and checkpoints is its Hooks'.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
import time
from array import array
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ._config import model_config
from ._gpt import GPT
from .checkpoint import Checkpoint, load_state, write_checkpoint

DIST_TIMEOUT = datetime.timedelta(seconds=60)  # rendezvous and every collective


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
    loss: the mean over the last window of the loss averaged over all workers;
    stopping: the workers were asked to stop, and this is their last step."""

    step: int
    steps: int
    loss: float
    loss0: float
    tokens: int
    tokens_per_s: float
    step_ms: float
    elapsed_s: float
    workers: int
    stopping: bool = False

    def info(self) -> dict[str, Any]:
        return {"state": "stopping" if self.stopping else "running", "step": self.step,
                "steps": self.steps, "loss": self.loss, "loss0": self.loss0,
                "tokens_per_s": self.tokens_per_s, "step_ms": self.step_ms,
                "elapsed_s": self.elapsed_s, "workers": self.workers}


class Hooks(Protocol):
    """Where a worker's loop differs by mode: whether this rank was asked to stop,
    what it does with progress and checkpoints. log and checkpoint are called on
    every rank, in the same order (they may use collectives)."""

    def stop_requested(self) -> bool: ...

    def log(self, trainer: Trainer, progress: Progress) -> None: ...

    def checkpoint(self, trainer: Trainer, progress: Progress) -> None: ...


class Family(Protocol):
    """What a Trainer needs of a model family (the byte GPT here; a Hugging Face
    causal LM in _hftrain.py): its model, a batch's loss, and its checkpoints."""

    def build(self) -> nn.Module: ...

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def write_checkpoint(self, osh: Any, out: str, model: nn.Module,
                         optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                         history: torch.Tensor) -> str: ...


class GPTFamily:
    """The byte-level GPT (_gpt.py): bytes in, the model's own loss, checkpoints in
    checkpoint.py's layout."""

    def __init__(self, cfg: dict) -> None:
        self.config = model_config(cfg)

    def build(self) -> nn.Module:
        return GPT(self.config)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)[1]

    def write_checkpoint(self, osh: Any, out: str, model: nn.Module,
                         optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                         history: torch.Tensor) -> str:
        return write_checkpoint(osh, out, model, optimizer, meta, history)


class Trainer:
    """One worker's model (wrapped in DDP), optimizer, data shard and loss history.
    family builds the model (default: the byte GPT of cfg); shard holds its tokens
    (uint8 bytes for the GPT, int32 ids for a Hugging Face model)."""

    def __init__(self, cfg: dict, shard: torch.Tensor, rank: int, world: int,
                 device: torch.device, start: Checkpoint | None = None,
                 family: Family | None = None) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.family = GPTFamily(cfg) if family is None else family
        self.block_size = cfg["block_size"]
        if shard.dim() != 1 or shard.numel() < self.block_size + 1:
            raise ValueError(f"rank {rank}: a shard of {shard.numel()} tokens is "
                             f"shorter than block_size + 1 = {self.block_size + 1}")
        self.step = 0 if start is None else int(start.meta["step"])
        # the untrained model's loss, measured once per model, carried by checkpoints
        self.loss0: float | None = None if start is None else \
            start.meta.get("stats", {}).get("loss0")
        self.tokens = 0 if start is None else int(start.meta.get("tokens", 0))
        # step, loss averaged over workers, step, loss... of every step since the
        # job's first run: 8 bytes a step, however long the job
        self.history = array("f")
        if start is not None and start.history is not None:
            rows = start.history.float().reshape(-1, 2)
            self.history.frombytes(rows[rows[:, 0] <= self.step].numpy().tobytes())
        # distinct batches per rank, and after a resume not the ones already seen
        torch.manual_seed(cfg["seed"] + rank + 16 * self.step)
        self.shard = shard.to(device)  # 1 B (bytes) or 4 B (ids) a token, not 8
        self.model = self.family.build().to(device)
        self.optimizer = make_optimizer(self.model, cfg)
        if start is not None:
            load_state(self.model, self.optimizer, start)
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.offsets = torch.arange(self.block_size + 1, device=device)

    @property
    def batch_tokens(self) -> int:
        """Tokens one step trains on, over all workers."""
        return self.cfg["batch_size"] * self.block_size * self.world

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows of block_size + 1 tokens of this rank's shard."""
        t = self.block_size
        starts = torch.randint(self.shard.numel() - t, (self.cfg["batch_size"],))
        chunk = self.shard[starts.to(self.device)[:, None] + self.offsets].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_step(self) -> torch.Tensor:
        """One optimizer step; this rank's loss (detached, not yet averaged)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        x, y = self.batch()
        loss = self.family.loss(self.ddp, x, y)
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
        return self.family.loss(self.model, x, y)

    def mean_over_workers(self, value: torch.Tensor) -> float:
        """value averaged over all ranks (a collective: every rank calls it)."""
        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return float(total.item()) / self.world

    def history_tensor(self) -> torch.Tensor:
        """The loss history as checkpoints keep it: float32 rows of (step, loss)."""
        return torch.from_numpy(np.frombuffer(self.history, dtype=np.float32).copy()
                                ).reshape(-1, 2)

    def agree(self, loss: torch.Tensor, stop: bool) -> Agreement:
        """Start the all-reduce of this step's loss and of whether this rank was
        asked to stop (a collective: every rank starts one at the end of every
        step, so that all of them stop at the same step)."""
        both = torch.stack([loss.detach().float().reshape(()),
                            torch.tensor(float(stop), device=loss.device)])
        return Agreement(self.step, both, dist.all_reduce(both, async_op=True), self.world)


@dataclass
class Agreement:
    """One step's all-reduce of (loss, stop flag), in flight until result()."""

    step: int
    values: torch.Tensor
    work: Any
    world: int

    def result(self) -> tuple[float, bool]:
        """(the step's loss averaged over all ranks, whether any rank asked to stop)."""
        self.work.wait()
        total, stops = self.values.tolist()
        return total / self.world, stops > 0


@dataclass
class LoopResult:
    """What a finished loop measured: loss0 and the last window's loss (averaged
    over workers), every step's seconds, and whether it ended on a stop request."""

    loss0: float
    loss: float
    durations: list[float]
    stopped: bool = False


def train_loop(trainer: Trainer, hooks: Hooks, steps: int) -> LoopResult:
    """Train until trainer.step == steps, or a rank is asked to stop.

    Every rank: loss0 (the averaged loss before any step; a resumed model keeps
    the one its checkpoint holds), then steps, each ending with the start of the
    all-reduce of its loss and stop request (trainer.agree), with hooks.log every
    log_every steps and hooks.checkpoint every checkpoint_every steps, and both
    at the last step: steps, or the step at which the ranks agreed to stop.

    A step's agreement is waited for at the end of the next step, so that it
    overlaps that step's work instead of making the ranks wait for each other once
    more per step (waited for at once, it cost about 1 ms a step with 2 gloo
    workers on 2 busy cores: 15% of a tiny model's step), except at a step that
    logs or checkpoints, which waits for its own. Every rank waits at the same
    steps for the same sums, so all of them stop at the same step: the one after
    a request, or the request's own when it logs or checkpoints."""
    cfg = trainer.cfg
    loss0 = trainer.loss0
    if loss0 is None:
        loss0 = trainer.loss0 = trainer.mean_over_workers(trainer.first_loss())
    durations: list[float] = []
    window: list[float] = []
    start = window_start = time.perf_counter()
    loss, stopped = math.nan, False

    def settle(agreement: Agreement) -> bool:
        """Wait for a step's agreement; keep its loss; whether to stop."""
        mean, stop = agreement.result()
        trainer.history.extend((agreement.step, mean))
        window.append(mean)
        return stop

    previous: Agreement | None = None
    while trainer.step < steps and not stopped:
        t0 = time.perf_counter()
        current = trainer.agree(trainer.train_step(), hooks.stop_requested())
        if previous is not None:
            stopped = settle(previous)
        step = trainer.step
        logs = step % cfg["log_every"] == 0
        saves = cfg["checkpoint_every"] > 0 and step % cfg["checkpoint_every"] == 0
        previous = current
        if logs or saves or stopped or step == steps:
            stopped = settle(current) or stopped
            previous = None
        durations.append(time.perf_counter() - t0)
        if previous is not None:
            continue
        last = step == steps or stopped
        logs, saves = logs or last, saves or last
        loss = sum(window) / len(window)
        now = time.perf_counter()
        seconds = (now - window_start) / len(window)
        timed = durations[3:] or durations  # as bench/direct_train.py reports it
        progress = Progress(step, steps, loss, loss0, trainer.tokens,
                            trainer.batch_tokens / seconds, 1e3 * sum(timed) / len(timed),
                            now - start, trainer.world, stopped)
        hooks_start = time.perf_counter()
        if logs:
            hooks.log(trainer, progress)
        if saves:
            hooks.checkpoint(trainer, progress)
        if logs:
            window, window_start = [], time.perf_counter()
        else:  # a checkpoint's time is not a step's
            window_start += time.perf_counter() - hooks_start
    return LoopResult(loss0, loss, durations, stopped)


def set_threads(workers: int) -> int:
    """Give each worker its share of the cores. torch's intra-op pool defaults to
    every core in each process: W workers on C <= W cores would run W * C busy
    threads that preempt each other (and gloo's allreduce), so each gets C // W
    threads, at least one."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    return threads


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share of n bytes: [r*n//W, (r+1)*n//W)."""
    return rank * n // world, (rank + 1) * n // world


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (each attempt takes a fresh one, so a
    rendezvous never meets a previous attempt's survivors)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
