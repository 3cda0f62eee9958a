"""The executor's model (_gpt.py) and continuous-batching engine (_engine.py), in-process.

Tiny models with enlarged random weights, so greedy outputs vary from token to
token (at GPT-2's init scale a random model mostly repeats its input, which
would let wrong answers pass). The oracle for generation is a plain loop over
the training forward, independent of the KV cache.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
import torch

from drivers.executor._engine import Engine, Event, GenRequest, generate_direct
from drivers.executor._gpt import GPT, GPTConfig, n_params, train_bytes

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=32)


def tiny_model(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine
    OpenMP threads waiting for each other make each op ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


def reference_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding through GPT.forward with the engine's context rules, no cache."""
    block = model.config.block_size
    context, out = list(prompt[-max(1, block - 1):]), []
    with torch.inference_mode():
        for _ in range(n):
            if len(context) > block:
                context = context[-max(1, block // 2):]
            logits, _ = model(torch.tensor([context]))
            out.append(int(logits[0, -1].argmax()))
            context.append(out[-1])
    return out


def run(engine: Engine, earlier: Iterable[Event] = (), limit: int = 10_000) -> dict[int, list[Event]]:
    """Step until idle; all events (after `earlier` ones) by request id, in order."""
    events: dict[int, list[Event]] = {}
    for ev in earlier:
        events.setdefault(ev.id, []).append(ev)
    for _ in range(limit):
        if not engine.busy:
            return events
        for ev in engine.step():
            events.setdefault(ev.id, []).append(ev)
    raise AssertionError("engine still busy")


def tokens_of(events: list[Event]) -> list[int]:
    return [t for ev in events for t in ev.tokens]


def req(model: GPT, id: int, prompt: list[int], max_tokens: int, owner: int = 1,
        key: object = "m", **kw: object) -> GenRequest:
    return GenRequest(id=id, owner=owner, model_key=key, model=model, prompt=prompt,
                      max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


PROMPTS = [[1, 2, 3], [200, 17, 5, 99, 4, 8, 8], [65], list(range(40, 60))]


# --- the model -------------------------------------------------------------

def test_config_round_trip_and_validation() -> None:
    cfg = GPTConfig(**TINY)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig.from_dict({}) == GPTConfig()
    for bad in ({"n_layer": 0}, {"n_head": 3}, {"vocab_size": 70000}, {"block_size": 9000},
                {"n_embd": 1.5}, {"n_layer": True}, {"dropout": 1.0}, {"bias": 1}, {"colour": 1}):
        with pytest.raises(ValueError):
            GPTConfig.from_dict(bad)


@pytest.mark.parametrize("bias", [True, False])
def test_n_params_counts_unique_parameters(bias: bool) -> None:
    cfg = GPTConfig(**TINY, bias=bias, vocab_size=300)  # type: ignore[arg-type]
    assert n_params(cfg) == sum(p.numel() for p in GPT(cfg).parameters())


def test_train_bytes_formula() -> None:
    cfg = GPTConfig()
    tokens = 8 * cfg.block_size
    expected = 16 * n_params(cfg) + tokens * cfg.n_embd * cfg.n_layer * 34 * 4 + tokens * cfg.vocab_size * 12
    assert train_bytes(cfg, 8) == expected
    assert train_bytes(cfg, 16) > train_bytes(cfg, 8)


def test_training_forward_gives_a_loss_and_gradients(model: GPT) -> None:
    m = tiny_model(1, dropout=0.1).train()
    idx = torch.randint(0, 256, (2, 16))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    logits, loss = m(idx, targets)
    assert logits.shape == (2, 16, 256)
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    assert m.wte.weight.grad is not None and m.wte.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_prefill_and_decode_match_full_forward(model: GPT) -> None:
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (3, 30))
    starts, slots = [4, 11, 1], [2, 0, 3]
    with torch.inference_mode():
        full, _ = model(idx)
        cache = model.new_cache(4)
        assert cache.k.shape == (2, 4, 4, 32, 8) and cache.v.shape == cache.k.shape
        for row, (start, slot) in enumerate(zip(starts, slots)):
            last = model.prefill(idx[row, :start], cache, slot)
            torch.testing.assert_close(last, full[row, start - 1], atol=1e-4, rtol=0)
        positions = list(starts)
        for _ in range(15):
            tokens = torch.tensor([int(idx[r, positions[r]]) for r in range(3)])
            logits = model.decode(tokens, torch.tensor(slots), torch.tensor(positions), cache)
            for r in range(3):
                torch.testing.assert_close(logits[r], full[r, positions[r]], atol=1e-4, rtol=0)
            positions = [p + 1 for p in positions]


def test_prefill_overwrites_a_used_slot(model: GPT) -> None:
    with torch.inference_mode():
        cache = model.new_cache(1)
        model.prefill(torch.arange(20), cache, 0)
        fresh = model.prefill(torch.tensor([7, 8]), cache, 0)
        logits = model.decode(torch.tensor([9]), torch.tensor([0]), torch.tensor([2]), cache)
        full, _ = model(torch.tensor([[7, 8, 9]]))
    torch.testing.assert_close(fresh, full[0, 1], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[0], full[0, 2], atol=1e-4, rtol=0)


# --- generation ------------------------------------------------------------

def test_generate_direct_matches_reference(model: GPT) -> None:
    for prompt in PROMPTS:
        out = generate_direct(model, prompt, 12)
        assert out == reference_greedy(model, prompt, 12)
    assert len(set(out)) > 3, "the test model should not just repeat itself"


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=5),
                                      dict(temperature=1.3, seed=11)])
