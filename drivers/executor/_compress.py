"""Model compression's torch side (docs/compression.md): int8 weights, pruning,
and the yardsticks every compressed model is measured with (perplexity on
held-out tokens, decode tokens/s through the executor's Engine, bytes).

int8 is weight-only storage with dynamic activation quantization at run time,
on torch.ao's fbgemm kernels (torch.ops.quantized.linear_dynamic): each weight
matrix is int8 with one float32 scale per output row (symmetric, -127..127),
kept in the state_dict as `NAME.weight` (int8, [out, in]) and
`NAME.weight_scale` (float32, [out]), so safetensors stores exactly those
bytes. torchao was measured and not chosen: with torch 2.13 on this CPU its
Int8WeightOnlyConfig ran 2x and Int8DynamicActivationInt8WeightConfig 19x
slower than float32, and Int4WeightOnlyConfig needs a package (mslk) that does
not exist for CPU. torch.ao's dynamic kernel only covers nn.Linear, so GPT-2's
Conv1D layers (x @ W, W [in, out]) are turned into the same int8 layer of W's
transpose.

This module must never make syscalls: the job (compress.py) reads and writes
tensorfs; the loaders (_hfload.py, _models.py) rebuild int8 layers from here.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

INT8 = "int8"
MANIFEST = "compression.json"  # the manifest file in a compressed model's directory


def _conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # no transformers: the byte GPT has none
        return None


class Int8Linear(nn.Module):
    """A linear layer of int8 weights, one float32 scale per output row; the input
    is quantized per batch at run time (fbgemm's dynamic int8 matmul)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: Any = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """weight [out, in] rounded to int8 per row: scale = max |w| / 127."""
        w = weight.detach().float()
        layer = cls(w.shape[1], w.shape[0], bias is not None)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        layer.weight.copy_(torch.clamp(torch.round(w / scale[:, None]), -127, 127))
        layer.weight_scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] these int8 values and scales stand for."""
        return self.weight.float() * self.weight_scale[:, None]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._packed = None
        return super()._apply(fn, recurse)

    def pack(self) -> Any:
        if self._packed is None:
            with warnings.catch_warnings():  # torch calls quantized tensors deprecated
                warnings.simplefilter("ignore")
                zero = torch.zeros(self.out_features, dtype=torch.long)
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight.cpu(), self.weight_scale.cpu().double(), zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(
                    qweight, None if self.bias is None else self.bias.cpu())
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("int8 layers run on the CPU (fbgemm); this input is on "
                               f"{x.device}")
        lead = x.shape[:-1]
        y = torch.ops.quantized.linear_dynamic(
            x.reshape(-1, self.in_features).float().contiguous(), self.pack(), True)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _embedding_storage(model: nn.Module) -> set[int]:
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}


def linear_layers(model: nn.Module, output_too: bool = True
                  ) -> Iterable[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every linear layer ("linear": nn.Linear, "conv1d":
    transformers' Conv1D) whose weight is not an embedding's (tied) and, unless
    output_too, that is not the output projection (lm_head)."""
    conv = _conv1d()
    tied = _embedding_storage(model)
    out = None
    if not output_too and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
    for name, m in model.named_modules():
        kind = "linear" if isinstance(m, nn.Linear) else \
            "conv1d" if conv is not None and isinstance(m, conv) else None
        if kind is None or m.weight.data_ptr() in tied or m is out or \
                (not output_too and name.endswith("lm_head")):
            continue
        yield name, m, kind


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _float_weight(m: nn.Module, kind: str) -> torch.Tensor:
    """The layer's weight as [out, in] (Conv1D keeps it [in, out])."""
    return m.weight.t() if kind == "conv1d" else m.weight


def quantize_int8(model: nn.Module) -> dict[str, str]:
    """Replace every linear layer (linear_layers) of model by an Int8Linear, in
    place; {name: kind} of those replaced (the manifest keeps it: the loaders
    rebuild the same layers, and export turns them back into float)."""
    done = {}
    for name, m, kind in list(linear_layers(model)):
        _set(model, name, Int8Linear.from_float(_float_weight(m, kind), m.bias))
        done[name] = kind
    return done


