"""The settings of one llmos instance (config.toml in its LLMOS_HOME), typed once.

Config.load() checks every value against its kind and converts it: sizes to
bytes, quotas to {uid: bytes}, lists to tuples; so the kernel and the drivers
read typed attributes and never parse a setting again. docs/architecture.md
shows the file; Config.describe() lists every setting with its default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ._units import parse_sim_spec, parse_size


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _convert(key: str, kind: str, value: Any) -> Any:
    """value checked against kind and converted (sizes to bytes, quotas to {uid: bytes});
    ValueError naming key."""
    def wrong(want: str) -> ValueError:
        return ValueError(f"{key} must be {want}, not {value!r}")

    number = type(value) in (int, float)
    if kind in ("int", "uid", "count0"):
        if type(value) is not int:
            raise wrong("int")
        if kind == "int" and value <= 0:
            raise wrong("> 0")
        if kind != "int" and value < 0:
            raise wrong(">= 0")
        return value
    if kind == "float":
        if not number:
            raise wrong("float")
        if not value > 0:
            raise wrong("> 0")
        return float(value)
    if kind in ("size", "size0"):
        if kind == "size0" and value in (0, "0"):
            return 0
        try:
            return parse_size(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    if kind == "quota":
        if not isinstance(value, Mapping):
            raise wrong("a table of uid = size")
        out = {}
        for uid, size in value.items():
            if not (isinstance(uid, str) and uid.isascii() and uid.isdigit()):
                raise ValueError(f"{key}: {uid!r} is not a uid")
            try:
                out[int(uid)] = parse_size(size)
            except ValueError as e:
                raise ValueError(f"{key}[{uid!r}]: {e}") from None
        return MappingProxyType(out)
    if kind == "list[str]":
        if type(value) not in (list, tuple) or not all(type(v) is str for v in value):
            raise wrong("list of str")
        return tuple(value)
    if kind == "sim":
        try:
            parse_sim_spec(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        return value
    if kind.startswith("choice:"):
        names = kind[len("choice:"):].split("|")
        if value not in names:
            raise wrong(" or ".join(f'"{n}"' for n in names))
        return value
    if type(value) is not str:
        raise wrong("str")
    return value


def _setting(default: Any, doc: str, kind: str) -> Any:
    """A Config field: its default as config.toml would spell it, what it means, and
    its kind (how a value is checked and converted):
      int, float   > 0;  count0: an int >= 0 (0: automatic);  uid: an int >= 0
      size         bytes: an int or "2GiB";  size0: the same, or "0" / 0 for none
      quota        a table of uid = size;  str, list[str];  sim: COUNTxSIZE;
      choice:a|b   one of the names"""
    if isinstance(default, (dict, list)):
        frozen = tuple(default) if isinstance(default, list) else MappingProxyType(default)
        return field(default_factory=lambda: frozen, metadata={"doc": doc, "kind": kind,
                                                                "spelt": default})
    return field(default=_convert("default", kind, default), metadata={
        "doc": doc, "kind": kind, "spelt": default})


@dataclass(frozen=True)
class Config:
    """Every setting of config.toml, typed. docs/architecture.md shows the file."""

    default_uid: int = _setting(1000, "uid of a process attaching from the host", "uid")
    drivers: tuple[str, ...] = _setting(["echo", "devices", "tensorfs", "executor"],
                                        "driver packages to start", "list[str]")
    driver_heartbeat_s: float = _setting(1.0, "kernel <-> driver heartbeat period", "float")
    driver_liveness: int = _setting(3, "missed heartbeats before a driver is dead", "int")
    client_heartbeat_s: float = _setting(0.5, "userland heartbeat period", "float")
    client_liveness: int = _setting(3, "missed heartbeats before a process is lost", "int")
    driver_wait_s: float = _setting(10.0, "how long a request waits for a restarting "
                                    "driver", "float")
    max_inflight_per_process: int = _setting(256, "calls in flight to drivers, and waits "
                                             "parked, per process (EAGAIN above)", "int")
    max_processes: int = _setting(4096, "processes in the table (EAGAIN above)", "int")
    ended_kept: int = _setting(256, "ended processes ps -a and jobs -a remember", "count0")
    gpus: str = _setting("auto", "auto: real GPUs if NVML finds any, else simulated; sim: "
                         "simulated only", "choice:auto|sim")
    sim_gpus: str = _setting("2x16GiB", "simulated GPUs when there is no real one: "
                             "COUNTxSIZE", "sim")
    gpu_quota: Mapping[int, int] = _setting({}, "uid = most GPU bytes it may hold", "quota")
    gpu_max_bypass: int = _setting(4, "times a queued request may be overtaken "
                                   "(docs/devices.md)", "count0")
    tensor_max_size: int = _setting("8GiB", "largest tensor (EFBIG above)", "size")
    tensor_quota: Mapping[int, int] = _setting({}, "uid = most tensor bytes it may own",
                                               "quota")
    tensor_cache: int = _setting("1GiB", "memory budget of the tensorfs read cache (0: "
                                 "none)", "size0")
    tensor_shm_threshold: int = _setting("1MiB", "tensors from this size move through "
                                         "/dev/shm", "size")
    tensor_max_open: int = _setting(1024, "open tensor descriptors per process (EMFILE "
                                    "above)", "int")
    infer_max_batch: int = _setting(16, "sequences decoded together (1: batching off)",
                                    "int")
    infer_window_ms: float = _setting(2.0, "an idle executor waits this long to batch "
                                      "arrivals", "float")
    infer_max_tokens: int = _setting(4096, "largest max_tokens of one infer (EINVAL "
                                     "above)", "int")
    infer_max_prompt: int = _setting(65536, "longest prompt in bytes (EINVAL above)", "int")
    model_cache: int = _setting("2GiB", "memory budget of the executor's loaded models",
                                "size")
    node_name: str = _setting("head", "this kernel's own node, as nodes and ps name it",
                              "str")
    node_heartbeat_s: float = _setting(1.0, "node agent heartbeat period", "float")
    node_timeout_s: float = _setting(5.0, "silence after which a node is lost: its "
                                     "processes end (docs/scaling.md)", "float")
    placement: str = _setting("local", "where spawn runs a program when no node is named: "
                              "local (this node), spread (the node with the fewest "
                              "processes), pack (fill a node to its CPUs first)",
                              "choice:local|spread|pack")
    infer_threads: int = _setting(0, "torch threads of the executor; 0: half the cores",
                                  "count0")

    @classmethod
    def load(cls, values: Mapping[str, Any], source: str = "config.toml") -> "Config":
        """A Config from config.toml's values; ValueError naming source and the key
        for an unknown key, a wrong type or a value out of range."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"{source}: unknown settings {sorted(unknown)}")
        typed = {}
        for key, value in values.items():
            try:
                typed[key] = _convert(key, fields[key].metadata["kind"], value)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        return cls(**typed)

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (bytes as ints, quotas as dicts)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default as config.toml spells it, meaning) of every setting."""
        return [(f.name, f.metadata["spelt"], f.metadata["doc"])
                for f in dataclasses.fields(cls)]


DEFAULTS: dict[str, Any] = {name: spelt for name, spelt, _ in Config.describe()}


