"""llmos drivers: one package per driver, all on the shared loop in _loop.

A driver never imports the kernel, userland or another driver; it talks only
through the ABI in syscalls/.
"""
from ._loop import DEFERRED, DriverLoop, Request, run_driver

__all__ = ["DEFERRED", "DriverLoop", "Request", "run_driver"]
