"""infer, models, and spawn_train's and spawn_compress's refusals against the
executor's contracts.

Two in-process handles (uids 1000 and 1001) generate from a tiny model with valid
and invalid arguments, and ask for training jobs that must all be refused before
anything starts (no real training here: tests/test_executor_jobs.py trains).

Model: a valid infer answers max_tokens tokens (finish_reason "length") of the
prompt's byte count, the seed it was given (or the one it chose), the same text
for the same greedy (temperature 0) or seeded request, and, streamed, partial
replies whose texts (the final reply's too) add up to the text, with exactly the
last one carrying a finish_reason. Each refused request has one errno, from
the model paths and datasets the fixture lays out: a missing, plain-tensor, empty
or unparsable model, another uid's private model, a vocabulary that is not bytes,
prompts and max_tokens past the configured bounds; configs with every kind of
mistake, datasets missing, misplaced, unreadable, damaged or the wrong shape,
allocations unknown, another process's or too small, memory estimates that cannot
fit. models() lists what was loaded, and ps never shows a training job.
"""
from __future__ import annotations

import json
from typing import Iterator

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import userland
from conftest import Booted
from drivers.executor._gpt import GPTConfig

from ._util import FAST, INFER_MAX_PROMPT, INFER_MAX_TOKENS, LONG, outcome, walk

DATA = "/datasets/small"
BUSY_OUT = "/models/busy"
# what ps shows of a training job into BUSY_OUT (a sleeper with its argv)
FAKE_JOB = ["sh", "-c", "sleep 600", "drivers.executor.train", "--job", "busy", "--out",
            BUSY_OUT]
OK = {"name": "conformance", "dataset": DATA, "steps": 1}   # never sent as it is
UIDS = (1000, 1001)


@pytest.fixture(scope="module")
def layout(system: Booted, tiny_model: str) -> Iterator[dict]:
    """Models and datasets, good and bad, that the refusals below name."""
    import torch
    from test_executor import TINY, as_bytes, write_model
    with system.connect(uid=1000) as osh:
        osh.save_tensor("/models/plain", torch.zeros(3))
        osh.mkdir("/models/empty")
        write_model(osh, "/models/badjson")
        osh.save_tensor("/models/badjson/step-000001/config", as_bytes(b"{not json"))
        small = GPTConfig(**{**TINY.to_dict(), "vocab_size": 100})
        write_model(osh, "/models/vocab100", cfg=small)
        osh.mkdir("/models/dirlatest")
        osh.mkdir("/models/dirlatest/latest")
        write_model(osh, "/models/dirconfig")
        osh.unlink("/models/dirconfig/step-000001/config")
        osh.mkdir("/models/dirconfig/step-000001/config")
        osh.mkdir("/datasets", 0o1777)
        osh.save_tensor(DATA, as_bytes((b"hello world. " * 400)[:4096]))
        osh.save_tensor("/datasets/floats", torch.zeros(4096))
        osh.mkdir("/datasets/dir")
        osh.save_tensor("/datasets/damaged", as_bytes(b"x" * 4096))
    with system.connect(uid=1001) as other:
        write_model(other, "/private1001", perm=0o600, seed=3)
        other.save_tensor("/datasets/private1001", as_bytes(b"y" * 4096), perm=0o600)
    damaged = system.root / "tensors" / "datasets" / "damaged.safetensors"
    with open(damaged, "r+b") as f:
        f.write(b"\xff" * 8)                 # a header length past any header: EIO
    with system.connect(uid=1000) as osh:
        job = osh.spawn(FAKE_JOB)
        try:
            yield {"model": tiny_model}
        finally:
            osh.kill(job, "KILL")
            osh.wait(job, timeout=30)


