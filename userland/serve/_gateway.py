"""The gateway: where serve's requests go to be generated.

Two ways in, one shape out (an async iterator of events: ("chunk", text, tokens),
("done", record), ("error", errno, message); a deployment's also ("queued",) and
("restart",), _fleet.py says when):

- A model path (/models/NAME): the infer syscall, through the executor, made on a
  connection acting as the request's uid (Conns: a pool of llmos processes per uid,
  in threads: the client library is blocking), so tensorfs's permissions decide.
- A deployment name: one of the deployment's replicas (_fleet.py), after the
  gateway checked that the request's uid may read the deployment's model.

Leaving the iterator early (the HTTP client went away) cancels the generation:
the infer stream is closed (the library tells the executor) or the replica is told.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from syscalls import Errno, Home, SyscallError

from ._fleet import Deployment, Fleet

log = logging.getLogger("llmos.serve")

ACCESS_TTL_S = 2.0
IDLE_CONNS = 8              # idle connections kept per uid; more are closed


# -- the executor path --------------------------------------------------------------

class Conns:
    """llmos connections acting as each uid, lent to one call at a time."""

    def __init__(self, home: Home, argv: list[str]) -> None:
        self.home, self.argv = home, argv
        self.free: dict[int, list[Any]] = collections.defaultdict(list)
        self.all: list[Any] = []
        self.lock = threading.Lock()

    def acquire(self, uid: int) -> Any:
        with self.lock:
            if self.free[uid]:
                return self.free[uid].pop()
        from syscalls.client import connect
        osh = connect(self.home.root, uid=uid, heartbeat=True,
                      argv=[*self.argv, f"(as uid {uid})"])
        with self.lock:
            self.all.append(osh)
        return osh

    def release(self, uid: int, osh: Any, broken: bool = False) -> None:
        with self.lock:
            broken = broken or len(self.free[uid]) >= IDLE_CONNS  # a burst's extras go
            if broken:
                self.all.remove(osh)
            else:
                self.free[uid].append(osh)
        if broken:
            try:
                osh.close()
            except Exception:
                pass

    def call(self, uid: int, fn: Any) -> Any:
        """fn(handle) on a connection acting as uid (a thread's)."""
        osh = self.acquire(uid)
        broken = False
        try:
            return fn(osh)
        except SyscallError as e:
            broken = e.errno in (Errno.ECONNRESET, Errno.EIO, Errno.EBADF)
            raise
        finally:
            self.release(uid, osh, broken)

    def close(self) -> None:
        with self.lock:
            conns, self.all = self.all, []
            self.free.clear()
        for osh in conns:
            try:
                osh.close()
            except Exception:
                pass


class Gateway:
    def __init__(self, home: Home, admin: Any, argv: list[str],
                 replica_threads: int = 1) -> None:
        self.home, self.admin = home, admin
        self.conns = Conns(home, argv)
        # generations hold a thread for their whole life; the gateway's own calls
        # (ps, spawn, kill, access checks) have threads of their own, so a crowd of
        # generations never holds up the autoscaler or the replicas' heartbeats
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="serve-infer")
        self.admin_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="serve-admin")
        self.admin_lock = threading.Lock()
        self.fleet = Fleet(home, self.admin_call, admin.pid, replica_threads)
        self._access: dict[tuple[int, str], tuple[float, SyscallError | None]] = {}
        cfg = home.config()
        self.limits = {"max_tokens": cfg.infer_max_tokens, "max_prompt": cfg.infer_max_prompt}

    # -- lifetime -------------------------------------------------------------------

    @property
    def deployments(self) -> dict[str, Deployment]:
        return self.fleet.deployments

    @property
    def url(self) -> str:
        return self.fleet.url

    @url.setter
    def url(self, url: str) -> None:
        self.fleet.url = url

    async def start(self) -> None:
        await self.fleet.start()

    async def stop(self) -> None:
        await self.fleet.stop()
        await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.conns.close)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.admin_pool.shutdown(wait=False, cancel_futures=True)

    async def admin_call(self, fn: Any) -> Any:
        def run() -> Any:
            with self.admin_lock:
                return fn(self.admin)
        return await asyncio.get_running_loop().run_in_executor(self.admin_pool, run)

    async def as_uid(self, uid: int, fn: Any) -> Any:
        """fn(a connection acting as uid), for a short call (not a generation)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.admin_pool, self.conns.call, uid, fn)

    # -- what a request names -------------------------------------------------------

    def resolve(self, model: str) -> tuple[str, str]:
        """("deployment", name) or ("model", path) for what a request's model says."""
        if model in self.deployments:
            return "deployment", model
        if model.startswith("/"):
            return "model", model
        return "model", f"/models/{model}"

    async def check_read(self, uid: int, path: str) -> None:
        """EACCES/ENOENT unless uid may read the model at path (as tensorfs says,
        remembered ACCESS_TTL_S)."""
        if uid == 0:
            return
        now = time.monotonic()
        hit = self._access.get((uid, path))
        if hit is None or now - hit[0] > ACCESS_TTL_S:
            def check(osh: Any) -> None:
                listing = osh.listdir(path)
                if any(e["name"] == "latest" and e["type"] == "tensor" for e in listing):
                    # a trained model: what it serves is its latest checkpoint's (as
                    # the executor reads it: reading latest is checked here too)
                    import numpy as np
                    name = bytes(np.asarray(osh.load_tensor(f"{path}/latest"),
                                            dtype=np.uint8)).decode("utf-8", "replace")
                    listing = listing + osh.listdir(f"{path}/{name.strip()}")
                for e in listing:
                    if e["type"] in ("tensor", "group") and e.get("owner") != uid \
                            and not e.get("mode", 0) & 0o4:
                        raise SyscallError(Errno.EACCES, f"uid {uid} may not read "
                                           f"{e['path']}")
            try:
                await self.as_uid(uid, check)
                hit = (now, None)
            except SyscallError as e:
                hit = (now, e)
            self._access[(uid, path)] = hit
        if hit[1] is not None:
            raise hit[1]

    async def visible(self, uid: int) -> list[dict[str, Any]]:
        """The models (under /models) and deployments uid may read."""
        out: list[dict[str, Any]] = []
        for d in list(self.deployments.values()):
            try:
                await self.check_read(uid, d.spec["model"])
            except SyscallError:
                continue
            out.append({"id": d.name, "kind": "deployment", "model": d.spec["model"],
                        "owner": d.spec["owner"], "created": d.spec.get("created", 0)})
        try:
            entries = await self.as_uid(uid, lambda osh: osh.listdir("/models"))
        except SyscallError:
            entries = []
        for e in entries:
            if e.get("type") != "dir":
                continue
            if uid not in (0, e.get("owner")) and not e.get("mode", 0) & 0o4:
                continue
            out.append({"id": e["path"], "kind": "model", "model": e["path"],
                        "owner": e.get("owner"), "created": e.get("mtime", 0)})
        return out

    # -- generating -----------------------------------------------------------------

    async def generate(self, uid: int, model: str, args: dict, stream: bool = True
                       ) -> AsyncIterator[tuple]:
        """The events of one generation; stream False: nothing reaches the client before
        the end, so a request whose replica died may start again: ("restart",) says
        to forget the text so far."""
        kind, name = self.resolve(model)
        if kind == "deployment":
            d = self.deployments[name]
            await self.check_read(uid, d.spec["model"])
            if self.deployments.get(name) is not d:  # undeployed while we looked
                raise SyscallError(Errno.ENOENT, f"deployment {name} was removed")
            self._check_limits(args)
            gen = self.fleet.submit(d, uid, args, stream)
        else:
            gen = self._via_executor(uid, name, args)
        async for ev in gen:
            yield ev

    def _check_limits(self, args: dict) -> None:
        """infer's own limits (infer_max_tokens, infer_max_prompt), for a replica's
        request as the executor applies them to infer's."""
        if args["max_tokens"] > self.limits["max_tokens"]:
            raise SyscallError(Errno.EINVAL, f"max_tokens {args['max_tokens']} is over "
                               f"infer_max_tokens ({self.limits['max_tokens']})")
        size = len((args.get("prompt") or "").encode("utf-8", "surrogatepass")) + sum(
            len(m["content"].encode("utf-8", "surrogatepass"))
            for m in args.get("messages") or ())
        if size > self.limits["max_prompt"]:
            raise SyscallError(Errno.EINVAL, f"the prompt is {size} bytes, over "
                               f"infer_max_prompt ({self.limits['max_prompt']})")

    async def _via_executor(self, uid: int, path: str, args: dict) -> AsyncIterator[tuple]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(ev: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        def run(osh: Any) -> None:
            it = osh.infer(path, stream=True, **args)
            try:
                for c in it:
                    if stop.is_set():
                        return
                    if c.get("finish_reason") is None:
                        put(("chunk", c["text"], c["tokens"]))
                    else:
                        put(("done", c))
                        return
            finally:
                it.close()

        def thread() -> None:
            try:
                self.conns.call(uid, run)
            except SyscallError as e:
                put(("error", int(e.errno), e.message))
            except Exception as e:
                log.exception("infer through the executor failed")
                put(("error", int(Errno.EIO), f"{type(e).__name__}: {e}"))

        fut = loop.run_in_executor(self.pool, thread)
        try:
            while True:
                ev = await events.get()
                yield ev
                if ev[0] != "chunk":
                    return
        finally:
            stop.set()
            fut.cancel()  # still waiting for a thread: it never starts
