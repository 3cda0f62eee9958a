"""Continuous batching of generation requests across processes: pure torch, no sockets.

The executor driver submits ``GenRequest``s and calls ``Engine.step()`` in its
loop; each step returns the ``Event``s (new tokens, completions) to stream back.

One step:

1. **Admit** queued requests into free slots, round robin across owners: the
   owners with queued requests wait in a ring, and each admission takes the
   oldest request of the owner at the head and moves that owner to the back.
   So a process that floods the queue gets one slot in turn like any other and
   cannot starve a process that submitted later. At most ``max_batch``
   sequences run at once, all models together (``max_batch=1`` is batching off).
2. **Prefill** each admitted prompt into its slot of its model's KV cache; the
   prefill's logits give the first new token.
3. **Decode** one token for every running sequence (but in a step that admitted
   a request, unless the step before also did: that step returns the new
   sequences' first tokens at once, so a request joining a running batch waits
   for its prefill, not for a decode step more; the running sequences still
   decode at least every other step): one batched forward per
   model, each row at its own position (see _gpt.py), then sampling per
   sequence with its own ``torch.Generator`` seeded from ``req.seed``
   (temperature under 0.001 is argmax; else logits / temperature, the top_k filter when
   top_k > 0, then ``torch.multinomial``). So the same requests give the same
   tokens every run. Batch mates change a sequence's logits only by float
   rounding (about 1e-7 on CPU: another matrix shape, another summation
   order), which in the tests never changed a token, greedy or sampled.

Context handling. A prompt longer than ``block_size - 1`` tokens keeps only its
last ``block_size - 1`` (truncated from the left), so its first new token still
has a position. When a sequence's context (prompt + generated) no longer fits
(the token to feed would sit at position ``block_size``), the context *slides*:
its last ``block_size // 2`` tokens are prefilled again at positions 0.. (the
positional embeddings are absolute, so the cached keys cannot simply be
shifted) and generation goes on from there. Generation length is therefore
bounded only by ``max_tokens``; a sequence ends with reason "length" when it
has produced max_tokens tokens, or "cancelled" after ``cancel``/``cancel_owner``
(reported by the next step). This engine never ends a sequence with "context".

Each model (named by ``model_key``; the model object of the request that
created the entry is the one used) gets a KV cache of ``max_batch`` slots on
first use, kept until ``drop_model(key)`` while no sequence of it runs.
``generate_direct`` is the same prefill/decode/sampling in a plain loop: the
benchmark's baseline and the tests' oracle. An Engine is not thread-safe: one
thread calls all its methods. Nothing here may block, touch a socket or import
the rest of llmos.
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from ._gpt import GPT, KVCache

__all__ = ["Engine", "Event", "GenRequest", "generate_direct"]


@dataclass
class GenRequest:
    """One generation: `prompt` tokens in, up to `max_tokens` new tokens out."""

    id: int
    owner: int
    model_key: Hashable
    model: GPT
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    top_p: float = 1.0
    eos: frozenset[int] = frozenset()  # tokens that end the sequence (reason "stop")


@dataclass
class Event:
    """Progress of request `id`: tokens new since its last event; reason is set when done."""

    id: int
    tokens: list[int]
    done: bool = False
    reason: str = ""


@dataclass(eq=False)
class _Sequence:
    """A running request. context[-1] is the newest token, not yet in the cache."""

    req: GenRequest
    slot: int
    context: list[int]
    generator: torch.Generator
    generated: int = 0
    reported: int = 0
    stopped: bool = False  # it made one of its eos tokens


@dataclass(eq=False)
class _ModelState:
    model: GPT
    cache: KVCache
    free_slots: list[int]
    running: dict[int, _Sequence] = field(default_factory=dict)


def _clip_prompt(prompt: list[int], block_size: int) -> list[int]:
    return list(prompt[-max(1, block_size - 1):])


def _new_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


MIN_TEMPERATURE = 1e-3


def _sample_rows(logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
    """One token per row of logits [B, vocab], each with its sequence's sampling settings.

    Temperature and top_k are applied to all sampled rows at once; only the
    draw itself (torch.multinomial with the row's own generator) is per row.
    """
    tokens = logits.argmax(dim=-1).tolist()
    # below MIN_TEMPERATURE, logits / temperature overflows float32 (NaN probabilities
    # would fail the whole step); the distribution is all but greedy there anyway
    hot = [i for i, seq in enumerate(seqs) if seq.req.temperature >= MIN_TEMPERATURE]
    if not hot:
        return tokens
    vocab = logits.shape[-1]
    scaled = logits[hot].float() / torch.tensor(
        [seqs[i].req.temperature for i in hot], device=logits.device)[:, None]
    ks = [seqs[i].req.top_k if 0 < seqs[i].req.top_k < vocab else 0 for i in hot]
    if any(ks):
        top = torch.topk(scaled, max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor([max(k - 1, 0) for k in ks], device=logits.device)[:, None])
        kth[torch.tensor([k == 0 for k in ks], device=logits.device)] = float("-inf")
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    ps = [seqs[i].req.top_p for i in hot]
    if any(p < 1.0 for p in ps):
        probs = _nucleus(probs, torch.tensor(ps, device=logits.device))
    for row, i in enumerate(hot):
        tokens[i] = int(torch.multinomial(probs[row], 1, generator=seqs[i].generator))
    return tokens


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the likeliest tokens whose probabilities reach top_p (at least
    one), as transformers' TopPLogitsWarper; renormalized."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the likelier tokens
    drop = before >= top_p[:, None]
    drop[:, 0] = False
    kept = sorted_probs.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter(1, order, kept)
    return out / out.sum(dim=-1, keepdim=True)


def _append(seq: _Sequence, token: int) -> None:
    seq.context.append(token)
    seq.generated += 1
    if token in seq.req.eos:
        seq.stopped = True


def _prefill_next(model: GPT, cache: KVCache, seq: _Sequence) -> int:
    """Prefill the whole context into the sequence's slot; sample and append the next token."""
    tokens = torch.tensor(seq.context, dtype=torch.long, device=cache.device)
    token = _sample_rows(model.prefill(tokens, cache, seq.slot)[None], [seq])[0]
    _append(seq, token)
    return token


def _advance(model: GPT, cache: KVCache, seqs: list[_Sequence]) -> int:
    """One new token for each sequence (slide by re-prefill, or one batched decode).

    Returns the number of rows in the batched decode forward (0 when none ran).
    """
    block_size = model.config.block_size
    rows = []
    for seq in seqs:
        if len(seq.context) > block_size:
            del seq.context[:-max(1, block_size // 2)]
            _prefill_next(model, cache, seq)
        elif seq.generated == 0:  # its admission prefill raised: try it again
            _prefill_next(model, cache, seq)
        else:
            rows.append(seq)
    if not rows:
        return 0
    columns = torch.tensor([[s.context[-1] for s in rows], [s.slot for s in rows],
                            [len(s.context) - 1 for s in rows]], dtype=torch.long, device=cache.device)
    logits = model.decode(columns[0], columns[1], columns[2], cache)
    for seq, token in zip(rows, _sample_rows(logits, rows)):
        _append(seq, token)
    return len(rows)


def _check_request(req: GenRequest) -> None:
    vocab = req.model.config.vocab_size
    if not req.prompt:
        raise ValueError("prompt must not be empty")
    if min(req.prompt) < 0 or max(req.prompt) >= vocab:
        raise ValueError(f"prompt tokens must be in [0, {vocab})")
    if req.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
    if not req.temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {req.temperature}")
    if req.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {req.top_k}")
    if not 0.0 <= req.top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {req.top_p}")


def generate_direct(model: GPT, prompt: list[int], max_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, seed: int = 0, top_p: float = 1.0,
                    eos: frozenset[int] = frozenset()) -> list[int]:
    """Generate in-process, one sequence, no engine: the same tokens the Engine gives alone."""
    req = GenRequest(0, 0, None, model, list(prompt), max_tokens, temperature, top_k, seed,
                     top_p, frozenset(eos))
    _check_request(req)
    cache = model.new_cache(1)
    seq = _Sequence(req, 0, _clip_prompt(req.prompt, model.config.block_size),
                    _new_generator(seed, cache.device))
    out = []
    with torch.inference_mode():
        out.append(_prefill_next(model, cache, seq))
        while seq.generated < max_tokens and not seq.stopped:
            _advance(model, cache, [seq])
            out.append(seq.context[-1])
    return out


class Engine:
    """Continuous batching over per-model KV caches; see the module docstring."""

    def __init__(self, max_batch: int = 16, device: str | torch.device = "cpu") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.device = torch.device(device)
        self._queues: dict[int, deque[GenRequest]] = {}
        self._owner_ring: deque[int] = deque()
        self._queued: dict[int, GenRequest] = {}
        self._running: dict[int, _Sequence] = {}
        self._models: dict[Hashable, _ModelState] = {}
        self._pending: list[Event] = []
        self._steps = 0
        self._tokens = 0
        self._admitted_last = False  # the previous step admitted and did not decode
        self._batch_sizes: Counter[int] = Counter()

    @property
    def busy(self) -> bool:
        """True while step() has work: queued or running requests, or events to report."""
        return bool(self._queued or self._running or self._pending)

    def submit(self, req: GenRequest) -> None:
        """Queue a request (ValueError on a bad one or a duplicate id)."""
        if req.id in self._queued or req.id in self._running:
            raise ValueError(f"request id {req.id} is already in the engine")
        _check_request(req)
        queue = self._queues.get(req.owner)
        if queue is None:
            queue = self._queues[req.owner] = deque()
            self._owner_ring.append(req.owner)
        queue.append(req)
        self._queued[req.id] = req

    def cancel(self, id: int) -> bool:
        """Stop request `id`, queued or running; the next step() reports it. False if unknown."""
        req = self._queued.pop(id, None)
        if req is not None:
            queue = self._queues[req.owner]
            queue.remove(req)
            if not queue:
                del self._queues[req.owner]
                self._owner_ring.remove(req.owner)
        else:
            seq = self._running.get(id)
            if seq is None:
                return False
            self._retire(seq)
        self._pending.append(Event(id, [], True, "cancelled"))
        return True

    def cancel_owner(self, pid: int) -> list[int]:
        """Cancel every request of process `pid`; returns their ids."""
        ids = [r.id for r in self._queues.get(pid, ())]
        ids += [i for i, s in self._running.items() if s.req.owner == pid]
        for i in ids:
            self.cancel(i)
        return ids

    def drop_model(self, key: Hashable) -> bool:
        """Free the KV cache of model `key` if none of its sequences runs; True if freed."""
        state = self._models.get(key)
        if state is None or state.running:
            return False
        del self._models[key]
        return True

    def step(self) -> list[Event]:
        """Admit, prefill, decode one token per running sequence; return the events.

        If a forward raises, the exception propagates and the engine stays
        consistent: the caller may cancel the affected requests and step again.
        """
        with torch.inference_mode():
            admitted = self._admit() and not self._admitted_last
            self._admitted_last = admitted
            for state in self._models.values() if not admitted else ():
                seqs = [s for s in state.running.values()
                        if s.generated < s.req.max_tokens and not s.stopped]
                if seqs:
                    rows = _advance(state.model, state.cache, seqs)
                    if rows:
                        self._batch_sizes[rows] += 1
        events, self._pending = self._pending, []
        for seq in list(self._running.values()):
            events.append(self._report(seq))
        self._steps += 1
        return events

    def stats(self) -> dict[str, object]:
        """Counters: steps, tokens generated, decode batch sizes, queued and running requests."""
        forwards = sum(self._batch_sizes.values())
        rows = sum(size * n for size, n in self._batch_sizes.items())
        return {
            "steps": self._steps,
            "tokens": self._tokens,
            "decode_forwards": forwards,
            "mean_batch": rows / forwards if forwards else 0.0,
            "batch_hist": dict(sorted(self._batch_sizes.items())),
            "queued": len(self._queued),
            "running": len(self._running),
            "models": len(self._models),
            "max_batch": self.max_batch,
        }

    def _admit(self) -> int:
        """Start and prefill queued requests, round robin across owners, while slots
        are free; how many."""
        admitted = 0
        while len(self._running) < self.max_batch and self._owner_ring:
            owner = self._owner_ring.popleft()
            queue = self._queues[owner]
            req = queue.popleft()
            if queue:
                self._owner_ring.append(owner)
            else:
                del self._queues[owner]
            del self._queued[req.id]
            state, seq = self._start(req)
            _prefill_next(state.model, state.cache, seq)
            admitted += 1
        return admitted

    def _start(self, req: GenRequest) -> tuple[_ModelState, _Sequence]:
        state = self._models.get(req.model_key)
        if state is None:
            cache = req.model.new_cache(self.max_batch, device=self.device)
            state = _ModelState(req.model, cache, list(range(self.max_batch - 1, -1, -1)))
            self._models[req.model_key] = state
        seq = _Sequence(req, state.free_slots.pop(),
                        _clip_prompt(req.prompt, state.model.config.block_size),
                        _new_generator(req.seed, self.device))
        state.running[req.id] = seq
        self._running[req.id] = seq
        return state, seq

    def _retire(self, seq: _Sequence) -> None:
        state = self._models[seq.req.model_key]
        del state.running[seq.req.id]
        del self._running[seq.req.id]
        state.free_slots.append(seq.slot)

    def _report(self, seq: _Sequence) -> Event:
        """The tokens `seq` made since its last event; retires it when it is done."""
        new = seq.generated - seq.reported
        seq.reported = seq.generated
        self._tokens += new
        # At most two tokens per step (prefill, then decode) and a slide keeps at
        # least one old token, so the new ones are all still in the context.
        event = Event(seq.req.id, seq.context[-new:] if new else [])
        if seq.stopped or seq.generated >= seq.req.max_tokens:
            event.done, event.reason = True, "stop" if seq.stopped else "length"
            self._retire(seq)
        return event