def compress_refusals(tiny: str) -> list[tuple[dict, str]]:
    """spawn_compress configs refused before a job starts, each with its errno."""
    q = {"task": "quantize", "model": tiny, "out": "/models/q"}
    return [
        ({"task": "zip", "model": tiny}, "EINVAL"),
        ({**q, "bogus": 1}, "EINVAL"),
        ({**q, "sparsity": 0.5}, "EINVAL"),                     # prune's key
        ({"task": "eval", "model": tiny, "data": "/datasets/floats"}, "EINVAL"),
        ({**q, "model": "/models/none"}, "ENOENT"),
        ({"task": "eval", "model": tiny, "data": "/datasets/none"}, "ENOENT"),
        ({"task": "eval", "model": tiny, "data": "/datasets/dir"}, "EISDIR"),
        ({**q, "model": "/private1001"}, "EACCES"),             # uid 1001's, mode 600
        ({**q, "out": "/models/vocab100"}, "EEXIST"),
        ({**q, "out": BUSY_OUT}, "EBUSY"),                      # FAKE_JOB writes there
        ({**q, "out": "/models/plain/x"}, "ENOTDIR"),           # a tensor in the way
        ({**q, "method": "int4"}, "ENOTSUP"),                   # no CPU kernel here
        ({"task": "prune", "model": tiny, "out": "/models/q", "mlp": 0.5}, "ENOTSUP"),
    ]


def infer_refusals(tiny: str) -> list[tuple[str, str, dict, str]]:
    return [
        ("/models/none", "x", {}, "ENOENT"),
        ("/models/plain", "x", {}, "ENOENT"),          # a tensor, not a model
        ("/models/empty", "x", {}, "ENOENT"),          # a directory with no config
        ("/models", "x", {}, "ENOENT"),
        (f"{DATA}/x", "x", {}, "ENOENT"),              # through a tensor
        ("models/tiny", "x", {}, "EINVAL"),            # not a tensorfs path
        ("/", "x", {}, "EINVAL"),
        ("/models/badjson", "x", {}, "EIO"),
        ("/models/dirlatest", "x", {}, "EIO"),         # its latest is a directory
        ("/models/dirconfig", "x", {}, "EISDIR"),      # its config is one
        ("/models/vocab100", "x", {}, "EINVAL"),
        (tiny, "", {}, "EINVAL"),
        (tiny, "x" * (INFER_MAX_PROMPT + 1), {}, "EINVAL"),
        (tiny, "x", {"max_tokens": INFER_MAX_TOKENS + 1}, "EINVAL"),
        (tiny, "x", {"max_tokens": 0}, "EINVAL"),
        (tiny, "x", {"temperature": -1.0}, "EINVAL"),
        (tiny, "x", {"top_k": -1}, "EINVAL"),
    ]


TRAIN_REFUSALS: list[tuple[dict, str]] = [
    ({"dataset": DATA}, "EINVAL"),                                  # no name
    ({"name": "t"}, "EINVAL"),                                      # no dataset
    ({**OK, "bogus": 1}, "EINVAL"),
    ({**OK, "devices": "0"}, "EINVAL"),                             # the executor's own
    ({**OK, "workers": 0}, "EINVAL"),
    ({**OK, "steps": "1"}, "EINVAL"),
    ({**OK, "n_embd": 30, "n_head": 4}, "EINVAL"),
    ({**OK, "min_lr": 1.0}, "EINVAL"),
    ({**OK, "name": ".hidden"}, "EINVAL"),
    ({**OK, "dataset": "relative"}, "EINVAL"),
    ({**OK, "dataset": "/datasets/" + "n" * 201}, "EINVAL"),        # tensorfs: name too long
    ({**OK, "dataset": "/datasets/floats"}, "EINVAL"),              # not 1-D uint8
    ({**OK, "block_size": 2048}, "EINVAL"),                         # too short for 2 workers
    ({**OK, "dataset": "/datasets/none"}, "ENOENT"),
    ({**OK, "dataset": "/nodir/data"}, "ENOENT"),
    ({**OK, "dataset": f"{DATA}/x"}, "ENOTDIR"),
    ({**OK, "dataset": "/datasets/dir"}, "EISDIR"),
    ({**OK, "dataset": "/datasets/private1001"}, "EACCES"),
    ({**OK, "dataset": "/datasets/damaged"}, "EIO"),
    ({**OK, "n_layer": 64, "n_embd": 8192, "n_head": 64}, "ENOMEM"),
    ({**OK, "gpus": 1, "n_layer": 48, "n_embd": 4096, "n_head": 32}, "ENOMEM"),
    ({**OK, "name": "tiny"}, "EEXIST"),                             # /models/tiny is trained
    ({**OK, "out": "/private1001/job"}, "EACCES"),                  # another uid's directory
    ({**OK, "out": f"{DATA}/job"}, "ENOTDIR"),
    ({**OK, "out": BUSY_OUT}, "EBUSY"),                             # the fixture's "job"
]


