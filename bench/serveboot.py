"""`llmos serve` for a benchmark or a test: started on a kernel's home with --port 0,
its URL read from its first line, stopped by pid (SIGTERM, then SIGKILL).

Used by bench/serve_bench.py, bench/serve_load.py and tests/test_serve*.py.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class ServeProcess:
    def __init__(self, root: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.log = open(self.root / "serve.out", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userland.serve", "--home", str(root), "--port", "0",
             *args], env={**os.environ, "LLMOS_HOME": str(root), **(env or {})},
            stdout=subprocess.PIPE, stderr=self.log)
        self.url = self._first_line(timeout).split()[4]

    def _first_line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(0.2):
                line = self.proc.stdout.readline().decode()
                if line.startswith("llmos serve: listening on"):
                    return line
                if not line:
                    break
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"serve did not start: {self.tail()}")

    def deployment(self, name: str) -> dict[str, Any]:
        """What serve last said of deployment name ({} before it knows it)."""
        try:
            live = json.loads((self.root / "run" / "serve.json").read_text())
        except (OSError, ValueError):
            return {}
        return next((d for d in live["deployments"] if d["name"] == name), {})

    def wait_running(self, name: str, replicas: int = 1, timeout: float = 120.0) -> None:
        """Until deployment name has this many replicas ready (RuntimeError after timeout)."""
        deadline = time.monotonic() + timeout
        while self.deployment(name).get("running", 0) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"deployment {name}: {replicas} replicas not ready in "
                                   f"{timeout:g} s: {self.deployment(name)}")
            time.sleep(0.2)

    def tail(self) -> str:
        try:
            return (self.root / "serve.out").read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