def int8_skeleton(model: nn.Module, layers: dict[str, str]) -> None:
    """Make model (just built from its config, in float) hold an empty Int8Linear
    where layers says, so that its state_dict is the quantized model's."""
    for name, kind in layers.items():
        m = model.get_submodule(name)
        w = _float_weight(m, kind)
        _set(model, name, Int8Linear(w.shape[1], w.shape[0], m.bias is not None))


def layer_bytes(model: nn.Module, names: Iterable[str]) -> int:
    """Bytes of the named layers' tensors (weights, scales, biases)."""
    return sum(t.numel() * t.element_size() for n in names
               for t in model.get_submodule(n).state_dict().values())


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- unstructured pruning ------------------------------------------------------------

def prune_magnitude(model: nn.Module, sparsity: float) -> dict[str, Any]:
    """Global magnitude pruning: the fraction `sparsity` of all the linear layers'
    weights (lm_head and embeddings excepted) with the smallest |w| set to zero.
    The matrices keep their shapes (dense kernels: no speed is gained)."""
    layers = [m for _, m, _ in linear_layers(model, output_too=False)]
    total = sum(m.weight.numel() for m in layers)
    k = int(sparsity * total)
    if k == 0 or not layers:
        return {"pruned": 0, "weights": total, "sparsity": 0.0, "layers": len(layers)}
    with torch.no_grad():
        scores = torch.cat([m.weight.detach().abs().reshape(-1).float() for m in layers])
        threshold = torch.kthvalue(scores, k).values
        del scores
        zeroed = 0
        for m in layers:
            mask = m.weight.abs() > threshold
            zeroed += int(mask.numel() - mask.sum())
            m.weight.mul_(mask)
    return {"pruned": zeroed, "weights": total, "sparsity": zeroed / total,
            "layers": len(layers)}


def zero_fraction(model: nn.Module) -> float:
    layers = [m for _, m, _ in linear_layers(model, output_too=False)]
    total = sum(m.weight.numel() for m in layers) or 1
    return sum(int((m.weight == 0).sum()) for m in layers) / total


# -- structured pruning ----------------------------------------------------------------

