"""Whole-tensor conveniences on the handle: save_tensor and load_tensor.

They are built on the tensorfs syscalls (open_tensor, read_tensor, write_tensor,
close_tensor). Tensors of tensor_shm_threshold bytes and more travel through a
/dev/shm segment the driver names: the library maps the file with mmap (never
multiprocessing.shared_memory, whose resource tracker unlinks segments it did
not create) and unlinks the name at once, so nothing is left if this process
dies. load_tensor returns a torch tensor when torch can be imported, else a
numpy array (bfloat16 as ml_dtypes.bfloat16 when installed, else raw uint16).
"""
from __future__ import annotations

import mmap
import os
import sys
from typing import Any

import numpy as np

_NP = {"float32": "<f4", "float16": "<f2", "int8": "i1", "int16": "<i2", "int32": "<i4",
       "int64": "<i8", "uint8": "u1", "bool": "?"}
_FROM_NP = {np.dtype(v).str: k for k, v in _NP.items()}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def as_raw(tensor: Any) -> tuple[str, list[int], np.ndarray]:
    """(dtype name, shape, a C-contiguous numpy array of the bytes) of a torch
    tensor or anything numpy accepts."""
    torch = sys.modules.get("torch")  # a torch tensor means torch is imported already
    if torch is not None and isinstance(tensor, torch.Tensor):
        t = tensor.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name == "bfloat16":
            return name, list(t.shape), t.view(torch.int16).numpy().view("<u2")
        arr = t.numpy()
    else:
        arr = np.asarray(tensor)
        if arr.dtype.name == "bfloat16":  # ml_dtypes
            return "bfloat16", list(arr.shape), np.ascontiguousarray(arr).view("<u2")
    arr = np.ascontiguousarray(arr)
    name = _FROM_NP.get(arr.dtype.newbyteorder("<").str if arr.dtype.byteorder != "|"
                        else arr.dtype.str)
    if name is None:
        raise TypeError(f"tensorfs stores {', '.join([*_NP, 'bfloat16'])}; not {arr.dtype}")
    return name, list(arr.shape), arr.astype(_NP[name], copy=False)


def from_raw(buf: Any, dtype: str, shape: list[int]) -> Any:
    """A tensor over buf's bytes (no copy): torch if importable, else numpy."""
    if dtype == "bfloat16":
        arr = np.frombuffer(buf, dtype="<u2").reshape(shape)
        torch = _torch()
        if torch is not None:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        try:
            import ml_dtypes
            return arr.view(ml_dtypes.bfloat16)
        except ImportError:
            return arr
    arr = np.frombuffer(buf, dtype=_NP[dtype]).reshape(shape)
    torch = _torch()
    return torch.from_numpy(arr) if torch is not None else arr


def map_segment(path: str, size: int, writable: bool) -> mmap.mmap:
    """Map a driver's segment. A read's segment is handed over: its name is unlinked
    here and the pages live while mapped; a private (copy-on-write) mapping, so the
    caller may write to its tensor without touching the driver's cache. A write's
    staging segment stays the driver's (it reuses it for this process's next write
    and removes it when the process ends)."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        if writable:
            return mmap.mmap(fd, max(size, 1))
        return mmap.mmap(fd, max(size, 1), access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
        if not writable:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class TensorMethods:
    """Mixed into Llmos; uses its generated syscall methods."""

    def save_tensor(self, path: str, tensor: Any, perm: int = 0o644,
                    exclusive: bool = False) -> dict[str, Any]:
        """Write a whole tensor to path, durably: when this returns, it is on disk.
        exclusive: fail with EEXIST if path exists."""
        dtype, shape, arr = as_raw(tensor)
        info = self.open_tensor(path, "x" if exclusive else "w", dtype, shape,  # type: ignore[attr-defined]
                                perm, True, True)
        fd = info["fd"]
        try:
            if info["shm"]:
                mm = self._staging_map(info["shm"], info["size"])
                dst = np.frombuffer(mm, dtype=np.uint8, count=info["size"])
                dst[:] = arr.reshape(-1).view(np.uint8)
                del dst
            elif info["size"]:
                self.write_tensor(fd, memoryview(arr).cast("B"))  # type: ignore[attr-defined]
        except BaseException:
            self.close_tensor(fd, True)  # type: ignore[attr-defined]
            raise
        return self.close_tensor(fd)  # type: ignore[attr-defined]

    def _staging_map(self, path: str, size: int) -> mmap.mmap:
        """The driver hands a process the same staging segment for its next write of
        the same size; keeping the last one mapped saves faulting in its pages again
        (a write fault per page: about 60 ms for 256 MiB, more than the copy)."""
        held = getattr(self, "_staging", None)
        if held is not None and held[0] == path and held[2] == size:
            return held[1]
        self._drop_staging()
        mm = map_segment(path, size, writable=True)
        self._staging = (path, mm, size)
        return mm

    def _drop_staging(self) -> None:
        held = getattr(self, "_staging", None)
        self._staging = None
        if held is not None:
            try:
                held[1].close()
            except BufferError:  # still exported to a view: the GC unmaps it
                pass

    def load_tensor(self, path: str, slice: list[list[int]] | None = None) -> Any:
        """Read a whole tensor (or a slice: [[start, stop], ...] per leading
        dimension) from path."""
        fd = self.open_tensor(path, "r")["fd"]  # type: ignore[attr-defined]
        try:
            r = self.read_tensor(fd, slice, True)  # type: ignore[attr-defined]
        finally:
            self.close_tensor(fd)  # type: ignore[attr-defined]
        if r["shm"]:
            size = int(np.prod(r["shape"], dtype=np.int64)) * (
                2 if r["dtype"] == "bfloat16" else np.dtype(_NP[r["dtype"]]).itemsize)
            buf: Any = map_segment(r["shm"], size, writable=False)
            if size == 0:
                buf = b""
        else:
            buf = bytearray(r["data"])  # writable, as torch.from_numpy wants
        return from_raw(buf, r["dtype"], r["shape"])
