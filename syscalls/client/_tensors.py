"""Whole-tensor conveniences on the handle: save_tensor and load_tensor.

They are built on the tensorfs syscalls (open_tensor, read_tensor, write_tensor,
close_tensor). Tensors of tensor_shm_threshold bytes and more travel through a
/dev/shm segment the driver names: the library maps the file with mmap (never
multiprocessing.shared_memory, whose resource tracker unlinks segments it did
not create) and unlinks the name at once, so nothing is left if this process
dies. load_tensor returns a torch tensor when torch can be imported, else a
numpy array (bfloat16 as ml_dtypes.bfloat16 when installed, else raw uint16);
load_array always a numpy array. numpy is imported at the first tensor call,
not with the library: a program that makes no tensor call (every llmos command
but put, get and cat) does not pay for it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

from syscalls import Errno, SyscallError

if TYPE_CHECKING:
    import mmap

    import numpy as np

# tensorfs's dtypes as numpy spells them (bfloat16 has no numpy dtype: raw <u2)
NUMPY_DTYPES = {"float32": "<f4", "float16": "<f2", "int8": "i1", "int16": "<i2",
                "int32": "<i4", "int64": "<i8", "uint8": "u1", "bool": "?"}
DTYPES = (*NUMPY_DTYPES, "bfloat16")


def _np() -> Any:
    import numpy
    return numpy


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def floating(tensor: Any) -> bool:
    """Whether tensor holds floating-point data (torch, numpy, or what numpy takes)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tensor, torch.Tensor):
        return bool(tensor.is_floating_point())
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        dtype = _np().asarray(tensor).dtype
    return getattr(dtype, "kind", "") == "f" or getattr(dtype, "name", "") == "bfloat16"


