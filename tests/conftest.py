"""Fixtures that boot a real llmos kernel (and its real drivers) in a temporary
LLMOS_HOME, and always shut it down: SIGTERM, then SIGKILL to every process it
left, found by pid (psutil's children of the kernel), never by name.

Hypothesis runs under a settings profile: "ci" (the default) is derandomized, so
the suite tests the same examples on every run and a failure in CI reproduces;
"explore" (make explore, HYPOTHESIS_PROFILE=explore) draws new examples each run,
examples(n) times LLMOS_EXPLORE_SCALE (5) of them, keeping failures in .hypothesis/."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from hypothesis import settings

import userland
from syscalls import Home
from syscalls.client._proc import stop_kernel

ROOT = Path(__file__).resolve().parent.parent

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
EXPLORE_SCALE = int(os.environ.get("LLMOS_EXPLORE_SCALE", "5")) if PROFILE == "explore" else 1


def examples(n: int) -> int:
    """n examples in CI; more when exploring (LLMOS_EXPLORE_SCALE times n)."""
    return n * EXPLORE_SCALE


class Booted:
    """A kernel process running on its own LLMOS_HOME."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        # short path: ipc:// socket paths must fit in sun_path
        self.root = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
        self.home = Home.resolve(self.root)
        if config:
            lines = [f"{k} = {_toml(v)}" for k, v in config.items()]
            (self.root / "config.toml").write_text("\n".join(lines) + "\n")
        env = dict(os.environ, LLMOS_HOME=str(self.root), PYTHONPATH=str(ROOT))
        self.log = open(self.root / "boot.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(self.root)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernel exited: {self.boot_log()}")
            if self.home.secretfile.exists() and self.drivers_ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"kernel not ready in {timeout}s: {self.boot_log()}")

    def drivers_ready(self) -> bool:
        try:
            with userland.connect(self.root, uid=0, heartbeat=False) as osh:
                return all(d["state"] == "ready" for d in osh.sysinfo()["drivers"])
        except userland.SyscallError:
            return False

    def connect(self, uid: int | None = None, **kw: Any) -> userland.Llmos:
        return userland.connect(self.root, uid=uid, **kw)

    def boot_log(self) -> str:
        return (self.root / "boot.log").read_text(errors="replace")[-4000:]

    def driver_pid(self, name: str = "echo") -> int:
        with self.connect(uid=0) as osh:
            d = next(d for d in osh.sysinfo()["drivers"] if d["name"] == name)
        return d["os_pid"]

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def __enter__(self) -> "Booted":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the kernel (by pid), remove the home, and the home's /dev/shm
        segments: a tensorfs driver SIGKILLed by a test leaves its cache behind."""
        from drivers.tensorfs import shm_prefix, sweep_segments
        stop_kernel(self.pid)
        self.proc.wait()  # ours to reap
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        sweep_segments(shm_prefix(self.root))


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{_toml(str(k))} = {_toml(x)}" for k, x in v.items()) + "}"
    return repr(v)


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


def wait_until(cond, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()
