"""Finding the machine's devices: CPUs and memory with psutil, NVIDIA GPUs with
NVML (the nvidia-ml-py package, imported only here and only when asked). Any
NVML failure, or its absence, means "no real GPUs"; the driver then offers
simulated ones, described by a spec such as "2x16GiB"."""
from __future__ import annotations

import logging
import os
from typing import Any

import psutil

from syscalls import parse_sim_spec

from ._alloc import Gpu

log = logging.getLogger("llmos.devices")

def simulated_gpus(spec: str) -> list[Gpu]:
    count, size = parse_sim_spec(spec)
    return [Gpu(f"sim{i}", i, "llmos virtual GPU", size, True) for i in range(count)]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_gpus() -> list[Gpu]:
    """The NVIDIA GPUs NVML sees, keyed by UUID; [] when there is no NVML or no GPU."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # no package, no library, no driver: no real GPUs
        log.info("no NVML (%s: %s): no real GPUs", type(e).__name__, e)
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(Gpu(_text(pynvml.nvmlDeviceGetUUID(h)), i,
                           _text(pynvml.nvmlDeviceGetName(h)), int(mem.total), False, h))
    except Exception as e:
        log.warning("NVML failed while listing GPUs (%s: %s): no real GPUs",
                    type(e).__name__, e)
        return []
    return out


def live_stats(gpu: Gpu) -> dict[str, Any]:
    """What a real GPU reports now: used memory, utilization, temperature (each
    where the device reports it)."""
    if gpu.simulated or gpu.handle is None:
        return {}
    import pynvml
    out: dict[str, Any] = {}
    for key, fn in (("used", lambda h: int(pynvml.nvmlDeviceGetMemoryInfo(h).used)),
                    ("utilization", lambda h: int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)),
                    ("temperature", lambda h: int(pynvml.nvmlDeviceGetTemperature(
                        h, pynvml.NVML_TEMPERATURE_GPU)))):
        try:
            out[key] = fn(gpu.handle)
        except Exception:
            out[key] = None
    return out


def cpus() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"logical": psutil.cpu_count(logical=True),
            "physical": psutil.cpu_count(logical=False),
            "percent": psutil.cpu_percent(interval=None), "load": load}


def memory() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "available": int(vm.available), "percent": vm.percent}
