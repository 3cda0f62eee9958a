"""Loading a Hugging Face model from tensorfs for infer (docs/executor.md).

The layout is what `llmos import` writes (syscalls/client/_hf.py): in one
directory, each weight file `*.safetensors` as a tensorfs group and every other
file (config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json, ...) as a uint8 tensor of its bytes. A training job's
checkpoints use it too, one directory per step.

The small files are written to a private temporary directory so transformers
reads them exactly as from_pretrained would (never the hub: local_files_only);
the weights are read with load_tensors (a mapping of tensorfs's cache, no copy)
and assigned to a model built without random init. Runs in the executor's
background thread, reading tensorfs as the caller.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from syscalls import Errno, SyscallError, format_size

WEIGHTS_SUFFIX = ".safetensors"
CONFIG = "config.json"
MAX_CONTEXT = 4096  # the engine's context at most (a model may say more)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def is_hf(listing: list[dict[str, Any]]) -> bool:
    """Whether a directory listing is a Hugging Face model's (it has config.json)."""
    return any(e["name"] == CONFIG and e["type"] == "tensor" for e in listing)


@dataclass
class HFParts:
    """What load_parts read: the files' directory (temporary), the config, the
    weight groups' paths and total size, and the generation settings."""
    where: str
    config: Any
    groups: list[str]
    weight_bytes: int
    eos: frozenset[int] = field(default_factory=frozenset)


def _fail(errno: Errno, path: str, why: str) -> SyscallError:
    return SyscallError(errno, f"infer: {path}: {why}")


def read_parts(osh: Any, ckpt: str, listing: list[dict[str, Any]], tmp: str) -> HFParts:
    """Write ckpt's small files into tmp and read its config (EINVAL: an
    architecture transformers does not know; EIO: a config that is not JSON)."""
    import numpy as np
    groups, weight_bytes = [], 0
    for e in listing:
        if e["type"] == "group" and e["name"].endswith(WEIGHTS_SUFFIX):
            groups.append(e["path"])
            weight_bytes += int(e.get("size", 0))
        elif e["type"] == "tensor" and e.get("dtype") == "uint8" and e["name"] != "latest":
            data = np.asarray(osh.load_tensor(e["path"]), dtype=np.uint8).tobytes()
            with open(os.path.join(tmp, e["name"]), "wb") as f:
                f.write(data)
    if not groups:
        raise _fail(Errno.EINVAL, ckpt, "no weights (no *.safetensors group)")
    from transformers import AutoConfig, GenerationConfig
    try:
        with open(os.path.join(tmp, CONFIG), "rb") as f:
            raw = json.loads(f.read())
    except ValueError as e:
        raise _fail(Errno.EIO, ckpt, f"config.json is not JSON: {e}") from None
    try:
        config = AutoConfig.from_pretrained(tmp, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise _fail(Errno.EINVAL, ckpt, f"config.json names model_type "
                    f"{raw.get('model_type')!r}, which the installed transformers does "
                    f"not know ({str(e).splitlines()[0][:200]})") from None
    eos: Any = None
    if os.path.exists(os.path.join(tmp, "generation_config.json")):
        try:
            eos = GenerationConfig.from_pretrained(tmp, local_files_only=True).eos_token_id
        except (ValueError, OSError):
            eos = None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_set = frozenset([eos] if isinstance(eos, int) else (eos or []))
    return HFParts(tmp, config, sorted(groups), weight_bytes, eos_set)


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Bytes of keys and values of one position of one sequence, every layer."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", heads)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * element_size


def context_of(config: Any, cap: int | None = MAX_CONTEXT) -> int | None:
    """The model's context in tokens, at most cap (None: as the config says; None
    when it says nothing and there is no cap)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value if cap is None else min(value, cap)
    return cap


def build(osh: Any, ckpt: str, parts: HFParts, device: str) -> Any:
    """The model with its weights from tensorfs, in eval mode on device (EINVAL:
    weights that do not match the config, naming the first)."""
    import torch
    from transformers import AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    state: dict[str, Any] = {}
    for g in parts.groups:
        state.update(osh.load_tensors(g))
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(parts.config, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise _fail(Errno.EINVAL, ckpt, f"transformers has no causal LM for "
                    f"{type(parts.config).__name__}: {e}") from None
    manifest = os.path.join(parts.where, "compression.json")
    if os.path.exists(manifest):
        with open(manifest, "rb") as f:
            layers = json.loads(f.read()).get("layers") or {}
        if layers:
            if device != "cpu":
                raise _fail(Errno.ENOTSUP, ckpt, "int8 weights run on the CPU (fbgemm); "
                            f"this executor runs models on {device}")
            from ._compress import int8_skeleton
            int8_skeleton(model, layers)
    expected = model.state_dict()
    for name, t in state.items():
        if name not in expected:
            raise _fail(Errno.EINVAL, ckpt, f"weights do not match config.json: "
                        f"{name} is not a tensor of {type(model).__name__}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise _fail(Errno.EINVAL, ckpt, f"weights do not match config.json: {name} is "
                        f"{list(t.shape)}, the config makes it {list(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    loaded = {t.data_ptr() for t in state.values()}
    for name, t in model.state_dict().items():
        if name not in state and t.data_ptr() not in loaded and \
                name not in dict(model.named_buffers()):
            raise _fail(Errno.EINVAL, ckpt, f"weights do not match config.json: no {name}")
    return model.eval().to(device)


def tokenizer(parts: HFParts, ckpt: str) -> Any:
    """The model's tokenizer (EINVAL when it has none)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(parts.where, local_files_only=True)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise _fail(Errno.EINVAL, ckpt, f"no usable tokenizer (tokenizer.json): "
                    f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def load(osh: Any, ckpt: str, listing: list[dict[str, Any]], device: str, budget: int,
         max_batch: int, path: str) -> tuple[Any, Any, HFParts, int]:
    """(HFCausalLM, tokenizer, parts, bytes counted) of the model at ckpt: ENOMEM,
    before reading any weight, when its weights and the KV cache of max_batch
    sequences at full context are over budget."""
    from ._hf import HFCausalLM
    with tempfile.TemporaryDirectory(prefix="llmos-hf-") as tmp:
        parts = read_parts(osh, ckpt, listing, tmp)
        tok = tokenizer(parts, ckpt)
        element = 2 if "16" in str(getattr(parts.config, "dtype", "") or "") else 4
        kv = kv_bytes_per_token(parts.config, element) * context_of(parts.config) * max_batch
        nbytes = parts.weight_bytes + kv
        if nbytes > budget:
            raise SyscallError(Errno.ENOMEM, f"infer: {path} needs {format_size(nbytes)} "
                               f"({format_size(parts.weight_bytes)} of weights, "
                               f"{format_size(kv)} of KV cache for {max_batch} sequences of "
                               f"{context_of(parts.config)} tokens), over the model cache "
                               f"budget of {format_size(budget)} (model_cache)")
        try:
            model = build(osh, ckpt, parts, device)
        except RuntimeError as e:
            raise _fail(Errno.EIO, ckpt, f"corrupt weights: {e}") from None
        return HFCausalLM(model, context_of(parts.config)), tok, parts, nbytes
