"""The echo driver: the smallest real driver, proving the routing path.

echo returns its bytes through the driver (the benchmark's driver-routed call),
ticks streams partial replies, and sleep answers later without blocking the loop
(a parked call, for fault tests that kill a driver mid-call).
"""
from __future__ import annotations

import time

from drivers import DEFERRED, Request, run_driver


def echo(req: Request, data: bytes) -> bytes:
    return data


def ticks(req: Request, count: int, interval: float) -> object:
    def tick(i: int) -> None:
        if i == count:
            req.reply(count)
            return
        req.partial(i)
        req.loop.call_later(interval, lambda: tick(i + 1))

    tick(0)
    return DEFERRED


def sleep(req: Request, seconds: float) -> object:
    t0 = time.monotonic()
    req.loop.call_later(seconds, lambda: req.reply(round(time.monotonic() - t0, 6)))
    return DEFERRED


def main() -> None:
    run_driver("echo", {"echo": echo, "ticks": ticks, "sleep": sleep})
