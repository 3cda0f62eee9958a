"""Compression through a real kernel (docs/compression.md): eval, quantize and
prune as spawn_compress jobs, and distillation as a spawn_train mode, on tiny
Llama and GPT-2 models built here and on the byte-level GPT. Every output is
loaded by infer, exported and loaded by transformers' from_pretrained; int8
weights round-trip through tensorfs bit-exact; structured pruning shrinks the
config and the matrices together; manifests come from measurements; bad input
gets its errno before anything starts, and a killed job leaves no model."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import Booted, errno_of, wait_until
from hf_models import TEXT, make_hf_dir
from syscalls import Errno
from test_executor import write_model

DATA = "/datasets/py"
FAST = {"decode_tokens": 8, "eval_tokens": 2048}  # the yardstick, kept short


def text_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"llama": make_hf_dir(root / "llama", "llama", seed=7, num_key_value_heads=4),
            "llama2": make_hf_dir(root / "llama2", "llama", seed=8, num_key_value_heads=4),
            "gqa": make_hf_dir(root / "gqa", "llama", seed=9),
            "gpt2": make_hf_dir(root / "gpt2", "gpt2", seed=7),
            "bf16": make_hf_dir(root / "bf16", "llama", seed=7, dtype="bfloat16"),
            # the tests' tokenizer, with more logits than tokens (a padded vocabulary)
            "padded": make_hf_dir(root / "padded", "llama", seed=7, vocab_size=400)}


@pytest.fixture(scope="module")
def kernel(dirs: dict[str, Path]) -> Iterator[Booted]:
    with Booted() as b:
        with b.connect(uid=0) as osh:
            osh.mkdir("/models", perm=0o1777)
            osh.mkdir("/datasets", perm=0o1777)
        with b.connect() as osh:
            for name, d in dirs.items():
                osh.import_model(d, f"/models/{name}")
            osh.import_model(dirs["llama"], "/models/private", perm=0o600)
            osh.save_tensor(DATA, text_tensor(TEXT * 4))
            write_model(osh, "/models/gpt")
        yield b


def manifest(osh: Any, path: str) -> dict[str, Any]:
    return json.loads(osh.load_array(f"{path}/compression.json").tobytes())


def from_pretrained(osh: Any, path: str, where: Path) -> Any:
    from transformers import AutoModelForCausalLM
    osh.export_model(path, where, force=True)
    return AutoModelForCausalLM.from_pretrained(where, local_files_only=True).eval()


def expected_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the docs say int8 is: per output row, scale = max |w| / 127."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8), scale


# -- quantize --------------------------------------------------------------------------


def test_int8_llama_round_trips_serves_exports_and_is_not_trainable(
        kernel: Booted, tmp_path: Path) -> None:
    with kernel.connect() as osh:
        info = osh.quantize("/models/llama", "/models/llama-int8", data=DATA, **FAST)
        m = info["manifest"]
        assert m == manifest(osh, "/models/llama-int8")
        assert m["method"] == "int8" and m["source"] == "/models/llama"
        # measured, not claimed: sizes are the stored tensors'; the layers' ratio is
        # int8 + a float32 scale per row against float32 (64 inputs: 4 * 64 / 68)
        stored = sum(e["size"] for e in osh.listdir("/models/llama-int8")
                     if e["name"] == "model.safetensors")
        assert m["bytes"]["after"] <= stored
        assert m["layer_bytes"]["ratio"] == pytest.approx(4 * 64 / 68, rel=0.02)
        assert m["bytes"]["ratio"] > 1.5
        ppl = m["perplexity"]
        assert ppl["data"] == DATA and ppl["tokens"] > 100
        assert abs(ppl["after"] / ppl["before"] - 1) < 0.02, ppl
        for batch in ("batch1", "batch8"):
            pair = m["tokens_per_s"][batch]
            assert pair["before"] > 0 < pair["after"]
            lo, hi = pair["after_range"]
            assert lo <= pair["after"] <= hi  # the median of the runs
        if max(m["tokens_per_s"][b]["ratio"] for b in ("batch1", "batch8")) < 1.05:
            assert m["speed"].startswith("no speed gained"), m["speed"]

        # the int8 bytes are exactly the rounding of the source's weights
        src = osh.load_tensors("/models/llama/model.safetensors")
        got = osh.load_tensors("/models/llama-int8/model.safetensors")
        assert set(m["layers"]) >= {"model.layers.0.self_attn.q_proj", "lm_head"}
        for layer in m["layers"]:
            q, scale = expected_int8(src[f"{layer}.weight"].float())
            assert got[f"{layer}.weight"].dtype == torch.int8
            assert torch.equal(got[f"{layer}.weight"], q), layer
            assert torch.equal(got[f"{layer}.weight_scale"], scale), layer
        assert torch.equal(got["model.embed_tokens.weight"], src["model.embed_tokens.weight"])

        # served by infer, batched with other requests
        outs = [osh.infer("/models/llama-int8", "def add", max_tokens=6, seed=i,
                          temperature=1.0) for i in range(3)]
        assert all(o["tokens"] == 6 for o in outs)
        loaded = {x["path"]: x for x in osh.models()["models"]}
        assert loaded["/models/llama-int8"]["compression"]["method"] == "int8"

        # export: float32 weights equal to int8 * scale, loaded by from_pretrained
        model = from_pretrained(osh, "/models/llama-int8", tmp_path / "out")
        w = model.model.layers[0].self_attn.q_proj.weight.detach()
        q = got["model.layers.0.self_attn.q_proj.weight"].float()
        assert torch.equal(w, q * got["model.layers.0.self_attn.q_proj.weight_scale"][:, None])
        assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4,
                              do_sample=False).shape == (1, 7)
        # imported back, it is a float model (its manifest says it was dequantized)
        osh.import_model(tmp_path / "out", "/models/llama-back")
        back = manifest(osh, "/models/llama-back")
        assert "layers" not in back and "model.layers.0.mlp.up_proj" in back[
            "dequantized_layers"] and back["exported"].startswith("float32")
        assert osh.infer("/models/llama-back", "def add", max_tokens=3)["tokens"] == 3

        # refused by spawn_train, clearly
        e = errno_of(osh.spawn_train, {"name": "ft", "base": "/models/llama-int8",
                                       "dataset": DATA, "steps": 1, "workers": 1,
                                       "block_size": 32})
        assert e == Errno.EINVAL


def test_int8_gpt2_conv1d_and_the_byte_gpt(kernel: Booted, tmp_path: Path) -> None:
    with kernel.connect() as osh:
        m = osh.quantize("/models/gpt2", "/models/gpt2-int8", data=DATA, **FAST)["manifest"]
        assert m["layers"]["transformer.h.0.attn.c_attn"] == "conv1d"
        got = osh.load_tensors("/models/gpt2-int8/model.safetensors")
        src = osh.load_tensors("/models/gpt2/model.safetensors")
        # Conv1D's [in, out] weight is stored as the int8 layer's [out, in]
        q, _ = expected_int8(src["transformer.h.0.attn.c_attn.weight"].t().float())
        assert torch.equal(got["transformer.h.0.attn.c_attn.weight"], q)
        assert "lm_head.weight" not in got  # tied to the embeddings: kept float, once
        assert osh.infer("/models/gpt2-int8", "for i", max_tokens=5)["tokens"] == 5
        model = from_pretrained(osh, "/models/gpt2-int8", tmp_path / "gpt2")
        assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 192)

        m = osh.quantize("/models/gpt", "/models/gpt-int8", data=DATA, **FAST)["manifest"]
        assert "lm_head" not in m["layers"] and "blocks.0.attn.c_attn" in m["layers"]
        assert m["bytes"]["ratio"] > 1.5
        r = osh.infer("/models/gpt-int8", "hello", max_tokens=7)
        assert r["tokens"] == 7


# -- prune ------------------------------------------------------------------------------


def test_unstructured_pruning_zeroes_and_says_no_speed(kernel: Booted) -> None:
    with kernel.connect() as osh:
        m = osh.prune("/models/llama", "/models/llama-sparse", sparsity=0.5, data=DATA,
                      finetune_steps=5, **FAST)["manifest"]
        assert m["speed"].startswith("no speed gained: unstructured"), m["speed"]
        got = osh.load_tensors("/models/llama-sparse/model.safetensors")
        layers = [k for k in got if k.endswith("_proj.weight")]
        zeros = sum(int((got[k] == 0).sum()) for k in layers)
        total = sum(got[k].numel() for k in layers)
        assert zeros / total == pytest.approx(0.5, abs=0.01)  # the fine-tune kept them
        assert m["pruned"]["after_finetune"] == pytest.approx(zeros / total, abs=1e-6)
        assert int((got["lm_head.weight"] == 0).sum()) == 0
        assert m["finetune"]["steps"] == 5
        assert osh.infer("/models/llama-sparse", "x = ", max_tokens=3)["tokens"] == 3


def test_structured_pruning_shrinks_config_and_weights(kernel: Booted, tmp_path: Path) -> None:
    with kernel.connect() as osh:
        info = osh.prune("/models/llama", "/models/llama-slim", heads=0.5, mlp=0.25,
                         data=DATA, finetune_steps=5, **FAST)
        m = info["manifest"]
        assert m["shape"] == {"heads": [4, 2], "kv_heads": [4, 2], "mlp": [128, 96]}
        config = json.loads(osh.load_array("/models/llama-slim/config.json").tobytes())
        assert (config["num_attention_heads"], config["num_key_value_heads"],
                config["head_dim"], config["intermediate_size"]) == (2, 2, 16, 96)
        got = osh.load_tensors("/models/llama-slim/model.safetensors")
        shapes = {k: list(got[f"model.layers.1.{k}.weight"].shape) for k in
                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.down_proj")}
        assert shapes == {"self_attn.q_proj": [32, 64], "self_attn.k_proj": [32, 64],
                          "self_attn.o_proj": [64, 32], "mlp.gate_proj": [96, 64],
                          "mlp.down_proj": [64, 96]}
        assert m["bytes"]["after"] < m["bytes"]["before"]
        assert "perplexity_before_finetune" in m and m["finetune"]["steps"] == 5
        assert osh.infer("/models/llama-slim", "def ", max_tokens=4)["tokens"] == 4
        model = from_pretrained(osh, "/models/llama-slim", tmp_path / "slim")
        assert model.config.num_attention_heads == 2
        assert model.generate(torch.tensor([[1, 5]]), max_new_tokens=3,
                              do_sample=False).shape == (1, 5)

        # grouped-query attention: whole key/value groups go (2 groups of 2 heads)
        m = osh.prune("/models/gqa", "/models/gqa-slim", heads=0.5, **FAST)["manifest"]
        assert m["shape"]["heads"] == [4, 2] and m["shape"]["kv_heads"] == [2, 1]
        assert "weights only" in m["settings"]["importance"]  # no data given
        assert m["perplexity"] == {"why": "not measured: no data given"}

        # a bfloat16 source gives a bfloat16 model
        osh.prune("/models/bf16", "/models/bf16-slim", mlp=0.5, measure=False)
        got = osh.load_tensors("/models/bf16-slim/model.safetensors")
        assert got["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
        assert list(got["model.layers.0.mlp.up_proj.weight"].shape) == [64, 64]

        # GPT-2: its MLP shrinks (n_inner); its heads cannot
        m = osh.prune("/models/gpt2", "/models/gpt2-slim", mlp=0.5, **FAST)["manifest"]
        config = json.loads(osh.load_array("/models/gpt2-slim/config.json").tobytes())
        assert config["n_inner"] == 128 == m["shape"]["mlp"][1]
        got = osh.load_tensors("/models/gpt2-slim/model.safetensors")
        assert list(got["transformer.h.0.mlp.c_fc.weight"].shape) == [64, 128]
        assert osh.infer("/models/gpt2-slim", "def ", max_tokens=3)["tokens"] == 3


# -- eval and manifests -------------------------------------------------------------------


def test_eval_is_the_manifests_yardstick_and_follows_the_model(kernel: Booted) -> None:
    with kernel.connect() as osh:
        one = osh.evaluate("/models/llama", DATA, **FAST)
        two = osh.evaluate("/models/llama2", DATA, **FAST)
        for r in (one, two):
            assert r["state"] == "done" and r["eval_tokens"] > 100
            assert r["tokens_per_s_b1"] > 0 and r["tokens_per_s_b8"] > 0
            assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert one["perplexity"] != two["perplexity"]  # another model, another measure
        # the manifest's "before" is eval's measure of the source
        m = osh.quantize("/models/llama2", "/models/llama2-q8", data=DATA, **FAST)["manifest"]
        assert m["perplexity"]["before"] == pytest.approx(two["perplexity"], rel=1e-9)
        # a bigger held-out slice measures more tokens
        more = osh.evaluate("/models/llama", DATA, split=0.2, **FAST)
        assert more["eval_tokens"] > one["eval_tokens"]
        assert osh.evaluate("/models/gpt", DATA, **FAST)["bytes"] > 0


# -- bad input ------------------------------------------------------------------------------


def test_refusals_come_before_anything_starts(kernel: Booted) -> None:
    with kernel.connect() as osh:
        q = {"task": "quantize", "model": "/models/llama", "out": "/models/nope"}
        cases = [
            ({**q, "model": "/models/private"}, None, Errno.EACCES),  # asked by uid 1001
            ({**q, "model": "/models/missing"}, None, Errno.ENOENT),
            ({**q, "out": "/models/gpt2"}, None, Errno.EEXIST),
            ({**q, "method": "int4"}, None, Errno.ENOTSUP),
            ({**q, "method": "fp3"}, None, Errno.EINVAL),
            ({**q, "out": "/models/llama"}, None, Errno.EINVAL),
            ({**q, "data": "/datasets/none"}, None, Errno.ENOENT),
            ({**q, "task": "prune", "method": "int8"}, None, Errno.EINVAL),
            ({"task": "prune", "model": "/models/llama", "out": "/models/p",
              "sparsity": 1.0}, None, Errno.EINVAL),
            ({"task": "prune", "model": "/models/llama", "out": "/models/p",
              "sparsity": -0.1}, None, Errno.EINVAL),
            ({"task": "prune", "model": "/models/llama", "out": "/models/p",
              "heads": 0.9}, None, Errno.EINVAL),              # every head
            ({"task": "prune", "model": "/models/llama", "out": "/models/p",
              "sparsity": 0.5, "heads": 0.5}, None, Errno.EINVAL),
            ({"task": "prune", "model": "/models/llama", "out": "/models/p",
              "sparsity": 0.5, "finetune_steps": 3}, None, Errno.EINVAL),  # no data
            ({"task": "prune", "model": "/models/gpt2", "out": "/models/p",
              "heads": 0.25}, None, Errno.ENOTSUP),
            ({"task": "prune", "model": "/models/gpt", "out": "/models/p",
              "mlp": 0.25}, None, Errno.ENOTSUP),
            ({"task": "prune", "model": "/models/gqa", "out": "/models/p",
              "heads": 0.1}, None, Errno.EINVAL),              # removes no group of 2
            ({**q, "out": "/models/llama/sub", "force": True}, None, Errno.EINVAL),
            ({"task": "prune", "model": "/models/llama", "out": "/models/p",
              "sparsity": 0.0}, None, Errno.EINVAL),           # prunes nothing
            ({"task": "prune", "model": "/models/llama", "out": "/models/p",
              "sparsity": 0.5, "lr": 0.1}, None, Errno.EINVAL),  # no fine-tune to use it
            ({"task": "eval", "model": "/models/llama",
              "data": "/models/llama/model.safetensors"}, None, Errno.EINVAL),  # a group
            ({"task": "eval", "model": "/models/llama"}, None, Errno.EINVAL),  # no data
            ({"task": "eval", "model": "/models/llama", "data": DATA,
              "out": "/models/x"}, None, Errno.EINVAL),
            ({"task": "eval", "model": "/models/llama", "data": DATA, "bogus": 1},
             None, Errno.EINVAL),
        ]
        for config, _, want in cases:
            h = osh
            if config["model"] == "/models/private":
                h = kernel.connect(uid=1001)
            try:
                assert errno_of(h.spawn_compress, config) == want, config
            finally:
                if h is not osh:
                    h.close()
        for p in ("/models/nope", "/models/p", "/models/x"):
            assert errno_of(osh.stat, p) == Errno.ENOENT, p
        assert not any("drivers.executor.compress" in p["argv"] and p["state"] == "running"
                       and "/models/nope" in p["argv"] for p in osh.ps())


def test_force_replaces_only_when_complete_and_a_killed_job_leaves_nothing(
        kernel: Booted) -> None:
    with kernel.connect() as osh:
        for sig in ("KILL", "TERM"):
            pid = osh.spawn_compress({"task": "quantize", "model": "/models/llama",
                                      "out": "/models/killed", "data": DATA, **FAST})
            assert wait_until(lambda: any(p["pid"] == pid and (p.get("info") or {}).get(
                "state") not in (None, "loading") for p in osh.ps()), timeout=60)
            osh.kill(pid, sig)
            record = osh.wait(pid, timeout=60)
            assert record["status"] != 0
            assert errno_of(osh.stat, "/models/killed") == Errno.ENOENT
            if sig == "TERM":  # a stopped job removes what it began
                assert errno_of(osh.stat, "/models/killed.compressing") == Errno.ENOENT
        # a later job for the same place cleans up and writes it whole
        osh.quantize("/models/llama", "/models/killed", data=DATA, measure=False)
        assert errno_of(osh.stat, "/models/killed.compressing") == Errno.ENOENT
        before = manifest(osh, "/models/killed")
        assert before["perplexity"] == {"why": "not measured (measure = false: --no-measure)"}
        assert errno_of(osh.spawn_compress, {"task": "quantize", "model": "/models/llama2",
                                             "out": "/models/killed"}) == Errno.EEXIST
        after = osh.quantize("/models/llama2", "/models/killed", force=True,
                             measure=False)["manifest"]
        assert after["source"] == "/models/llama2" != before["source"]
        assert errno_of(osh.stat, "/models/killed.replaced") == Errno.ENOENT


# -- distillation ------------------------------------------------------------------------------


def kl_to_teacher(student: Any, teacher: Any, ids: torch.Tensor) -> float:
    import torch.nn.functional as F
    with torch.no_grad():
        s = student(input_ids=ids).logits.float()
        t = teacher(input_ids=ids).logits.float()
    return float(F.kl_div(F.log_softmax(s, -1).reshape(-1, s.shape[-1]),
                          F.log_softmax(t, -1).reshape(-1, t.shape[-1]), log_target=True,
                          reduction="batchmean"))


def test_distillation_lowers_the_students_kl_to_the_teacher(
        kernel: Booted, tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    job = {"name": "student", "arch": "llama", "tokenizer": "/models/llama",
           "teacher": "/models/teacher", "dataset": DATA, "n_layer": 1, "n_head": 2,
           "n_embd": 32, "block_size": 32, "batch_size": 8, "workers": 2, "lr": 3e-3,
           "warmup": 2, "log_every": 5, "checkpoint_every": 5, "distill_alpha": 0.9}
    with kernel.connect() as osh:
        # a teacher that knows something: the random llama, trained a little
        teach = {"name": "teacher", "base": "/models/llama", "dataset": DATA, "steps": 30,
                 "block_size": 32, "batch_size": 8, "workers": 2, "lr": 3e-3, "warmup": 2}
        assert osh.wait(osh.spawn_train(teach), timeout=300)["status"] == 0
        assert osh.wait(osh.spawn_train({**job, "steps": 1}), timeout=300)["status"] == 0
        teacher = from_pretrained(osh, "/models/teacher", tmp_path / "teacher")
        tok = AutoTokenizer.from_pretrained(tmp_path / "teacher")
        ids = torch.tensor([tok(TEXT[:400])["input_ids"][:64]])
        first = kl_to_teacher(from_pretrained(osh, "/models/student", tmp_path / "s1"),
                              teacher, ids)
        record = osh.wait(osh.spawn_train({**job, "steps": 40, "resume": True}), timeout=300)
        assert record["status"] == 0, record
        last = kl_to_teacher(from_pretrained(osh, "/models/student", tmp_path / "s40"),
                             teacher, ids)
        assert last < 0.8 * first, (first, last)
        meta = json.loads(osh.load_array(
            "/models/student/step-000040/llmos/config").tobytes())
        assert meta["train"]["teacher"] == "/models/teacher"
        assert meta["train"]["distill_temperature"] == 2.0

        # a teacher whose tokenizer is not the student's is refused before starting
        osh.train_tokenizer(DATA, "/models/othertok", vocab=300)
        assert errno_of(osh.spawn_train, {**job, "name": "s2", "tokenizer": "/models/othertok",
                                          "steps": 1}) == Errno.EINVAL
        assert errno_of(osh.spawn_train, {**job, "name": "s3", "teacher": "/models/gpt",
                                          "steps": 1}) == Errno.EINVAL  # the byte GPT
        assert errno_of(osh.spawn_train, {**job, "name": "s5", "teacher": "/models/padded",
                                          "steps": 1}) == Errno.EINVAL  # 400 logits, 384
        assert errno_of(osh.spawn_train, {"name": "s4", "dataset": DATA,
                                          "distill_alpha": 0.5}) == Errno.EINVAL


# -- the commands ----------------------------------------------------------------------------


def llmos(kernel: Booted, *words: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMOS_HOME": str(kernel.root)}
    return subprocess.run([sys.executable, "-m", "userland.cli", *words], env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_commands_show_the_manifest(kernel: Booted) -> None:
    r = llmos(kernel, "prune", "/models/llama", "/models/cli-slim", "--structured",
              "mlp=0.5", "--data", DATA, "--decode-tokens", "4", "--eval-tokens", "512")
    assert r.returncode == 0, r.stderr
    assert "/models/cli-slim: structured" in r.stdout and "perplexity:" in r.stdout, r.stdout
    assert "shape: heads 4 -> 4" in r.stdout and "mlp 128 -> 64" in r.stdout, r.stdout
    r = llmos(kernel, "stat", "/models/cli-slim")
    assert r.returncode == 0 and "compression: structured of /models/llama" in r.stdout, r
    r = llmos(kernel, "eval", "/models/cli-slim", "--data", DATA, "--decode-tokens", "4")
    assert r.returncode == 0 and "perplexity" in r.stdout and "tok/s at batch 8" in r.stdout
    r = llmos(kernel, "quantize", "/models/llama", "/models/q4", "--method", "int4")
    assert r.returncode != 0 and "ENOTSUP" in r.stderr and "mslk" in r.stderr, r
    r = llmos(kernel, "jobs", "-a")
    assert r.returncode == 0 and "prune" in r.stdout, r.stdout
