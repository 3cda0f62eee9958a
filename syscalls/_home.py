"""LLMOS_HOME: where one llmos instance keeps its state on disk, and its settings.

    config.toml         optional settings (Config below: every one, its type, its default)
    kernel.state        what outlives a boot: the next pid (pids are never reused)
    run/                kernel.sock, drivers.sock, kernel.pid, kernel.lock, secret
    log/                kernel.log, drivers/<name>.log, proc/<pid>.log
    tensors/            the tensor store (drivers/tensorfs)
    devices/            the GPU allocation journal (drivers/devices)

Shared by the kernel, drivers and userland so they agree on every path. The
settings are typed once, in _config.py: Home.config() checks config.toml and
returns a Config whose sizes are bytes and whose quotas map uids to bytes, so no
reader parses a setting again. (That module, and tomllib, load only when a
setting is read: an llmos command needs the paths, not the settings.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._config import Config

# ipc:// paths live in sun_path, 108 bytes on Linux.
_MAX_SOCKET_PATH = 100


def default_home() -> Path:
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos")


class Home:
    """One LLMOS_HOME: every path in it."""

    __slots__ = ("root",)

    def __init__(self, root: Path) -> None:
        self.root = root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Home) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __repr__(self) -> str:
        return f"Home({str(self.root)!r})"

    @classmethod
    def resolve(cls, root: str | os.PathLike | None = None) -> "Home":
        return cls(Path(root).expanduser().absolute() if root else default_home().absolute())

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "log"

    def socket(self, name: str) -> str:
        path = self.run / f"{name}.sock"
        if len(str(path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"LLMOS_HOME {self.root} is too deep: the socket path "
                             f"{path} is over {_MAX_SOCKET_PATH} characters")
        return f"ipc://{path}"

    @property
    def kernel_endpoint(self) -> str:
        return self.socket("kernel")

    @property
    def driver_endpoint(self) -> str:
        return self.socket("drivers")

    @property
    def pidfile(self) -> Path:
        return self.run / "kernel.pid"

    @property
    def lockfile(self) -> Path:
        return self.run / "kernel.lock"

    @property
    def secretfile(self) -> Path:
        return self.run / "secret"

    @property
    def statefile(self) -> Path:
        return self.root / "kernel.state"

    def proc_log(self, pid: int) -> Path:
        """Where a spawned process's stdout and stderr go."""
        return self.log / "proc" / f"{pid}.log"

    def driver_log(self, name: str) -> Path:
        return self.log / "drivers" / f"{name}.log"

    @property
    def kernel_log(self) -> Path:
        return self.log / "kernel.log"

    def config(self) -> "Config":
        """config.toml's settings, checked (ValueError naming the file), with the
        defaults for the rest."""
        import tomllib

        from ._config import Config
        path = self.root / "config.toml"
        if not path.exists():
            return Config()
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
        return Config.load(values, str(path))

    def kernel_pid(self) -> int | None:
        """The pid in run/kernel.pid if that process is alive, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid
