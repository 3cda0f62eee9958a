"""Hugging Face models in the engine, no kernel: greedy output token-identical to
`model.generate(do_sample=False)` alone and batched (sequences joining a running
batch), eos, top_p, and the text side (incremental detokenizing, stop strings)."""
from __future__ import annotations


import pytest
import torch

from drivers.executor._engine import Engine, GenRequest, _nucleus, generate_direct
from drivers.executor._hf import HFCausalLM
from drivers.executor._text import Detokenizer, StopFilter
from hf_models import FAMILIES, make_hf_dir

PROMPTS = ["def add(a, b):", "class Point:\n    def __init__(self, x, y):\n        self.x = x",
           "for", "print(i, add(i, i))\n\nclass Point:\n"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = {}
    for family in FAMILIES:
        d = make_hf_dir(tmp_path_factory.mktemp(family), family, seed=1)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
        out[family] = (model, AutoTokenizer.from_pretrained(d, local_files_only=True))
    return out


def generate(model, tok, prompt: str, n: int, **kw) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


def run(engine: Engine, reqs: list[GenRequest], join_every: int = 1) -> dict[int, tuple]:
    """Submit reqs one every join_every steps (each joins a running batch); step
    until done. {id: (tokens, reason)}."""
    got: dict[int, list[int]] = {r.id: [] for r in reqs}
    reasons: dict[int, str] = {}
    waiting = list(reqs)
    while waiting or engine.busy:
        if waiting:
            engine.submit(waiting.pop(0))
        for _ in range(join_every):
            for ev in engine.step():
                got[ev.id] += ev.tokens
                if ev.done:
                    reasons[ev.id] = ev.reason
    return {i: (got[i], reasons[i]) for i in got}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batched_is_token_identical_to_generate(models, family: str) -> None:
    model, tok = models[family]
    hf = HFCausalLM(model, 256)
    n = 24
    want = [generate(model, tok, p, n) for p in PROMPTS]
    reqs = [GenRequest(i, owner=i, model_key="m", model=hf, prompt=tok(p).input_ids,
                       max_tokens=n, eos=frozenset([2])) for i, p in enumerate(PROMPTS)]
    got = run(Engine(max_batch=8), reqs, join_every=3)
    for i in range(len(PROMPTS)):
        assert got[i][0] == want[i], (family, i)
    alone = generate_direct(hf, tok(PROMPTS[1]).input_ids, n, eos=frozenset([2]))
    assert alone == want[1]


def test_eos_ends_with_stop_as_generate_does(models) -> None:
    model, tok = models["llama"]
    hf = HFCausalLM(model, 256)
    free = generate(model, tok, PROMPTS[0], 12)
    eos = free[4]
    want = generate(model, tok, PROMPTS[0], 12, eos_token_id=eos)
    assert want[-1] == eos and len(want) < 12
    got = run(Engine(4), [GenRequest(0, 0, "m", hf, tok(PROMPTS[0]).input_ids, 12,
                                     eos=frozenset([eos]))])
    assert got[0] == (want, "stop")
    got = run(Engine(4), [GenRequest(0, 0, "m", hf, tok(PROMPTS[0]).input_ids, 12)])
    assert got[0] == (free, "length")


def test_context_grows_past_the_first_allocation(models) -> None:
    """The slot cache starts short and lengthens as positions need (64 -> 128)."""
    model, tok = models["qwen2"]
    hf = HFCausalLM(model, 256)
    prompt = tok(PROMPTS[3]).input_ids
    want = generate(model, tok, PROMPTS[3], 80)
    assert len(prompt) + 80 > 64 and generate_direct(hf, prompt, 80) == want


def test_nucleus_keeps_the_likeliest_tokens_reaching_top_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    out = _nucleus(probs, torch.tensor([0.7, 0.5]))
    assert torch.allclose(out[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.equal(_nucleus(probs, torch.tensor([0.0, 0.0])).argmax(-1),
                       torch.tensor([0, 0]))  # at least the likeliest one


def test_top_p_sampling_is_seeded_and_narrower(models) -> None:
    model, tok = models["gpt2"]
    hf = HFCausalLM(model, 256)
    prompt = tok(PROMPTS[0]).input_ids
    a = generate_direct(hf, prompt, 30, temperature=1.0, seed=5, top_p=0.9)
    assert a == generate_direct(hf, prompt, 30, temperature=1.0, seed=5, top_p=0.9)
    greedy = generate_direct(hf, prompt, 30)
    assert generate_direct(hf, prompt, 30, temperature=1.0, seed=5, top_p=1e-6) == greedy
    assert a != greedy


def test_detokenizer_streams_what_decode_gives(models) -> None:
    _, tok = models["llama"]
    ids = tok("def add(a, b):\n    return a + b  # é ü").input_ids
    d = Detokenizer(tok)
    text = "".join(d.feed([i]) for i in ids) + d.feed([], final=True)
    assert text == tok.decode(ids, skip_special_tokens=True)
    bytes_ = Detokenizer(None)
    data = "é€".encode()
    assert "".join(bytes_.feed([b]) for b in data) == "é€"


def test_stop_filter_cuts_before_a_stop_string_across_chunks() -> None:
    f = StopFilter(["\n\n", "END"])
    out = [f.push(c, False) for c in ["abc", "\n", "x", "E", "N"]]
    assert "".join(t for t, _ in out) == "abc\nx" and not any(s for _, s in out)
    assert f.push("Dzz", False) == ("", True)
    g = StopFilter(["END"])
    assert g.push("aEN", False) == ("a", False) and g.push("", True) == ("EN", False)
    assert StopFilter([]).push("END", False) == ("END", False)
