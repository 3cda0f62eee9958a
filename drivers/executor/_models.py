"""The executor's loaded models: resolving a model path as the caller, its access
check, loading a checkpoint, and the cache with a memory budget.

resolve, check_access and load run in the driver's background thread and read
tensorfs through the executor's connection for the caller's uid (so tensorfs's
permissions apply), on every call, also on a cache hit: the cache is everyone's.
admit runs on the loop's thread. It must never hand a model to a caller that
could not read every tensor of its checkpoint.
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from syscalls import Errno, SyscallError, format_size

log = logging.getLogger("llmos.executor")


@dataclass
class Loaded:
    """A model in the cache."""
    key: tuple
    path: str           # the checkpoint directory it came from
    model: Any          # a GPT in eval mode
    nbytes: int
    config: dict
    model_path: str = ""  # the path infer named: a model directory or a checkpoint
    loaded_at: float = field(default_factory=time.time)
    requests: int = 0
    tokenizer: Any = None  # a Hugging Face model's; None: the byte-level GPT (bytes)
    eos: frozenset[int] = frozenset()  # tokens that end generation (reason "stop")
    architecture: str = "gpt"  # the byte GPT's, or config.json's first architecture


def text_of(t: Any) -> str:
    """A uint8 tensor's bytes as text."""
    import numpy as np
    return bytes(np.asarray(t, dtype=np.uint8).tobytes()).decode("utf-8")


