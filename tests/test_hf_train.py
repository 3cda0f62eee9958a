"""spawn_train on Hugging Face models through a real kernel: fine-tuning an
imported model (base=) on token ids, training a new one (arch= with a tokenizer
`llmos tokenizer train` made) on text, checkpoints that infer and export use
and that transformers loads, resume after a killed worker, and the configs
refused before anything starts."""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import Booted, errno_of, wait_until
from hf_models import TEXT, make_hf_dir
from syscalls import Errno, SyscallError

SMALL = {"block_size": 32, "batch_size": 8, "workers": 2, "log_every": 5,
         "checkpoint_every": 10, "warmup": 2, "lr": 3e-3}



def text_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "llama", "llama", seed=7)


@pytest.fixture(scope="module")
def kernel(llama: Path) -> Iterator[Booted]:
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(llama, local_files_only=True)(TEXT)["input_ids"]
    with Booted() as b:
        with b.connect(uid=0) as osh:
            osh.mkdir("/models", perm=0o1777)
            osh.mkdir("/datasets", perm=0o1777)
        with b.connect() as osh:
            osh.import_model(llama, "/models/llama")
            osh.import_model(llama, "/models/private", perm=0o600)
            osh.save_tensor("/datasets/py", text_tensor(TEXT))
            osh.save_tensor("/datasets/ids", torch.tensor(ids, dtype=torch.int32))
        yield b