def test_engine_alone_equals_generate_direct(model: GPT, sampling: dict) -> None:
    for prompt in PROMPTS:
        engine = Engine(max_batch=4)
        engine.submit(req(model, 7, prompt, 20, **sampling))
        events = run(engine)[7]
        assert tokens_of(events) == generate_direct(model, prompt, 20, **sampling)
        assert [ev.done for ev in events] == [False] * (len(events) - 1) + [True]
        assert events[-1].reason == "length"


def test_sampling_depends_on_seed_and_top_k(model: GPT) -> None:
    a = generate_direct(model, [1, 2], 30, temperature=1.0, seed=1)
    assert a == generate_direct(model, [1, 2], 30, temperature=1.0, seed=1)
    assert a != generate_direct(model, [1, 2], 30, temperature=1.0, seed=2)
    top1 = generate_direct(model, [1, 2], 30, temperature=1.0, top_k=1, seed=3)
    assert top1 == generate_direct(model, [1, 2], 30)


def test_engine_is_deterministic_across_runs(model: GPT) -> None:
    def once() -> dict[int, list[int]]:
        engine = Engine(max_batch=3)
        for i, prompt in enumerate(PROMPTS * 2):
            engine.submit(req(model, i, prompt, 15 + i, owner=i % 3, temperature=0.8 * (i % 2), seed=i))
        return {i: tokens_of(evs) for i, evs in run(engine).items()}

    first = once()
    assert first == once()
    assert sorted(len(t) for t in first.values()) == [15 + i for i in range(8)]


def test_batched_greedy_equals_solo(model: GPT) -> None:
    """On CPU, a sequence's greedy tokens do not depend on who shares its batch.

    Its logits do, by about 1e-7 (a different matrix shape takes a different
    summation order), which changes no argmax of these models in practice.
    """
    engine = Engine(max_batch=8)
    for i, prompt in enumerate(PROMPTS):
        engine.submit(req(model, i, prompt, 40 + 5 * i))
    batched = {i: tokens_of(evs) for i, evs in run(engine).items()}
    assert engine.stats()["mean_batch"] > 2
    for i, prompt in enumerate(PROMPTS):
        assert batched[i] == generate_direct(model, prompt, 40 + 5 * i)


MIXED = [dict(temperature=0.0), dict(temperature=1.0, seed=100), dict(temperature=0.7, top_k=5, seed=101),
         dict(temperature=1.5, top_k=50, seed=102)]