class ExecutorMachine(RuleBasedStateMachine):
    system: Booted
    tiny: str

    def __init__(self) -> None:
        super().__init__()
        self.handles = [self.system.connect(uid=uid) for uid in UIDS]
        self.texts: dict[tuple, str] = {}      # a deterministic request -> its text
        self.loaded: set[str] = set()          # checkpoint paths models() must list

    def teardown(self) -> None:
        for h in self.handles:
            h.close()

    # -- infer ----------------------------------------------------------------------

    @rule(i=st.integers(0, 1), prompt=st.text("ab é\n", min_size=1, max_size=12),
          max_tokens=st.integers(1, 6), temperature=st.sampled_from([0.0, 1.0]),
          seed=st.sampled_from([None, 1, 2]), stream=st.booleans())
    def infer(self, i, prompt, max_tokens, temperature, seed, stream) -> None:
        h = self.handles[i]
        if stream:
            parts = list(h.infer(self.tiny, prompt, max_tokens, temperature, seed=seed,
                                 stream=True))
            assert [p["finish_reason"] is None for p in parts] == \
                [True] * (len(parts) - 1) + [False], parts
            r = {**parts[-1], "text": "".join(p["text"] for p in parts)}  # deltas
        else:
            r = h.infer(self.tiny, prompt, max_tokens, temperature, seed=seed)
        assert (r["tokens"], r["finish_reason"]) == (max_tokens, "length"), r
        assert r["prompt_tokens"] == len(prompt.encode()), r
        if seed is not None:
            assert r["seed"] == seed, r
        if temperature == 0 or seed is not None:
            key = (prompt, max_tokens, temperature, seed if temperature else None)
            assert self.texts.setdefault(key, r["text"]) == r["text"], (key, r)
        self.loaded.add(f"{self.tiny}/step-000001")

    @rule(i=st.integers(0, 1))
    def infer_private(self, i) -> None:
        got = outcome(self.handles[i].infer, "/private1001", "hi", 2)
        if UIDS[i] == 1001:
            assert got[0] == "r" and got[1]["tokens"] == 2, got
            self.loaded.add("/private1001/step-000001")
        else:
            assert got == ("e", "EACCES"), got

    @rule(i=st.integers(0, 1), case=st.integers(0, len(infer_refusals("")) - 1))
    def infer_refused(self, i, case) -> None:
        model, prompt, kw, errno = infer_refusals(self.tiny)[case]
        got = outcome(self.handles[i].infer, model, prompt, **kw)
        assert got == ("e", errno), (model, prompt[:20], kw, got)

    @rule(i=st.integers(0, 1))
    def models(self, i) -> None:
        listed = {m["path"] for m in self.handles[i].models()["models"]}
        mine = {p for p in self.loaded if UIDS[i] == 1001 or not p.startswith("/private1001")}
        assert mine <= listed, (mine, listed)
        if UIDS[i] != 1001:  # another uid's private model: not even its path
            assert not any(p.startswith("/private1001") for p in listed), listed

    # -- spawn_train: refusals only ----------------------------------------------------

    @rule(case=st.sampled_from(TRAIN_REFUSALS))
    def train_refused(self, case) -> None:
        config, errno = case
        self._refused(self.handles[0], config, None, errno)

    @rule(kind=st.sampled_from(["unknown", "another's", "too small"]))
    def train_refused_allocation(self, kind) -> None:
        mine, theirs = self.handles
        if kind == "unknown":
            self._refused(mine, OK, "0" * 24, "EBADF")
            return
        owner = theirs if kind == "another's" else mine
        alloc = owner.alloc_gpu(1 << 20)
        try:
            self._refused(mine, OK, alloc["id"], "EPERM" if kind == "another's" else "ENOMEM")
        finally:
            owner.free_gpu(alloc["id"])

    def _refused(self, h: userland.Llmos, config: dict, alloc: str | None, errno: str) -> None:
        got = outcome(h.spawn_train, config, alloc)
        if got[0] == "r":                      # a job started: end it, then fail
            h.kill(got[1], "KILL")
            h.wait(got[1], timeout=30)
        assert got == ("e", errno), (config, alloc, got)

    @rule(case=st.integers(0, len(compress_refusals("")) - 1))
    def compress_refused(self, case) -> None:
        config, errno = compress_refusals(self.tiny)[case]
        got = outcome(self.handles[0].spawn_compress, config)
        if got[0] == "r":                      # a job started: end it, then fail
            self.handles[0].kill(got[1], "KILL")
            self.handles[0].wait(got[1], timeout=30)
        assert got == ("e", errno), (config, got)

    @invariant()
    def no_job_started(self) -> None:
        jobs = [p for p in self.handles[0].ps()
                if any(j in " ".join(p["argv"]) for j in ("drivers.executor.train",
                                                           "drivers.executor.compress"))
                and p["argv"] != FAKE_JOB]
        assert not jobs, jobs