class Structure:
    """Where a Hugging Face decoder keeps its heads and MLP neurons: Llama's
    family (q/k/v/o_proj, gate/up/down_proj: Llama, Qwen2, Mistral ...) or GPT-2's
    (c_attn, c_proj and mlp.c_fc, mlp.c_proj, all Conv1D)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        base = getattr(model, "model", None) or getattr(model, "transformer", None)
        self.layers = list(getattr(base, "layers", None) or getattr(base, "h", None) or [])
        if not self.layers:
            raise NotImplementedError(f"{type(model).__name__}: no decoder layers found")
        first = self.layers[0]
        if hasattr(first, "self_attn") and hasattr(first.self_attn, "o_proj") and \
                hasattr(getattr(first, "mlp", None), "down_proj"):
            self.kind = "llama"
        elif hasattr(first, "attn") and hasattr(first.attn, "c_attn") and \
                hasattr(getattr(first, "mlp", None), "c_fc"):
            self.kind = "gpt2"
        else:
            raise NotImplementedError(f"{type(model).__name__}: structured pruning knows "
                                      "Llama-style (q/k/v/o_proj, gate/up/down_proj) and "
                                      "GPT-2 decoders")
        c = model.config
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.hidden = c.hidden_size
        self.head_dim = getattr(c, "head_dim", None) or self.hidden // self.heads

    def mlp_out(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.down_proj if self.kind == "llama" else layer.mlp.c_proj

    def attn_out(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.o_proj if self.kind == "llama" else layer.attn.c_proj

    def neurons(self) -> int:
        w = self.mlp_out(self.layers[0]).weight
        return w.shape[1] if self.kind == "llama" else w.shape[0]

    def importance(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                               list[torch.Tensor]]:
        """Per layer, each key/value group's and each MLP neuron's importance: the
        mean L2 norm of its activation (the input of o_proj / down_proj, on
        batches; 1 without any) times the norm of its output weights."""
        acts_h: list[torch.Tensor] = [torch.zeros(self.heads) for _ in self.layers]
        acts_m: list[torch.Tensor] = [torch.zeros(self.neurons()) for _ in self.layers]
        hooks = []

        def on(store: list[torch.Tensor], i: int, per: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                a = args[0].detach().float()
                a = a.reshape(-1, a.shape[-1] // per, per).norm(dim=-1).mean(dim=0)
                store[i] += a
            return hook

        for i, layer in enumerate(self.layers):
            hooks.append(self.attn_out(layer).register_forward_pre_hook(
                on(acts_h, i, self.head_dim)))
            hooks.append(self.mlp_out(layer).register_forward_pre_hook(on(acts_m, i, 1)))
        try:
            with torch.no_grad():
                for x in batches:
                    self.model(input_ids=x, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        if not batches:
            acts_h = [torch.ones(self.heads) for _ in self.layers]
            acts_m = [torch.ones(self.neurons()) for _ in self.layers]
        group = self.heads // self.kv_heads
        heads_out, mlp_out = [], []
        for i, layer in enumerate(self.layers):
            wo = _float_weight(self.attn_out(layer), "linear" if self.kind == "llama"
                               else "conv1d").detach().float()  # [hidden, heads*head_dim]
            norm_h = wo.reshape(wo.shape[0], self.heads, self.head_dim).norm(dim=(0, 2))
            score = (acts_h[i] * norm_h).reshape(self.kv_heads, group).sum(dim=1)
            heads_out.append(score)
            wd = _float_weight(self.mlp_out(layer), "linear" if self.kind == "llama"
                               else "conv1d").detach().float()  # [hidden, neurons]
            mlp_out.append(acts_m[i] * wd.norm(dim=0))
        return heads_out, mlp_out

    def prune(self, keep_heads: int, keep_mlp: int, batches: list[torch.Tensor]
              ) -> tuple[Any, dict[str, torch.Tensor]]:
        """(the new config, the pruned state_dict): per layer the most important
        keep_heads query heads (whole key/value groups) and keep_mlp neurons."""
        import copy
        h_scores, m_scores = self.importance(batches)
        group = self.heads // self.kv_heads
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        prefix = "model.layers" if self.kind == "llama" else "transformer.h"
        for i, layer in enumerate(self.layers):
            p = f"{prefix}.{i}."
            kv = torch.sort(torch.topk(h_scores[i], keep_heads // group).indices).values
            neurons = torch.sort(torch.topk(m_scores[i], keep_mlp).indices).values
            if self.kind == "llama":
                if keep_heads != self.heads:
                    q_rows = _rows(torch.cat([torch.arange(g * group, (g + 1) * group)
                                              for g in kv.tolist()]), self.head_dim)
                    kv_rows = _rows(kv, self.head_dim)
                    a = p + "self_attn."
                    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows),
                                       ("v_proj", kv_rows)):
                        _take(state, a + name, 0, rows)
                    state[a + "o_proj.weight"] = state[a + "o_proj.weight"][:, q_rows]
                for name in ("gate_proj", "up_proj"):
                    _take(state, p + "mlp." + name, 0, neurons)
                state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, neurons]
            else:  # GPT-2: Conv1D weights are [in, out]
                state[p + "mlp.c_fc.weight"] = state[p + "mlp.c_fc.weight"][:, neurons]
                state[p + "mlp.c_fc.bias"] = state[p + "mlp.c_fc.bias"][neurons]
                state[p + "mlp.c_proj.weight"] = state[p + "mlp.c_proj.weight"][neurons]
        config = copy.deepcopy(self.model.config)
        if self.kind == "llama":
            config.num_attention_heads = keep_heads
            config.num_key_value_heads = keep_heads // group
            config.head_dim = self.head_dim
            config.intermediate_size = keep_mlp
        else:
            config.n_inner = keep_mlp
        return config, {k: v.contiguous() for k, v in state.items()}


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads.tolist()])


def _take(state: dict[str, torch.Tensor], name: str, dim: int, index: torch.Tensor) -> None:
    state[name + ".weight"] = state[name + ".weight"].index_select(dim, index)
    if name + ".bias" in state:
        state[name + ".bias"] = state[name + ".bias"].index_select(0, index)


def build_hf(config: Any, state: dict[str, torch.Tensor],
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model of config in dtype (the source's) holding state (strict), eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if \
        getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"pruned weights do not fit the pruned config: missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model.eval()


# -- yardsticks --------------------------------------------------------------------------

def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, T, vocab] logits of a byte GPT or a Hugging Face causal LM."""
    if hasattr(model, "get_output_embeddings"):
        return model(input_ids=x, use_cache=False).logits
    return model(x)[0]


