"""Training a Hugging Face causal LM (docs/executor.md, "Training Hugging Face
models"): spawn_train with `base` (fine-tune a model `llmos import` stored, or a
checkpoint of one) or with `arch` and `tokenizer` (a new model of that
transformers architecture, shaped by n_layer, n_head, n_embd, ffn and
block_size, with the tokenizer of that tensorfs directory).

The executor calls train_memory before a job starts, reading as the caller (so
a base or tokenizer the caller may not read is EACCES then, and a worker's
memory is known for alloc_gpu); each worker builds an HFFamily, the Trainer's
model family: the model (float32, the same weights on every rank), its loss,
its data (a text dataset is tokenized by each worker, its own shard; a dataset
of ids is used as it is) and its checkpoints, in the layout infer and export
read (checkpoint.write_hf_checkpoint).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from syscalls import Errno, SyscallError
from syscalls.client import text_pieces

from ._gpt import estimate_train_bytes
from ._hfload import context_of
from .checkpoint import _aliases

CONFIG, GENERATION = "config.json", "generation_config.json"
# what a checkpoint takes from a tokenizer directory: the tokenizer's own files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(errno: Errno, why: str) -> SyscallError:
    return SyscallError(errno, f"spawn_train: {why}")


def model_dir(osh: Any, path: str, what: str) -> str:
    """path, or the checkpoint its `latest` names: where a model's config.json
    should be (errors as the caller meets them; EINVAL for a tensor)."""
    try:
        st = osh.stat(path)
    except SyscallError as e:
        raise _fail(e.errno, f"{what} {path}: {e.message}") from None
    if st["type"] != "dir":
        raise _fail(Errno.EINVAL, f"{what} {path} is a tensor, not a model directory")
    where = path
    try:
        name = bytes(np.asarray(osh.load_tensor(f"{path}/latest"), np.uint8)).decode().strip()
        where = f"{path}/{name}"
    except SyscallError as e:
        if e.errno != Errno.ENOENT:
            raise _fail(e.errno, f"{what} {path}/latest: {e.message}") from None
    except UnicodeDecodeError:
        raise _fail(Errno.EIO, f"{what} {path}/latest does not name a checkpoint") from None
    return where


def tokenizer_dir(osh: Any, path: str) -> str:
    """Where a job's tokenizer= is read: path, when it holds a tokenizer.json (so
    one `llmos tokenizer train --force` replaced wins), else the checkpoint its
    `latest` names (a trained model's own copy)."""
    where = model_dir(osh, path, "tokenizer")
    if where != path and any(e["name"] == "tokenizer.json" for e in osh.listdir(path)):
        return path
    return where


def small_files(osh: Any, where: str, names: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """The 1-D uint8 tensors of the directory where (only names, when given), as
    name -> bytes: a model directory's files other than its weights."""
    out = {}
    for e in osh.listdir(where):
        if e["type"] != "tensor" or e.get("dtype") != "uint8" or e["name"] == "latest":
            continue
        if names is None or e["name"] in names:
            out[e["name"]] = bytes(np.asarray(osh.load_tensor(e["path"]), np.uint8))
    return out


@dataclass
class Source:
    """What a job's model comes from: the transformers config, the files its
    checkpoints carry besides the weights and config.json, and (base) the
    directory and weight groups to start from."""
    config: Any
    files: dict[str, bytes]
    where: str | None = None
    groups: tuple[str, ...] = ()
    int8: bool = False  # the base is quantized (compression.json lists int8 layers)


def read_source(osh: Any, cfg: dict, tmp: str) -> Source:
    """The job's Source, its files also written into tmp (for AutoTokenizer)."""
    from transformers import AutoConfig
    if cfg.get("base"):
        where = model_dir(osh, cfg["base"], "base")
        listing = osh.listdir(where)
        if not any(e["name"] == CONFIG and e["type"] == "tensor" for e in listing):
            raise _fail(Errno.EINVAL, f"base {cfg['base']}: {where} has no config.json (not "
                        "a Hugging Face model: llmos import stores one)")
        files = small_files(osh, where)
        groups = tuple(sorted(e["path"] for e in listing if e["type"] == "group"
                              and e["name"].endswith(".safetensors")))
        if not groups:
            raise _fail(Errno.EINVAL, f"base {cfg['base']}: no weights (*.safetensors)")
        _write(tmp, files)
        try:
            config = AutoConfig.from_pretrained(tmp, local_files_only=True)
        except (ValueError, KeyError, OSError) as e:
            raise _fail(Errno.EINVAL, f"base {cfg['base']}: config.json: "
                        f"{str(e).splitlines()[0][:200]}") from None
        files.pop(CONFIG)
        files.pop("model.safetensors.index.json", None)  # the job writes one file
        manifest = files.pop("compression.json", None)  # the trained model is not that
        int8 = bool(manifest and json.loads(manifest).get("layers"))
        tokenizer_of(tmp, cfg["base"])
        return Source(config, files, where, groups, int8)
    where = tokenizer_dir(osh, cfg["tokenizer"])
    files = small_files(osh, where, TOKENIZER_FILES)
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise _fail(Errno.EINVAL, f"tokenizer {cfg['tokenizer']}: no tokenizer.json there "
                    "(llmos tokenizer train makes one)")
    _write(tmp, files)
    config = new_config(cfg, tokenizer_of(tmp, cfg["tokenizer"]))
    # next to a config.json, transformers may choose the architecture's own
    # tokenizer class (Qwen2Tokenizer adds <|endoftext|>): the job tokenizes, and
    # sizes the vocabulary, as infer and from_pretrained will load it
    _write(tmp, {CONFIG: config.to_json_string().encode()})
    tok = tokenizer_of(tmp, cfg["tokenizer"])
    if len(tok) != config.vocab_size:
        config = new_config(cfg, tok)
        _write(tmp, {CONFIG: config.to_json_string().encode()})
    return Source(config, files)


def new_config(cfg: dict, tok: Any) -> Any:
    """The config of a new cfg["arch"] model of the job's shape, for tok."""
    from transformers import AutoConfig
    config = AutoConfig.for_model(cfg["arch"], **shape_kwargs(cfg, tok))
    if hasattr(config, "n_inner"):  # GPT-2 names its MLP width so
        config.n_inner = cfg.get("ffn") or 4 * cfg["n_embd"]
    if hasattr(config, "num_key_value_heads"):  # as many as query heads (no GQA)
        config.num_key_value_heads = cfg["n_head"]
    return config


def shape_kwargs(cfg: dict, tok: Any) -> dict[str, Any]:
    """A new model's config keys, in transformers' common names (each config maps
    them to its own: GPT-2's n_embd ...)."""
    special = {k: getattr(tok, f"{k}_id", None) for k in ("bos_token", "eos_token",
                                                          "pad_token")}
    return {"vocab_size": len(tok), "hidden_size": cfg["n_embd"],
            "num_hidden_layers": cfg["n_layer"], "num_attention_heads": cfg["n_head"],
            "intermediate_size": cfg.get("ffn") or 4 * cfg["n_embd"],
            "max_position_embeddings": cfg["block_size"],
            **{f"{k}_id": v for k, v in special.items() if v is not None}}


def _write(tmp: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)


def tokenizer_of(tmp: str, path: str) -> Any:
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise _fail(Errno.EINVAL, f"{path}: no usable tokenizer (tokenizer.json): "
                    f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def n_params(config: Any) -> int:
    """Parameters of the model config builds (on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def train_bytes(config: Any, batch_size: int, block_size: int) -> int:
    """One worker's training memory, estimated as the GPT's (_gpt.estimate_train_bytes)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 1)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 1)
    return estimate_train_bytes(n_params(config), batch_size * block_size, hidden, layers,
                                c.vocab_size)


def check_teacher(osh: Any, cfg: dict, tmp: str, student_config: Any) -> int:
    """A distillation's teacher, read as the caller: a Hugging Face model whose
    tokenizer is the student's (the same vocabulary and ids, and as many logits:
    EINVAL otherwise) and whose context holds block_size; the bytes it adds to a
    worker (its weights)."""
    where = model_dir(osh, cfg["teacher"], "teacher")
    listing = osh.listdir(where)
    if not any(e["name"] == CONFIG and e["type"] == "tensor" for e in listing):
        raise _fail(Errno.EINVAL, f"teacher {cfg['teacher']}: {where} has no config.json "
                    "(a Hugging Face model is needed: its logits teach the student)")
    student = tokenizer_of(tmp, cfg.get("base") or cfg["tokenizer"])
    own = os.path.join(tmp, "teacher")
    os.makedirs(own, exist_ok=True)
    _write(own, small_files(osh, where))
    teacher = tokenizer_of(own, cfg["teacher"])
    if teacher.get_vocab() != student.get_vocab():
        raise _fail(Errno.EINVAL, f"teacher {cfg['teacher']} has another tokenizer than the "
                    f"student's ({len(teacher)} tokens against {len(student)}, or other "
                    "ids): distillation compares their distributions token by token")
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(own, local_files_only=True)
    logits = [int(c.get_text_config().vocab_size) for c in (config, student_config)]
    if logits[0] != logits[1]:
        raise _fail(Errno.EINVAL, f"teacher {cfg['teacher']} has {logits[0]} logits, the "
                    f"student {logits[1]} (a padded vocabulary): distillation compares "
                    "them one to one")
    context = context_of(config, cap=None)
    if context is not None and cfg["block_size"] > context:
        raise _fail(Errno.EINVAL, f"block_size = {cfg['block_size']} is over the teacher's "
                    f"context of {context} tokens")
    return sum(int(e.get("size", 0)) for e in listing if e["type"] == "group")


def load_teacher(osh: Any, path: str) -> Any:
    """The teacher model (eval mode, on the CPU; int8 layers rebuilt), as infer
    loads a model."""
    from ._hfload import build, read_parts
    where = model_dir(osh, path, "teacher")
    with tempfile.TemporaryDirectory(prefix="llmos-teacher-") as tmp:
        parts = read_parts(osh, where, osh.listdir(where), tmp)
        model = build(osh, where, parts, "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def distill_loss(logits: Any, teacher_logits: Any, y: Any, alpha: float, t: float) -> Any:
    """Hinton et al.'s loss: alpha * T^2 * KL(teacher at T || student at T) +
    (1 - alpha) * cross-entropy on the data, per token."""
    import torch.nn.functional as F
    v = logits.size(-1)
    s, te = logits.float().reshape(-1, v), teacher_logits.float().reshape(-1, v)
    kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(te / t, -1), log_target=True,
                  reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(s, y.reshape(-1))


def train_memory(osh: Any, cfg: dict) -> int:
    """Check a Hugging Face job before it starts, reading as the caller (osh): its
    base or tokenizer, its architecture, block_size within the model's context;
    the bytes one worker needs."""
    with tempfile.TemporaryDirectory(prefix="llmos-hftrain-") as tmp:
        src = read_source(osh, cfg, tmp)
        if src.int8:
            raise _fail(Errno.EINVAL, f"base {cfg['base']} is int8-quantized (its "
                        "compression.json): its weights cannot take gradients; fine-tune "
                        "its float source, then quantize again")
        teacher = check_teacher(osh, cfg, tmp, src.config) if cfg.get("teacher") else 0
    context = context_of(src.config, cap=None)
    if context is not None and cfg["block_size"] > context:
        raise _fail(Errno.EINVAL, f"block_size = {cfg['block_size']} is over the model's "
                    f"context of {context} tokens")
    try:
        return train_bytes(src.config, cfg["batch_size"], cfg["block_size"]) + teacher
    except (ValueError, KeyError, TypeError) as e:
        raise _fail(Errno.EINVAL, f"transformers cannot build {cfg.get('arch') or 'the base'}"
                    f" with this config: {str(e).splitlines()[0][:200]}") from None


class HFFamily:
    """The Trainer's model family for a Hugging Face causal LM (trainer.Family)."""

    def __init__(self, osh: Any, cfg: dict) -> None:
        self.osh, self.cfg = osh, cfg
        with tempfile.TemporaryDirectory(prefix="llmos-hftrain-") as tmp:
            self.source = read_source(osh, cfg, tmp)
            self.tokenizer = tokenizer_of(tmp, cfg.get("base") or cfg["tokenizer"])
        self.vocab = int(self.source.config.get_text_config().vocab_size)
        self.teacher = load_teacher(osh, cfg["teacher"]) if cfg.get("teacher") else None

    def build(self) -> Any:
        """The model in float32, train mode: the base's weights, or a seeded init
        (the same on every rank; DDP also broadcasts rank 0's)."""
        import torch
        from transformers import AutoModelForCausalLM
        config = self.source.config
        config.dtype = torch.float32
        torch.manual_seed(self.cfg["seed"])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if self.source.groups:
            state: dict[str, Any] = {}
            for g in self.source.groups:
                state.update(self.osh.load_tensors(g))
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = set(missing) & set(_aliases(model))
            if unexpected or set(missing) - tied:
                raise ValueError(f"base {self.cfg['base']}: weights do not match its "
                                 f"config: missing {sorted(set(missing) - tied)[:3]}, "
                                 f"unexpected {sorted(unexpected)[:3]}")
            model.tie_weights()
        model.config.architectures = [type(model).__name__]  # as save_pretrained says
        return model.train()

    def loss(self, model: Any, x: Any, y: Any) -> Any:
        import torch
        import torch.nn.functional as F
        logits = model(input_ids=x, use_cache=False).logits
        if self.teacher is None:
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        from ._compress import Int8Linear
        on_cpu = any(isinstance(m, Int8Linear) for m in self.teacher.modules())
        where = torch.device("cpu") if on_cpu else x.device  # int8 runs on the CPU only
        if next(self.teacher.parameters()).device != where:
            self.teacher.to(where)
        with torch.no_grad():
            taught = self.teacher(input_ids=x.to(where), use_cache=False).logits.to(x.device)
        return distill_loss(logits, taught, y, self.cfg["distill_alpha"],
                            self.cfg["distill_temperature"])

    def tokens(self, raw: Any) -> Any:
        """A shard of the dataset as int32 token ids: text (uint8) tokenized, in
        pieces cut after a newline; ids checked against the vocabulary."""
        import torch
        if raw.dtype == torch.uint8:
            text = bytes(raw.numpy()).decode("utf-8", errors="replace")
            ids: list[int] = []
            for piece in text_pieces(text):
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            return torch.tensor(ids, dtype=torch.int32)
        if raw.numel() and (int(raw.min()) < 0 or int(raw.max()) >= self.vocab):
            raise ValueError(f"dataset {self.cfg['dataset']}: token ids must be in "
                             f"[0, {self.vocab}), found {int(raw.min())}..{int(raw.max())}")
        return raw.to(torch.int32)

    def write_checkpoint(self, osh: Any, out: str, model: Any, optimizer: Any,
                         meta: dict[str, Any], history: Any) -> str:
        from .checkpoint import write_hf_checkpoint
        files = {**self.source.files,
                 CONFIG: model.config.to_json_string(use_diff=False).encode()}
        if GENERATION not in files:
            from transformers import GenerationConfig
            files[GENERATION] = GenerationConfig.from_model_config(
                model.config).to_json_string().encode()
        return write_hf_checkpoint(osh, out, model, optimizer, meta, history, files)


__all__ = ["HFFamily", "train_memory"]
