"""Hugging Face causal LMs behind the engine's model interface: pure torch and
transformers, no sockets.

``HFCausalLM`` wraps any ``AutoModelForCausalLM`` so the Engine (_engine.py)
batches it exactly as it batches the byte-level GPT: ``new_cache`` /
``prefill`` / ``decode`` over a pool of KV-cache *slots*, one sequence each.

* ``prefill`` runs the model on one prompt alone, as ``model.generate`` does,
  and copies the keys and values it made into the sequence's slot.
* ``decode`` feeds one token per row, each at its own position: the rows'
  cached keys and values are gathered into a ``DynamicCache`` of the longest
  row's length, an attention mask hides each shorter row's unused positions,
  ``position_ids`` give each row its own position (rotary or learned), and the
  new token's keys and values are written back into each row's slot.

So every sequence sees the same keys, values and positions it would see alone;
batch mates change its logits only by float rounding (another matrix shape).
The tests check that greedy output is token-identical to ``model.generate``.

The cache's length grows on demand (doubling, up to ``block_size``), so a
model with a long context costs what its sequences use, not its maximum.
This module must never import the rest of llmos.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HFCausalLM", "SlotCache"]


@dataclass
class EngineConfig:
    """What the engine reads of a model: its vocabulary and context (block_size)."""

    vocab_size: int
    block_size: int


class SlotCache:
    """Per layer, keys and values [slots, kv_heads, length, head_dim]; allocated at
    the first prefill (when the shapes are known), lengthened as positions need."""

    def __init__(self, slots: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.slots, self.max_len = slots, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reserve(self, layers: list[tuple[torch.Tensor, torch.Tensor]], need: int) -> None:
        """Make room for positions < need, shaped like one sequence's `layers`."""
        if self.k and need <= self.length:
            return
        old = self.length
        length = max(need, min(self.max_len, max(64, 2 * old)))
        for i, (k, v) in enumerate(layers):
            _, heads, _, dim = k.shape
            grown_k = torch.zeros((self.slots, heads, length, dim), device=self.device, dtype=k.dtype)
            grown_v = torch.zeros((self.slots, v.shape[1], length, v.shape[3]),
                                  device=self.device, dtype=v.dtype)
            if i < len(self.k):
                grown_k[:, :, :old] = self.k[i]
                grown_v[:, :, :old] = self.v[i]
                self.k[i], self.v[i] = grown_k, grown_v
            else:
                self.k.append(grown_k)
                self.v.append(grown_v)


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a transformers Cache: [batch, heads, length, dim]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]  # older transformers: a sequence of pairs


class HFCausalLM:
    """A transformers causal LM (eval mode) with the engine's slot interface."""

    def __init__(self, model: Any, block_size: int) -> None:
        self.model = model
        vocab = model.get_output_embeddings().weight.shape[0]
        self.config = EngineConfig(vocab, block_size)
        from transformers import DynamicCache
        self._dynamic = DynamicCache

    def new_cache(self, slots: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> SlotCache:
        ref = next(self.model.parameters())
        return SlotCache(slots, self.config.block_size, ref.device if device is None else device,
                         ref.dtype if dtype is None else dtype)

    def _forward(self, **kw: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(use_cache=True, **kw)
        cache = out.get("cache") if "cache" in out else out.past_key_values
        return out.logits, cache

    def prefill(self, tokens: torch.Tensor, cache: SlotCache, slot: int) -> torch.Tensor:
        """Run `tokens` ([T]) alone and keep their keys and values in `slot`; logits
        [vocab] after the last token."""
        t = tokens.shape[0]
        if not 1 <= t <= self.config.block_size:
            raise ValueError(f"prefill of {t} tokens; need 1..{self.config.block_size}")
        logits, made = self._forward(input_ids=tokens[None],
                                     attention_mask=torch.ones_like(tokens)[None])
        layers = _layers(made)
        cache.reserve(layers, t)
        for i, (k, v) in enumerate(layers):
            cache.k[i][slot, :, :t] = k[0]
            cache.v[i][slot, :, :t] = v[0]
        return logits[0, -1]

    def decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
               cache: SlotCache) -> torch.Tensor:
        """Feed tokens[i] at positions[i] of slots[i] -> logits [B, vocab].

        The model's attention writes each row's new keys and values straight into
        its slot (_SlotLayer) and reads the rows' first `longest + 1` positions:
        views of the slots when they are consecutive (no copy), else gathered."""
        past = int(positions.max())
        b = tokens.shape[0]
        if past + 1 > cache.length:
            cache.reserve([(k[:1], v[:1]) for k, v in zip(cache.k, cache.v)], past + 1)
        rows = slots.tolist()
        first = rows[0]
        pick: Any = slice(first, first + b) if rows == list(range(first, first + b)) else slots
        mask = (torch.arange(past + 1, device=tokens.device) <= positions[:, None]).long()
        view = self._dynamic()
        view.layers = [_SlotLayer(k, v, slots, positions, pick, past)
                       for k, v in zip(cache.k, cache.v)]
        logits, _ = self._forward(input_ids=tokens[:, None], attention_mask=mask,
                                  position_ids=positions[:, None], cache=view)
        return logits[:, -1]


def _slot_layer() -> type:
    """A transformers cache layer over the engine's slots (made on first use: the
    class derives from transformers', loaded lazily)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, pick: Any, past: int) -> None:
            super().__init__()
            self.store = (k, v)
            self.slots, self.positions, self.pick, self.past = slots, positions, pick, past
            self.is_initialized = True
            self.device = k.device

        def get_seq_length(self) -> int:
            return self.past

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = self.store
            k[self.slots, :, self.positions] = key_states[:, :, -1]
            v[self.slots, :, self.positions] = value_states[:, :, -1]
            self.keys = k[self.pick, :, :self.past + 1]
            self.values = v[self.pick, :, :self.past + 1]
            return self.keys, self.values

    return SlotLayer


class _LazySlotLayer:
    cls: type | None = None

    def __call__(self, *args: Any) -> Any:
        if self.cls is None:
            self.cls = _slot_layer()
        return self.cls(*args)


_SlotLayer = _LazySlotLayer()