def as_raw(tensor: Any, dtype: str | None = None) -> tuple[str, list[int], np.ndarray]:
    """(dtype name, shape, a C-contiguous numpy array of the bytes) of a torch
    tensor or anything numpy accepts, cast to dtype when given. EINVAL for a dtype
    tensorfs does not store (numpy's default float64, say), naming the way out."""
    np = _np()
    if dtype is not None and dtype not in DTYPES:
        raise SyscallError(Errno.EINVAL, f"dtype {dtype!r}: tensorfs stores "
                           f"{', '.join(DTYPES)}")
    torch = sys.modules.get("torch")  # a torch tensor means torch is imported already
    if torch is not None and isinstance(tensor, torch.Tensor):
        t = tensor.detach().cpu()
        if dtype is not None:
            t = t.to(getattr(torch, dtype))
        t = t.contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name == "bfloat16":
            return name, list(t.shape), t.view(torch.int16).numpy().view("<u2")
        arr = t.numpy()
    else:
        try:
            arr = np.asarray(tensor)
        except (TypeError, ValueError) as e:
            raise SyscallError(Errno.EINVAL, f"not a tensor: {e}") from None
        if dtype == "bfloat16" or (dtype is None and arr.dtype.name == "bfloat16"):
            return "bfloat16", list(arr.shape), _bfloat16_bits(np, arr)
        if dtype is not None:
            arr = arr.astype(NUMPY_DTYPES[dtype], copy=False)
    arr = np.asarray(arr, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    known = {np.dtype(v).str: k for k, v in NUMPY_DTYPES.items()}
    name = known.get(arr.dtype.newbyteorder("<").str if arr.dtype.byteorder != "|"
                     else arr.dtype.str)
    if name is None:
        raise SyscallError(Errno.EINVAL, f"tensorfs stores {', '.join(DTYPES)}; not "
                           f"{arr.dtype}: cast it (dtype=\"float32\", or llmos put "
                           "--dtype float32)")
    return name, list(arr.shape), arr.astype(NUMPY_DTYPES[name], copy=False)


def _bfloat16_bits(np: Any, arr: Any) -> Any:
    """bfloat16's bits (<u2) of an array: ml_dtypes' bfloat16 as it is, anything
    else through float32 (rounded to nearest even, as torch rounds)."""
    if arr.dtype.name == "bfloat16":
        return np.asarray(arr, order="C").view("<u2")
    floats = np.asarray(arr, dtype="<f4", order="C")
    bits = floats.view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    rounded[np.isnan(floats)] = 0x7FC0  # rounding would carry a NaN into infinity
    return rounded


def from_raw(buf: Any, dtype: str, shape: list[int], torch_ok: bool = True) -> Any:
    """A tensor over buf's bytes (no copy): torch if importable (and torch_ok),
    else numpy (bfloat16 then as ml_dtypes' when installed, else its uint16 bits)."""
    np = _np()
    if dtype == "bfloat16":
        arr = np.frombuffer(buf, dtype="<u2").reshape(shape)
        torch = _torch() if torch_ok else None
        if torch is not None:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        try:
            import ml_dtypes
            return arr.view(ml_dtypes.bfloat16)
        except ImportError:
            return arr
    arr = np.frombuffer(buf, dtype=NUMPY_DTYPES[dtype]).reshape(shape)
    torch = _torch() if torch_ok else None
    return torch.from_numpy(arr) if torch is not None else arr


def map_segment(path: str, size: int, writable: bool) -> mmap.mmap:
    """Map a driver's segment. A read's segment is handed over: its name is unlinked
    here and the pages live while mapped; a private (copy-on-write) mapping, so the
    caller may write to its tensor without touching the driver's cache. A write's
    staging segment stays the driver's (it reuses it for this process's next write
    and removes it when the process ends)."""
    import mmap
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


# Bytes copied between two progress calls: a few ms at memcpy speed, longer when
# the source is a file's mapping being read in (llmos put of a .npy or raw file).
PROGRESS_CHUNK = 64 * 2**20
CHANNEL_MIN = 1 << 20  # over TCP, reads from this size come by a data channel

# progress(done_bytes, total_bytes, phase): see save_tensor and load_tensor.
Progress = Callable[[int, int, str], None]


def _copy(dst: np.ndarray, src: np.ndarray, progress: Progress | None) -> None:
    """dst[:] = src (flat uint8 arrays of one size); with progress, PROGRESS_CHUNK
    bytes at a time, each reported as phase "write" (the last at total, also for
    no bytes). Without progress it stays one numpy copy."""
    if progress is None:
        dst[:] = src
        return
    total, start = len(dst), 0
    while True:
        stop = min(start + PROGRESS_CHUNK, total)
        dst[start:stop] = src[start:stop]
        progress(stop, total, "write")
        if stop == total:
            return
        start = stop


STAGING_MAPS = 2  # staging segments kept mapped: the driver keeps 2 per process


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # still exported to a view: the GC unmaps it
        pass


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else _np().dtype(NUMPY_DTYPES[dtype]).itemsize


def _nbytes(r: dict[str, Any]) -> int:
    n = _itemsize(r["dtype"])
    for d in r["shape"]:
        n *= d
    return n


class TensorMethods:
    """Mixed into Llmos; uses its generated syscall methods."""

    _shm = True  # tensors through /dev/shm (not across hosts: Llmos sets it)

    def save_tensor(self, path: str, tensor: Any, perm: int = 0o644,
                    exclusive: bool = False, progress: Progress | None = None,
                    dtype: str | None = None) -> dict[str, Any]:
        """Write a whole tensor to path, durably: when this returns, it is on disk.
        exclusive: fail with EEXIST if path exists. dtype: store it cast to this
        dtype (one of DTYPES); a tensor of a dtype tensorfs does not store (numpy's
        float64) is EINVAL without it.

        progress: called as progress(done, total, phase) with byte counts. phase
        "write": done bytes are staged (after each PROGRESS_CHUNK copied into the
        shared-memory segment; once, at the end, for a tensor small enough for the
        socket); "commit": all is staged and the commit (close_tensor: a file
        write and fsync) starts, the one step that reports nothing while it runs;
        "done": it returned, the tensor is durable. done == total in the last two."""
        name, shape, arr = as_raw(tensor, dtype)
        return self._save(path, exclusive, progress,
                          dict(dtype=name, shape=shape, perm=perm),
                          lambda info: [(0, arr.reshape(-1).view("u1"))])

    def save_tensors(self, path: str, tensors: dict[str, Any], perm: int = 0o644,
                     exclusive: bool = False, progress: Progress | None = None,
                     dtype: str | None = None) -> dict[str, Any]:
        """Write a group: several named tensors (a state_dict, say) as one
        safetensors file, durably and atomically, like save_tensor. progress: as
        for save_tensor, over all the members' bytes; dtype: the floating-point
        members cast to it (integer and bool members keep theirs)."""
        raws = {name: as_raw(t, dtype if floating(t) else None)
                for name, t in tensors.items()}
        members = [[name, dtype, shape] for name, (dtype, shape, _) in raws.items()]
        return self._save(path, exclusive, progress, dict(members=members, perm=perm),
                          lambda info: [(offset, raws[name][2].reshape(-1).view("u1"))
                                        for name, _, _, offset in info["members"]])

    def _save(self, path: str, exclusive: bool, progress: Progress | None,
              how: dict[str, Any],
              pieces: Callable[[dict[str, Any]], list[tuple[int, Any]]]) -> dict[str, Any]:
        """One save, exactly once across a tensorfs crash: open_tensor(path, w or x,
        **how) under an idempotency key, staged through shared memory, then the
        pieces (byte offset, flat uint8 array) of open's reply filled in. If the
        driver dies under the save (EIO; or EBADF: a new instance that never saw
        the descriptor), the key, which the commit writes into the file's header,
        tells whether the commit happened: if stat shows it, the save is done;
        if not, the whole save runs once more."""
        key = secrets.token_hex(16)
        for attempt in range(2):
            try:
                info = self.open_tensor(path, "x" if exclusive else "w",  # type: ignore[attr-defined]
                                        shm=self._shm, whole=True, key=key, **how)
                return self._fill_and_commit(info, pieces(info), progress)
            except SyscallError as e:
                if e.errno not in (Errno.EIO, Errno.EBADF) or attempt:
                    raise
                done = self._committed(path, key)
                if done is not None:
                    return done
        raise AssertionError("unreachable")

    def _fill_and_commit(self, info: dict[str, Any], pieces: list[tuple[int, Any]],
                         progress: Progress | None) -> dict[str, Any]:
        """Stage pieces (byte offset, flat uint8 array) of a write open_tensor just
        opened, then commit it: into the shared-memory segment (progress per chunk),
        or in one write_tensor; on any failure the write is discarded."""
        np = _np()
        fd, size = info["fd"], info["size"]
        try:
            if info["shm"]:
                mm = self._staging_map(info["shm"], size)
                for at, src in pieces:
                    dst = np.frombuffer(mm, np.uint8, count=src.size, offset=at)
                    _copy(dst, src, None if progress is None else
                          lambda d, t, ph, at=at: progress(at + d, size, ph))
                    del dst
            elif size:
                if len(pieces) == 1:
                    data: Any = memoryview(pieces[0][1])
                else:
                    data = bytearray(size)
                    for at, src in pieces:
                        data[at:at + src.size] = memoryview(src)
                self.write_tensor(fd, data)  # type: ignore[attr-defined]
            if progress is not None:
                if not info["shm"]:  # one write_tensor: nothing to report before
                    progress(size, size, "write")
                progress(size, size, "commit")
        except BaseException:
            try:  # discard; if the driver is gone, so is the staged write
                self.close_tensor(fd, True)  # type: ignore[attr-defined]
            except SyscallError:
                pass
            raise
        r = self.close_tensor(fd)  # type: ignore[attr-defined]
        if progress is not None:
            progress(size, size, "done")
        return r

    def _committed(self, path: str, key: str) -> dict[str, Any] | None:
        """{size, checksum} as close_tensor gives them if the tensor at path is the
        one committed under key; None if it is not (or there is none)."""
        try:
            st = self.stat(path)  # type: ignore[attr-defined]
        except SyscallError as e:
            if e.errno in (Errno.ENOENT, Errno.EISDIR, Errno.ENOTDIR):
                return None
            raise
        if st.get("key") != key:
            return None
        return {"size": st["size"], "checksum": st["checksum"]}

    def load_tensors(self, path: str) -> dict[str, Any]:
        """A group's tensors, {name: tensor} in file order. One read of the group's
        data (a mapping of the driver's cache when large: no copy) and a view per
        member; the views share it, and writing to one never touches the file."""
        info, _, buf, _ = self._read(path, None, None, "load_tensors", True)
        view = memoryview(buf).cast("B") if len(buf) else memoryview(bytearray())
        out = {}
        for name, dtype, shape, offset in info["members"]:
            n = _nbytes({"dtype": dtype, "shape": shape})
            out[name] = from_raw(view[offset:offset + n], dtype, shape)
        return out

    @staticmethod
    def _received(r: dict[str, Any]) -> tuple[Any, int]:
        """A read_tensor reply's bytes: its segment mapped (copy-on-write), or its
        data in a writable buffer (as torch.from_numpy wants); and their size."""
        size = _nbytes(r)
        if r["shm"]:
            at = r.get("offset") or 0  # a group's member, in the group's segment
            buf: Any = map_segment(r["shm"], at + size, writable=False)
            if size == 0:
                return b"", 0
            return (memoryview(buf)[at:at + size] if at else buf), size
        data = r["data"]  # writable, as torch.from_numpy wants: a channel's already is
        return (data if type(data) is bytearray else bytearray(data)), size

    def _staging_map(self, path: str, size: int) -> mmap.mmap:
        """The driver hands a process the same staging segment for its next write of
        the same size; keeping the last one mapped saves faulting in its pages again
        (a write fault per page: about 60 ms for 256 MiB, more than the copy)."""
        held = getattr(self, "_staging", None)
        if held is None:
            held = self._staging = {}
        if path in held and held[path][1] == size:
            held[path] = held.pop(path)  # most recently used last
            return held[path][0]
        while len(held) >= STAGING_MAPS:  # as many as the driver keeps (MAX_SPARES)
            _unmap(held.pop(next(iter(held)))[0])
        mm = map_segment(path, size, writable=True)
        held[path] = (mm, size)
        return mm

    def _drop_staging(self) -> None:
        for mm, _ in (getattr(self, "_staging", None) or {}).values():
            _unmap(mm)
        self._staging = {}

    def load_array(self, path: str, slice: list[list[int]] | None = None,
                   member: str | None = None) -> Any:
        """As load_tensor, but always a numpy array (without importing torch); a
        bfloat16 tensor comes as float32, exactly (bfloat16 is float32's top half)."""
        np = _np()
        r, buf, _ = self._read_whole(path, slice, member, "load_array")
        if r["dtype"] == "bfloat16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(r["shape"])
        return from_raw(buf, r["dtype"], r["shape"], torch_ok=False)

    def _read_whole(self, path: str, slice: list[list[int]] | None, member: str | None,
                    call: str) -> tuple[dict[str, Any], Any, int]:
        """One read_tensor of path (or its member), through shared memory when large:
        the reply, its bytes and their size."""
        return self._read(path, slice, member, call, False)[1:]

    def _read(self, path: str, slice: list[list[int]] | None, member: str | None,
              call: str, group: bool) -> tuple[dict[str, Any], dict[str, Any], Any, int]:
        """Open path, read it whole (a group, or one tensor or member) and close it:
        (open's reply, read's reply, the bytes, mapped before the close, and their
        size). A read has no effect: if tensorfs dies under it (EIO; or EBADF, a
        new instance that never saw the descriptor), it is done once more."""
        for attempt in range(2):
            try:
                info = self.open_tensor(path, "r")  # type: ignore[attr-defined]
                with self._reading(info["fd"]):
                    if group and info["members"] is None:
                        raise SyscallError(Errno.EINVAL, f"{call}: {path} is one tensor, "
                                           "not a group: use load_tensor")
                    if not group and info["members"] is not None and member is None:
                        raise SyscallError(Errno.EINVAL, f"{call}: {path} is a group of "
                                           f"{len(info['members'])} tensors: name a "
                                           f"member ({path}[NAME]), or use load_tensors")
                    channel = not self._shm and info.get("size", 0) >= CHANNEL_MIN
                    r = self.read_tensor(info["fd"], slice, self._shm, member,  # type: ignore[attr-defined]
                                         channel)
                    if r.get("channel"):
                        r = {**r, "data": self._fetch(r["channel"])}
                    buf, size = self._received(r)
                return info, r, buf, size
            except SyscallError as e:
                if e.errno not in (Errno.EIO, Errno.EBADF) or attempt:
                    raise
        raise AssertionError("unreachable")

    def _fetch(self, grant: dict[str, Any]) -> bytearray:
        """The bytes of a data channel's grant: a plain TCP connection to the driver,
        the token, then the length and the bytes (drivers/tensorfs/_channel.py)."""
        host = grant["host"]
        if host in ("0.0.0.0", "::", "*"):  # it listens everywhere: where the kernel is
            host = self.remote["endpoint"].removeprefix("tcp://").rpartition(":")[0]  # type: ignore[attr-defined]
        try:
            with socket.create_connection((host.strip("[]"), grant["port"]),
                                          timeout=30) as s:
                s.sendall(bytes.fromhex(grant["token"]))
                head = b""
                while len(head) < 8:
                    chunk = s.recv(8 - len(head))
                    if not chunk:
                        raise ConnectionError("the data channel was refused")
                    head += chunk
                n = struct.unpack("<Q", head)[0]
                buf = bytearray(n)
                view, got = memoryview(buf), 0
                while got < n:  # MSG_WAITALL: the OS fills it, not one call a chunk
                    k = s.recv_into(view[got:], n - got, socket.MSG_WAITALL)
                    if not k:
                        raise ConnectionError(f"the data channel closed after {got} of "
                                              f"{n} bytes")
                    got += k
                return buf
        except OSError as e:
            raise SyscallError(Errno.EIO, f"read_tensor: the data channel to {host}:"
                               f"{grant['port']} failed: {e}") from None

    @contextlib.contextmanager
    def _reading(self, fd: str) -> Iterator[None]:
        """Close read descriptor fd after the block. Once the data is here (mapped),
        a close that fails because tensorfs restarted meanwhile (its new instance
        knows no descriptor of ours: EBADF; or it died again: EIO) costs nothing:
        a read has nothing to commit."""
        try:
            yield
        except BaseException:
            try:
                self.close_tensor(fd)  # type: ignore[attr-defined]
            except SyscallError:
                pass
            raise
        try:
            self.close_tensor(fd)  # type: ignore[attr-defined]
        except SyscallError as e:
            if e.errno not in (Errno.EBADF, Errno.EIO):
                raise

    def load_tensor(self, path: str, slice: list[list[int]] | None = None,
                    progress: Progress | None = None, member: str | None = None) -> Any:
        """Read a whole tensor (or a slice: [[start, stop], ...] per leading
        dimension) from path; of a group, its member of that name.

        progress: called once, progress(size, size, "done"), when the tensor is
        here. A shared-memory read maps the driver's segment, no copy, so there is
        nothing to report along the way: the bytes move when the pages are first
        touched (a caller writing the tensor to a file reports that copy)."""
        r, buf, size = self._read_whole(path, slice, member, "load_tensor")
        t = from_raw(buf, r["dtype"], r["shape"])
        if progress is not None:
            progress(size, size, "done")
        return t