def _run(system: Booted, layout: dict, cfg) -> None:
    ExecutorMachine.system, ExecutorMachine.tiny = system, layout["model"]
    run_state_machine_as_test(ExecutorMachine, settings=cfg)


def test_executor_walk(system: Booted, layout: dict) -> None:
    """Every refusal of infer and spawn_train, in one walk."""
    ExecutorMachine.system, ExecutorMachine.tiny = system, layout["model"]
    walk(ExecutorMachine(), [
        ("infer", {"i": 0, "prompt": "hello", "max_tokens": 3, "temperature": 0.0,
                   "seed": None, "stream": False}),
        ("infer", {"i": 1, "prompt": "hello", "max_tokens": 3, "temperature": 0.0,
                   "seed": None, "stream": True}),
        ("infer_private", {"i": 0}),
        ("infer_private", {"i": 1}),
        *[("infer_refused", {"i": 0, "case": n}) for n in range(len(infer_refusals("")))],
        ("models", {"i": 0}),
        *[("train_refused", {"case": case}) for case in TRAIN_REFUSALS],
        *[("train_refused_allocation", {"kind": k}) for k in ("unknown", "another's",
                                                              "too small")],
        *[("compress_refused", {"case": n}) for n in range(len(compress_refusals("")))],
    ], ("no_job_started",))


@pytest.mark.timeout(300)
def test_executor_machine(system: Booted, layout: dict) -> None:
    _run(system, layout, FAST)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_executor_machine_long(system: Booted, layout: dict) -> None:
    _run(system, layout, LONG)


def test_the_layout_is_what_the_refusals_assume(system: Booted, layout: dict) -> None:
    with system.connect(uid=0) as root:
        cfg = json.loads(bytes(root.load_tensor("/models/vocab100/step-000001/config")
                               .numpy()).decode())
        assert cfg["model"]["vocab_size"] == 100
        assert root.stat(DATA)["shape"] == [4096]
