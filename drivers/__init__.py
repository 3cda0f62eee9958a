"""llmos drivers: one package per driver, all on the shared loop in _loop.

A driver is a Service subclass run by run_driver() from its package's __main__.
A driver never imports the kernel or another driver; it talks only through the
ABI in syscalls/. A driver that needs syscalls of its own (the executor reads
models from tensorfs) uses the client library there, syscalls.client, as a MINIX
driver uses libc; never userland.
"""
from ._loop import DEFERRED, DriverLoop, Request, Service, run_driver

__all__ = ["DEFERRED", "DriverLoop", "Request", "Service", "run_driver"]
