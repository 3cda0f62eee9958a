"""The training job's pieces that need no running llmos: config checking, the
learning-rate schedule, checkpoint state round trips, and the training loop in
direct mode (bench/direct_train.py: two real gloo processes). The job and its
workers under llmos, and checkpoints in a real tensorfs, are tested against a
booted llmos elsewhere."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drivers.executor._config import memory_bytes, model_config, normalize
from drivers.executor._gpt import GPT, GPTConfig, train_bytes
from drivers.executor.checkpoint import OPTIM_TENSORS, Checkpoint, load_state, optimizer_moments
from drivers.executor.trainer import lr_at, make_optimizer, shard_bounds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from direct_train import run_direct  # noqa: E402

BASE = {"name": "tiny", "dataset": "/datasets/tiny"}


def test_normalize_fills_defaults():
    cfg = normalize(BASE)
    assert cfg == {
        "name": "tiny", "dataset": "/datasets/tiny", "out": "/models/tiny",
        "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.0,
        "batch_size": 12, "lr": 1e-3, "min_lr": 1e-4, "warmup": 20, "steps": 300,
        "workers": 2, "checkpoint_every": 100, "resume": False, "restarts": 0, "seed": 0,
        "grad_clip": 1.0, "log_every": 10, "timeout_s": 3600.0, "gpus": 0}
    assert normalize(cfg) == cfg  # idempotent: the job re-normalizes what it was given


def test_normalize_keeps_given_values_and_internal_keys():
    cfg = normalize({**BASE, "out": "/home/u/m", "lr": 1, "steps": 5, "resume": True,
                     "gpus": 2, "alloc_id": "a1", "devices": ["GPU-x", 3],
                     "simulated": False, "gpu_bytes": 1 << 30})
    assert cfg["out"] == "/home/u/m"
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    assert (cfg["steps"], cfg["resume"], cfg["devices"]) == (5, True, ["GPU-x", 3])
    assert (cfg["alloc_id"], cfg["simulated"], cfg["gpu_bytes"]) == ("a1", False, 1 << 30)


@pytest.mark.parametrize("change, key", [
    ({"colour": "red"}, "colour"),
    ({"name": None}, "name"),
    ({"dataset": None}, "dataset"),
    ({"name": 7}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": ".hidden"}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x" * 101}, "name"),
    ({"dataset": "relative/path"}, "dataset"),
    ({"dataset": "/"}, "dataset"),
    ({"dataset": "/a/../b"}, "dataset"),
    ({"out": "/models/.x"}, "out"),
    ({"steps": 1.5}, "steps"),
    ({"steps": "300"}, "steps"),
    ({"steps": True}, "steps"),
    ({"steps": 0}, "steps"),
    ({"lr": "fast"}, "lr"),
    ({"lr": 0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": True}, "lr"),
    ({"min_lr": 0.01}, "min_lr"),       # above lr
    ({"resume": 1}, "resume"),
    ({"resume": "yes"}, "resume"),
    ({"workers": 0}, "workers"),
    ({"workers": 17}, "workers"),
    ({"restarts": -1}, "restarts"),
    ({"restarts": 11}, "restarts"),
    ({"dropout": 1.0}, "dropout"),
    ({"n_head": 3}, "n_embd"),           # 128 % 3
    ({"n_layer": 0}, "n_layer"),
    ({"block_size": 8193}, "block_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"log_every": 0}, "log_every"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": float("inf")}, "timeout_s"),
    ({"gpus": 17}, "gpus"),
    ({"warmup": -1}, "warmup"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"alloc_id": 5}, "alloc_id"),
    ({"devices": "0,1"}, "devices"),
    ({"devices": [0.5]}, "devices"),
    ({"gpus": 1, "devices": [0, 1]}, "devices"),
    ({"simulated": "no"}, "simulated"),
    ({"gpu_bytes": -1}, "gpu_bytes"),
])
def test_normalize_rejects(change, key):
    config = {**BASE, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ValueError, match=key):
        normalize(config)


def test_normalize_rejects_a_non_dict():
    with pytest.raises(ValueError, match="dict"):
        normalize(["name", "x"])  # type: ignore[arg-type]


def test_model_config_and_memory_bytes():
    cfg = normalize({**BASE, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32})
    mc = model_config(cfg)
    assert mc == GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64)
    assert memory_bytes(cfg) == train_bytes(mc, 12)
    bigger = normalize({**cfg, "batch_size": 24})
    assert memory_bytes(bigger) > memory_bytes(cfg) > 16 * sum(
        p.numel() for p in GPT(mc).parameters())


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = normalize({**BASE, "lr": 1e-3, "min_lr": 1e-4, "warmup": 10, "steps": 100})
    warm = [lr_at(s, cfg) for s in range(11)]
    assert warm == sorted(warm) and warm[0] < 1e-4
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True)
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == 1e-4


def test_shards_cover_the_data_once():
    for n, world in ((10, 3), (1000, 4), (7, 7)):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def _trained(cfg: dict) -> tuple[GPT, torch.optim.AdamW]:
    model = GPT(model_config(cfg))
    opt = make_optimizer(model, cfg)
    for _ in range(2):
        x = torch.randint(256, (2, cfg["block_size"]))
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_checkpoint_state_round_trips_without_the_tied_duplicate():
    cfg = normalize({**BASE, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8})
    model, opt = _trained(cfg)
    moments, step = optimizer_moments(model, opt)
    assert step == 2 and set(moments) == set(OPTIM_TENSORS)
    n = sum(p.numel() for p in model.parameters())
    assert all(m.shape == (n,) and m.dtype == torch.float32 for m in moments.values())
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ckpt = Checkpoint("/m/step-000002", {"step": 2, "optim_step": step}, state, moments)

    fresh = GPT(model_config(cfg))
    fresh_opt = make_optimizer(fresh, cfg)
    load_state(fresh, fresh_opt, ckpt)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.lm_head.weight is fresh.wte.weight  # still tied
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])
        assert float(fresh_opt.state[q]["step"]) == 2.0
    # and it trains on from there exactly as the original does
    x = torch.randint(256, (2, 8))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        _, loss = m(x, x)
        o.zero_grad()
        loss.backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.allclose(a, b)


def test_load_state_rejects_moments_of_another_model():
    cfg = normalize({**BASE, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8})
    model, opt = _trained(cfg)
    moments, step = optimizer_moments(model, opt)
    short = {k: v[:-1] for k, v in moments.items()}
    ckpt = Checkpoint("/m", {"step": 2, "optim_step": step}, model.state_dict(), short)
    with pytest.raises(ValueError, match="moments"):
        load_state(GPT(model_config(cfg)), make_optimizer(model, cfg), ckpt)


def test_run_direct_learns_with_two_gloo_workers():
    text = b"the quick brown fox jumps over the lazy dog. " * 200
    data = np.frombuffer(text, dtype=np.uint8)
    result = run_direct({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16,
                         "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup": 3,
                         "log_every": 5, "workers": 2}, data, steps=30)
    assert result["workers"] == 2 and result["steps"] == 30
    assert math.isfinite(result["step_ms"]) and result["step_ms"] > 0
    assert 5.0 < result["loss0"] < 6.0  # about ln(256): an untrained byte model
    assert result["loss"] < 0.6 * result["loss0"], result
    assert [s for s, _ in result["curve"]] == [5, 10, 15, 20, 25, 30]


def test_run_direct_rejects_too_little_data():
    with pytest.raises(ValueError, match="20 B of data"):
        run_direct({"block_size": 16, "workers": 2}, np.zeros(20, np.uint8), steps=1)


def test_config_errors_say_their_bounds_in_words():
    for change, says in (({"steps": -1}, "steps = -1 must be at least 1"),
                         ({"workers": 17}, "workers = 17 must be between 1 and 16"),
                         ({"dropout": 1.0}, "must be at least 0 and under 1"),
                         ({"lr": 0}, "lr = 0.0 must be over 0 and at most 10"),
                         ({"gpu_bytes": -1}, "gpu_bytes = -1 must be at least 0 B")):
        with pytest.raises(ValueError) as e:
            normalize({**BASE, **change})
        assert says in str(e.value) and "e+" not in str(e.value), e.value


class StopAt:
    """Hooks that ask to stop once step `at` was trained, and record the calls."""

    def __init__(self, at: int) -> None:
        self.at, self.trainer, self.calls = at, None, []

    def stop_requested(self) -> bool:
        return self.trainer is not None and self.trainer.step >= self.at

    def log(self, trainer, progress) -> None:
        self.calls.append(("log", progress.step, progress.stopping))

    def checkpoint(self, trainer, progress) -> None:
        self.calls.append(("checkpoint", progress.step, progress.stopping))


@pytest.fixture
def one_rank():
    import torch.distributed as dist

    from drivers.executor.trainer import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_a_stop_request_ends_the_loop_with_a_checkpoint_of_that_step(one_rank):
    from drivers.executor.trainer import Trainer, train_loop
    cfg = normalize({**BASE, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8,
                     "batch_size": 2, "workers": 1, "steps": 100, "log_every": 5,
                     "checkpoint_every": 5})
    trainer = Trainer(cfg, torch.randint(256, (500,), dtype=torch.uint8), 0, 1,
                      torch.device("cpu"))
    # asked during step 7, which neither logs nor checkpoints: its agreement is
    # waited for at the end of step 8, the last
    hooks = StopAt(7)
    hooks.trainer = trainer
    result = train_loop(trainer, hooks, cfg["steps"])
    assert result.stopped and trainer.step == 8 and len(result.durations) == 8
    assert hooks.calls == [("log", 5, False), ("checkpoint", 5, False),
                           ("log", 8, True), ("checkpoint", 8, True)]
    history = trainer.history_tensor()
    assert history.dtype == torch.float32 and history[:, 0].tolist() == list(range(1, 9))
    assert torch.isfinite(history[:, 1]).all()
    assert result.loss == pytest.approx(float(history[5:, 1].mean()))
    # asked during a step that logs: that step is the last
    again = Trainer(cfg, torch.randint(256, (500,), dtype=torch.uint8), 0, 1,
                    torch.device("cpu"))
    hooks = StopAt(10)
    hooks.trainer = again
    assert train_loop(again, hooks, cfg["steps"]).stopped and again.step == 10
    assert hooks.calls[-2:] == [("log", 10, True), ("checkpoint", 10, True)]


def test_a_resumed_trainer_carries_the_history_up_to_its_step(one_rank):
    from drivers.executor.trainer import Trainer, train_loop
    cfg = normalize({**BASE, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8,
                     "batch_size": 2, "workers": 1, "steps": 3, "log_every": 1})
    shard = torch.randint(256, (500,), dtype=torch.uint8)
    first = Trainer(cfg, shard, 0, 1, torch.device("cpu"))
    train_loop(first, StopAt(100), 3)
    history = first.history_tensor()
    moments, step = optimizer_moments(first.model, first.optimizer)
    stale = torch.cat([history, torch.tensor([[4.0, 1.0]])])  # a row past the checkpoint
    ckpt = Checkpoint("/m/step-000003", {"step": 3, "optim_step": step,
                                         "stats": {"loss0": first.loss0}},
                      first.model.state_dict(), moments, stale)
    resumed = Trainer({**cfg, "steps": 5}, shard, 0, 1, torch.device("cpu"), ckpt)
    assert torch.equal(resumed.history_tensor(), history)
    train_loop(resumed, StopAt(100), 5)
    assert resumed.history_tensor()[:, 0].tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(resumed.history_tensor()[:3], history)
