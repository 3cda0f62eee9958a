"""Prometheus metrics (text exposition format, by prometheus_client).

Two kinds: the system's, read at each scrape from the kernel (sysinfo: syscalls with
their latency histogram and errors by errno, drivers, processes, tensorfs's cache,
the executor's engine) and the devices driver (GPU memory, its queue); and serve's
own, counted as requests pass (HTTP requests by endpoint and status, time to first
token, inter-token latency, tokens, and per deployment replicas desired and
running, ongoing and queued requests, 429s). `llmos metrics` prints the first kind
itself when no serve runs.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def system_families(info: dict[str, Any], devices: dict[str, Any] | None,
                    engine: dict[str, Any] | None) -> Iterable[Any]:
    """Metric families from sysinfo, devices() and the executor's models()['engine']."""
    calls = CounterMetricFamily("llmos_syscalls", "syscalls answered by the kernel",
                                labels=["syscall"])
    errs = CounterMetricFamily("llmos_syscall_errors", "syscalls that failed, by errno",
                               labels=["syscall", "errno"])
    lat = HistogramMetricFamily("llmos_syscall_latency_seconds",
                                "time from a syscall's arrival at the kernel to its "
                                "final answer", labels=["syscall"])
    bounds = info.get("latency_buckets_s") or []
    for name, s in sorted(info.get("syscalls", {}).items()):
        calls.add_metric([name], s["count"])
        for errno, n in sorted((s.get("errnos") or {}).items()):
            errs.add_metric([name, errno], n)
        cum = s.get("buckets")
        if cum and len(cum) == len(bounds):
            buckets = [(repr(float(b)), c) for b, c in zip(bounds, cum)]
            buckets.append(("+Inf", s["count"]))
            lat.add_metric([name], buckets, s.get("sum_s", 0.0))
    yield from (calls, errs, lat)
    dropped = CounterMetricFamily("llmos_kernel_dropped_messages",
                                  "messages the kernel dropped, by why", labels=["why"])
    for why, n in sorted((info.get("dropped") or {}).items()):
        dropped.add_metric([why], n)
    yield dropped
    restarts = CounterMetricFamily("llmos_driver_restarts", "driver restarts",
                                   labels=["driver"])
    up = GaugeMetricFamily("llmos_driver_up", "1 while the driver is ready",
                           labels=["driver"])
    for d in info.get("drivers", []):
        restarts.add_metric([d["name"]], d.get("restarts", 0))
        up.add_metric([d["name"]], 1 if d.get("state") == "ready" else 0)
    yield from (restarts, up)
    procs = GaugeMetricFamily("llmos_processes", "processes by state", labels=["state"])
    for state in ("running", "zombie"):
        procs.add_metric([state], info.get("processes", {}).get(state, 0))
    yield procs
    yield GaugeMetricFamily("llmos_uptime_seconds", "kernel uptime",
                            value=info.get("uptime_s", 0))
    by_name = {d["name"]: d.get("info") or {} for d in info.get("drivers", [])}
    cache = by_name.get("tensorfs", {}).get("cache") or {}
    for key, help_ in (("hits", "tensorfs cache hits"), ("misses", "tensorfs cache misses"),
                       ("evictions", "tensorfs cache evictions")):
        yield CounterMetricFamily(f"llmos_tensorfs_cache_{key}", help_,
                                  value=cache.get(key, 0))
    yield GaugeMetricFamily("llmos_tensorfs_cache_bytes", "bytes in tensorfs's cache",
                            value=cache.get("bytes", 0))
    if devices is not None:
        mem = GaugeMetricFamily("llmos_gpu_memory_bytes", "GPU memory by device and kind "
                                "(capacity, allocated, free)", labels=["gpu", "kind"])
        allocs = GaugeMetricFamily("llmos_gpu_allocations", "allocations per GPU",
                                   labels=["gpu"])
        for g in devices.get("gpus", []):
            for kind in ("capacity", "allocated", "free"):
                mem.add_metric([g["id"], kind], g.get(kind, 0))
            allocs.add_metric([g["id"]], len(g.get("allocations", [])))
        yield from (mem, allocs)
        yield GaugeMetricFamily("llmos_gpu_queue_length", "alloc_gpu calls waiting",
                                value=len(devices.get("queue", [])))
    engine = engine or {}
    yield CounterMetricFamily("llmos_executor_tokens", "tokens the executor generated",
                              value=engine.get("tokens", 0))
    yield CounterMetricFamily("llmos_executor_steps", "engine steps",
                              value=engine.get("steps", 0))
    for key in ("running", "queued"):
        yield GaugeMetricFamily(f"llmos_executor_{key}_requests",
                                f"infer requests {key} in the executor", value=engine.get(key, 0))
    hist = {int(k): v for k, v in (engine.get("batch_hist") or {}).items()}
    batch = HistogramMetricFamily("llmos_executor_batch_size", "sequences per decode "
                                  "forward")
    total, rows, buckets = 0, 0, []
    for b in BATCH_BUCKETS:
        buckets.append((str(float(b)), sum(v for k, v in hist.items() if k <= b)))
    total = sum(hist.values())
    rows = sum(k * v for k, v in hist.items())
    buckets.append(("+Inf", total))
    batch.add_metric([], buckets, rows)
    yield batch


