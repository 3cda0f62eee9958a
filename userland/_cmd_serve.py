"""The serving commands: serve, keys, deploy, deployments, undeploy, metrics
(docs/serving.md)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from syscalls import Errno, SyscallError

from ._argtypes import sized
from ._command import Session, UsageError, arg, command

SERVE_ARGV = ["python", "-m", "userland.serve"]


@command("serve", "serving", "an OpenAI-compatible HTTP server: /v1/completions, "
         "/v1/chat/completions, /v1/models, /metrics, /health and a status page at /",
         arg("--host", default="127.0.0.1", metavar="ADDR",
             help="address to bind (another than loopback needs API keys)"),
         arg("--port", type=int, default=8000, metavar="PORT", help="0: any free port"),
         arg("-d", "--detach", action="store_true",
             help="run it as a child of the kernel and return (it stops with llmos stop, "
                  "or llmos kill PID)"),
         arg("--replica-threads", type=int, default=1, metavar="N",
             help="torch threads of each deployment replica"),
         syscalls=("attach", "spawn", "kill", "ps", "infer", "listdir", "sysinfo",
                   "devices", "models"),
         scope="cli",
         details="Requests act as the uid of their API key (llmos keys); with no keys "
                 "they act as the default uid (or --uid), and serve binds to 127.0.0.1 "
                 "only. A request's model is a deployment name (llmos deploy), a model "
                 "path, or a name under /models. Ctrl-C or SIGTERM stops it.")
def serve(s: Session, a: argparse.Namespace) -> None:
    if not 0 <= a.port <= 65535:
        raise UsageError("PORT is 0 to 65535")
    from .serve import check_bind, run, serving
    check_bind(s.home, a.host)
    other = serving(s.home)
    if other is not None:
        raise SyscallError(Errno.EBUSY, f"serve: already serving {s.home.root} at "
                           f"{other['url']} (pid {other['pid']})")
    if a.detach:
        argv = [*SERVE_ARGV, "--host", a.host, "--port", str(a.port),
                "--replica-threads", str(a.replica_threads)]
        if s.uid is not None:
            argv += ["--uid", str(s.uid)]
        root = s.connect(uid=0)
        try:
            pid = root.spawn(argv, uid=0)
        finally:
            root.close()
        deadline = time.monotonic() + 30
        with s.connect(uid=0) as root:
            while time.monotonic() < deadline:
                up = serving(s.home)
                if up is not None and up.get("url"):
                    s.line(f"llmos serve: pid {pid}, listening on {up['url']}")
                    return
                if not any(p["pid"] == pid and p["state"] == "running" for p in root.ps()):
                    break  # it ended: its log says why
                time.sleep(0.1)
        s.note(f"llmos serve: pid {pid} is not listening; see {s.home.proc_log(pid)}:\n"
               + _tail(s.home.proc_log(pid)))
        s.status = 1
        return
    s.detach()  # serve attaches on its own, as uid 0
    run(s.home, a.host, a.port, s.uid, a.replica_threads)


def _keys_view(r: Any, s: Session, a: argparse.Namespace) -> list[str]:
    if a.action == "create":
        return [r["key"], f"(uid {r['uid']}, name {r['name']}, id {r['id']}: the key is "
                          "shown only now)"]
    if a.action == "revoke":
        return [f"revoked {r['id']} ({r['name']}, uid {r['uid']})"]
    if not r:
        return ["no API keys (serve binds to 127.0.0.1 only)"]
    out = [f"{'ID':<9} {'NAME':<16} {'UID':>6}  {'PREFIX':<11} CREATED"]
    for k in r:
        out.append(f"{k['id']:<9} {k['name']:<16} {k['uid']:>6}  {k['prefix']:<11} "
                   f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(k['created']))}")
    return out


@command("keys", "serving", "API keys for llmos serve: each one acts as a uid",
         arg("action", metavar="ACTION", choices=["create", "list", "revoke"],
             help="create, list or revoke"),
         arg("which", nargs="?", metavar="ID|NAME", help="the key to revoke"),
         arg("--name", default="", metavar="NAME", help="create: a name to know it by"),
         view=_keys_view, scope="cli",
         json_keys="create: {key, id, name, uid, prefix, created}; list: [{id, name, uid, "
                   "prefix, created}]; revoke: the record removed",
         details="The key is printed once; the home keeps only its SHA-256 "
                 "(keys/api.json, mode 0600). create takes the uid the key acts as from "
                 "--uid. A running serve sees changes within a "
                 "second. The home's secret is needed, as for every administrator's "
                 "command.")
def keys(s: Session, a: argparse.Namespace) -> Any:
    from .serve import create_key, read_keys, revoke_key
    s.home.secretfile.read_bytes()  # an administrator's: the one who may read the secret
    if a.action == "create":
        if s.uid is None:
            raise UsageError("keys create needs --uid N: the uid the key acts as")
        key, record = create_key(s.home, s.uid, a.name)
        return {"key": key, **{k: v for k, v in record.items() if k != "sha256"}}
    if a.action == "revoke":
        if not a.which:
            raise UsageError("keys revoke needs the key's ID or NAME")
        record = revoke_key(s.home, a.which)
        return {k: v for k, v in record.items() if k != "sha256"}
    return [{k: v for k, v in r.items() if k != "sha256"} for r in read_keys(s.home)]


def _deployment_lines(rows: list[dict], s: Session) -> list[str]:
    if not rows:
        return ["no deployments"]
    out = [f"{'NAME':<16} {'MODEL':<24} {'OWNER':>5} {'REPLICAS':>9} {'MIN..MAX':>8} "
           f"{'ONGOING':>7} {'QUEUED':>6} {'REQS':>6} {'429s':>5}  STATE"]
    for d in rows:
        state = d["state"] + (f" ({d['error']})" if d.get("error") else "")
        out.append(f"{d['name']:<16} {d['model']:<24} {d['owner']:>5} "
                   f"{d['running']:>4}/{d['desired']:<4} {d['min']:>3}..{d['max']:<3} "
                   f"{d['ongoing']:>7} {d['queued']:>6} {d['requests']:>6} "
                   f"{d['rejected']:>5}  {state}")
    return out


@command("deploy", "serving", "serve a model through llmos serve as replicas that scale "
         "with load",
         arg("model", metavar="MODEL", complete="tensor", help="a model directory"),
         arg("--name", required=True, metavar="NAME", help="what requests call it"),
         arg("--min", type=int, default=1, metavar="N", help="replicas at least"),
         arg("--max", type=int, default=4, metavar="N", help="replicas at most"),
         arg("--target-ongoing", type=float, default=2.0, metavar="X",
             help="ongoing requests per replica the autoscaler aims at"),
         arg("--gpu-mem", type=sized, default=0, metavar="SIZE",
             help="each replica's GPU allocation (default: its model with its KV cache)"),
         arg("--max-ongoing", type=int, default=8, metavar="N",
             help="requests one replica serves at once"),
         arg("--max-queued", type=int, default=64, metavar="N",
             help="requests waiting for a replica; more get 429"),
         arg("--upscale-delay", type=float, default=30.0, metavar="SECONDS",
             help="how long more replicas must be wanted before they start"),
         arg("--downscale-delay", type=float, default=600.0, metavar="SECONDS",
             help="how long fewer must be wanted before replicas stop"),
         arg("--look-back", type=float, default=30.0, metavar="SECONDS",
             help="the load the autoscaler judges is averaged over this window"),
         arg("--queue-timeout", type=float, default=60.0, metavar="SECONDS",
             help="a request no replica took in this long gets 503"),
         arg("--replace", action="store_true", help="replace a deployment of that name"),
         syscalls=("stat", "listdir"),
         view=lambda r, s, a: [f"deployed {r['model']} as {r['name']}: {r['min']}..{r['max']}"
                               f" replicas, {r['target_ongoing']:g} ongoing requests each"
                               + ("" if _served(s) else " (starts when llmos serve runs)")],
         json_keys="the deployment's spec: {name, model, owner, min, max, target_ongoing, "
                   "max_ongoing, max_queued, upscale_delay_s, downscale_delay_s, look_back_s, "
                   "queue_timeout_s, gpu_mem}",
         details="The deployment is kept in the home (serve/deployments.json) and owned by "
                 "your uid: its replicas run as it, so they read only what you may. "
                 "Defaults are Ray Serve's (upscale 30 s, downscale 600 s, look-back 30 s).")
def deploy(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    from .serve import deploy as deploy_
    return deploy_(s.osh, s.resolve(a.model), a.name, replace=a.replace, min=a.min,
                   max=a.max, target_ongoing=a.target_ongoing, gpu_mem=a.gpu_mem,
                   max_ongoing=a.max_ongoing, max_queued=a.max_queued,
                   upscale_delay_s=a.upscale_delay, downscale_delay_s=a.downscale_delay,
                   look_back_s=a.look_back, queue_timeout_s=a.queue_timeout)


def _served(s: Session) -> bool:
    from .serve import serving
    return serving(s.home) is not None


@command("deployments", "serving", "the deployments, with their replicas and load now",
         view=lambda r, s, a: _deployment_lines(r, s),
         json_keys="[{name, model, owner, min, max, ..., state, desired, running, replicas, "
                   "ongoing, queued, requests, rejected, error}]")
def deployments(s: Session, a: argparse.Namespace) -> list[dict[str, Any]]:
    from .serve import deployments as list_
    return list_(s.home)


@command("undeploy", "serving", "stop serving a deployment (its replicas stop)",
         arg("name", metavar="NAME"),
         view=lambda r, s, a: [f"undeployed {r['name']}"], json_keys="the spec removed",
         details="Your own deployments only, unless you are uid 0 (EPERM).")
def undeploy(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    from .serve import undeploy as undeploy_
    return undeploy_(s.home, a.name, s.osh.uid)


@command("metrics", "serving", "print the Prometheus metrics (serve's /metrics when it "
         "runs, else the system's alone)",
         syscalls=("sysinfo", "devices", "models"),
         details="Text exposition format, as Prometheus scrapes it.")
def metrics(s: Session, a: argparse.Namespace) -> None:
    from .serve import serving
    up = serving(s.home)
    if up is not None and up.get("url"):
        import urllib.request
        try:
            with urllib.request.urlopen(up["url"] + "/metrics", timeout=10) as r:
                sys.stdout.write(r.read().decode())
                return
        except OSError as e:
            if getattr(e, "code", None) != 401:
                raise SyscallError(Errno.EIO, f"metrics: {up['url']}/metrics: {e}")
            s.note(f"llmos metrics: serve's /metrics needs an API key ({e}); the "
                   "system's alone follow")
    from .serve import system_text
    sys.stdout.write(system_text(s.osh).decode())


def _tail(path: Any, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
