"""`llmos serve`: an OpenAI-compatible HTTP server, deployments that scale with load,
API keys and Prometheus metrics (docs/serving.md).

serve is a userland program: an llmos process (uid 0: it spawns each deployment's
replicas as the deployment owner's uid) that makes syscalls and nothing more. A
request acts as the uid of its API key (keys/api.json in the home), or, with no
keys made, as the configured default uid; then it may bind to 127.0.0.1 only.

Library calls (what the commands use):
    deploy(osh, model, name, **settings)   undeploy(home, name)   deployments(home)
    create_key(home, uid, name)   revoke_key(home, which)   read_keys(home)
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import time
from typing import Any

from syscalls import Errno, Home, SyscallError

from ._deploy import DEFAULTS, read_specs, remove_spec, save_spec, status_file
from ._keys import KeyRing, create_key, read_keys, revoke_key


def system_text(osh: Any) -> bytes:
    """The system's Prometheus metrics alone (what `llmos metrics` prints with no serve)."""
    from ._metrics import system_text as text
    return text(osh)

log = logging.getLogger("llmos.serve")

__all__ = ["DEFAULTS", "check_bind", "create_key", "deploy", "deployments", "read_keys", "revoke_key",
           "run", "serving", "system_text", "undeploy"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(home: Home, host: str) -> None:
    """EACCES for an address other than loopback while no API key exists."""
    if not _loopback(host) and not read_keys(home):
        raise SyscallError(Errno.EACCES, f"serve: binding {host} needs API keys (llmos "
                           "keys create --uid N); without keys serve binds to 127.0.0.1 "
                           "only")


def deploy(osh: Any, model: str, name: str, replace: bool = False, **settings: Any
           ) -> dict[str, Any]:
    """Save a deployment of model as name, owned by osh's uid, after checking that
    uid may read the model (stat as it: ENOENT, EACCES). serve starts its replicas."""
    if not isinstance(model, str) or not model.startswith("/"):
        raise SyscallError(Errno.EINVAL, f"deploy: model must be a tensorfs path, not "
                           f"{model!r}")
    st = osh.stat(model)
    if st["type"] != "dir":
        raise SyscallError(Errno.ENOTDIR, f"deploy: {model} is not a model directory")
    for e in osh.listdir(model):  # as infer would: every tensor readable by the owner
        if e["type"] in ("tensor", "group") and osh.uid not in (0, e.get("owner")) \
                and not e.get("mode", 0) & 0o4:
            raise SyscallError(Errno.EACCES, f"deploy: uid {osh.uid} may not read "
                               f"{e['path']}")
    return save_spec(osh.home, {**settings, "name": name, "model": model, "owner": osh.uid},
                     replace)


def undeploy(home: Home, name: str, uid: int = 0) -> dict[str, Any]:
    """Remove deployment name (uid: who asks; another uid's is EPERM unless 0)."""
    return remove_spec(home, name, uid)


def serving(home: Home) -> dict[str, Any] | None:
    """What the running serve last wrote (run/serve.json), or None when none runs."""
    from syscalls.client import alive
    try:
        data = json.loads(status_file(home).read_text())
    except (OSError, ValueError):
        return None
    if not alive(int(data.get("os_pid", 0))) or time.time() - data.get("updated", 0) > 10:
        return None
    return data


def deployments(home: Home) -> list[dict[str, Any]]:
    """Each deployment's spec, with what serve says of it now (state "not served"
    when no serve runs)."""
    live = {d["name"]: d for d in (serving(home) or {}).get("deployments", [])}
    out = []
    for name, spec in sorted(read_specs(home).items()):
        now = live.get(name)
        out.append({**spec, "state": "served" if now else "not served",
                    "desired": now["desired"] if now else 0,
                    "running": now["running"] if now else 0,
                    "replicas": now["replicas"] if now else [],
                    "ongoing": now["ongoing"] if now else 0,
                    "queued": now["queued"] if now else 0,
                    "requests": now["requests"] if now else 0,
                    "rejected": now["rejected"] if now else 0,
                    "error": now["error"] if now else None})
    return out


def run(home: Home, host: str = "127.0.0.1", port: int = 8000, uid: int | None = None,
        replica_threads: int = 1, ready: Any = None) -> int:
    """Serve until SIGTERM/SIGINT or the kernel goes away. ready(url) is called once
    the socket listens."""
    import uvicorn

    from syscalls.client import alive, connect

    from ._gateway import Gateway
    from ._http import App
    from ._metrics import Metrics
    from ._page import render

    keys = KeyRing(home)
    check_bind(home, host)
    spawned = "LLMOS_SPAWN_TOKEN" in os.environ
    admin = connect(home.root, uid=None if spawned else 0,
                    argv=["llmos", "serve", "--host", host, "--port", str(port)])
    if admin.uid != 0:
        admin.close(1)
        raise SyscallError(Errno.EPERM, "serve: must run as uid 0 (it spawns replicas as "
                           "their deployments' owners)")
    default_uid = home.config().default_uid if uid is None else uid
    gw = Gateway(home, admin, ["llmos", "serve"], replica_threads=replica_threads)
    metrics = Metrics(gw)
    app = App(gw, keys, default_uid, metrics, render, keyed=keys.configured)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)

    async def main() -> None:
        await gw.start()

        async def watch() -> None:
            while not server.started:
                await asyncio.sleep(0.02)
            sock = server.servers[0].sockets[0]
            h, p = sock.getsockname()[:2]
            gw.url = f"http://{h}:{p}"
            if keys.configured:
                print(f"llmos serve: listening on {gw.url} (API keys required)", flush=True)
            else:
                print(f"llmos serve: listening on {gw.url} (no API keys: requests act as "
                      f"uid {default_uid}; loopback only)", flush=True)
            if ready is not None:
                ready(gw.url)
            while not server.should_exit:
                if not alive(admin.kernel_pid):
                    log.warning("the kernel is gone: stopping")
                    server.should_exit = True
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        try:
            await server.serve()
        finally:
            watcher.cancel()
            await gw.stop()

    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        status_file(home).unlink(missing_ok=True)
        try:
            admin.close(0)
        except Exception:
            pass
    return 0