def test_sampled_tokens_do_not_depend_on_batch_mates(model: GPT) -> None:
    engine = Engine(max_batch=8)
    for i, (prompt, sampling) in enumerate(zip(PROMPTS, MIXED)):
        engine.submit(req(model, i, prompt, 25, **sampling))
    batched = {i: tokens_of(evs) for i, evs in run(engine).items()}
    for i, (prompt, sampling) in enumerate(zip(PROMPTS, MIXED)):
        assert batched[i] == generate_direct(model, prompt, 25, **sampling)


def test_context_slides_past_block_size(model: GPT) -> None:
    engine = Engine(max_batch=2)
    engine.submit(req(model, 1, [5, 6, 7], 100))
    engine.submit(req(model, 2, list(range(10, 30)), 77))
    out = {i: tokens_of(evs) for i, evs in run(engine).items()}
    assert len(out[1]) == 100 and len(out[2]) == 77
    assert out[1] == reference_greedy(model, [5, 6, 7], 100)
    assert out[2] == reference_greedy(model, list(range(10, 30)), 77)


def test_long_prompt_keeps_its_last_block_size_minus_one_tokens(model: GPT) -> None:
    prompt = [(i * 37) % 256 for i in range(100)]
    engine = Engine()
    engine.submit(req(model, 1, prompt, 10))
    assert tokens_of(run(engine)[1]) == generate_direct(model, prompt[-31:], 10)
    assert generate_direct(model, prompt, 10) == reference_greedy(model, prompt[-31:], 10)
    assert generate_direct(model, prompt, 10) != generate_direct(model, prompt[-30:], 10)


def test_block_size_one_still_generates() -> None:
    m = tiny_model(2, block_size=1)
    assert generate_direct(m, [1, 2, 3], 5) == reference_greedy(m, [3], 5)


# --- scheduling ------------------------------------------------------------

def admission_order(engine: Engine) -> list[int]:
    order: list[int] = []
    while engine.busy:
        for ev in engine.step():
            if ev.id not in order:
                order.append(ev.id)
    return order


def test_round_robin_admission_across_owners(model: GPT) -> None:
    engine = Engine(max_batch=2)
    for i in range(10):
        engine.submit(req(model, i, [1, 2, 3], 3, owner=100))
    engine.submit(req(model, 50, [4, 5], 3, owner=200))
    order = admission_order(engine)
    assert order.index(50) < order.index(1)
    assert sorted(order) == list(range(10)) + [50]


def test_round_robin_interleaves_owners(model: GPT) -> None:
    engine = Engine(max_batch=1)
    for i in range(4):
        engine.submit(req(model, i, [1], 2, owner=1))
    for i in range(10, 13):
        engine.submit(req(model, i, [2], 2, owner=2))
    assert admission_order(engine) == [0, 10, 1, 11, 2, 12, 3]


def test_max_batch_one_runs_one_sequence_at_a_time(model: GPT) -> None:
    engine = Engine(max_batch=1)
    for i in range(3):
        engine.submit(req(model, i, [i + 1], 5))
    while engine.busy:
        engine.step()
        assert engine.stats()["running"] <= 1
    stats = engine.stats()
    assert stats["batch_hist"] == {1: 12} and stats["tokens"] == 15


def test_cancel_queued_and_running(model: GPT) -> None:
    engine = Engine(max_batch=1)
    engine.submit(req(model, 1, [1], 50))
    engine.submit(req(model, 2, [2], 50))
    engine.submit(req(model, 3, [3], 4))
    first = engine.step()  # an admitting step: the prefill's token at once, no decode
    assert [ev.id for ev in first] == [1] and len(first[0].tokens) == 1
    assert engine.cancel(2) and engine.cancel(1)
    assert not engine.cancel(1) and not engine.cancel(99)
    events = run(engine, first)
    assert events[1] == [first[0], Event(1, [], True, "cancelled")]
    assert events[2] == [Event(2, [], True, "cancelled")]
    assert tokens_of(events[3]) == generate_direct(model, [3], 4)
    assert engine.stats()["running"] == 0 and engine.stats()["queued"] == 0


