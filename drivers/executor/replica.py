"""One replica of a deployment: an llmos process that holds a GPU allocation and serves
one model to the gateway of `llmos serve` (userland/serve).

    python -m drivers.executor.replica --deployment NAME --model PATH \\
        --gateway ipc://... [--gpu-mem BYTES] [--max-batch N]

The gateway spawns it (through the kernel: ps shows it, its uid is the deployment
owner's, it dies with the kernel). It connects a DEALER to the gateway's ROUTER and
says where it is (state waiting: in the devices queue; loading; ready; failed). It
loads the model as its uid (tensorfs's permissions hold) on the CPU, asks alloc_gpu
for the model's bytes with its KV cache (or --gpu-mem) and waits in the devices queue
for them, then moves the model onto its GPU (a real one; on a simulated GPU it stays
on the CPU) and runs its own Engine: continuous batching of the requests the gateway
sends, each answered with chunks of new text and a final record, as infer answers.
It exits when the gateway has been silent for GATEWAY_SILENCE_S (the gateway is
gone), when a gateway says "bye" (a new serve that does not know it), on SIGTERM,
or when its own kernel connection is lost.

Messages are msgpack maps with "t": gateway -> replica "req" {id, args}, "cancel"
{id}, "hb", "bye"; replica -> gateway "state" {state, pid, os_pid, deployment, error,
errno, bytes}, "chunk" {id, text, tokens}, "done" {id, text, tokens,
prompt_tokens, finish_reason, seed, time_s}, "error" {id, errno, message}, "hb"
{ongoing}.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import threading
import time
from typing import Any

import msgpack
import zmq

from syscalls import Errno, SyscallError, format_size

log = logging.getLogger("llmos.replica")

HEARTBEAT_S = 0.5
GATEWAY_SILENCE_S = 5.0


class Replica:
    def __init__(self, a: argparse.Namespace) -> None:
        from syscalls.client import connect
        self.a = a
        self.osh = connect(argv=["replica", a.deployment, a.model])
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(a.gateway)
        self.state = "starting"
        self.error: tuple[int, str] | None = None
        self.loaded: Any = None
        self.engine: Any = None
        self.device = "cpu"
        self.alloc: dict | None = None
        self.pending: dict[int, dict] = {}  # request id -> its text state
        self.heard = time.monotonic()
        self.stop = False
        self._ready = threading.Event()

    def send(self, t: str, **fields: Any) -> None:
        self.sock.send(msgpack.packb({"t": t, **fields}, use_bin_type=True))

    def say_state(self) -> None:
        fields: dict[str, Any] = {"state": self.state, "pid": self.osh.pid,
                                  "os_pid": os.getpid(), "deployment": self.a.deployment}
        if self.error is not None:
            fields.update(errno=int(self.error[0]), error=self.error[1])
        if self.alloc is not None:
            fields.update(bytes=self.alloc["bytes_each"], alloc=self.alloc["id"])
        self.send("state", **fields)

    # -- loading (a thread: the loop keeps heartbeating while it waits) ---------------

    def load(self) -> None:
        try:
            from ._models import ModelCache
            self.state = "loading"
            cache = ModelCache(lambda uid: self.osh, lambda: "cpu", 1 << 62, self.a.max_batch)
            m = cache.load(self.osh.uid, self.a.model)
            need = self.a.gpu_mem or m.nbytes
            self.state = "waiting"  # in the devices queue until the memory is free
            self.alloc = self.osh.alloc_gpu(need, wait=True)
            if not self.alloc.get("simulated"):
                from syscalls.client import gpu_env
                os.environ.update(gpu_env(self.alloc))
                import torch
                if torch.cuda.is_available():
                    self.device = "cuda"
                    m.model.to(self.device)
            from ._engine import Engine
            self.engine = Engine(self.a.max_batch, self.device)
            self.loaded = m
            self.state = "ready"
            log.info("replica of %s ready: %s, allocation %s (%s)", self.a.deployment,
                     self.a.model, self.alloc["id"], format_size(need))
        except SyscallError as e:
            self.error, self.state = (e.errno, e.message), "failed"
        except Exception as e:  # a model that does not load: say why, then end
            log.exception("replica failed to load")
            self.error, self.state = (Errno.EIO, f"{type(e).__name__}: {e}"), "failed"
        finally:
            self._ready.set()

    # -- serving -----------------------------------------------------------------------

    def on_message(self, msg: dict) -> None:
        t = msg.get("t")
        if t == "bye":  # a gateway that does not know us (serve restarted): leave
            log.warning("the gateway does not know this replica: leaving")
            self.stop = True
            return
        if t in ("hb", "req", "cancel"):
            self.heard = time.monotonic()
        if t == "req":
            self.submit(msg["id"], msg.get("args") or {})
        elif t == "cancel":
            if self.engine is not None and msg.get("id") in self.pending:
                self.engine.cancel(msg["id"])

    def submit(self, rid: int, args: dict) -> None:
        from ._engine import GenRequest
        from ._text import Detokenizer, StopFilter, encode
        m = self.loaded
        if m is None:
            self.send("error", id=rid, errno=int(Errno.EAGAIN), message="replica not ready")
            return
        try:
            ids = encode(m.tokenizer, args.get("prompt"), args.get("messages"),
                         m.model.config.block_size, bool(args.get("truncate")),
                         self.a.model)
            seed = args.get("seed")
            seed = secrets.randbits(63) if seed is None else int(seed)
            self.engine.submit(GenRequest(
                rid, int(args.get("owner", 0)), m.key, m.model, ids,
                int(args.get("max_tokens", 16)), float(args.get("temperature", 1.0)),
                int(args.get("top_k", 0)), seed, float(args.get("top_p", 1.0)), m.eos))
        except SyscallError as e:
            self.send("error", id=rid, errno=int(e.errno), message=e.message)
            return
        except (ValueError, TypeError) as e:
            self.send("error", id=rid, errno=int(Errno.EINVAL), message=f"infer: {e}")
            return
        self.pending[rid] = {"detok": Detokenizer(m.tokenizer),
                             "stops": StopFilter(list(args.get("stop") or [])),
                             "tokens": 0, "prompt_tokens": len(ids), "seed": seed,
                             "t0": time.monotonic()}

    def step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:
            log.exception("engine step failed")
            for rid in list(self.pending):
                self.engine.cancel(rid)
                del self.pending[rid]
                self.send("error", id=rid, errno=int(Errno.EIO),
                          message=f"infer: the model failed: {type(e).__name__}: {e}")
            return
        for ev in events:
            p = self.pending.get(ev.id)
            if p is None:
                continue
            p["tokens"] += len(ev.tokens)
            chunk, stopped = p["stops"].push(p["detok"].feed(ev.tokens, final=ev.done), ev.done)
            reason = "stop" if stopped else ev.reason
            if stopped and not ev.done:
                self.engine.cancel(ev.id)
            if reason == "cancelled":
                del self.pending[ev.id]
                continue
            if ev.done or stopped:
                del self.pending[ev.id]
                self.send("done", id=ev.id, text=chunk, tokens=p["tokens"],
                          prompt_tokens=p["prompt_tokens"], finish_reason=reason,
                          seed=p["seed"], time_s=round(time.monotonic() - p["t0"], 6))
            elif chunk:
                self.send("chunk", id=ev.id, text=chunk, tokens=p["tokens"])

    def run(self) -> int:
        threading.Thread(target=self.load, daemon=True, name="replica-load").start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        said, beat = None, 0.0
        while not self.stop:
            busy = self.engine is not None and self.engine.busy
            for _ in range(64 if busy else 1):
                if not dict(poller.poll(0 if busy else 100)):
                    break
                self.on_message(msgpack.unpackb(self.sock.recv(), raw=False))
            now = time.monotonic()
            if self.state != said:
                said = self.state
                self.say_state()
                if self.state == "failed":
                    time.sleep(0.2)  # let the message leave before the socket closes
                    return 1
            if now - beat >= HEARTBEAT_S:
                beat = now
                self.send("hb", ongoing=len(self.pending))
            if now - self.heard > GATEWAY_SILENCE_S:
                log.warning("the gateway is silent: leaving")
                return 0
            if self.engine is not None and self.engine.busy:
                self.step()
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drivers.executor.replica")
    p.add_argument("--deployment", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--gateway", required=True)
    p.add_argument("--gpu-mem", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s replica %(levelname)s %(message)s")
    import torch
    torch.set_num_threads(max(1, a.threads))
    r = Replica(a)
    signal.signal(signal.SIGTERM, lambda *_: setattr(r, "stop", True))
    try:
        return r.run()
    finally:
        r.sock.close(0)
        r.osh.close()


if __name__ == "__main__":
    raise SystemExit(main())
