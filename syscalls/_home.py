"""LLMOS_HOME: where one llmos instance keeps its state on disk.

    config.toml         optional settings (see DEFAULTS)
    run/                kernel.sock, drivers.sock, kernel.pid, kernel.lock, secret
    log/                kernel.log, drivers/<name>.log, proc/<pid>.log

Shared by the kernel, drivers and userland so they agree on every path.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "default_uid": 1000,           # uid of a process attaching from the host
    "drivers": ["echo", "devices", "tensorfs", "executor"],  # driver packages to start
    "driver_heartbeat_s": 1.0,     # kernel <-> driver heartbeat period
    "driver_liveness": 3,          # missed heartbeats before a driver is dead
    "client_heartbeat_s": 0.5,     # userland heartbeat period
    "client_liveness": 3,          # missed heartbeats before a process is lost
    "driver_wait_s": 10.0,         # how long a request waits for a restarting driver
    "max_inflight_per_process": 256,
    "max_processes": 4096,
    "gpus": "auto",                # auto: real GPUs if NVML finds any, else simulated; "sim"
    "sim_gpus": "2x16GiB",         # simulated GPUs when there is no real one: NxSIZE
    "gpu_quota": {},               # uid (as a string) -> most GPU bytes it may hold
    "gpu_max_bypass": 4,           # times a queued request may be overtaken (docs/devices.md)
    "tensor_max_size": "8GiB",     # largest tensor (EFBIG); docs/tensorfs.md
    "tensor_quota": {},            # uid (as a string) -> most tensor bytes it may own
    "tensor_cache": "1GiB",        # memory budget of the tensorfs read cache ("0": none)
    "tensor_shm_threshold": "1MiB",  # tensors from this size move through /dev/shm
    "tensor_max_open": 1024,       # open tensor descriptors per process (EMFILE above)
    "infer_max_batch": 16,         # sequences decoded together (1: batching off)
    "infer_window_ms": 2.0,        # an idle executor waits this long to batch arrivals
    "infer_max_tokens": 4096,      # largest max_tokens of one infer (EINVAL above)
    "infer_max_prompt": 65536,     # longest prompt in bytes (EINVAL above)
    "model_cache": "2GiB",         # memory budget of the executor's loaded models
    "infer_threads": 0,            # torch threads of the executor; 0: half the cores
}

ZERO_OK = ("infer_threads",)  # numbers where 0 means "automatic"

# ipc:// paths live in sun_path, 108 bytes on Linux.
_MAX_SOCKET_PATH = 100


def _check_setting(path: Path, key: str, value: Any) -> None:
    """A setting must have its default's type; numbers must be positive (uids: >= 0)."""
    default = DEFAULTS[key]
    kind = type(default)
    ok = (type(value) is kind or (kind is float and type(value) is int))
    if ok and kind is list:
        ok = all(type(v) is type(default[0]) for v in value) if default else True
    if not ok:
        raise ValueError(f"{path}: {key} must be {kind.__name__}, not {value!r}")
    zero_ok = key.endswith("uid") or key in ZERO_OK
    if kind in (int, float) and (value < 0 if zero_ok else value <= 0):
        raise ValueError(f"{path}: {key} must be {'>= 0' if zero_ok else '> 0'}, "
                         f"not {value!r}")


def default_home() -> Path:
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos")


@dataclass(frozen=True)
class Home:
    root: Path

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

    def config(self) -> dict[str, Any]:
        cfg = dict(DEFAULTS)
        path = self.root / "config.toml"
        if path.exists():
            try:
                with open(path, "rb") as f:
                    user = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: {e}") from None
            unknown = set(user) - set(DEFAULTS)
            if unknown:
                raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
            for key, value in user.items():
                _check_setting(path, key, value)
            cfg.update(user)
        return cfg

    def kernel_pid(self) -> int | None:
        """The pid in run/kernel.pid if that process is alive, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid
