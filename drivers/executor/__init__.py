"""The executor driver: training jobs and batched, streamed inference with torch.

    spawn_train(config, alloc_id=None) -> pid      infer(model, prompt, ...)      models()

spawn_train checks a job before anything starts (the config, the dataset, the
memory estimate against the allocation: ENOMEM) and answers with the program to
run; the kernel spawns it as the caller's child (the table's `spawns`), so the
job is the caller's process: ps shows it, kill ends it, wait returns its final
loss. The job itself is drivers/executor/train.py (_job.py, _worker.py).

infer resolves the model as the caller: the executor makes its own syscalls to
tensorfs, through one connection per caller uid (so tensorfs's permissions
apply), loads the checkpoint into a cache with a memory budget (_models.py:
least recently used out first), and hands the request to the Engine (_engine.py):
continuous batching across processes, round robin between them. Tokens stream back as
partial replies. Everything slow (importing torch, loading a model, checking a
dataset) runs in one background thread, so the loop keeps answering heartbeats;
each result comes back to the loop's thread with loop.post. The engine steps on
the loop's thread, between messages. docs/executor.md has the details.
It must never import the kernel or userland; it makes its own syscalls with the
client library, syscalls.client, as a MINIX driver uses libc.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from drivers import DriverLoop, Request, Service
from syscalls import ConnectionLost, Errno, SyscallError, format_size

from ._admit import Admission
from ._models import Loaded, ModelCache

log = logging.getLogger("llmos.executor")

TRAIN_ARGV = ["python", "-m", "drivers.executor.train"]


@dataclass
class Pending:
    """An infer request: its driver Request, and the decoded text its final reply
    carries: all of it, or streamed, what no partial reply has sent (each partial
    carries only its new text)."""
    req: Request
    stream: bool
    seed: int
    prompt_tokens: int
    detok: Any  # _text.Detokenizer: new text from new tokens
    stops: Any  # _text.StopFilter: holds back what may begin a stop string
    t0: float = field(default_factory=time.monotonic)
    text: list[str] = field(default_factory=list)
    tokens: int = 0


class Executor(Service):
    name = "executor"
    serves = ("spawn_train", "infer", "models", "spawn_compress")

    def __init__(self, loop: DriverLoop) -> None:
        super().__init__(loop)
        cfg = self.config
        self.max_batch = cfg.infer_max_batch
        self.window_s = cfg.infer_window_ms / 1000
        self.max_tokens = cfg.infer_max_tokens
        self.max_prompt = cfg.infer_max_prompt
        self.threads_setting = cfg.infer_threads
        self.threads: int | None = None
        self.conns: dict[int, Any] = {}        # uid -> client handle (background thread)
        self.cache = ModelCache(self.conn, self.device, cfg.model_cache, self.max_batch)
        self.admission = Admission(self.conn, self.cache)
        self.engine: Any = None                # created on the first infer
        self.pending: dict[int, Pending] = {}  # request id -> Pending
        self.loading: dict[int, int] = {}      # request id -> caller pid, model loading
        self.stepping = False
        self.errors = 0

    # -- the background thread ------------------------------------------------------

    def background(self, work: Callable[[], Any], done: Callable[[Any], None],
                   req: Request) -> Any:
        """loop.background, once more on fresh connections when one of this driver's
        own was lost (the kernel restarted or ended it); a failed load leaves
        nothing in the loading table."""
        def attempt() -> Any:
            try:
                return work()
            except ConnectionLost as e:
                self.forget_connections(e)
                return work()
            except BaseException:
                self.loop.post(lambda: self.loading.pop(req.id, None))
                raise

        def failed_too(result: Any) -> None:
            try:
                done(result)
            except Exception:
                self.errors += 1
                raise

        return self.loop.background(attempt, failed_too, req)

    def forget_connections(self, e: SyscallError) -> None:
        """One of this driver's own connections is no longer attached: forget them
        all, to attach anew."""
        log.warning("a connection of the executor was lost (%s); attaching again", e)
        for osh in self.conns.values():
            try:
                osh.close()
            except Exception:
                pass
        self.conns.clear()

    def conn(self, uid: int) -> Any:
        """This driver's connection acting as uid (pool thread only)."""
        osh = self.conns.get(uid)
        if osh is None:
            from syscalls.client import connect
            osh = connect(self.home.root, uid=uid, heartbeat=True, timeout=60,
                                   argv=["executor", f"(as uid {uid})"])
            self.conns[uid] = osh
        return osh

    # -- torch -----------------------------------------------------------------------

    def device(self) -> str:
        import torch
        if self.threads is None:
            # torch's default, a thread per core, collides with the training workers and
            # the clients on a small machine (10-30x slower decode steps on 2 busy cores)
            self.threads = self.threads_setting or max(1, (os.cpu_count() or 2) // 2)
            torch.set_num_threads(self.threads)
        return "cuda" if torch.cuda.is_available() else "cpu"

    # -- infer -----------------------------------------------------------------------

    def infer(self, req: Request, model: str, prompt: str | None, max_tokens: int,
              temperature: float, top_k: int, seed: int | None, stream: bool,
              messages: list[dict] | None, stop: list[str], top_p: float,
              truncate: bool) -> Any:
        from ._text import Detokenizer, StopFilter, encode
        if (prompt is None) == (messages is None):
            raise SyscallError(Errno.EINVAL, "infer: give either prompt or messages")
        size = len(prompt.encode("utf-8", errors="surrogatepass")) if prompt is not None \
            else sum(len(m["content"].encode("utf-8", errors="surrogatepass"))
                     for m in messages or ())
        if prompt is not None and not size:
            raise SyscallError(Errno.EINVAL, "infer: the prompt is empty")
        if size > self.max_prompt:
            raise SyscallError(Errno.EINVAL, f"infer: the prompt is {format_size(size)}, "
                               f"over infer_max_prompt ({format_size(self.max_prompt)})")
        if max_tokens > self.max_tokens:
            raise SyscallError(Errno.EINVAL, f"infer: max_tokens {max_tokens} is over "
                               f"infer_max_tokens ({self.max_tokens})")
        seed = secrets.randbits(63) if seed is None else seed
        uid = req.uid
        self.loading[req.id] = req.pid

        def load() -> tuple[Loaded, list[int]]:
            m = self.cache.load(uid, model)
            return m, encode(m.tokenizer, prompt, messages, m.model.config.block_size,
                             truncate, model)

        def start(got: tuple[Loaded, list[int]]) -> None:
            m, ids = got
            if self.loading.pop(req.id, None) is None:  # cancelled, or its caller ended
                req.fail(Errno.ECANCELED, "infer: cancelled")
                return
            m = self.cache.admit(m, self.engine)
            from ._engine import GenRequest
            if self.engine is None:
                from ._engine import Engine
                self.engine = Engine(self.max_batch, self.device())
            m.requests += 1
            self.pending[req.id] = Pending(req, stream, seed, len(ids), Detokenizer(m.tokenizer),
                                           StopFilter(stop))
            self.engine.submit(GenRequest(req.id, req.pid, m.key, m.model, ids, max_tokens,
                                          temperature, top_k, seed, top_p, m.eos))
            self.kick(self.window_s)

        return self.background(load, start, req)

    def kick(self, delay: float = 0.0) -> None:
        if not self.stepping:
            self.stepping = True
            self.loop.call_later(delay, self.step)

    def step(self) -> None:
        self.stepping = False
        try:
            events = self.engine.step()
        except Exception as e:  # a model that fails mid-batch: fail its requests
            log.exception("engine step failed")
            self.errors += 1
            for rid in list(self.pending):
                self.engine.cancel(rid)
                p = self.pending.pop(rid)
                if not p.req.done:
                    p.req.fail(Errno.EIO, f"infer: the model failed: {type(e).__name__}: {e}")
            events = []
        for ev in events:
            p = self.pending.get(ev.id)
            if p is None:
                continue
            p.tokens += len(ev.tokens)
            chunk, stopped = p.stops.push(p.detok.feed(ev.tokens, final=ev.done), ev.done)
            reason = "stop" if stopped else ev.reason
            if stopped and not ev.done:  # a stop string: end it (its cancel event is ignored)
                self.engine.cancel(ev.id)
            if p.stream and chunk and reason != "cancelled":
                p.req.partial({"text": chunk, "tokens": p.tokens, "finish_reason": None})
            else:  # what the final reply carries: all of it, or what no partial sent
                p.text.append(chunk)
            if ev.done or stopped:
                del self.pending[ev.id]
                if reason == "cancelled":
                    if not p.req.done:
                        p.req.fail(Errno.ECANCELED, "infer: cancelled")
                    continue
                p.req.reply({"text": "".join(p.text), "tokens": p.tokens,
                             "prompt_tokens": p.prompt_tokens, "finish_reason": reason,
                             "seed": p.seed, "time_s": round(time.monotonic() - p.t0, 6)})
        if self.engine.busy:
            self.kick()

    def on_cancel(self, rid: Any) -> None:
        self.loading.pop(rid, None)
        if self.engine is not None and type(rid) is int and rid in self.pending:
            self.engine.cancel(rid)
            self.kick()

    def on_exit(self, pid: int) -> None:
        for rid in [r for r, p in self.loading.items() if p == pid]:
            del self.loading[rid]
        if self.engine is not None and self.engine.cancel_owner(pid):
            self.kick()

    def models(self, req: Request) -> Any:
        """The loaded models the caller may read (as infer would let it: the check
        reads tensorfs as the caller, in the pool thread), with the engine's figures."""
        uid, loaded = req.uid, list(self.cache)

        def visible() -> list[Loaded]:
            if uid == 0:
                return loaded
            out = []
            for m in loaded:
                try:
                    self.cache.check_access(uid, m.path)
                except SyscallError as e:
                    if e.errno not in (Errno.EACCES, Errno.ENOENT, Errno.ENOTDIR):
                        raise
                    continue  # another uid's private model: not even its path
                out.append(m)
            return out

        def answer(shown: list[Loaded]) -> None:
            req.reply({"models": [{"path": m.path, "bytes": m.nbytes,
                                   "requests": m.requests, "step": m.config.get("step"),
                                   "loss": m.config.get("loss"), "loaded_at": m.loaded_at,
                                   "architecture": m.architecture,
                                   "compression": m.config.get("compression")}
                                  for m in shown],
                       "engine": self.engine_stats(),
                       "budget": self.cache.budget, "max_batch": self.max_batch})
        return self.background(visible, answer, req)

    def engine_stats(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        s = dict(self.engine.stats())
        if "batch_hist" in s:  # msgpack maps on the wire have str keys
            s["batch_hist"] = {str(k): v for k, v in s["batch_hist"].items()}
        return s

    # -- jobs: checked (_admit.py), then spawned by the kernel -----------------------

    def spawn_train(self, req: Request, config: dict, alloc_id: str | None) -> Any:
        def plan(cfg: dict) -> None:
            req.reply({"argv": [*TRAIN_ARGV, "--job", cfg["name"], "--out", cfg["out"]],
                       "env": {"LLMOS_TRAIN_CONFIG": json.dumps(cfg)}})
        return self.background(lambda: self.admission.train(req.uid, req.pid, config,
                                                            alloc_id), plan, req)

    def spawn_compress(self, req: Request, config: dict) -> Any:
        def plan(cfg: dict) -> None:
            from .compress import ARGV, CONFIG_ENV
            argv = [*ARGV, "--job", cfg["task"], "--model", cfg["model"]]
            if "out" in cfg:
                argv += ["--out", cfg["out"].rstrip("/")]
            req.reply({"argv": argv, "env": {CONFIG_ENV: json.dumps(cfg)}})
        return self.background(lambda: self.admission.compress(req.uid, config), plan, req)

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"models": len(self.cache), "pending": len(self.pending),
                               "loading": len(self.loading),
                               "errors": self.errors,
                               "cache_bytes": self.cache.nbytes}
        if self.engine is not None:
            s = self.engine_stats()
            out.update({k: s[k] for k in ("steps", "tokens", "running", "queued") if k in s})
        return out

    def shutdown(self) -> None:
        for osh in self.conns.values():
            try:
                osh.close()
            except Exception:
                pass


# What other code (bench/, tests) may use besides the driver: the model, its
# generation loop, the training config's check, the model loader and the decode
# yardstick (bench/compress_bench.py profiles with them). They load on first use (torch
# is heavy, and the driver imports it only when a model is first needed).
_LAZY = {"GPT": "._gpt", "GPTConfig": "._gpt", "generate_direct": "._engine",
         "normalize": "._config", "ModelCache": "._models", "decode_rate": "._compress"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Executor", "GPT", "GPTConfig", "ModelCache", "decode_rate", "generate_direct",
           "normalize"]
