"""llmos drivers: one package per driver, all on the shared loop in _loop.

A driver never imports the kernel or another driver; it talks only through the
ABI in syscalls/. A driver that needs syscalls of its own (the executor reads
models from tensorfs) uses the userland library, as a MINIX driver uses libc;
never the CLI.
"""
from ._loop import DEFERRED, DriverLoop, Request, prepare_driver, run_driver

__all__ = ["DEFERRED", "DriverLoop", "Request", "prepare_driver", "run_driver"]
