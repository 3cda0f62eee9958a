"""Local files in and out of tensorfs: what put reads and get writes, and the
progress bar of both (docs/tensorfs.md).

put imports .npy, .pt (a tensor, or a dict of tensors: one tensorfs tensor per
key under PATH/) and .safetensors files (one tensor per key when there are
several), and anything else as raw bytes, uint8. get exports by FILE's suffix:
.npy, .pt, .safetensors, else raw bytes. Both show a rich progress bar on stderr
(TransferBar) for BAR_BYTES and more when it is a terminal, for any size with
--progress, never with -q. numpy, torch and rich are imported here only when a
file is read or written: every command loads the command table, few of them this.
"""
from __future__ import annotations

import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from syscalls import Errno, SyscallError, format_size
from syscalls.client import PROGRESS_CHUNK, Progress, as_raw, floating

from ._views import size

if TYPE_CHECKING:
    import numpy as np

# A transfer of this many bytes or more gets a progress bar when stderr is a
# terminal (smaller ones are over before a bar would say anything); --progress
# shows it for any size and anywhere, -q never.
BAR_BYTES = 64 * 2**20


def show_bar(quiet: bool, force: bool, size: int) -> bool:
    """Whether a transfer of size bytes gets a progress bar: -q never, --progress
    always, else from BAR_BYTES on when stderr is a terminal."""
    return not quiet and (force or (size >= BAR_BYTES and sys.stderr.isatty()))


def _new_bar() -> Any:
    """A rich Progress on stderr with the bar's columns. rich is imported here, not
    at the top: every llmos command loads this module, few draw a bar (23 ms)."""
    from datetime import timedelta

    from rich import filesize
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, Task,
                               TextColumn)
    from rich.text import Text

    class _Speed(ProgressColumn):
        """Bytes per second in binary units, like the sizes: rich's estimate while the
        bytes move; once all are there, the average since the start (so the commit
        counts, and a transfer of one chunk, one update, still gets a figure)."""

        def render(self, task: Task) -> Text:
            if task.total is None:  # a step with nothing to count
                return Text("")
            speed = (task.completed / task.elapsed if task.finished and task.elapsed
                     else task.speed)
            if speed is None:
                return Text("?", style="progress.data.speed")
            unit, suffix = filesize.pick_unit_and_suffix(
                int(speed), ["B", "KiB", "MiB", "GiB", "TiB"], 1024)
            return Text(f"{speed / unit:.1f} {suffix}/s", style="progress.data.speed")

    class _Time(ProgressColumn):
        """Time left while the bytes move, then the time taken: it runs on through the
        commit and stops when the transfer ends (TransferBar stops the task)."""

        def render(self, task: Task) -> Text:
            if task.finished:
                seconds, style = task.elapsed, "progress.elapsed"
            else:
                seconds, style = task.time_remaining, "progress.remaining"
            if seconds is None:
                return Text("-:--:--", style=style)
            return Text(str(timedelta(seconds=int(seconds))), style=style)

    return Progress(TextColumn("{task.description}"), BarColumn(),
                    DownloadColumn(binary_units=True), _Speed(), _Time(),
                    console=Console(stderr=True))


class TransferBar:
    """The rich progress bar of one put or get on stderr: bar, bytes, speed, time
    left (once finished: the average speed and the time taken). Its part()
    callbacks are the progress argument of save_tensor and write_file. Without
    show every method does nothing and part() is None, so the transfer keeps its
    single copy.

    The bar is not transient: on a terminal the finished bar stays (put's summary
    lines print above it while it runs); on anything else rich draws only the
    final state, once, when it stops. A failed transfer removes its bar."""

    WORDS = {"write": "writing", "commit": "committing", "done": ""}  # by phase

    def __init__(self, label: str, show: bool) -> None:
        self.label = label
        self._bar: Any = None
        if show:
            self._bar = _new_bar()
            # the clock starts at the first step, after imports that are no transfer
            self._task = self._bar.add_task(label, total=None, start=False)

    def __enter__(self) -> "TransferBar":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._bar is not None:
            if exc_type is not None:
                self._bar.live.transient = True  # erased on a terminal, never printed
            self._bar.stop_task(self._task)  # its time and speed: the whole transfer
            self._bar.stop()

    def reading(self) -> None:
        """A step with nothing to count (loading a .pt or .safetensors file, or the
        tensor of a get): the bar pulses."""
        if self._bar is not None:
            self._bar.start_task(self._task)
            self._bar.update(self._task, description=f"{self.label} reading",
                             completed=0, total=None)

    def part(self, name: str | None = None, offset: int = 0,
             total: int | None = None) -> Progress | None:
        """The progress(done, size, phase) callback of one tensor, named name on
        the bar, whose bytes start at offset of the transfer's total (a file of
        several tensors is one bar); total None: the tensor is the transfer."""
        bar = self._bar
        if bar is None:
            return None
        task, name = self._task, name or self.label

        def progress(done: int, size: int, phase: str) -> None:
            bar.start_task(task)  # once: later calls leave its start time
            bar.update(task, completed=offset + done,
                       total=size if total is None else total,
                       description=f"{name} {self.WORDS.get(phase, phase)}".rstrip())
        return progress


