"""Per-syscall counters and latency percentiles, and counters of dropped messages.

Latencies are kept in a bounded ring per syscall (the last RING samples), so
memory stays flat however long the kernel runs.
"""
from __future__ import annotations

from collections import Counter, deque

RING = 4096


class SyscallStats:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, deque[float]] = {}
        self.dropped: Counter[str] = Counter()

    def record(self, name: str, seconds: float, failed: bool) -> None:
        self.count[name] += 1
        if failed:
            self.errors[name] += 1
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
            calls[name] = {"count": n, "errors": self.errors[name],
                           **{f"p{q}_us": _percentile(samples, q) for q in (50, 90, 99)}}
        return {"syscalls": calls, "dropped": dict(self.dropped)}


def _percentile(samples: list[float], q: int) -> float | None:
    if not samples:
        return None
    i = min(len(samples) - 1, int(round(q / 100 * (len(samples) - 1))))
    return round(samples[i] * 1e6, 1)
