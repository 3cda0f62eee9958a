"""One worker of a training job under llmos (`python -m drivers.executor.train
--worker`, spawned by the job with RANK, WORLD_SIZE, MASTER_ADDR/PORT and the
config in its environment).

It joins torch.distributed (gloo on CPU and simulated GPUs, NCCL on real ones),
reads its own shard of the dataset (a sliced read of a uint8 1-D tensor), and
trains; rank 0 reports progress to the job (`report` syscall, pid = the job) and
writes checkpoints (checkpoint.py). SIGTERM or SIGINT asks it to stop: the ranks
agree at the next step, rank 0 checkpoints that step, and every worker exits 0.
It must never outlive its job: a worker whose job is gone exits.
Exit statuses: 0 done or stopped, 1 failed (the traceback is in its llmos log).
"""
from __future__ import annotations

import json
import os
import threading
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from syscalls import Errno, SyscallError

from ._config import dataset_error, hf_job, model_identity, normalize
from .checkpoint import read_checkpoint
from .trainer import DIST_TIMEOUT, Progress, Trainer, set_threads, shard_bounds, train_loop

CONFIG_ENV = "LLMOS_TRAIN_CONFIG"
RESUME_ENV = "LLMOS_TRAIN_RESUME"
JOB_ENV = "LLMOS_TRAIN_JOB"  # the job's llmos pid, for its workers to watch


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


def checkpoint_meta(trainer: Trainer, progress: Progress) -> dict[str, Any]:
    """The config JSON of a checkpoint: `model` is what a resume must match
    (_config.model_identity); `stats` carries what the job's final report needs."""
    return {"model": model_identity(trainer.cfg), "step": trainer.step,
            "loss": progress.loss, "tokens": trainer.tokens, "dataset": trainer.cfg["dataset"], "train": trainer.cfg,
            "stats": {"loss0": progress.loss0, "tokens_per_s": progress.tokens_per_s,
                      "step_ms": progress.step_ms, "elapsed_s": progress.elapsed_s}}


class LlmosHooks:
    """A worker under llmos: rank 0 reports to the job and writes checkpoints; every
    rank stops if its job is gone (it would otherwise train on as an orphan), and
    says whether a signal asked it to stop."""

    def __init__(self, osh: Any, job_pid: int, stop: threading.Event) -> None:
        self.osh, self.job_pid, self.stop = osh, job_pid, stop
        self.reporting = True

    def stop_requested(self) -> bool:
        return self.stop.is_set()

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
            path = trainer.family.write_checkpoint(
                self.osh, trainer.cfg["out"], trainer.model, trainer.optimizer,
                checkpoint_meta(trainer, progress), trainer.history_tensor())
            if self.reporting:  # jobs shows a running job's last checkpoint too
                self.reporting = report(self.osh, {"checkpoint": path}, pid=self.job_pid)


def check_dataset(osh: Any, cfg: dict) -> int:
    """The dataset's length; ENOENT if missing, EINVAL when it cannot train cfg's
    model (_config.dataset_error)."""
    st = osh.stat(cfg["dataset"])
    why = dataset_error(cfg, st)
    if why:
        raise SyscallError(Errno.EINVAL, why)
    return int(st["shape"][0])


def read_shard(osh: Any, cfg: dict, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of the dataset: [r*N//W, (r+1)*N//W)."""
    n = check_dataset(osh, cfg)
    a, b = shard_bounds(n, rank, world)
    return torch.as_tensor(osh.load_tensor(cfg["dataset"], slice=[[a, b]])).clone()


def pick_device(cfg: dict, rank: int) -> tuple[torch.device, str]:
    """cuda (rank modulo the GPUs it sees: NCCL wants one GPU per rank) with NCCL when
    the job holds real GPUs, else the CPU with gloo."""
    real = cfg.get("devices") and not cfg.get("simulated", True)
    if real and torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device, "nccl"
    return torch.device("cpu"), "gloo"


def worker_main(stop: threading.Event) -> int:
    """A worker under llmos: train (until done, or stop is set by a signal), then end
    through exit() so that the kernel has the status at once (a process that merely
    returns keeps its connection's threads and sockets to the last moment)."""
    from syscalls.client import connect

    cfg = normalize(json.loads(os.environ[CONFIG_ENV]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    set_threads(world)
    osh = connect()
    try:
        run_worker(osh, cfg, rank, world, os.environ.get(RESUME_ENV, ""), stop)
        status = 0
    except BaseException as e:  # noqa: B902 - whatever it was, the job must see a failure
        traceback.print_exc()
        status = 1
        tell_job(osh, f"rank {rank}: {type(e).__name__}: {e}")
    osh.exit(status)
    return status


def tell_job(osh: Any, why: str) -> None:
    """Put why a worker failed into its job's info (worker_error), for the job's
    final error: the first line, at most 300 characters."""
    job = os.environ.get(JOB_ENV)
    try:
        if job:
            report(osh, {"worker_error": why.strip().splitlines()[0][:300]}, pid=int(job))
    except (SyscallError, ValueError, IndexError):
        pass  # the job is gone, or this llmos cannot say: the worker's log has it


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


def run_worker(osh: Any, cfg: dict, rank: int, world: int, resume: str,
               stop: threading.Event) -> None:
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
        shard = read_shard(osh, cfg, rank, world)
        family = None
        if hf_job(cfg):
            from ._hftrain import HFFamily
            family = HFFamily(osh, cfg)
            shard = family.tokens(shard)
        start = read_checkpoint(osh, resume) if resume else None
        trainer = Trainer(cfg, shard, rank, world, device, start, family)
        result = train_loop(trainer, LlmosHooks(osh, job_pid, stop), cfg["steps"])
        if result.stopped and rank == 0:
            print(f"stopped at step {trainer.step} on request", flush=True)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