def test_a_joining_request_gets_its_first_token_from_the_step_that_admits_it(
        model: GPT) -> None:
    engine = Engine(max_batch=8)
    seen: list[Event] = []

    def step() -> dict[int, Event]:
        events = engine.step()
        seen.extend(events)
        return {e.id: e for e in events}

    engine.submit(req(model, 1, [1], 60))
    step()
    step()
    engine.submit(req(model, 2, [2], 60))
    ev = step()
    assert ev[2].tokens == generate_direct(model, [2], 1) and ev[1].tokens == []
    assert all(len(e.tokens) == 1 for e in step().values())  # then both decode
    # a request admitted at every step: the running ones still decode every other step
    decoded = []
    for i in range(3, 9):
        engine.submit(req(model, i, [i], 60))
        decoded.append(len(step()[1].tokens))
    assert decoded == [0, 1, 0, 1, 0, 1]
    events = run(engine, seen)
    for i in range(1, 9):  # and each makes what it makes alone
        assert tokens_of(events[i]) == generate_direct(model, [i], 60)


def test_cancel_owner_cancels_only_that_owner(model: GPT) -> None:
    engine = Engine(max_batch=2)
    for i in range(4):
        engine.submit(req(model, i, [i + 1], 30, owner=1 + i % 2))
    first = engine.step()
    assert sorted(engine.cancel_owner(1)) == [0, 2]
    assert engine.cancel_owner(1) == [] and engine.cancel_owner(42) == []
    events = run(engine, first)
    assert events[0][-1].reason == events[2][-1].reason == "cancelled"
    assert len(tokens_of(events[1])) == len(tokens_of(events[3])) == 30
    assert tokens_of(events[3]) == generate_direct(model, [4], 30)


def test_submit_rejects_bad_requests(model: GPT) -> None:
    engine = Engine()
    for bad in (dict(prompt=[]), dict(prompt=[256]), dict(prompt=[-1]), dict(max_tokens=0),
                dict(temperature=-0.5), dict(temperature=float("nan")), dict(top_k=-1)):
        args = {**dict(prompt=[1], max_tokens=1), **bad}
        with pytest.raises(ValueError):
            engine.submit(req(model, 1, **args))  # type: ignore[arg-type]
    engine.submit(req(model, 1, [1], 1))
    with pytest.raises(ValueError):
        engine.submit(req(model, 1, [1], 1))
    with pytest.raises(ValueError):
        Engine(max_batch=0)


def test_models_batch_separately_and_caches_are_dropped(model: GPT) -> None:
    other = tiny_model(3, n_embd=16, n_head=2, block_size=16)
    engine = Engine(max_batch=4)
    engine.submit(req(model, 1, [1, 2], 10, key="a"))
    engine.submit(req(other, 2, [1, 2], 10, key="b"))
    first = engine.step()
    assert engine.stats()["models"] == 2
    assert not engine.drop_model("a") and not engine.drop_model("zzz")
    out = {i: tokens_of(evs) for i, evs in run(engine, first).items()}
    assert out[1] == generate_direct(model, [1, 2], 10)
    assert out[2] == generate_direct(other, [1, 2], 10)
    assert engine.drop_model("a") and engine.drop_model("b")
    assert engine.stats()["models"] == 0


def test_max_tokens_one_finishes_at_prefill(model: GPT) -> None:
    engine = Engine()
    engine.submit(req(model, 1, [9, 9], 1))
    events = engine.step()
    assert events == [Event(1, generate_direct(model, [9, 9], 1), True, "length")]
    assert not engine.busy and engine.stats()["decode_forwards"] == 0


@pytest.mark.parametrize("method", ["prefill", "decode"])
def test_a_failed_forward_leaves_the_engine_consistent(method: str) -> None:
    flaky = tiny_model(4)
    real = getattr(flaky, method)
    calls = []

    def fail_once(*args: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(*args)

    setattr(flaky, method, fail_once)
    engine = Engine(max_batch=2)
    engine.submit(req(flaky, 1, [3, 1, 4], 12))
    engine.submit(req(flaky, 2, [1, 5], 5))
    engine.cancel(2)
    # an admitting step only prefills (its first token at once); decode comes next
    first = engine.step() if method == "decode" else []
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    events = run(engine, first)
    assert events[2] == [Event(2, [], True, "cancelled")]
    assert tokens_of(events[1]) == generate_direct(tiny_model(4), [3, 1, 4], 12)