class ModelCache:
    """Loaded models, least recently used first, within budget bytes (each model's
    weights and the KV cache of max_batch slots the engine gives it). conn(uid) is
    the executor's connection acting as uid; device() where models run."""

    def __init__(self, conn: Callable[[int], Any], device: Callable[[], str], budget: int,
                 max_batch: int) -> None:
        self.conn, self.device = conn, device
        self.budget, self.max_batch = budget, max_batch
        self.models: OrderedDict[tuple, Loaded] = OrderedDict()

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[Loaded]:
        return iter(list(self.models.values()))

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.models.values())

    def resolve(self, uid: int, path: str) -> tuple[str, dict, tuple]:
        """(checkpoint dir, its config, cache key) of a model path, read as uid: a
        model directory's `latest` checkpoint, or a checkpoint directory itself."""
        osh = self.conn(uid)
        path = path.rstrip("/")
        if not path.startswith("/"):
            raise SyscallError(Errno.EINVAL, "infer: model must be a tensorfs path such as "
                               "/models/NAME")
        try:
            st = osh.stat(path)
        except SyscallError as e:
            if e.errno in (Errno.ENOENT, Errno.ENOTDIR):
                raise SyscallError(Errno.ENOENT, f"infer: no model at {path}") from None
            raise
        if st["type"] != "dir":
            raise SyscallError(Errno.ENOENT, f"infer: {path} is a tensor, not a model "
                               "directory")
        ckpt = path
        try:
            name = text_of(osh.load_tensor(f"{path}/latest")).strip()
            ckpt = f"{path}/{name}"
        except SyscallError as e:
            if e.errno == Errno.EISDIR:
                raise SyscallError(Errno.EIO, f"infer: {path}/latest is a directory, not "
                                   "a checkpoint's name") from None
            if e.errno != Errno.ENOENT:
                raise
        except UnicodeDecodeError:
            raise SyscallError(Errno.EIO, f"infer: {path}/latest does not name a "
                               "checkpoint") from None
        from ._hfload import CONFIG, is_hf
        try:
            listing = osh.listdir(ckpt)
        except SyscallError as e:
            if e.errno not in (Errno.ENOENT, Errno.ENOTDIR):
                raise
            listing = []
        if is_hf(listing):  # its listing has config.json's stat record: no stat more
            cst = next(e for e in listing if e["name"] == CONFIG)
            if "mtime" not in cst:  # listed with "error": its header is damaged
                raise SyscallError(Errno.EIO, f"infer: {ckpt}/{CONFIG}: unreadable")
            return ckpt, {"hf": listing}, (ckpt, cst["mtime"], cst.get("checksum"))
        try:
            cst = osh.stat(f"{ckpt}/config")
            key = (ckpt, cst["mtime"], cst.get("checksum"))  # none: not a tensor
            hit = self.models.get(key) if cst["type"] == "tensor" else None
            config = hit.config if hit is not None else json.loads(
                text_of(osh.load_tensor(f"{ckpt}/config")))
        except SyscallError as e:
            if e.errno in (Errno.ENOENT, Errno.ENOTDIR):
                raise SyscallError(Errno.ENOENT, f"infer: {path} is not a model: no "
                                   f"{ckpt}/config") from None
            raise
        except (ValueError, UnicodeDecodeError) as e:
            raise SyscallError(Errno.EIO, f"infer: corrupt checkpoint {ckpt}: config: {e}")
        return ckpt, config, key

    def load(self, uid: int, path: str) -> Loaded:
        """The model at path, from the cache or loaded now (background thread)."""
        ckpt, config, key = self.resolve(uid, path)
        # on a cache hit too: the cache is everyone's (a Hugging Face model's listing,
        # just read as uid, serves for it)
        self.check_access(uid, ckpt, config.get("hf"))
        if "hf" in config:
            return self.models.get(key) or self.load_hf(uid, path, ckpt, config["hf"], key)
        from ._gpt import GPT, GPTConfig, n_params
        try:
            cfg = GPTConfig.from_dict(dict(config["model"]))
        except (ValueError, KeyError, TypeError) as e:
            raise SyscallError(Errno.EIO, f"infer: corrupt checkpoint {ckpt}: {e}") from None
        if cfg.vocab_size != 256:
            raise SyscallError(Errno.EINVAL, f"infer: {path} has a vocabulary of "
                               f"{cfg.vocab_size}; infer reads and writes bytes (256)")
        # weights, and the KV cache of max_batch slots the engine gives it
        nbytes = 4 * n_params(cfg) + 2 * 4 * cfg.n_layer * self.max_batch * \
            cfg.block_size * cfg.n_embd
        if nbytes > self.budget:
            raise SyscallError(Errno.ENOMEM, f"infer: {path} needs {format_size(nbytes)} "
                               "with its KV cache, over the model cache budget of "
                               f"{format_size(self.budget)} (model_cache)")
        hit = self.models.get(key)
        if hit is not None:
            return hit
        from .checkpoint import load_state, read_checkpoint
        try:
            got = read_checkpoint(self.conn(uid), ckpt, for_resume=False)
            model = GPT(cfg)
            if config.get("int8"):  # a quantized model (compress.py): its int8 layers
                if self.device() != "cpu":
                    raise SyscallError(Errno.ENOTSUP, f"infer: {path}: int8 weights run on "
                                       f"the CPU (fbgemm); this executor runs models on "
                                       f"{self.device()}")
                from ._compress import int8_skeleton
                int8_skeleton(model, dict(config["int8"]))
            load_state(model, None, got)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise SyscallError(Errno.EIO, f"infer: corrupt checkpoint {ckpt}: {e}") from None
        model.eval().to(self.device())
        log.info("loaded %s (%s with its KV cache)", ckpt, format_size(nbytes))
        manifest = self.manifest(uid, ckpt)
        return Loaded(key, ckpt, model, nbytes, {**config, **manifest}, path)

    def load_hf(self, uid: int, path: str, ckpt: str, listing: list[dict], key: tuple
                ) -> Loaded:
        from . import _hfload
        model, tok, parts, nbytes = _hfload.load(self.conn(uid), ckpt, listing, self.device(),
                                                 self.budget, self.max_batch, path)
        arch = (getattr(parts.config, "architectures", None) or [type(model.model).__name__])[0]
        log.info("loaded %s (%s, %s with its KV cache)", ckpt, arch, format_size(nbytes))
        config = {"architecture": arch, **self.trained(uid, ckpt)}
        if any(e["name"] == "compression.json" for e in listing):
            config.update(self.manifest(uid, ckpt))
        return Loaded(key, ckpt, model, nbytes, config, path, tokenizer=tok, eos=parts.eos,
                      architecture=arch)

    def manifest(self, uid: int, ckpt: str) -> dict[str, Any]:
        """{"compression": a summary of ckpt's compression.json} of a compressed
        model (docs/compression.md), {} for any other."""
        try:
            m = self.conn(uid).read_manifest(ckpt)
        except SyscallError:  # unreadable: the model serves all the same
            return {}
        if not m:
            return {}
        keep = ("method", "source", "bytes", "perplexity", "tokens_per_s", "speed",
                "exported")
        return {"compression": {k: m[k] for k in keep if k in m}}

    def trained(self, uid: int, ckpt: str) -> dict[str, Any]:
        """{step, loss} of a training job's Hugging Face checkpoint (its llmos/config),
        {} for an imported model."""
        from .checkpoint import JOB_STATE
        try:
            meta = json.loads(text_of(self.conn(uid).load_tensor(f"{ckpt}/{JOB_STATE}/config")))
        except (SyscallError, ValueError, UnicodeDecodeError):
            return {}
        return {k: meta.get(k) for k in ("step", "loss")}

    def check_access(self, uid: int, ckpt: str, listing: list[dict] | None = None) -> None:
        """EACCES unless uid may list ckpt and read each of its tensors (background
        thread); listing: ckpt's, when the caller has just read it as uid."""
        if uid == 0:
            return
        if listing is None:
            listing = self.conn(uid).listdir(ckpt)  # the directory's own r bit: tensorfs
        for e in listing:
            if e["type"] in ("tensor", "group") and e.get("owner") != uid \
                    and not e.get("mode", 0) & 0o4:
                raise SyscallError(Errno.EACCES, f"infer: uid {uid} may not read "
                                   f"{e['path']} (owner {e.get('owner')}, mode "
                                   f"{e.get('mode', 0):o})")

    def admit(self, m: Loaded, engine: Any) -> Loaded:
        """Put m in the cache (loop thread), evicting idle models over the budget:
        those the engine (None: not started yet) lets go."""
        have = self.models.get(m.key)
        if have is not None:
            m = have
        self.models[m.key] = m
        self.models.move_to_end(m.key)
        for key, old in list(self.models.items()):  # older checkpoints of the same model
            if key != m.key and old.model_path == m.model_path and (
                    engine is None or engine.drop_model(key)):
                del self.models[key]
        used = self.nbytes
        for key in list(self.models):
            if used <= self.budget or key == m.key:
                continue
            if engine is None or engine.drop_model(key):
                used -= self.models.pop(key).nbytes
        return m
