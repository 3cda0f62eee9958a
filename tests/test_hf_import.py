"""Hugging Face model directories in and out of tensorfs (issue 13, part 1):
import_model and export_model on a real kernel, and `llmos import` / `llmos
export`. The models are tiny ones built here (tests/hf_models.py), never
downloaded; every check compares bytes, so nothing depends on timing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import errno_of
from hf_models import make_hf_dir

import userland
from userland import Errno

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """One model directory of each family, float32, made once for the module."""
    base = tmp_path_factory.mktemp("hf")
    return {f: make_hf_dir(base / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def osh(shared_kernel):
    with shared_kernel.connect(uid=1000) as h:
        yield h


def weights_of(d: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    import torch
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


def gone(osh, path: str) -> bool:
    names = {e["name"] for e in osh.listdir(os.path.dirname(path))} \
        if _exists(osh, os.path.dirname(path)) else set()
    base = os.path.basename(path)
    return base not in names and f"{base}.importing" not in names


def _exists(osh, path: str) -> bool:
    try:
        osh.stat(path)
        return True
    except userland.SyscallError:
        return False


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_round_trips(osh, made, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = made[family]
    r = osh.import_model(src, f"/models/rt-{family}")
    assert r["path"] == f"/models/rt-{family}" and r["files"] == len(os.listdir(src))
    st = osh.stat(f"/models/rt-{family}/model.safetensors")
    assert st["type"] == "group" and st["owner"] == 1000 and st["mode"] == 0o644
    cfg = osh.stat(f"/models/rt-{family}/config.json")
    assert cfg["type"] == "tensor" and cfg["dtype"] == "uint8"
    assert osh.load_array(f"/models/rt-{family}/config.json").tobytes() == \
        (src / "config.json").read_bytes()
    assert not _exists(osh, f"/models/rt-{family}.importing")

    out = tmp_path / "out"
    e = osh.export_model(f"/models/rt-{family}", out)
    assert e["tensors"] == r["tensors"] and e["architecture"] == r["architecture"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            assert (out / f).read_bytes() == (src / f).read_bytes(), f
    assert_same_weights(src, out)
    if family == "gpt2":  # tied to the embedding: absent from the file, not refused
        assert "lm_head.weight" not in weights_of(src)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    import torch
    for (k, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    text = "def norm(self):\n    return self.x"
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)(text).input_ids == \
        AutoTokenizer.from_pretrained(src, local_files_only=True)(text).input_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_are_bit_exact(osh, tmp_path, dtype):
    src = make_hf_dir(tmp_path / "m", "llama", dtype=dtype)
    osh.import_model(src, f"/models/half-{dtype}")
    members = osh.stat(f"/models/half-{dtype}/model.safetensors")["members"]
    assert {m["dtype"] for m in members} == {dtype}
    osh.export_model(f"/models/half-{dtype}", tmp_path / "out")
    assert_same_weights(src, tmp_path / "out")


def test_a_sharded_model_round_trips(osh, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    from hf_models import make_tokenizer
    src = make_hf_dir(tmp_path / "m", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    make_tokenizer().save_pretrained(sharded)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    r = osh.import_model(sharded, "/models/sharded")
    assert [e["name"] for e in osh.listdir("/models/sharded") if e["type"] == "group"] \
        == shards
    osh.export_model("/models/sharded", tmp_path / "out")
    assert_same_weights(sharded, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert r["tensors"] == len(back.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


# -- bad input: an errno, a message, and nothing left behind ---------------------------

def _rewrite_weights(d: Path, change) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(d / "model.safetensors")
    change(state)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def _set_config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


def _big_file(d: Path) -> None:
    with open(d / "vocab.bin.txt", "wb") as f:  # sparse: no disk, 257 MiB
        f.truncate(257 * 2**20)


def _del(*names):
    return lambda d: [(d / n).unlink() for n in names]


import torch as _torch  # noqa: E402  (the cases below build tensors)

BAD = {
    "no-config": (_del("config.json"), Errno.EINVAL, "no config.json in"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{nope"),
                        Errno.EINVAL, "is not JSON"),
    "unknown-type": (lambda d: _set_config(d, model_type="frobnicator"),
                     Errno.EINVAL, "'frobnicator'"),
    "not-causal": (lambda d: _set_config(d, model_type="vit"), Errno.EINVAL,
                   "not a causal language model"),
    "wrong-shape": (lambda d: _rewrite_weights(d, lambda s: s.__setitem__(
        "model.layers.0.mlp.up_proj.weight", _torch.zeros(3, 3))), Errno.EINVAL,
        "model.layers.0.mlp.up_proj.weight in model.safetensors has shape [3, 3]"),
    "missing-tensor": (lambda d: _rewrite_weights(d, lambda s: s.pop("model.norm.weight")),
                       Errno.EINVAL, "model.norm.weight is missing"),
    "unexpected-tensor": (lambda d: _rewrite_weights(d, lambda s: s.__setitem__(
        "model.extra.weight", _torch.zeros(2))), Errno.EINVAL,
        "model.extra.weight in model.safetensors is not a weight of LlamaForCausalLM"),
    "config-of-another-size": (lambda d: _set_config(d, num_hidden_layers=3), Errno.EINVAL,
                               "model.layers.2."),
    "no-weights": (_del("model.safetensors"), Errno.EINVAL, "no weights in"),
    "truncated": (_truncate, Errno.EIO, "model.safetensors: not a readable safetensors"),
    "garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\x10" * 64), Errno.EIO,
                "model.safetensors: not a readable safetensors"),
    "no-tokenizer": (_del("tokenizer.json", "tokenizer_config.json"), Errno.EINVAL,
                     "has no tokenizer (tokenizer.json)"),
    "big-file": (_big_file, Errno.EINVAL, "vocab.bin.txt: 257 MiB, over the 256 MiB"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_and_leaves_nothing(osh, made, tmp_path, case):
    change, errno, words = BAD[case]
    d = tmp_path / "m"
    shutil.copytree(made["llama"], d)
    change(d)
    with pytest.raises(userland.SyscallError) as e:
        osh.import_model(d, f"/models/bad/{case}")
    assert e.value.errno == errno, e.value
    assert words in e.value.message, e.value.message
    assert gone(osh, f"/models/bad/{case}")


def test_a_missing_or_not_directory_source(osh, tmp_path):
    with pytest.raises(userland.NotFound):
        osh.import_model(tmp_path / "nothing", "/models/nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(userland.SyscallError) as e:
        osh.import_model(tmp_path / "file", "/models/nothing")
    assert e.value.errno == Errno.ENOTDIR
    assert gone(osh, "/models/nothing")


def test_an_existing_model_is_replaced_only_with_force(osh, made):
    osh.import_model(made["llama"], "/models/again")
    with pytest.raises(userland.AlreadyExists):
        osh.import_model(made["qwen2"], "/models/again")
    r = osh.import_model(made["qwen2"], "/models/again", force=True)
    assert r["architecture"] == "Qwen2ForCausalLM"
    assert json.loads(osh.load_array("/models/again/config.json").tobytes())[
        "model_type"] == "qwen2"
    assert {e["name"] for e in osh.listdir("/models")} & \
        {"again.importing", "again.replaced"} == set()


def test_an_interrupted_import_leaves_nothing_and_a_stale_one_is_cleared(osh, made):
    import numpy as np

    def interrupt(done, total, phase):
        if done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        osh.import_model(made["gpt2"], "/models/cut", progress=interrupt)
    assert gone(osh, "/models/cut")
    # what a killed import leaves: the next import of the name clears it
    osh.mkdir("/models/cut.importing")
    osh.save_tensor("/models/cut.importing/config.json", np.zeros(5, dtype=np.uint8))
    seen = []
    osh.import_model(made["gpt2"], "/models/cut", progress=lambda d, t, p: seen.append(
        (d, t, p)))
    assert not _exists(osh, "/models/cut.importing")
    assert seen[-1][2] == "done" and seen[-1][0] == seen[-1][1]
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)


# -- export ---------------------------------------------------------------------------

def test_export_refuses_a_nonempty_directory_unless_forced(osh, made, tmp_path):
    osh.import_model(made["llama"], "/models/exp")
    out = tmp_path / "out"
    out.mkdir()
    osh.export_model("/models/exp", out)  # empty: fine
    with pytest.raises(userland.AlreadyExists):
        osh.export_model("/models/exp", out)
    (out / "old-file").write_text("x")
    osh.export_model("/models/exp", out, force=True)
    assert not (out / "old-file").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial left


def test_export_follows_latest_to_a_checkpoint(osh, made, tmp_path):
    import numpy as np
    osh.import_model(made["qwen2"], "/models/run/step-100")
    osh.save_tensor("/models/run/latest", np.frombuffer(b"step-100", dtype=np.uint8))
    e = osh.export_model("/models/run", tmp_path / "out")
    assert e["path"] == "/models/run/step-100"
    assert_same_weights(made["qwen2"], tmp_path / "out")
    osh.mkdir("/models/notf")  # a byte-level GPT's checkpoint is not a Hugging Face model
    osh.save_tensor("/models/notf/config", np.zeros(3, dtype=np.uint8))
    with pytest.raises(userland.SyscallError) as err:
        osh.export_model("/models/notf", tmp_path / "other")
    assert err.value.errno == Errno.EINVAL and "no config.json" in err.value.message
    assert not (tmp_path / "other").exists()


def test_a_private_model_is_exported_by_its_owner_only(shared_kernel, made, tmp_path):
    with shared_kernel.connect(uid=1000) as owner:
        owner.import_model(made["llama"], "/models/private", perm=0o600)
        assert owner.stat("/models/private/model.safetensors")["mode"] == 0o600
        with shared_kernel.connect(uid=1001) as other:
            with pytest.raises(userland.PermissionDenied):
                other.export_model("/models/private", tmp_path / "stolen")
        assert sorted(tmp_path.iterdir()) == []
        owner.export_model("/models/private", tmp_path / "mine")
    assert_same_weights(made["llama"], tmp_path / "mine")


# -- the commands -----------------------------------------------------------------------

def llmos(kernel, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLMOS_HOME=str(kernel.root), PYTHONPATH=str(ROOT))
    env.pop("LLMOS_SPAWN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "userland.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_import_and_export_commands(shared_kernel, made, tmp_path):
    r = llmos(shared_kernel, "import", str(made["gpt2"]), "/models/cli", "--mode", "640",
              "--uid", "1000", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["path"] == "/models/cli" and got["architecture"] == "GPT2LMHeadModel"
    with shared_kernel.connect(uid=1000) as osh:
        assert osh.stat("/models/cli/model.safetensors")["mode"] == 0o640
    r = llmos(shared_kernel, "import", str(made["gpt2"]), "/models/cli", "--uid", "1000")
    assert r.returncode == 1 and r.stderr.startswith("llmos: EEXIST: "), r.stderr
    assert len(r.stderr.splitlines()) == 1
    r = llmos(shared_kernel, "export", "/models/cli", str(tmp_path / "out"), "--uid", "1000")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"exported {tmp_path / 'out'} from /models/cli: "
                               "GPT2LMHeadModel, 6 files, 28 tensors, "), r.stdout
    assert_same_weights(made["gpt2"], tmp_path / "out")


# -- tokenizers ---------------------------------------------------------------------------


def test_a_tokenizer_trained_from_a_dataset_loads_and_encodes_every_text(shared_kernel):
    import numpy as np
    from transformers import AutoTokenizer
    from hf_models import TEXT
    with shared_kernel.connect(uid=1000) as osh:
        osh.save_tensor("/tok_text", np.frombuffer(TEXT.encode(), dtype=np.uint8))
        r = osh.train_tokenizer("/tok_text", "/models/tok/sub", vocab=300, min_frequency=1)
        assert r["vocab"] == 300 and r["files"] == ["tokenizer.json", "tokenizer_config.json"]
        assert r["bytes"] == len(TEXT.encode())
        assert errno_of(osh.train_tokenizer, "/tok_text", "/models/tok/sub") == Errno.EEXIST
        assert errno_of(osh.train_tokenizer, "/tok_text", "/models/t2", vocab=10) == Errno.EINVAL
        osh.save_tensor("/floats", np.zeros(4, np.float32))
        assert errno_of(osh.train_tokenizer, "/floats", "/models/t2") == Errno.EINVAL
        assert errno_of(osh.train_tokenizer, "/nothing", "/models/t2") == Errno.ENOENT
        noise = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8)
        osh.save_tensor("/noise", noise)  # bytes, not text
        assert errno_of(osh.train_tokenizer, "/noise", "/models/t2") == Errno.EINVAL
        assert errno_of(osh.stat, "/models/t2") == Errno.ENOENT
        files = {n: np.asarray(osh.load_tensor(f"/models/tok/sub/{n}")).tobytes()
                 for n in r["files"]}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for n, data in files.items():
            Path(d, n).write_bytes(data)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "def add(a, b):\n    return a + b  # ünïcode ✓"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) - 10  # merges learned


def test_the_tokenizer_command(shared_kernel):
    r = llmos(shared_kernel, "tokenizer", "train", "/tok_text", "/models/tokcli", "--vocab",
              "290", "--min-frequency", "1", "--uid", "1000")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("/models/tokcli: a BPE tokenizer of 290 tokens from "), r.stdout
    r = llmos(shared_kernel, "tokenizer", "train", "/tok_text", "/models/tokcli", "--uid",
              "1000")
    assert r.returncode == 1 and r.stderr.startswith("llmos: EEXIST: "), r.stderr
