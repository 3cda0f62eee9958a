"""A kernel of a benchmark's own: booted on a home under /tmp (ipc:// paths must be
short), waited for until every driver is ready, restarted on the same home, and
stopped with everything it left, by pid (never by name).

Used by bench/fuzz.py, bench/load.py, bench/syscall_latency.py, bench/chaos.py,
and by the tests (tests/conftest.py's Booted is one).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import userland  # noqa: E402
from syscalls import Home, Keyring, write_credential  # noqa: E402
from syscalls.client import stop_kernel  # noqa: E402


def toml_value(v: Any) -> str:
    """v as a TOML value: a bool, a string, a number, a list, or an inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}"
                               for k, x in v.items()) + "}"
    return repr(v)


class BenchKernel:
    """A real kernel on its own home; stop() ends it and what it left, and removes
    the home unless it was given."""

    def __init__(self, config: dict[str, Any] | None = None, timeout: float = 30.0,
                 prefix: str = "llmos-bench-", root: Path | None = None,
                 listen: str | None = None) -> None:
        self.listen = listen  # HOST:PORT of a CURVE TCP endpoint, if wanted
        self.owns_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = Home.resolve(self.root)
        if config:
            (self.root / "config.toml").write_text(
                "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
        self.log = open(self.root / "boot.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.boot(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def boot(self, timeout: float = 30.0) -> float:
        """Start a kernel on the home and wait until every driver is ready; the
        seconds it took."""
        t0 = time.monotonic()
        env = dict(os.environ, LLMOS_HOME=str(self.root), PYTHONPATH=str(ROOT))
        listen = ["--listen", self.listen] if self.listen else []
        self.proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home",
                                      str(self.root), *listen], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(remove=False)
            raise
        return time.monotonic() - t0

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the kernel exited: {self.boot_log()}")
            if self.home.secretfile.exists() and self.drivers_ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the kernel was not ready in {timeout}s: {self.boot_log()}")

    def drivers_ready(self) -> bool:
        try:
            with userland.connect(self.root, uid=0, heartbeat=False, timeout=5) as osh:
                return all(d["state"] == "ready" for d in osh.sysinfo()["drivers"])
        except userland.SyscallError:
            return False

    @property
    def endpoint(self) -> str:
        """The TCP endpoint the kernel listens on (with listen=)."""
        return (self.root / "run" / "endpoint").read_text().strip()

    def credential(self, kind: str, name: str, uid: int | None = None,
                   endpoint: str | None = None) -> Path:
        """A new key of a node or client, registered; its credential file's path."""
        path = self.root / f"{name}.{kind}.json"
        write_credential(path, Keyring(self.root).issue(kind, name, endpoint or self.endpoint,
                                                        uid))
        return path

    def boot_log(self) -> str:
        return (self.root / "boot.log").read_text(errors="replace")[-4000:]

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None:
            stop_kernel(self.proc.pid)
            self.proc.wait()  # ours to reap
        if remove:
            self.log.close()
            if self.owns_root:
                shutil.rmtree(self.root, ignore_errors=True)
            from drivers.tensorfs import shm_prefix, sweep_segments
            sweep_segments(shm_prefix(self.root))

    def __enter__(self) -> "BenchKernel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class NodeAgent:
    """A node agent (python -m kernel.agent) of its own home, joined to a kernel that
    listens on TCP with a node key issued for it; stop() ends it by pid."""

    def __init__(self, head: BenchKernel, name: str, sim_gpus: str = "2x8GiB",
                 token: Path | None = None, timeout: float = 20.0) -> None:
        self.head, self.name = head, name
        self.token = token or head.credential("node", name)
        self.root = head.root / "nodes" / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self.root / "agent.json"
        self.state.unlink(missing_ok=True)  # an earlier agent's
        self.log = open(self.root / "agent.log", "ab")
        env = dict(os.environ, LLMOS_HOME=str(self.root), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel.agent", "--token", str(self.token), "--home",
             str(self.root), "--sim-gpus", sim_gpus, "--state", str(self.state)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if timeout:
            self.wait_joined(timeout)

    def joined(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None

    def wait_joined(self, timeout: float = 20.0, epoch: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited: {self.agent_log()}")
            j = self.joined()
            if j is not None and j["epoch"] >= epoch:
                return j
            time.sleep(0.05)
        raise RuntimeError(f"node {self.name} did not join in {timeout}s: {self.agent_log()}")

    def agent_log(self) -> str:
        return (self.root / "agent.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "NodeAgent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
