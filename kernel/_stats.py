"""Per-syscall counters and latency percentiles, and counters of dropped messages.

Latencies are kept in a bounded ring per syscall (the last RING samples), so
memory stays flat however long the kernel runs; besides, every call counts in a
fixed latency bucket (BUCKETS_S: a Prometheus histogram's, cumulative) and a
failed one under its errno, for `llmos metrics` and serve's /metrics.
"""
from __future__ import annotations

from collections import Counter, deque

RING = 4096
# upper bounds of the latency histogram, seconds (the last bucket, +Inf, is count)
BUCKETS_S = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3,
             1.0, 10.0)


class SyscallStats:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, deque[float]] = {}
        self.dropped: Counter[str] = Counter()
        self.errnos: dict[str, Counter[str]] = {}
        self.buckets: dict[str, list[int]] = {}  # name -> a count per bound, not cumulative
        self.total_s: Counter[str] = Counter()

    def record(self, name: str, seconds: float, errno: str | None) -> None:
        """One call answered: errno, the errno's name when it failed."""
        self.count[name] += 1
        if errno is not None:
            self.errors[name] += 1
            self.errnos.setdefault(name, Counter())[errno] += 1
        counts = self.buckets.get(name)
        if counts is None:
            counts = self.buckets[name] = [0] * len(BUCKETS_S)
        for i, bound in enumerate(BUCKETS_S):
            if seconds <= bound:
                counts[i] += 1
                break
        self.total_s[name] += seconds
        ring = self.latency.get(name)
        if ring is None:
            ring = self.latency[name] = deque(maxlen=RING)
        ring.append(seconds)

    def drop(self, why: str) -> None:
        self.dropped[why] += 1

    def snapshot(self) -> dict:
        calls = {}
        for name, n in sorted(self.count.items()):
            samples = sorted(self.latency.get(name, ()))
            cumulative, running = [], 0
            for c in self.buckets.get(name, ()):
                running += c
                cumulative.append(running)
            calls[name] = {"count": n, "errors": self.errors[name],
                           **{f"p{q}_us": _percentile(samples, q) for q in (50, 90, 99)},
                           "errnos": dict(self.errnos.get(name, {})),
                           "buckets": cumulative, "sum_s": round(self.total_s[name], 6)}
        return {"syscalls": calls, "dropped": dict(self.dropped),
                "latency_buckets_s": list(BUCKETS_S)}


def _percentile(samples: list[float], q: int) -> float | None:
    if not samples:
        return None
    i = min(len(samples) - 1, int(round(q / 100 * (len(samples) - 1))))
    return round(samples[i] * 1e6, 1)
