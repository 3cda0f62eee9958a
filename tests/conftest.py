"""Fixtures that boot a real llmos kernel (and its real drivers) in a temporary
LLMOS_HOME, and always shut it down: SIGTERM, then SIGKILL to every process it
left, found by pid (psutil's children of the kernel), never by name.

Hypothesis runs under a settings profile: "ci" (the default) is derandomized, so
the suite tests the same examples on every run and a failure in CI reproduces;
"explore" (make explore, HYPOTHESIS_PROFILE=explore) draws new examples each run,
examples(n) times LLMOS_EXPLORE_SCALE (5) of them, keeping failures in .hypothesis/."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from hypothesis import settings

import userland

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from kernelboot import BenchKernel  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
EXPLORE_SCALE = int(os.environ.get("LLMOS_EXPLORE_SCALE", "5")) if PROFILE == "explore" else 1


def examples(n: int) -> int:
    """n examples in CI; more when exploring (LLMOS_EXPLORE_SCALE times n)."""
    return n * EXPLORE_SCALE


class Booted(BenchKernel):
    """A kernel process running on its own LLMOS_HOME (bench/kernelboot.py's, with
    what the tests ask of it)."""

    def __init__(self, config: dict[str, Any] | None = None, root: Path | None = None,
                 listen: str | None = None) -> None:
        """root: a home prepared beforehand; by default a new one under /tmp. listen:
        HOST:PORT of a CURVE TCP endpoint too."""
        super().__init__(config, timeout=20.0, prefix="llmos-", root=root, listen=listen)

    def reboot(self) -> None:
        """Boot a kernel on the home again, after the test killed the last one."""
        self.boot(20.0)

    def connect(self, uid: int | None = None, **kw: Any) -> userland.Llmos:
        return userland.connect(self.root, uid=uid, **kw)

    def driver_pid(self, name: str = "echo") -> int:
        with self.connect(uid=0) as osh:
            d = next(d for d in osh.sysinfo()["drivers"] if d["name"] == name)
        return d["os_pid"]

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


@pytest.fixture
def booted() -> Iterator[Booted]:
    """A fresh kernel for one test (use it for tests that kill or break things)."""
    with Booted() as b:
        yield b


@pytest.fixture(scope="module")
def shared_kernel() -> Iterator[Booted]:
    """One kernel for a module of tests that leave it as they found it."""
    with Booted() as b:
        yield b


def errno_of(fn: Any, *args: Any, **kw: Any) -> Any:
    """Call fn: None when it succeeds, else the Errno of the SyscallError it raised."""
    try:
        fn(*args, **kw)
    except userland.SyscallError as e:
        return e.errno
    return None


def wait_until(cond, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()
