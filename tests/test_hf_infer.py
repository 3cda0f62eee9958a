"""infer on Hugging Face models through a real kernel: greedy parity with
model.generate alone and with other processes batched in, chat templates, stop
strings, eos, truncation, permissions across uids, memory and the bad inputs."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import Booted, errno_of
from hf_models import make_hf_dir
from syscalls import Errno, SyscallError

PROMPTS = ["def add(a, b):", "class Point:\n    def __init__(self, x, y):", "for",
           "print(i, add(i, i))\n"]



@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"llama": make_hf_dir(root / "llama", "llama", seed=2),
            "gpt2": make_hf_dir(root / "gpt2", "gpt2", seed=3),
            "bare": make_hf_dir(root / "bare", "qwen2", chat_template=False, seed=4),
            "bf16": make_hf_dir(root / "bf16", "llama", dtype="bfloat16", seed=5)}


@pytest.fixture(scope="module")
def kernel(dirs: dict[str, Path]) -> Iterator[Booted]:
    with Booted() as b:
        with b.connect(uid=0) as osh:
            osh.mkdir("/models", perm=0o777)
        with b.connect(uid=1000) as osh:
            for name in ("llama", "gpt2", "bare", "bf16"):
                osh.import_model(dirs[name], f"/models/{name}")
            osh.import_model(dirs["llama"], "/models/private", perm=0o600)
        yield b


def reference(d: Path, prompt: str | None, n: int, messages: list | None = None,
              **kw: Any) -> tuple[list[int], str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    if messages is not None:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bf16"])
def test_greedy_infer_is_generate(kernel: Booted, dirs: dict[str, Path], name: str) -> None:
    ids, text = reference(dirs[name], PROMPTS[0], 20)
    with kernel.connect(uid=1000) as osh:
        r = osh.infer(f"/models/{name}", PROMPTS[0], 20, temperature=0)
    assert r["text"] == text and r["tokens"] == len(ids)
    assert r["finish_reason"] == ("stop" if ids[-1] == 2 else "length")


def test_processes_batched_together_each_get_generates_tokens(kernel: Booted,
                                                               dirs: dict[str, Path]) -> None:
    want = [reference(dirs["llama"], p, 24)[1] for p in PROMPTS]
    got: dict[int, Any] = {}

    def one(i: int) -> None:
        with kernel.connect(uid=1000) as osh:
            got[i] = "".join(c["text"] for c in osh.infer(
                "/models/llama", PROMPTS[i], 24, temperature=0, stream=True))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(len(PROMPTS))] == want
    with kernel.connect(uid=0) as osh:
        models = {m["path"]: m for m in osh.models()["models"]}
    assert models["/models/llama"]["architecture"] == "LlamaForCausalLM"


def test_messages_use_the_chat_template(kernel: Booted, dirs: dict[str, Path]) -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def"}]
    ids, text = reference(dirs["llama"], None, 12, messages=chat)
    with kernel.connect(uid=1000) as osh:
        r = osh.infer("/models/llama", messages=chat, max_tokens=12, temperature=0)
        assert r["text"] == text and r["prompt_tokens"] > 10
        e = pytest.raises(SyscallError, osh.infer, "/models/bare", messages=chat)
        assert e.value.errno == Errno.EINVAL and "chat template" in e.value.message
        assert errno_of(osh.infer, "/models/llama",
                        messages=[{"role": "robot", "content": "x"}]) == Errno.EINVAL
        assert errno_of(osh.infer, "/models/llama", "x", messages=chat) == Errno.EINVAL
        assert errno_of(osh.infer, "/models/llama") == Errno.EINVAL


def test_stop_strings_end_before_them(kernel: Booted, dirs: dict[str, Path]) -> None:
    _, text = reference(dirs["gpt2"], PROMPTS[1], 30)
    stop = text[6:8]
    assert stop and text.find(stop) >= 0
    with kernel.connect(uid=1000) as osh:
        r = osh.infer("/models/gpt2", PROMPTS[1], 30, temperature=0, stop=[stop, "never"])
        assert (r["text"], r["finish_reason"]) == (text[:text.find(stop)], "stop")
        chunks = list(osh.infer("/models/gpt2", PROMPTS[1], 30, temperature=0, stop=[stop],
                                stream=True))
        assert "".join(c["text"] for c in chunks) == r["text"]
        assert chunks[-1]["finish_reason"] == "stop"


def test_eos_from_generation_config_ends_with_stop(kernel: Booted, dirs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    ids, _ = reference(dirs["llama"], PROMPTS[2], 10)
    d = make_hf_dir(tmp_path / "eos", "llama", seed=2)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = ids[3]
    (d / "generation_config.json").write_text(json.dumps(gen))
    with kernel.connect(uid=1000) as osh:
        osh.import_model(d, "/models/eos")
        r = osh.infer("/models/eos", PROMPTS[2], 10, temperature=0)
    assert (r["tokens"], r["finish_reason"]) == (ids.index(ids[3]) + 1, "stop")


def test_a_prompt_over_the_context_is_einval_unless_truncated(kernel: Booted) -> None:
    long = "def add(a, b):\n" * 200
    with kernel.connect(uid=1000) as osh:
        e = pytest.raises(SyscallError, osh.infer, "/models/llama", long, 4)
        assert e.value.errno == Errno.EINVAL and "truncate" in e.value.message
        r = osh.infer("/models/llama", long, 4, temperature=0, truncate=True)
    assert r["prompt_tokens"] == 255 and r["tokens"] == 4


def test_permissions_hold_on_a_shared_loaded_model(kernel: Booted) -> None:
    with kernel.connect(uid=1000) as osh:
        assert osh.infer("/models/private", "def", 3, temperature=0)["tokens"] == 3
    with kernel.connect(uid=1001) as osh:
        assert errno_of(osh.infer, "/models/private", "def", 3) == Errno.EACCES
        assert osh.infer("/models/llama", "def", 3, temperature=0)["tokens"] == 3
        assert "/models/private" not in [m["path"] for m in osh.models()["models"]]


def test_broken_models_are_clear_errors(kernel: Booted) -> None:
    """What import refuses, written past it: each fails infer with its errno, and the
    executor goes on serving."""
    with kernel.connect(uid=1000) as osh:
        def put(path: str, data: bytes) -> None:
            osh.save_tensor(path, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        cfg = json.loads(bytes(osh.load_tensor("/models/llama/config.json").numpy()))
        osh.mkdir("/models/broken")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            put(f"/models/broken/{f}", bytes(osh.load_tensor(f"/models/llama/{f}").numpy()))
        weights = osh.load_tensors("/models/llama/model.safetensors")
        osh.save_tensors("/models/broken/model.safetensors", weights)
        put("/models/broken/config.json", json.dumps({**cfg, "model_type": "nonsense"}).encode())
        e = pytest.raises(SyscallError, osh.infer, "/models/broken", "def", 2)
        assert e.value.errno == Errno.EINVAL and "nonsense" in e.value.message
        put("/models/broken/config.json", json.dumps({**cfg, "hidden_size": 32,
                                                      "head_dim": 8}).encode())
        e = pytest.raises(SyscallError, osh.infer, "/models/broken", "def", 2)
        assert e.value.errno == Errno.EINVAL and "do not match" in e.value.message
        put("/models/broken/config.json", json.dumps(cfg).encode())
        for f in ("tokenizer.json", "tokenizer_config.json"):
            osh.unlink(f"/models/broken/{f}")
        e = pytest.raises(SyscallError, osh.infer, "/models/broken", "def", 2)
        assert e.value.errno == Errno.EINVAL and "tokenizer" in e.value.message
        assert osh.infer("/models/llama", "def", 2, temperature=0)["tokens"] == 2


def test_a_model_over_the_budget_is_enomem_with_sizes(dirs: dict[str, Path]) -> None:
    with Booted({"model_cache": "1MiB"}) as b, b.connect() as osh:
        osh.import_model(dirs["llama"], "/models/llama")
        e = pytest.raises(SyscallError, osh.infer, "/models/llama", "def", 2)
    assert e.value.errno == Errno.ENOMEM and "KV cache" in e.value.message
