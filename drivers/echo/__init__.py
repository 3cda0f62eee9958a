"""The echo driver: the smallest real driver, proving the routing path.

echo returns its bytes through the driver (the benchmark's driver-routed call),
ticks streams partial replies, and sleep answers later without blocking the loop
(a parked call, for fault tests that kill a driver mid-call).
"""
from __future__ import annotations

import time

from drivers import DEFERRED, Request, Service


class Echo(Service):
    name = "echo"
    serves = ("echo", "ticks", "sleep")

    def echo(self, req: Request, data: bytes) -> bytes:
        return data

    def ticks(self, req: Request, count: int, interval: float) -> object:
        def tick(i: int) -> None:
            if i == count:
                req.reply(count)
                return
            req.partial(i)
            self.loop.call_later(interval, lambda: tick(i + 1))

        tick(0)
        return DEFERRED

    def sleep(self, req: Request, seconds: float) -> object:
        t0 = time.monotonic()
        self.loop.call_later(seconds, lambda: req.reply(round(time.monotonic() - t0, 6)))
        return DEFERRED