def _save(osh: Any, path: str, tensor: Any, quiet: bool,
          progress: Progress | None = None, dtype: str | None = None) -> None:
    t0 = time.monotonic()
    r = osh.save_tensor(path, tensor, progress=progress, dtype=dtype)
    if not quiet:
        dt = time.monotonic() - t0
        print(f"{path}: {size(r['size'])} in {dt:.2f}s "
              f"({format_size(r['size'] / max(dt, 1e-9))}/s), {r['checksum']}",
              file=sys.stderr)


def _nbytes(tensor: Any) -> int:
    import numpy as np
    if isinstance(tensor, dict):  # a group
        return sum(_nbytes(t) for t in tensor.values())
    n = getattr(tensor, "nbytes", None)  # numpy and torch
    return int(n) if n is not None else np.asarray(tensor).nbytes


def put_data(osh: Any, path: str, data: Any, quiet: bool, bar: TransferBar,
             group: bool = False, dtype: str | None = None) -> None:
    """Save what read_file gave: a tensor at path, or a dict of them as one tensor
    per key under the directory path (a dict of one: that tensor at path), each
    with put's summary line unless quiet, all on one bar. group: all of it as one
    group at path (a lone tensor as its member "tensor")."""
    if group:
        t0 = time.monotonic()
        members = data if isinstance(data, dict) else {"tensor": data}
        r = osh.save_tensors(path, members, progress=bar.part(path), dtype=dtype)
        if not quiet:
            dt = time.monotonic() - t0
            print(f"{path}: a group of {len(members)}, {size(r['size'])} in {dt:.2f}s "
                  f"({format_size(r['size'] / max(dt, 1e-9))}/s), {r['checksum']}",
                  file=sys.stderr)
        return
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if not isinstance(data, dict):
        _save(osh, path, data, quiet, bar.part(path), dtype)
        return
    try:
        osh.mkdir(path)
    except SyscallError as e:
        if e.errno != Errno.EEXIST:
            raise
    total, offset = sum(_nbytes(t) for t in data.values()), 0
    for name, t in data.items():
        p = f"{path.rstrip('/')}/{name}"
        _save(osh, p, t, quiet, bar.part(p, offset, total), dtype if floating(t) else None)
        offset += _nbytes(t)


def check_storable(data: Any, split: bool, dtype: str | None = None) -> None:
    """EINVAL, before anything is written, when what a file held is not tensors of
    a dtype tensorfs stores (float64, nested dicts...), naming the key; and, when
    its tensors are to be one per key under a directory (split), when a key cannot
    be a tensorfs name."""
    for key, t in (data.items() if isinstance(data, dict) else [(None, data)]):
        if isinstance(data, dict) and not isinstance(key, str):
            raise SyscallError(Errno.EINVAL, f"put: key {key!r} is not a string")
        if split and isinstance(data, dict) and len(data) > 1 and (
                not key or key.startswith(".")
                or any(c in key for c in "/\\\x00") or len(key.encode()) > 200):
            raise SyscallError(Errno.EINVAL, f"put: key {key!r} cannot be a tensorfs "
                               "name (empty, a leading '.', '/', '\\', NUL, over 200 "
                               "bytes); put -g keeps such names in a group")
        several = isinstance(data, dict) and len(data) > 1
        try:
            as_raw(t, dtype if not several or floating(t) else None)
        except SyscallError as e:
            where = f" {key!r}:" if key is not None else ""
            raise SyscallError(Errno.EINVAL, f"put:{where} {e.message}") from None


def file_size(file: Path) -> int:
    """file's size, 0 when it cannot be read (reading it says why)."""
    try:
        return file.stat().st_size
    except OSError:
        return 0


