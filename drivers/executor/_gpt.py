"""A byte-level nanoGPT-style decoder, with a KV-cache inference path.

Two ways through the same weights:

* ``GPT.forward(idx, targets)`` is the training path: a whole [B, T] batch with
  causal ``scaled_dot_product_attention``, returning (logits, loss).
* ``new_cache`` / ``prefill`` / ``decode`` is the inference path. A ``KVCache``
  is a fixed pool of *slots*, one sequence each, and every slot has its own
  position, so sequences that started at different times decode together in one
  batched forward (continuous batching, see _engine.py). ``prefill`` writes a
  prompt into one slot at positions 0..T-1; ``decode`` feeds one token per row at
  that row's position and attends over positions <= it.

Both paths give the same logits (tests/test_executor_engine.py checks it). The
input embedding and the output head share one matrix, as in nanoGPT, so
``state_dict()`` holds ``lm_head.weight`` as a duplicate of ``wte.weight``.
This module imports only torch: it must never import the rest of llmos.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "KVCache", "n_params", "train_bytes"]

_INT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


@dataclass
class GPTConfig:
    """The shape of a model; validated on construction (ValueError)."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be an int >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.vocab_size > 65536:
            raise ValueError(f"vocab_size must be <= 65536, got {self.vocab_size}")
        if self.block_size > 8192:
            raise ValueError(f"block_size must be <= 8192, got {self.block_size}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be a bool, got {self.bias!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict such as to_dict() gives; missing keys take defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(map(str, unknown))}")
        return cls(**d)


def n_params(cfg: GPTConfig) -> int:
    """The number of unique parameters of GPT(cfg), by arithmetic (head tied to wte)."""
    c, b = cfg.n_embd, int(cfg.bias)
    layer_norm = c + b * c
    attn = (3 * c * c + b * 3 * c) + (c * c + b * c)
    mlp = (4 * c * c + b * 4 * c) + (4 * c * c + b * c)
    per_layer = 2 * layer_norm + attn + mlp
    return cfg.vocab_size * c + cfg.block_size * c + cfg.n_layer * per_layer + layer_norm


def train_bytes(cfg: GPTConfig, batch_size: int) -> int:
    """Estimated training memory of one worker, in bytes.

    16 B per parameter (fp32 weights, grads and AdamW's two moments)
    + activations: batch * block_size * n_embd * n_layer * 34 values of 4 B
      (about 34 saved values per embedding channel per layer, as in the
      Megatron activation estimate without recomputation)
    + logits: batch * block_size * vocab_size * 4 B, three times (logits, their
      softmax in the loss, and their gradient).
    """
    return estimate_train_bytes(n_params(cfg), batch_size * cfg.block_size, cfg.n_embd,
                                cfg.n_layer, cfg.vocab_size)


def estimate_train_bytes(params: int, tokens: int, width: int, layers: int,
                         vocab: int) -> int:
    """train_bytes for any decoder of params parameters, width channels and layers
    layers over a vocabulary of vocab, for tokens tokens a step."""
    return 16 * params + tokens * width * layers * 34 * 4 + tokens * vocab * 4 * 3


@dataclass
class KVCache:
    """Keys and values of every slot: k, v are [n_layer, slots, n_head, block_size, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def device(self) -> torch.device:
        return self.k.device


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., T, C] -> three [..., n_head, T, head_dim]."""
        *lead, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=-1)
        shape = (*lead, t, self.n_head, self.head_dim)
        return tuple(z.view(shape).transpose(-3, -2) for z in (q, k, v))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))

    def prefill(self, x: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, slot: int) -> torch.Tensor:
        """x: [T, C]; writes this layer's keys/values at positions 0..T-1 of `slot`."""
        t, c = x.shape
        q, k, v = self._qkv(x)
        ck[slot, :, :t] = k
        cv[slot, :, :t] = v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(0, 1).reshape(t, c))

    def decode(self, x: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, slots: torch.Tensor,
               positions: torch.Tensor, span: int, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, C], one token per row at positions[row] of slots[row]."""
        b, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=-1)
        heads = (b, self.n_head, self.head_dim)
        ck[slots, :, positions] = k.view(heads)
        cv[slots, :, positions] = v.view(heads)
        keys = ck[slots, :, :span]          # [B, n_head, span, head_dim]
        values = cv[slots, :, :span]
        y = F.scaled_dot_product_attention(q.view(b, self.n_head, 1, self.head_dim),
                                           keys, values, attn_mask=mask)
        return self.c_proj(y.reshape(b, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The decoder. Call eval() (and use torch.inference_mode) for the cache path."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: [B, T] token ids -> (logits [B, T, vocab], mean cross-entropy or None).

        Targets equal to -1 are ignored in the loss.
        """
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, slots: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache of `slots` sequences, on the weights' device and dtype by default."""
        cfg = self.config
        ref = self.wte.weight
        shape = (cfg.n_layer, slots, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        return KVCache(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))

    def prefill(self, tokens: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        """Write `tokens` ([T], 1 <= T <= block_size) into `slot` at positions 0..T-1.

        Returns the logits [vocab] after the last token. Whatever the slot held
        before is overwritten (positions >= T are masked off by decode).
        """
        t = tokens.shape[0]
        if not 1 <= t <= self.config.block_size:
            raise ValueError(f"prefill of {t} tokens; need 1..{self.config.block_size}")
        x = self.wte(tokens) + self.wpe(torch.arange(t, device=tokens.device))
        for layer, block in enumerate(self.blocks):
            x = x + block.attn.prefill(block.ln_1(x), cache.k[layer], cache.v[layer], slot)
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(self.ln_f(x[-1]))

    def decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        """Feed tokens[i] at positions[i] of slots[i] (each row its own slot) -> logits [B, vocab].

        Each row attends over its slot's positions 0..positions[i]; positions
        must be < block_size and the slot must hold that row's earlier tokens.
        """
        span = int(positions.max()) + 1
        mask = (torch.arange(span, device=positions.device) <= positions[:, None])[:, None, None, :]
        x = self.wte(tokens) + self.wpe(positions)
        for layer, block in enumerate(self.blocks):
            x = x + block.attn.decode(block.ln_1(x), cache.k[layer], cache.v[layer],
                                      slots, positions, span, mask)
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(self.ln_f(x))
