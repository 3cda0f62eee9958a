"""Training jobs end to end through a real kernel: spawn_train, the job's workers
as llmos processes, progress reports, checkpoints, resume, faults."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import torch

from conftest import Booted, errno_of, wait_until
from syscalls import Errno

ROOT = Path(__file__).resolve().parent.parent
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "batch_size": 8,
        "workers": 2, "log_every": 5, "checkpoint_every": 10, "warmup": 2, "lr": 3e-3}
TEXT = b"the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def kernel() -> Iterator[Booted]:
    with Booted() as b:
        with b.connect() as osh:
            osh.mkdir("/datasets")
            osh.save_tensor("/datasets/fox", torch.frombuffer(bytearray(TEXT), dtype=torch.uint8))
        yield b



def workers_of(osh: Any, job: int) -> list[dict]:
    return [p for p in osh.ps() if p["ppid"] == job and p["state"] == "running"]


def info_of(osh: Any, job: int) -> dict:
    return next(p for p in osh.ps() if p["pid"] == job)["info"]


def history_of(osh: Any, checkpoint: str) -> list[list[float]]:
    history = osh.load_tensor(f"{checkpoint}/history")
    assert history.dtype == torch.float32 and history.shape[1] == 2
    return history.tolist()


def test_a_job_trains_reports_checkpoints_and_its_model_serves(kernel: Booted) -> None:
    with kernel.connect() as osh:
        job = osh.spawn_train({**TINY, "name": "fox", "dataset": "/datasets/fox",
                               "steps": 30})
        me = next(p for p in osh.ps() if p["pid"] == job)
        assert me["ppid"] == osh.getpid() and me["uid"] == 1000
        assert me["argv"][-4:] == ["--job", "fox", "--out", "/models/fox"]
        assert wait_until(lambda: len(workers_of(osh, job)) == 2, timeout=60)
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0, (end, kernel.boot_log())
        info = end["info"]
        assert info["state"] == "done" and info["step"] == info["steps"] == 30
        assert info["loss"] < info["loss0"] - 0.5, info  # the text is learnable
        assert info["history_len"] == 30
        assert {e["name"] for e in osh.listdir("/models/fox")} == {
            "latest", "step-000020", "step-000030"}  # two kept
        # a checkpoint is two tensorfs groups, its loss history and its config; the
        # weights open with the safetensors library as the state_dict (lm_head tied:
        # stored once)
        step = {e["name"]: e for e in osh.listdir("/models/fox/step-000030")}
        assert {n: e["type"] for n, e in step.items()} == {
            "config": "tensor", "model": "group", "optim": "group", "history": "tensor"}
        history = history_of(osh, "/models/fox/step-000030")
        assert [s for s, _ in history] == list(range(1, 31))
        assert sum(v for _, v in history[-5:]) / 5 == pytest.approx(info["loss"], rel=1e-5)
        from safetensors.torch import load_file
        sd = load_file(str(kernel.root / "tensors/models/fox/step-000030/model.safetensors"))
        assert "wte.weight" in sd and "lm_head.weight" not in sd
        assert sd["wte.weight"].shape == (256, TINY["n_embd"])
        assert set(osh.load_tensors("/models/fox/step-000030/optim")) == {
            "optim.exp_avg", "optim.exp_avg_sq"}
        out = osh.infer("/models/fox", "the quick brown", 20, temperature=0)
        assert out["tokens"] == 20
        assert not workers_of(osh, job)
        again = {**TINY, "name": "fox", "dataset": "/datasets/fox", "steps": 30}
        assert errno_of(osh.spawn_train, again) == Errno.EEXIST  # no silent overwrite


def test_one_out_one_job_and_models_is_shared(kernel: Booted) -> None:
    with kernel.connect(uid=1001) as other:  # /models was made 1777 by the first job
        job = other.spawn_train({**TINY, "name": "busy", "dataset": "/datasets/fox",
                                 "steps": 100000, "checkpoint_every": 0})
        try:
            again = {**TINY, "name": "busy", "dataset": "/datasets/fox", "steps": 10}
            assert errno_of(other.spawn_train, again) == Errno.EBUSY
        finally:
            other.kill(job, "TERM")
            other.wait(job, timeout=60)


def test_resume_goes_on_from_the_last_checkpoint(kernel: Booted) -> None:
    with kernel.connect() as osh:
        first = osh.spawn_train({**TINY, "name": "res", "dataset": "/datasets/fox",
                                 "steps": 10})
        assert osh.wait(first, timeout=300)["status"] == 0
        job = osh.spawn_train({**TINY, "name": "res", "dataset": "/datasets/fox",
                               "steps": 20, "resume": True})
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0 and end["info"]["step"] == 20
        names = {e["name"] for e in osh.listdir("/models/res")}
        assert names == {"latest", "step-000010", "step-000020"}
        # the history goes back to the first run's first step
        assert end["info"]["history_len"] == 20
        assert history_of(osh, "/models/res/step-000020")[:10] == \
            history_of(osh, "/models/res/step-000010")


def test_sigterm_stops_a_job_keeping_its_work_and_resume_goes_on(kernel: Booted) -> None:
    with kernel.connect() as osh:
        config = {**TINY, "name": "stopped", "dataset": "/datasets/fox", "steps": 100000,
                  "checkpoint_every": 100000}
        job = osh.spawn_train(config)
        assert wait_until(lambda: info_of(osh, job).get("step", 0) > 0, timeout=120)
        osh.kill(job, "TERM")
        end = osh.wait(job, timeout=120)
        assert end["status"] == 143 and end["reason"] == "exited", end
        info = end["info"]
        assert info["state"] == "stopped" and info["steps"] == 100000, info
        step = info["step"]
        assert step >= 5 and info["checkpoint"] == f"/models/stopped/step-{step:06d}"
        assert info["history_len"] == step and 0 < info["loss"] < 10 and info["loss0"]
        assert not workers_of(osh, job)
        # the checkpoint of the step it stopped at is complete: it serves and resumes
        assert osh.infer("/models/stopped", "the ", 5, temperature=0)["tokens"] == 5
        history = history_of(osh, info["checkpoint"])
        assert [s for s, _ in history] == list(range(1, step + 1))
        again = osh.spawn_train({**config, "steps": step + 5, "resume": True})
        end = osh.wait(again, timeout=300)
        assert end["status"] == 0 and end["info"]["state"] == "done", end
        assert end["info"]["step"] == step + 5 and end["info"]["history_len"] == step + 5
        assert history_of(osh, end["info"]["checkpoint"])[:step] == history


def test_a_killed_worker_fails_the_job_cleanly(kernel: Booted) -> None:
    with kernel.connect() as osh:
        job = osh.spawn_train({**TINY, "name": "dies", "dataset": "/datasets/fox",
                               "steps": 100000, "checkpoint_every": 0})
        assert wait_until(lambda: osh.ps() and next(
            p for p in osh.ps() if p["pid"] == job)["info"].get("step", 0) >= 5, timeout=120)
        victim = workers_of(osh, job)[1]
        os.kill(victim["os_pid"], signal.SIGKILL)
        end = osh.wait(job, timeout=120)
        assert end["status"] == 1 and end["info"]["state"] == "failed", end
        # the one killed is named, not the other, whose gloo call failed with it
        assert f"worker rank 1 (pid {victim['pid']}) ended with status -9" in \
            end["info"]["error"], end
        assert not workers_of(osh, job)
        assert not psutil.pid_exists(victim["os_pid"]) or \
            psutil.Process(victim["os_pid"]).status() == psutil.STATUS_ZOMBIE


def test_a_sigkilled_job_leaves_no_workers_behind(kernel: Booted) -> None:
    with kernel.connect() as osh:
        job = osh.spawn_train({**TINY, "name": "orphans", "dataset": "/datasets/fox",
                               "steps": 100000, "checkpoint_every": 0,
                               "log_every": 100000})  # no reports: the watcher must act
        assert wait_until(lambda: [p["attached"] for p in workers_of(osh, job)] == [True] * 2,
                          timeout=60)
        workers = [p["os_pid"] for p in workers_of(osh, job)]
        os.kill(next(p for p in osh.ps() if p["pid"] == job)["os_pid"], signal.SIGKILL)
        assert osh.wait(job, timeout=30)["reason"] == "killed"
        assert wait_until(lambda: not any(psutil.pid_exists(w) and psutil.Process(w).status()
                                          != psutil.STATUS_ZOMBIE for w in workers),
                          timeout=30)


def test_killing_the_job_ends_its_workers(kernel: Booted) -> None:
    with kernel.connect() as osh:
        job = osh.spawn_train({**TINY, "name": "term", "dataset": "/datasets/fox",
                               "steps": 100000, "checkpoint_every": 0})
        assert wait_until(lambda: len(workers_of(osh, job)) == 2, timeout=60)
        workers = [p["os_pid"] for p in workers_of(osh, job)]
        osh.kill(job, "TERM")
        end = osh.wait(job, timeout=60)
        assert end["reason"] == "exited" and end["status"] == 143, end
        assert wait_until(lambda: not any(psutil.pid_exists(w) and psutil.Process(w).status()
                                          != psutil.STATUS_ZOMBIE for w in workers),
                          timeout=30)


@pytest.mark.slow
def test_a_job_with_restarts_recovers_from_a_killed_worker(kernel: Booted) -> None:
    with kernel.connect() as osh:
        job = osh.spawn_train({**TINY, "name": "phoenix", "dataset": "/datasets/fox",
                               "steps": 60, "restarts": 1, "checkpoint_every": 10})
        assert wait_until(lambda: next(p for p in osh.ps() if p["pid"] == job)["info"].get(
            "step", 0) >= 15, timeout=120)
        os.kill(workers_of(osh, job)[0]["os_pid"], signal.SIGKILL)
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0 and end["info"]["state"] == "done", end
        assert end["info"]["step"] == 60 and end["info"]["attempts"] == 2


def llmos(kernel: Booted, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "userland.cli", "--home", str(kernel.root),
                           *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_cli_story_corpus_train_jobs_infer(kernel: Booted, tmp_path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_bytes(TEXT)
    r = llmos(kernel, "corpus", "/datasets/cli/text", str(text))
    assert r.returncode == 0 and f"{len(TEXT):,} bytes" in r.stdout, r.stderr
    r = llmos(kernel, "train", "clijob", "--data", "/datasets/cli/text", "--steps", "10",
              "--layers", "1", "--heads", "2", "--width", "32", "--context", "16",
              "log_every=5", "batch_size=4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done  step 10/10 [####################]  loss" in r.stdout, r.stdout
    assert "checkpoint: /models/clijob/step-000010" in r.stdout
    r = llmos(kernel, "infer", "/models/clijob", "the ", "-n", "12", "-v", "--seed", "3")
    assert r.returncode == 0 and r.stdout.startswith("the "), r.stderr
    assert "12 tokens" in r.stderr and "seed 3" in r.stderr
    r = llmos(kernel, "train", "bad", "--data", "/datasets/none")
    assert r.returncode == 1 and r.stderr.startswith("llmos: ENOENT:"), r.stderr
    assert "Traceback" not in r.stderr
    r = llmos(kernel, "train", "det", "--data", "/datasets/cli/text", "--steps", "100000",
              "--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "-d")
    job = int(r.stdout)
    try:
        assert wait_until(lambda: "det" in llmos(kernel, "jobs").stdout, timeout=60)
        ps = llmos(kernel, "ps").stdout
        assert "INFO" in ps.splitlines()[0]
    finally:
        with kernel.connect(uid=0) as root:
            root.kill(job, "TERM")
    r = llmos(kernel, "models")
    assert "/models/clijob/step-000010" in r.stdout