def weights(d: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finetune_a_base_on_token_ids_checkpoints_serve_and_export(
        kernel: Booted, llama: Path, tmp_path: Path) -> None:
    with kernel.connect() as osh:
        job = osh.spawn_train({**SMALL, "name": "ft", "base": "/models/llama",
                               "dataset": "/datasets/ids", "steps": 20})
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0, (end, kernel.boot_log())
        info = end["info"]
        assert info["state"] == "done" and info["step"] == 20
        assert info["loss"] < info["loss0"] - 0.5, info  # the text is learnable
        step = {e["name"]: e["type"] for e in osh.listdir("/models/ft/step-000020")}
        assert step["model.safetensors"] == "group" and step["llmos"] == "dir"
        assert {"config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"} <= {n for n, t in step.items() if t == "tensor"}
        assert {e["name"] for e in osh.listdir("/models/ft/step-000020/llmos")} == {
            "config", "optim", "history"}
        # infer serves the latest checkpoint, in the base's tokens
        out = osh.infer("/models/ft", "def add(a, b):", 12, temperature=0)
        assert out["tokens"] == 12 and out["prompt_tokens"] < len("def add(a, b):")
        held = next(m for m in osh.models()["models"] if m["path"].startswith("/models/ft"))
        assert (held["step"], held["architecture"]) == (20, "LlamaForCausalLM")
        assert held["loss"] == pytest.approx(info["loss"], rel=1e-6)
        # export writes what transformers loads, bit for bit the checkpoint's weights
        r = osh.export_model("/models/ft", tmp_path / "ft")
        assert r["path"] == "/models/ft/step-000020" and "llmos" in r["skipped"]
        got, base = weights(tmp_path / "ft"), weights(llama)
        stored = osh.load_tensors("/models/ft/step-000020/model.safetensors")
        assert all(torch.equal(got[k], v) for k, v in stored.items())
        assert not torch.equal(got["model.embed_tokens.weight"],
                               base["model.embed_tokens.weight"])  # it trained
        exported = json.loads((tmp_path / "ft" / "config.json").read_text())
        assert exported["use_cache"] is True  # generate() of the export keeps its cache
        # and goes on from there, its history from the first step
        job = osh.spawn_train({**SMALL, "name": "ft", "base": "/models/llama",
                               "dataset": "/datasets/ids", "steps": 30, "resume": True})
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0 and end["info"]["step"] == 30, end
        assert end["info"]["history_len"] == 30
        # a job that trains something else into it is refused at its start
        job = osh.spawn_train({**SMALL, "name": "ft", "arch": "llama", "tokenizer":
                               "/models/llama", "dataset": "/datasets/py", "steps": 40,
                               "resume": True})
        end = osh.wait(job, timeout=300)
        assert end["status"] == 1 and "cannot resume" in end["info"]["error"], end


def test_a_new_model_from_a_trained_tokenizer_on_text(kernel: Booted, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with kernel.connect() as osh:
        osh.train_tokenizer("/datasets/py", "/models/scratch", vocab=320, min_frequency=1)
        job = osh.spawn_train({**SMALL, "name": "scratch", "arch": "qwen2",
                               "tokenizer": "/models/scratch", "dataset": "/datasets/py",
                               "n_layer": 2, "n_head": 2, "n_embd": 32, "ffn": 64,
                               "steps": 20})
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0, (end, kernel.boot_log())
        assert end["info"]["loss"] < end["info"]["loss0"] - 0.5, end["info"]
        out = osh.infer("/models/scratch", "class Point:", 16, temperature=0)
        r = osh.export_model("/models/scratch", tmp_path / "s")
        assert r["architecture"] == "Qwen2ForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "s", local_files_only=True)
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (
        2, 2, 32, 64, len(tok), 32)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 0)
    ids = tok("class Point:", return_tensors="pt").input_ids
    gen = model.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                         pad_token_id=0)
    assert out["text"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    # a tokenizer trained again into the directory wins over its checkpoints' copy
    from drivers.executor._hftrain import read_source
    with kernel.connect() as osh:
        osh.train_tokenizer("/datasets/py", "/models/scratch", vocab=300, min_frequency=1,
                            force=True)
        src = read_source(osh, {"arch": "llama", "tokenizer": "/models/scratch",
                                **normalize_shape()}, str(tmp_path))
        assert src.config.vocab_size == 300


def normalize_shape() -> dict:
    from drivers.executor._config import normalize
    cfg = normalize({"name": "x", "dataset": "/d", "arch": "llama", "tokenizer": "/t"})
    return {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}


def test_a_worker_s_reason_is_the_job_s_error(kernel: Booted) -> None:
    with kernel.connect() as osh:
        osh.save_tensor("/datasets/badids", torch.arange(5000, dtype=torch.int32) % 4000)
        job = osh.spawn_train({**SMALL, "name": "badids", "base": "/models/llama",
                               "dataset": "/datasets/badids", "steps": 5})
        end = osh.wait(job, timeout=300)
        assert end["status"] == 1, end
        assert "token ids must be in [0, " in end["info"]["error"], end["info"]
        found = re.search(r"found 0\.\.(\d+)", end["info"]["error"])  # the failing rank's shard
        assert found and int(found.group(1)) >= 320, end["info"]  # over the vocabulary


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_hf_checkpoint(kernel: Booted) -> None:
    with kernel.connect() as osh:
        job = osh.spawn_train({**SMALL, "name": "phoenix", "base": "/models/llama",
                               "dataset": "/datasets/py", "steps": 40, "restarts": 1})
        assert wait_until(lambda: next(p for p in osh.ps() if p["pid"] == job)["info"].get(
            "step", 0) >= 15, timeout=120)
        running = next(p for p in osh.ps() if p["pid"] == job)["info"]
        n = int(running["checkpoint"].rsplit("-", 1)[1])  # shown while it runs
        assert running["checkpoint"].startswith("/models/phoenix/step-")
        assert n % 10 == 0 and 10 <= n <= running["step"]
        workers = [p for p in osh.ps() if p["ppid"] == job and p["state"] == "running"]
        os.kill(workers[0]["os_pid"], signal.SIGKILL)
        end = osh.wait(job, timeout=300)
        assert end["status"] == 0 and end["info"]["attempts"] == 2, end
        assert end["info"]["step"] == 40 and end["info"]["history_len"] == 40


@pytest.mark.parametrize("change, errno, words", [
    ({"arch": "nosuch"}, Errno.EINVAL, "not a model_type"),
    ({"arch": "bert", "tokenizer": "/models/llama"}, Errno.EINVAL, "an encoder"),
    ({"arch": "llama"}, Errno.EINVAL, "tokenizer is required"),
    ({"arch": "llama", "tokenizer": "/datasets"}, Errno.EINVAL, "no tokenizer.json"),
    ({"base": "/models/llama", "n_layer": 2}, Errno.EINVAL, "cannot be set with base"),
    ({"base": "/models/llama", "arch": "llama"}, Errno.EINVAL, "cannot be set with base"),
    ({"tokenizer": "/models/llama"}, Errno.EINVAL, "for Hugging Face models"),
    ({"base": "/models/nothing"}, Errno.ENOENT, "/models/nothing"),
    ({"base": "/datasets"}, Errno.EINVAL, "no config.json"),
    ({"base": "/models/private"}, Errno.EACCES, "/models/private"),
    ({"base": "/models/llama", "block_size": 512}, Errno.EINVAL, "context of 256"),
    ({"base": "/models/llama", "dataset": "/datasets/f32"}, Errno.EINVAL, "token ids"),
    ({"dataset": "/datasets/ids"}, Errno.EINVAL, "bytes (uint8)"),  # the byte GPT's
])
def test_refused_before_anything_starts(kernel: Booted, change: dict, errno: Errno,
                                        words: str) -> None:
    with kernel.connect(uid=0) as root:
        if errno_of(root.stat, "/datasets/f32"):
            root.save_tensor("/datasets/f32", torch.zeros(4096))
    with kernel.connect(uid=1001) as osh:
        config = {**SMALL, "name": "bad", "dataset": "/datasets/py", **change}
        with pytest.raises(SyscallError) as e:
            osh.spawn_train(config)
        assert e.value.errno == errno and words in e.value.message, e.value
        assert not [p for p in osh.ps() if "bad" in p["argv"]]  # no job started
        assert errno_of(osh.stat, "/models/bad") == Errno.ENOENT