def windows(ids: torch.Tensor, context: int, limit: int) -> list[torch.Tensor]:
    """Non-overlapping windows of context + 1 tokens from ids, at most `limit`
    tokens predicted in all."""
    n = min(len(ids) - 1, limit)
    return [ids[s:s + context + 1] for s in range(0, n - 1, context)
            if len(ids[s:s + context + 1]) > 1]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, context: int, limit: int,
               batch: int = 8) -> tuple[float, int]:
    """(exp of the mean next-token cross-entropy, tokens predicted) over ids in
    windows of `context` (every window starts afresh: no token sees past its
    window)."""
    total, count = 0.0, 0
    chunks = windows(ids.long(), context, limit)
    for i in range(0, len(chunks), batch):
        group = chunks[i:i + batch]
        for w in ([torch.stack(group)] if len({len(c) for c in group}) == 1
                  else [c[None] for c in group]):
            logits = logits_of(model, w[:, :-1]).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                   reduction="sum")
            total += float(loss)
            count += w[:, 1:].numel()
    if not count:
        raise ValueError("no held-out tokens to measure perplexity on")
    return math.exp(total / count), count


def decode_rate(engine_model: Any, prompt: list[int], batch: int, tokens: int,
                min_s: float = 0.0) -> float:
    """Tokens per second the executor's Engine decodes for `batch` greedy
    sequences of `tokens` new tokens after prompt; the generation is repeated
    until min_s seconds have passed (a short run is mostly the timer's noise)."""
    from ._engine import Engine, GenRequest
    made, t0 = 0, time.perf_counter()
    while True:
        engine = Engine(max_batch=batch, device="cpu")
        for i in range(batch):
            engine.submit(GenRequest(i, 0, "m", engine_model, list(prompt), tokens))
        while engine.busy:
            made += sum(len(e.tokens) for e in engine.step())
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return made / elapsed


def decode_rates(models: list[Any], prompt: list[int], tokens: int, batches: tuple[int, ...]
                 = (1, 8), rounds: int = 5, min_s: float = 0.3
                 ) -> list[dict[int, tuple[float, float, float]]]:
    """Per model, {batch: (median, lowest, highest) tokens/s over rounds}: after a
    warm-up run each, the models take turns, rounds times, each run at least
    min_s long, so a change in the machine's load falls on all of them alike."""
    import statistics
    out: list[dict[int, tuple[float, float, float]]] = [{} for _ in models]
    for batch in batches:
        for m in models:
            decode_rate(m, prompt, batch, tokens)
        runs: list[list[float]] = [[] for _ in models]
        for _ in range(rounds):
            for i, m in enumerate(models):
                runs[i].append(decode_rate(m, prompt, batch, tokens, min_s))
        for i in range(len(models)):
            out[i][batch] = (statistics.median(runs[i]), min(runs[i]), max(runs[i]))
    return out


def sizes_verdict(pairs: dict[str, dict[str, Any] | None], dense: bool = False) -> str:
    """What the measured decode speeds say, in words, never a gain not measured:
    a batch is faster (slower) only when its ratio is past 5% and the runs of the
    two models do not overlap. dense: the method leaves every matrix its shape
    (unstructured zeros), so no kernel here runs it faster and any difference is
    noise."""
    said = {b: p for b, p in pairs.items() if p and p.get("ratio") is not None}
    if not said:
        return "speed not measured"
    figures = ", ".join(f"{p['ratio']:.2f}x at {b.replace('batch', 'batch ')}"
                        for b, p in said.items())
    if dense:
        return (f"no speed gained: unstructured zeros run on dense kernels (measured "
                f"{figures}: noise)")

    def apart(p: dict[str, Any]) -> bool:
        lo_b, hi_b = p.get("before_range") or (p["before"], p["before"])
        lo_a, hi_a = p.get("after_range") or (p["after"], p["after"])
        return lo_a > hi_b or hi_a < lo_b
    faster = [b.replace("batch", "batch ") for b, p in said.items()
              if p["ratio"] >= 1.05 and apart(p)]
    slower = [b.replace("batch", "batch ") for b, p in said.items()
              if p["ratio"] <= 0.95 and apart(p)]
    if not faster:
        return (f"no speed gained on this machine (decode {figures} the source's"
                + (f"; slower at {', '.join(slower)}" if slower else "") + ")")
    return (f"faster at {', '.join(faster)}" +
            (f", slower at {', '.join(slower)}" if slower else "") +
            f": decode {figures} the source's, measured on this machine")