def _mappable(file: Path) -> bool:
    try:
        st = file.stat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def read_file(file: Path, bar: TransferBar | None = None) -> dict[str, Any] | Any:
    """A tensor, or a dict of name -> tensor, from a file by its suffix.

    A .npy or raw file is mapped, not read: its pages come in as save_tensor copies
    them (chunk by chunk, counted on the bar), with no copy of the file in memory
    first. A .pt or .safetensors file loads in one call: the bar pulses."""
    import numpy as np
    suffix = file.suffix.lower()
    if suffix == ".npy":
        if _mappable(file):
            try:
                return np.load(file, mmap_mode="r", allow_pickle=False)
            except ValueError:  # not mappable (object dtype...): np.load says why
                pass
        return np.load(file, allow_pickle=False)
    if suffix == ".pt":
        import torch
        if bar is not None:
            bar.reading()
        return torch.load(file, map_location="cpu", weights_only=True)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        if bar is not None:
            bar.reading()
        try:
            return load_file(file)
        except Exception:  # bfloat16 and friends: torch reads them
            from safetensors.torch import load_file as load_torch
            return load_torch(file)
    if _mappable(file):
        return np.memmap(file, dtype=np.uint8, mode="r")
    return np.frombuffer(file.read_bytes(), dtype=np.uint8)


def write_file(file: Path, tensor: Any, progress: Progress | None = None) -> None:
    """Export tensor to file by its suffix: .pt, .safetensors, .npy, else raw bytes.

    progress(done, total, phase): a .npy or raw file is written PROGRESS_CHUNK
    bytes at a time, each reported as "write" (a tensor from load_tensor is a
    mapping: this is where its bytes move), then "done"; a .pt or .safetensors
    file is one step between progress(0, total, "write") and "done"."""
    import numpy as np
    suffix = file.suffix.lower()
    if suffix in (".pt", ".safetensors"):
        total = _nbytes(tensor)
        if progress is not None:
            progress(0, total, "write")
        _write_whole(file, tensor, suffix)
        if progress is not None:
            progress(total, total, "done")
        return
    if suffix == ".npy" and isinstance(tensor, np.ndarray):
        arr = tensor if tensor.flags.c_contiguous else tensor.copy(order="C")
    else:  # torch (bfloat16 as its uint16 bits), or raw bytes of anything
        arr = as_raw(tensor)[2]
    with open(file, "wb") as f:
        if suffix == ".npy":
            _npy_header(f, arr)
        _write_chunks(f, arr.reshape(-1).view(np.uint8), progress)


def _write_whole(file: Path, tensor: Any, suffix: str) -> None:
    """A tensor, or a group's dict of them (its names kept), as .pt or .safetensors."""
    import numpy as np
    if suffix == ".pt":
        import torch
        torch.save(tensor if isinstance(tensor, dict) or hasattr(tensor, "dtype") and
                   not isinstance(tensor, np.ndarray)
                   else torch.from_numpy(np.asarray(tensor)), file)
        return
    try:
        import torch
        from safetensors.torch import save_file
        if isinstance(tensor, dict):
            save_file({k: v.contiguous() for k, v in tensor.items()}, file)
            return
        t = tensor if isinstance(tensor, torch.Tensor) else torch.from_numpy(tensor)
        save_file({"tensor": t.contiguous()}, file)
    except ImportError:
        from safetensors.numpy import save_file as save_np
        save_np({"tensor": np.ascontiguousarray(tensor)}, file)


def _npy_header(f: Any, arr: np.ndarray) -> None:
    """The header np.save writes for arr (format 1.0, or 2.0 when it is too long)."""
    import numpy as np
    header = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:
        np.lib.format.write_array_header_2_0(f, header)


def _write_chunks(f: Any, data: np.ndarray, progress: Progress | None) -> None:
    """Write a flat uint8 array: in one call without progress, else in chunks."""
    if progress is None:
        f.write(memoryview(data))
        return
    total, start = len(data), 0
    while True:
        stop = min(start + PROGRESS_CHUNK, total)
        f.write(memoryview(data[start:stop]))
        progress(stop, total, "write")
        if stop == total:
            break
        start = stop
    progress(total, total, "done")


def remove(osh: Any, path: str, recursive: bool,
           failed: Callable[[SyscallError], None]) -> bool:
    """unlink path; with recursive, a directory's contents first. Whether path is
    gone. A failure is given to failed() and the rest is still removed (as rm -r
    goes on), but not the directories left holding something. A file tensorfs
    cannot read (stat is EIO) is still removed: unlink does not need its header."""
    try:
        st = osh.stat(path)
        if st["type"] == "dir" and recursive:
            gone = [remove(osh, e["path"], True, failed) for e in osh.listdir(path)]
            if not all(gone):
                return False
    except SyscallError as e:
        if e.errno != Errno.EIO:
            failed(e)
            return False
    try:
        osh.unlink(path)
    except SyscallError as e:
        failed(e)
        return False
    return True
