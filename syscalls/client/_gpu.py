"""Using a GPU allocation: the environment a program runs under, and the limits it
applies to itself.

    alloc = osh.alloc_gpu("8GiB")
    child = osh.spawn(["python", "train.py"], env=userland.gpu_env(alloc))
    # in train.py, after import torch:
    userland.apply_gpu_limits()

The executor and training jobs (later drivers) start their work the same way.
On a simulated GPU CUDA_VISIBLE_DEVICES is empty, so torch sees no GPU and the
work runs on the CPU; the allocation's bytes are still exported
(LLMOS_GPU_MEM_BYTES) as the bound the work must keep to.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping


def gpu_env(alloc: Mapping[str, Any]) -> dict[str, str]:
    """The environment variables that bind a program to an allocation that
    alloc_gpu returned; pass them as spawn(env=...)."""
    caps = [int(c) for c in alloc.get("capacity") or []]
    each = int(alloc["bytes_each"])
    fraction = min((each / c for c in caps if c > 0), default=1.0)
    simulated = bool(alloc.get("simulated"))
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "" if simulated else ",".join(alloc["devices"]),
        "LLMOS_GPU_ALLOC": str(alloc["id"]),
        "LLMOS_GPU_MEM_BYTES": str(each),
        "LLMOS_GPU_MEM_FRACTION": f"{min(fraction, 1.0):.6f}",
        "LLMOS_GPU_SIMULATED": "1" if simulated else "0",
    }


def apply_gpu_limits() -> dict[str, Any]:
    """In a program started with gpu_env(): bound its memory to the allocation.

    On a real GPU: cap torch's CUDA memory on each visible device to the
    allocation's fraction (torch.cuda.set_per_process_memory_fraction).
    On a simulated GPU the work runs on the CPU, so the bound is on the process's
    own memory: RLIMIT_DATA is set to what it uses now plus the allocation's bytes,
    and an allocation past that fails (MemoryError; torch's "can't allocate memory").
    Does nothing without an allocation. Returns what it did."""
    if "LLMOS_GPU_ALLOC" not in os.environ:
        return {"applied": False, "why": "no allocation in the environment"}
    limit = int(os.environ["LLMOS_GPU_MEM_BYTES"])
    if os.environ.get("LLMOS_GPU_SIMULATED") == "1":
        return _limit_data(limit)
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {"applied": False, "why": "no CUDA", "bytes": limit}
    fraction = float(os.environ.get("LLMOS_GPU_MEM_FRACTION", "1"))
    n = torch.cuda.device_count()
    for i in range(n):
        torch.cuda.set_per_process_memory_fraction(fraction, i)
    return {"applied": True, "devices": n, "fraction": fraction}


def _limit_data(extra: int) -> dict[str, Any]:
    """RLIMIT_DATA (heap and private mappings, Linux >= 4.7) = now + extra bytes."""
    import resource
    with open("/proc/self/status") as f:
        vm_data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = vm_data + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return {"applied": True, "simulated": True, "rlimit_data": limit, "bytes": extra}
