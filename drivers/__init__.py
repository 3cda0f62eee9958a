"""llmos drivers: one package per driver, all on the shared loop in _loop.

A driver never imports the kernel or another driver; it talks only through the
ABI in syscalls/. A driver that needs syscalls of its own (the executor reads
models from tensorfs) uses the client library there, syscalls.client, as a MINIX
driver uses libc; never userland.
"""
from ._loop import DEFERRED, DriverLoop, Request, prepare_driver, run_driver

__all__ = ["DEFERRED", "DriverLoop", "Request", "prepare_driver", "run_driver"]