class _System:
    """A collector of the last snapshot taken (scrape() refreshes it first)."""

    def __init__(self) -> None:
        self.snapshot: tuple = ({}, None, None)

    def collect(self) -> Iterable[Any]:
        return system_families(*self.snapshot)


class Deployments:
    def __init__(self, gw: Any) -> None:
        self.gw = gw

    def collect(self) -> Iterable[Any]:
        replicas = GaugeMetricFamily("llmos_deployment_replicas", "replicas per deployment "
                                     "(desired, running)", labels=["deployment", "kind"])
        ongoing = GaugeMetricFamily("llmos_deployment_ongoing_requests", "requests at "
                                    "replicas", labels=["deployment"])
        queued = GaugeMetricFamily("llmos_deployment_queued_requests", "requests waiting "
                                   "for a replica", labels=["deployment"])
        rejected = CounterMetricFamily("llmos_deployment_rejected", "requests refused with "
                                       "429 (queue full)", labels=["deployment"])
        lost = CounterMetricFamily("llmos_deployment_replicas_lost", "replicas that died "
                                   "or went silent", labels=["deployment"])
        for d in list(self.gw.deployments.values()):
            r = d.record()
            replicas.add_metric([d.name, "desired"], r["desired"])
            replicas.add_metric([d.name, "running"], r["running"])
            ongoing.add_metric([d.name], r["ongoing"])
            queued.add_metric([d.name], r["queued"])
            rejected.add_metric([d.name], r["rejected"])
            lost.add_metric([d.name], r["lost_replicas"])
        return [replicas, ongoing, queued, rejected, lost]


class Metrics:
    """serve's registry: its own counters and histograms, the deployments', and the
    system's (refreshed from the kernel at each scrape)."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.registry = CollectorRegistry()
        self.system = _System()
        self.registry.register(self.system)  # type: ignore[arg-type]
        self.registry.register(Deployments(gw))  # type: ignore[arg-type]
        r = self.registry
        self.requests = Counter("llmos_serve_requests", "HTTP requests by endpoint and "
                                "status", ["endpoint", "status"], registry=r)
        self.duration = Histogram("llmos_serve_request_duration_seconds", "time to answer "
                                  "(to the start of the stream when streaming)", ["endpoint"],
                                  registry=r)
        self.ttft = Histogram("llmos_serve_time_to_first_token_seconds", "from the request "
                              "to its first generated text", registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("llmos_serve_inter_token_latency_seconds", "between streamed "
                             "chunks", registry=r,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.generated = Counter("llmos_serve_tokens", "tokens generated for serve's "
                                 "requests", registry=r)

        self.recent: collections.deque = collections.deque(maxlen=100_000)

    def rate(self, window: float = 60.0) -> float:
        """Generation requests per second over the last window seconds."""
        now = time.monotonic()
        return sum(1 for t in self.recent if now - t <= window) / window

    def http(self, endpoint: str, status: int, seconds: float) -> None:
        if endpoint.endswith("completions"):
            self.recent.append(time.monotonic())
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)

    async def exposition(self) -> tuple[bytes, str]:
        self.system.snapshot = await self.gw.admin_call(snapshot)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def snapshot(osh: Any) -> tuple:
    """(sysinfo, devices, engine stats) read with osh; a part that fails is empty."""
    from syscalls import SyscallError
    info = osh.sysinfo()
    try:
        devices = osh.devices()
    except SyscallError:
        devices = None
    try:
        engine = osh.models().get("engine")
    except SyscallError:
        engine = None
    return info, devices, engine


def system_text(osh: Any) -> bytes:
    """The system's metrics alone, as `llmos metrics` prints them with no serve."""
    registry = CollectorRegistry()
    system = _System()
    system.snapshot = snapshot(osh)
    registry.register(system)  # type: ignore[arg-type]
    return generate_latest(registry)
