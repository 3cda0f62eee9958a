"""Deployments: what `llmos deploy` asks for (kept in the home), and the autoscaling
policy that `llmos serve` applies to it.

A deployment's spec lives in serve/deployments.json in the home, so it outlasts a
restart of serve (or of the kernel) the way a Kubernetes object does: `llmos serve`
starts the replicas of every deployment it finds and follows the file as it
changes. What runs now (replicas, ongoing and queued requests) is serve's to say:
it writes run/serve.json every tick, and `llmos deployments` shows both.

The policy is Ray Serve's: desired replicas = ceil(ongoing requests / target_ongoing)
within min..max, the ongoing requests averaged over the last look_back_s (Ray's 30 s;
requests that come and go faster than the autoscaler looks would otherwise make
it see a different load at every tick); a decision to go up is carried out once it has held for
upscale_delay_s (Ray's default 30 s), one to go down once it has held for
downscale_delay_s (Ray's 600 s); from zero replicas it goes up at once. It is
judged on the clock the caller passes, so tests drive it.
"""
from __future__ import annotations

import collections
import math
import re
import time
from pathlib import Path
from typing import Any

from syscalls import Errno, Home, SyscallError

from ._store import read_json, rewrite_json

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

DEFAULTS: dict[str, Any] = {
    "min": 1, "max": 4, "target_ongoing": 2.0,
    "max_ongoing": 8,        # requests one replica serves at once (its batch)
    "max_queued": 64,        # requests waiting for a replica; beyond: 429
    "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
    "look_back_s": 30.0,     # ongoing requests are averaged over this window
    "gpu_mem": 0,            # bytes each replica allocates; 0: the model's own need
    "queue_timeout_s": 60.0,  # a request no replica took in this long: 503
}
# what a replica is started with: a change restarts the replicas
REPLICA_KEYS = ("model", "owner", "gpu_mem", "max_ongoing")


def specs_file(home: Home) -> Path:
    return home.root / "serve" / "deployments.json"


def status_file(home: Home) -> Path:
    return home.run / "serve.json"


def read_specs(home: Home) -> dict[str, dict[str, Any]]:
    data = read_json(specs_file(home), "deploy") or {}
    return {d["name"]: d for d in data.get("deployments", [])}


def _rewrite(home: Home, change: Any) -> Any:
    return rewrite_json(specs_file(home), lambda: read_specs(home), change,
                        lambda specs: {"deployments": list(specs.values())})


def check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with defaults filled in; EINVAL naming what is wrong."""
    out = {**DEFAULTS, **{k: v for k, v in spec.items() if v is not None}}
    name = out.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SyscallError(Errno.EINVAL, f"deploy: a name is 1-63 letters, digits, '.', '_' "
                           f"or '-', not {name!r}")
    if not isinstance(out.get("model"), str) or not out["model"].startswith("/"):
        raise SyscallError(Errno.EINVAL, f"deploy: model must be a tensorfs path, not "
                           f"{out.get('model')!r}")
    for key in ("min", "max", "max_ongoing", "max_queued", "gpu_mem"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SyscallError(Errno.EINVAL, f"deploy: {key} must be an integer >= 0, "
                               f"not {v!r}")
    for key in ("target_ongoing", "upscale_delay_s", "downscale_delay_s", "look_back_s",
                "queue_timeout_s"):
        v = out[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 \
                or math.isinf(v):
            raise SyscallError(Errno.EINVAL, f"deploy: {key} must be a number >= 0, "
                               f"not {v!r}")
        out[key] = float(v)
    if out["max"] < 1 or out["min"] > out["max"]:
        raise SyscallError(Errno.EINVAL, f"deploy: need 0 <= min <= max and max >= 1 "
                           f"(min {out['min']}, max {out['max']})")
    if out["target_ongoing"] <= 0 or out["max_ongoing"] < 1:
        raise SyscallError(Errno.EINVAL, "deploy: target_ongoing must be > 0 and "
                           "max_ongoing >= 1")
    return out


def save_spec(home: Home, spec: dict[str, Any], replace: bool = False) -> dict[str, Any]:
    """Keep spec (its owner: the caller's uid); replacing another uid's is EPERM
    unless the caller (the new owner) is uid 0."""
    spec = check_spec(spec)

    def put(specs: dict) -> None:
        have = specs.get(spec["name"])
        if have is not None and not replace:
            raise SyscallError(Errno.EEXIST, f"deploy: a deployment named {spec['name']!r} "
                               "exists (llmos undeploy it, or --replace)")
        if have is not None and spec["owner"] not in (0, have["owner"]):
            raise SyscallError(Errno.EPERM, f"deploy: {spec['name']} is uid "
                               f"{have['owner']}'s")
        specs[spec["name"]] = {**spec, "created": round(time.time(), 3)}
    _rewrite(home, put)
    return spec


def remove_spec(home: Home, name: str, uid: int = 0) -> dict[str, Any]:
    """Drop deployment name: its owner's or uid 0's to do (EPERM)."""
    def drop(specs: dict) -> dict:
        if name not in specs:
            raise SyscallError(Errno.ENOENT, f"undeploy: no deployment named {name!r}")
        if uid not in (0, specs[name]["owner"]):
            raise SyscallError(Errno.EPERM, f"undeploy: {name} is uid "
                               f"{specs[name]['owner']}'s")
        return specs.pop(name)
    return _rewrite(home, drop)


class Autoscaler:
    """Ray Serve's policy for one deployment, judged at the times it is given."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._seen: collections.deque = collections.deque()  # (time, ongoing)
        self.last_want = 0  # what the load asked for at the last decision

    def average(self, now: float, ongoing: float) -> float:
        """ongoing, averaged with what was seen in the last look_back_s."""
        self._seen.append((now, ongoing))
        while self._seen and now - self._seen[0][0] > self.spec["look_back_s"]:
            self._seen.popleft()
        return sum(o for _, o in self._seen) / len(self._seen)

    def wanted(self, ongoing: float) -> int:
        s = self.spec
        return max(s["min"], min(s["max"], math.ceil(ongoing / s["target_ongoing"])))

    def decide(self, now: float, ongoing: float, current: int) -> int:
        """The replicas to run now, given the ongoing (running and queued) requests
        and the replicas there are (ready or starting)."""
        s = self.spec
        want = self.last_want = self.wanted(self.average(now, ongoing))
        if current < s["min"] or current > s["max"]:
            self._up_since = self._down_since = None
            return max(s["min"], min(s["max"], current))
        if want > current:
            self._down_since = None
            if current == 0:  # from zero: at once, for what waits now
                return self.wanted(ongoing)
            if self._up_since is None:
                self._up_since = now
            if now - self._up_since >= s["upscale_delay_s"]:
                self._up_since = None
                return want
        elif want < current:
            self._up_since = None
            if self._down_since is None:
                self._down_since = now
            if now - self._down_since >= s["downscale_delay_s"]:
                self._down_since = None
                return want
        else:
            self._up_since = self._down_since = None
        return current
