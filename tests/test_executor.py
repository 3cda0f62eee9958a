"""The executor driver through a real kernel: infer (batched, streamed, cancelled,
its errors and faults) and spawn_train's checks before anything starts.
Training runs end to end in tests/test_executor_jobs.py."""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import Booted, errno_of, wait_until
from drivers.executor._gpt import GPT, GPTConfig
from syscalls import Errno, SyscallError

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)



def as_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def write_model(osh: Any, path: str, cfg: GPTConfig = TINY, seed: int = 0,
                perm: int = 0o644, step: int = 1, config: dict | None = None) -> GPT:
    """A randomly initialised model as a checkpoint in the documented format."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    parent = path.rsplit("/", 1)[0]
    for d in ([parent] if parent else []) + [path, f"{path}/step-{step:06d}"]:
        if errno_of(osh.mkdir, d) not in (None, Errno.EEXIST):
            raise AssertionError(d)
    ckpt = f"{path}/step-{step:06d}"
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            osh.save_tensor(f"{ckpt}/{name}", t, perm=perm)
    meta = config or {"model": cfg.to_dict(), "step": step, "loss": 5.5}
    osh.save_tensor(f"{ckpt}/config", as_bytes(json.dumps(meta).encode()), perm=perm)
    osh.save_tensor(f"{path}/latest", as_bytes(ckpt.rsplit("/", 1)[1].encode()), perm=perm)
    return model


@pytest.fixture(scope="module")
def kernel() -> Iterator[Booted]:
    with Booted({"infer_max_prompt": 1000, "infer_max_tokens": 3000}) as b:
        with b.connect() as osh:
            write_model(osh, "/models/tiny")
        yield b


def test_infer_is_deterministic_and_streams_what_it_returns(kernel: Booted) -> None:
    with kernel.connect() as osh:
        greedy = osh.infer("/models/tiny", "def f(x):", max_tokens=40, temperature=0)
        assert greedy["tokens"] == 40 and greedy["finish_reason"] == "length"
        assert greedy["prompt_tokens"] == len(b"def f(x):")
        assert osh.infer("/models/tiny", "def f(x):", 40, temperature=0)["text"] == \
            greedy["text"]
        a = osh.infer("/models/tiny", "import os", 30, temperature=1.0, seed=7)
        b = osh.infer("/models/tiny", "import os", 30, temperature=1.0, seed=7)
        c = osh.infer("/models/tiny", "import os", 30, temperature=1.0, seed=8)
        assert a["text"] == b["text"] and a["seed"] == 7
        assert c["text"] != a["text"]  # 30 sampled bytes from a flat model
        parts = list(osh.infer("/models/tiny", "import os", 30, temperature=1.0, seed=7,
                               stream=True))
        final = parts[-1]
        # chunks are deltas: all of them, the final one too, add up to the text once
        assert len(parts) > 2 and "".join(p["text"] for p in parts) == a["text"]
        assert [p["finish_reason"] for p in parts[:-1]] == [None] * (len(parts) - 1)
        assert final["finish_reason"] == "length" and final["tokens"] == 30
        assert (final["seed"], final["prompt_tokens"]) == (7, len(b"import os"))
        assert [p["tokens"] for p in parts] == sorted(p["tokens"] for p in parts)
        # other calls on the same handle while reading a stream lose none of it
        parts, pids = [], []
        for p in osh.infer("/models/tiny", "import os", 30, temperature=1.0, seed=7,
                           stream=True):
            parts.append(p)
            pids.append(osh.getpid())
            osh.stat("/models/tiny")
        assert set(pids) == {osh.getpid()}
        assert "".join(p["text"] for p in parts) == a["text"]


def test_a_tiny_temperature_is_greedy_not_a_failure_for_everyone(kernel: Booted) -> None:
    with kernel.connect() as osh:
        greedy = osh.infer("/models/tiny", "abc", 20, temperature=0)
        tiny = osh.infer("/models/tiny", "abc", 20, temperature=1e-45)
        assert tiny["text"] == greedy["text"]


def test_a_model_that_is_not_byte_level_is_einval(kernel: Booted) -> None:
    with kernel.connect() as osh:
        write_model(osh, "/models/wide", GPTConfig(vocab_size=1001, n_layer=1, n_head=2,
                                                   n_embd=32, block_size=16))
        assert errno_of(osh.infer, "/models/wide", "x") == Errno.EINVAL
        assert errno_of(osh.infer, "models/tiny", "x") == Errno.EINVAL  # not a path
        assert osh.infer("/models/tiny", "x", 2)["tokens"] == 2


def test_a_generation_outlives_the_context(kernel: Booted) -> None:
    with kernel.connect() as osh:
        r = osh.infer("/models/tiny", "x" * 100, max_tokens=3 * TINY.block_size, seed=1)
    assert r["tokens"] == 3 * TINY.block_size and r["prompt_tokens"] == 100


def test_infer_errors(kernel: Booted) -> None:
    with kernel.connect() as osh:
        osh.save_tensor("/models/plain", torch.zeros(3))
        assert errno_of(osh.infer, "/models/nothing", "x") == Errno.ENOENT
        assert errno_of(osh.infer, "/models/plain", "x") == Errno.ENOENT
        assert errno_of(osh.infer, "/models", "x") == Errno.ENOENT
        assert errno_of(osh.infer, "/models/tiny", "") == Errno.EINVAL
        assert errno_of(osh.infer, "/models/tiny", "x" * 1001) == Errno.EINVAL
        assert errno_of(osh.infer, "/models/tiny", "x", max_tokens=3001) == Errno.EINVAL
        assert errno_of(osh.infer, "/models/tiny", "x", max_tokens=0) == Errno.EINVAL
        assert errno_of(osh.infer, "/models/tiny", "x", temperature=-1) == Errno.EINVAL
        assert errno_of(osh.infer, "/models/tiny", "x", max_tokens=2**40) == Errno.EINVAL
        assert osh.infer("/models/tiny", "x", 2)["tokens"] == 2  # still serving


def test_another_uids_private_model_is_eacces(kernel: Booted) -> None:
    with kernel.connect(uid=1001) as other:
        write_model(other, "/private", perm=0o600, seed=3)
        assert other.infer("/private", "hi", 3)["tokens"] == 3
    with kernel.connect() as osh:
        assert errno_of(osh.infer, "/private", "hi") == Errno.EACCES
        # models() does not show it either, not even its path; its owner and root see it
        assert not any(m["path"].startswith("/private/") for m in osh.models()["models"])
    with kernel.connect(uid=1001) as other:
        assert any(m["path"].startswith("/private/") for m in other.models()["models"])
    with kernel.connect(uid=0) as root:
        assert any(m["path"].startswith("/private/") for m in root.models()["models"])
    # loaded for its owner, then one weight made private: the cache is no way around it
    with kernel.connect(uid=1001) as other:
        write_model(other, "/shared1001", seed=4)
        assert other.infer("/shared1001", "hi", 3)["tokens"] == 3
        other.chmod("/shared1001/step-000001/wte.weight", 0o600)
        assert other.infer("/shared1001", "hi", 3)["tokens"] == 3
    with kernel.connect() as osh:
        assert errno_of(osh.infer, "/shared1001", "hi") == Errno.EACCES


def test_a_corrupt_checkpoint_is_eio_and_the_executor_survives(kernel: Booted) -> None:
    with kernel.connect() as osh:
        wrong = {"model": {**TINY.to_dict(), "n_embd": 64}, "step": 1}
        write_model(osh, "/models/wrongshape", config=wrong)
        assert errno_of(osh.infer, "/models/wrongshape", "x") == Errno.EIO
        write_model(osh, "/models/badjson")
        osh.save_tensor("/models/badjson/step-000001/config", as_bytes(b"{not json"))
        assert errno_of(osh.infer, "/models/badjson", "x") == Errno.EIO
        # damage a weight's bytes on disk: tensorfs's checksum catches it
        write_model(osh, "/models/flipped", seed=5)
        f = Path(kernel.root, "tensors/models/flipped/step-000001/wte.weight.safetensors")
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(data)
        assert errno_of(osh.infer, "/models/flipped", "x") == Errno.EIO
        assert osh.infer("/models/tiny", "x", 3)["tokens"] == 3


def test_requests_from_several_processes_share_batches(kernel: Booted) -> None:
    results: list[Any] = []
    start = threading.Barrier(4)

    def client(i: int) -> None:
        with kernel.connect() as osh:  # each connection is its own llmos process
            start.wait()
            results.append(osh.infer("/models/tiny", f"client {i}", 600, seed=i))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r["tokens"] for r in results] == [600] * 4
    with kernel.connect() as osh:
        hist = osh.models()["engine"]["batch_hist"]
    assert max(int(size) for size in hist) >= 2, hist


def test_a_stream_abandoned_or_a_caller_gone_stops_its_generation(kernel: Booted) -> None:
    with kernel.connect() as osh:
        it = osh.infer("/models/tiny", "abc", max_tokens=3000, stream=True)
        next(it), next(it)
        it.close()  # the library sends cancel; the executor drops the sequence
        assert wait_until(lambda: osh.models()["engine"]["running"] == 0, timeout=10)
        assert osh.infer("/models/tiny", "x", 2)["tokens"] == 2
        prog = ("import userland; o = userland.connect(); "
                "[None for _ in o.infer('/models/tiny', 'x', 3000, stream=True)]")
        child = osh.spawn(["python", "-c", prog])
        assert wait_until(lambda: osh.models()["engine"]["running"] == 1, timeout=20)
        osh.kill(child, "KILL")
        assert osh.wait(child, timeout=10)["reason"] == "killed"
        assert wait_until(lambda: osh.models()["engine"]["running"] == 0, timeout=10)


def test_executor_sigkilled_mid_generation_gives_eio_then_serves(booted: Booted) -> None:
    with booted.connect() as osh:
        write_model(osh, "/models/m")
        it = osh.infer("/models/m", "abc", max_tokens=3000, stream=True)
        next(it)
        os.kill(booted.driver_pid("executor"), signal.SIGKILL)
        with pytest.raises(SyscallError) as e:
            for _ in it:
                pass
        assert e.value.errno == Errno.EIO
        assert osh.infer("/models/m", "abc", 5)["tokens"] == 5  # a new instance
        drivers = {d["name"]: d for d in osh.sysinfo()["drivers"]}
        assert drivers["executor"]["restarts"] == 1


# -- spawn_train: everything it refuses, before anything starts -----------------------


def _corpus(osh: Any, path: str = "/datasets/small", n: int = 4096) -> str:
    if errno_of(osh.mkdir, "/datasets") not in (None, Errno.EEXIST):
        raise AssertionError
    osh.save_tensor(path, as_bytes((b"hello world. " * n)[:n]))
    return path


def test_spawn_train_refuses_bad_jobs_before_starting_them(kernel: Booted) -> None:
    with kernel.connect() as osh:
        data = _corpus(osh)
        osh.save_tensor("/datasets/floats", torch.zeros(4096))
        ok = {"name": "t", "dataset": data, "steps": 1}
        cases = [
            ({"dataset": data}, Errno.EINVAL),                         # no name
            ({**ok, "bogus": 1}, Errno.EINVAL),
            ({**ok, "devices": "0"}, Errno.EINVAL),                   # the executor's own
            ({**ok, "workers": 0}, Errno.EINVAL),
            ({**ok, "n_embd": 30, "n_head": 4}, Errno.EINVAL),
            ({**ok, "dataset": "/datasets/none"}, Errno.ENOENT),
            ({**ok, "dataset": "/datasets/floats"}, Errno.EINVAL),
            ({**ok, "block_size": 4096}, Errno.EINVAL),               # data too small
            ({**ok, "n_layer": 64, "n_embd": 8192, "n_head": 64}, Errno.ENOMEM),
            ({**ok, "gpus": 1, "n_layer": 48, "n_embd": 4096, "n_head": 32}, Errno.ENOMEM),
        ]
        for config, want in cases:
            assert errno_of(osh.spawn_train, config) == want, config
        assert errno_of(osh.spawn_train, ok, "0" * 24) == Errno.EBADF
        small = osh.alloc_gpu(1 << 20)
        assert errno_of(osh.spawn_train, ok, small) == Errno.ENOMEM
        with kernel.connect() as other:
            theirs = other.alloc_gpu(1 << 30)
            assert errno_of(osh.spawn_train, ok, theirs["id"]) == Errno.EPERM
        with kernel.connect(uid=1001) as stranger:
            stranger.save_tensor("/secret1001", as_bytes(b"x" * 4096), perm=0o600)
        assert errno_of(osh.spawn_train, {**ok, "dataset": "/secret1001"}) == \
            Errno.EACCES
        assert not [p for p in osh.ps() if "drivers.executor.train" in " ".join(p["argv"])]


def test_the_executor_attaches_again_when_its_own_process_is_ended(kernel: Booted) -> None:
    with kernel.connect() as osh:
        assert osh.infer("/models/tiny", "x", 2)["tokens"] == 2
        mine = [p for p in osh.ps() if p["os_pid"] is None and p["uid"] == 1000
                and p["state"] == "running"]
        assert mine, osh.ps()  # the executor's connection as uid 1000
        with kernel.connect(uid=0) as root:
            for p in mine:
                root.kill(p["pid"], "KILL")
        assert osh.infer("/models/tiny", "x", 2)["tokens"] == 2


def test_failed_loads_leave_nothing_pending(kernel: Booted) -> None:
    with kernel.connect() as osh:
        for _ in range(3):
            assert errno_of(osh.infer, "/models/nothing", "x") == Errno.ENOENT
        assert osh.infer("/models/tiny", "x", 2)["tokens"] == 2

        def status() -> dict:  # as of the executor's last heartbeat (1 s)
            return next(d for d in osh.sysinfo()["drivers"] if d["name"] == "executor")["info"]
        assert wait_until(lambda: status().get("models", 0) >= 1, timeout=10)
        assert wait_until(lambda: status()["loading"] == 0 and status()["pending"] == 0,
                          timeout=10), status()
