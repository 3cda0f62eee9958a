"""The job supervisor (`python -m drivers.executor.train --job NAME --out PATH`,
spawned by the kernel for spawn_train): it owns its workers, as torchrun's agent
does, but through llmos.

The job reads its normalized config from LLMOS_TRAIN_CONFIG (JSON), allocates GPUs
for itself when asked (gpus > 0 and no alloc_id from the executor), and runs
1 + restarts attempts. Each attempt spawns `workers` workers through llmos on a
fresh TCP port and waits for them; when one fails the job kills the rest and
relaunches them all from the last complete checkpoint. As DESIGN.md's lessons say,
the job owns restarts (torch's elastic in-place restart hung on gloo; nothing here
uses it), and a wall-clock watchdog (timeout_s) ends a job that runs too long.

Stopping: a first SIGTERM (or SIGINT) is forwarded to the workers, which agree on
a step, checkpoint it and exit 0; the job reports state "stopped" and exits 143.
A second signal, the watchdog, or STOP_GRACE_S without the workers ending
SIGKILLs them (state "killed"). It must never leave a worker running behind it.
Exit statuses: 0 done, 1 failed (its last report says why), 143 stopped or killed
after a signal.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from typing import Any

from syscalls import Errno, SyscallError

from ._config import memory_bytes, model_identity, normalize
from ._worker import CONFIG_ENV, JOB_ENV, RESUME_ENV, check_dataset, report
from .checkpoint import (exists, history_len, is_step_dir, read_meta, remove_tree,
                         resolve_checkpoint)
from .trainer import free_port

WAIT_SLICE_S = 1.0       # the job's supervision tick: signal and watchdog latency
REAP_TIMEOUT_S = 10.0
STOP_GRACE_S = 60.0      # how long stopping workers get to checkpoint and exit
BLAME_GRACE_S = 2.0  # after a worker fails, how long the others get to end (blame)
EXIT_TERMINATED = 128 + signal.SIGTERM
WORKER_ARGV = ["python", "-m", "drivers.executor.train", "--worker"]


def _signalled(ended: dict[str, Any]) -> bool:
    """A worker killed by a signal, or lost with its node (no status at all)."""
    return ended["status"] is None or ended["status"] < 0


class JobFailed(Exception):
    """The job cannot go on; the message says why, for its final report."""


class Job:
    """One training job: allocation, attempts, supervision, reports. stop is set by
    a first signal (stop cleanly), force by a second (kill the workers now)."""

    def __init__(self, osh: Any, cfg: dict, stop: threading.Event,
                 force: threading.Event) -> None:
        self.osh, self.cfg, self.stop, self.force = osh, cfg, stop, force
        self.started = time.monotonic()
        self.deadline = self.started + cfg["timeout_s"]
        self.own_alloc: str | None = None

    def run(self) -> int:
        """The whole job; its exit status."""
        try:
            self.say({"state": "starting", "steps": self.cfg["steps"],
                      "workers": self.cfg["workers"],
                      # its loss is the distillation loss, not the cross-entropy
                      **({"teacher": self.cfg["teacher"]} if self.cfg.get("teacher") else {})})
            self.allocate()
            check_dataset(self.osh, self.cfg)
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
        succeeds or stops cleanly, or none is left, a signal came or time is up
        (JobFailed)."""
        total = 1 + self.cfg["restarts"]
        attempt = 1
        while True:
            failure = self.attempt(resume)
            if failure is None:
                return self.finish(attempt)
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
        alloc = self.osh.alloc_gpu(memory_bytes(self.cfg, self.osh), count=self.cfg["gpus"])
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
        existing = resolve_checkpoint(self.osh, out) if exists(self.osh, out) else None
        if existing is not None and self.cfg["resume"]:
            saved = read_meta(self.osh, existing)[1]["model"]
            want = model_identity(self.cfg)
            if saved != want:
                raise JobFailed(f"cannot resume {existing}: its model {saved} is not the "
                                f"configured {want}")
            return existing
        if existing is not None:
            if exists(self.osh, f"{out}/latest"):
                self.osh.unlink(f"{out}/latest")
            for entry in self.osh.listdir(out):
                if entry["type"] == "dir" and is_step_dir(entry["name"]):
                    remove_tree(self.osh, entry["path"])
        return ""

    def placement(self) -> list[dict[str, Any] | None]:
        """The node record each rank runs on (None: with the job): with `nodes`,
        rank r on the r-th ready one of them, round robin; a node lost since the last
        attempt is left out (its workers' ranks go to the others)."""
        if not self.cfg.get("nodes"):
            return [None] * self.cfg["workers"]
        names = self.cfg["nodes"].split(",")
        known = {n["name"]: n for n in self.osh.nodes()}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise JobFailed(f"no node {', '.join(unknown)} (llmos nodes lists them)")
        ready = [known[n] for n in names if known[n]["state"] == "ready"]
        if not ready:
            raise JobFailed(f"none of the nodes {self.cfg['nodes']} is ready")
        return [ready[r % len(ready)] for r in range(self.cfg["workers"])]

    def worker_env(self, rank: int, port: int, resume: str,
                   master: str = "127.0.0.1") -> dict[str, str]:
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(self.cfg["workers"]), "MASTER_ADDR": master,
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
        if self.stop.is_set():
            return "stopped (a signal) before its workers started"
        port = free_port()
        pids: dict[int, int] = {}  # llmos pid -> rank
        where = self.placement()
        # rank 0 serves the rendezvous: at its node's address when it has its own
        master = where[0]["addr"] if where[0] is not None and where[0].get("addr") \
            else "127.0.0.1"
        if where[0] is not None:
            self.say({"nodes": ",".join(sorted({w["name"] for w in where if w}))})
        try:
            for rank in range(self.cfg["workers"]):
                node = where[rank]["name"] if where[rank] is not None else None
                pid = self.osh.spawn(WORKER_ARGV, node=node,
                                     env=self.worker_env(rank, port, resume, master))
                pids[pid] = rank
            return self.supervise(pids)
        finally:
            self.kill_all(pids)

    def supervise(self, pids: dict[int, int]) -> str | None:
        """Wait for the workers (removing each from pids as it is reaped) until all
        are done, one fails, or the watchdog fires; on a first signal, ask them to
        stop (TERM) and give them STOP_GRACE_S; on a second, give up on them."""
        stop_by = None
        while pids:
            if self.force.is_set():
                return "killed: a second signal while the workers were stopping"
            if self.stop.is_set() and stop_by is None:
                self.signal_all(pids, "TERM")
                self.say({"state": "stopping"})
                stop_by = time.monotonic() + STOP_GRACE_S
            if stop_by is not None and time.monotonic() >= stop_by:
                return f"killed: the workers did not stop within {STOP_GRACE_S:g} s"
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
        while pids and not _signalled(ended) and time.monotonic() < deadline:
            other = self.reap(0.2)
            if other is None:
                continue
            r = pids.pop(other["pid"], None)
            if r is not None and other["status"] != 0:
                failed.append((r, other))
                if _signalled(other):
                    break
        # a signal (or a lost node: no status) first
        rank, ended = min(failed, key=lambda f: not _signalled(f[1]))
        why = self.worker_error()
        return (f"worker rank {rank} (pid {ended['pid']}) ended with status "
                f"{ended['status']} ({ended.get('reason', '?')}){why}; its log: "
                f"log/proc/{ended['pid']}.log")

    def worker_error(self) -> str:
        """": <why>" when a worker said why it failed (_worker.tell_job), else ""."""
        try:
            me = next((p for p in self.osh.ps() if p["pid"] == self.osh.pid), None)
        except SyscallError:
            return ""
        why = ((me or {}).get("info") or {}).get("worker_error")
        return f": {why}" if why else ""

    def signal_all(self, pids: dict[int, int], sig: str) -> None:
        for pid in list(pids):
            try:
                self.osh.kill(pid, sig)
            except SyscallError as e:
                if e.errno != Errno.ESRCH:
                    raise

    def kill_all(self, pids: dict[int, int]) -> None:
        """SIGKILL the workers still in pids and reap them."""
        self.signal_all(pids, "KILL")
        for pid in list(pids):
            try:
                self.osh.wait(pid=pid, timeout=REAP_TIMEOUT_S)
            except SyscallError as e:
                if e.errno not in (Errno.ECHILD, Errno.ETIMEDOUT):
                    raise
            pids.pop(pid)

    def finish(self, attempts: int) -> int:
        """The workers all ended with status 0: done (0) when they trained every
        step, stopped (143) when a signal stopped them first."""
        where = resolve_checkpoint(self.osh, self.cfg["out"])
        if where is None:
            raise JobFailed(f"the workers ended but {self.cfg['out']} holds no checkpoint")
        where, meta = read_meta(self.osh, where)
        stats = meta.get("stats", {})
        stopped = self.stop.is_set() and meta["step"] < self.cfg["steps"]
        self.say({"state": "stopped" if stopped else "done", "step": meta["step"],
                  "steps": self.cfg["steps"], "loss": meta["loss"],
                  "loss0": stats.get("loss0"), "tokens_per_s": stats.get("tokens_per_s"),
                  "step_ms": stats.get("step_ms"), "checkpoint": where,
                  "history_len": history_len(self.osh, where),
                  "elapsed_s": time.monotonic() - self.started, "attempts": attempts,
                  "attempt": None, "error": None,
                  "worker_error": None})  # None: drop a restart's keys
        return EXIT_TERMINATED if stopped else 0


def job_main(stop: threading.Event, force: threading.Event) -> int:
    """The job under llmos; ends through exit() with Job.run's status. stop and
    force are set by the first and a second SIGTERM or SIGINT."""
    from syscalls.client import connect

    osh = connect()
    try:
        status = Job(osh, normalize(json.loads(os.environ[CONFIG_ENV])), stop, force).run()
    except BaseException:  # noqa: B902 - a bug here must still end the job as failed
        traceback.print_exc()
        status = 1
    osh.exit(status)
    return status
