"""The training job's pieces that need no running llmos: config checking, the
learning-rate schedule, checkpoint state round trips, and the training loop in
direct mode (two real gloo processes). The job and its workers under llmos, and
checkpoints in a real tensorfs, are tested against a booted llmos elsewhere."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drivers.executor._config import memory_bytes, model_config, normalize
from drivers.executor._gpt import GPT, GPTConfig, train_bytes
from drivers.executor.train import (OPTIM_TENSORS, Checkpoint, load_state, lr_at,
                                    make_optimizer, optimizer_moments, run_direct,
                                    shard_bounds)

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
    with pytest.raises(ValueError, match="bytes"):
        run_direct({"block_size": 16, "workers": 2}, np.zeros(20, np.uint8), steps=1)
