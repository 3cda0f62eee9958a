"""The tensor commands of `llmos`: ls, stat, rm, mv, put, get (docs/tensorfs.md).

    llmos ls [-l] [PATH]        llmos stat PATH         llmos rm [-r] PATH
    llmos mv SRC DST            llmos put FILE PATH     llmos get PATH FILE

put imports .npy, .pt (a tensor, or a dict of tensors: one tensorfs tensor per
key under PATH/) and .safetensors files (one tensor per key when there are
several), and anything else as raw bytes, uint8. get exports by FILE's suffix:
.npy, .pt, .safetensors, else raw bytes. Both show a rich progress bar on stderr
(TransferBar) for BAR_BYTES and more when it is a terminal, for any size with
--progress, never with -q. cli.py registers these with add_commands; the shell's
put and get use the same helpers.
"""
from __future__ import annotations

import argparse
import json
import stat
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np

from syscalls import Errno, Home, SyscallError

from syscalls.client import _tensors
from syscalls.client import as_raw

# A transfer of this many bytes or more gets a progress bar when stderr is a
# terminal (smaller ones are over before a bar would say anything); --progress
# shows it for any size and anywhere, -q never.
BAR_BYTES = 64 * 2**20


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _tensors_count(e: dict[str, Any]) -> str:
    """A group's member count (listdir gives n_members, stat the members)."""
    n = e["n_members"] if "n_members" in e else len(e.get("members", []))
    return f"{n} tensor{'' if n == 1 else 's'}"


def _line(e: dict[str, Any], long: bool) -> str:
    name = e.get("name", e["path"]) + ("/" if e["type"] == "dir" else "")
    if not long:
        return name
    if "error" in e:  # a file listdir could not read (damaged, or not tensorfs's)
        return f"?????  {'?':>6} {'?':>9} {'?':16}  {name}  ({e['error']}: unreadable)"
    kind = {"dir": "d", "group": "g"}.get(e["type"], "-")
    what = (f"{e['dtype']}{e['shape']}" if e["type"] == "tensor"
            else _tensors_count(e) if e["type"] == "group" else "")
    size = _size(e["size"]) if "size" in e else "-"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["mtime"]))
    return f"{kind}{e['mode']:04o} {e['owner']:>6} {size:>9} {when}  {name}  {what}"


def show_bar(quiet: bool, force: bool, size: int) -> bool:
    """Whether a transfer of size bytes gets a progress bar: -q never, --progress
    always, else from BAR_BYTES on when stderr is a terminal."""
    return not quiet and (force or (size >= BAR_BYTES and sys.stderr.isatty()))


def _new_bar() -> Any:
    """A rich Progress on stderr with the bar's columns. rich is imported here, not
    at the top: every llmos command loads this module, few draw a bar (23 ms)."""
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
    callbacks are the progress argument of save_tensor and _write_file. Without
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
             total: int | None = None) -> _tensors.Progress | None:
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
          progress: _tensors.Progress | None = None) -> None:
    t0 = time.monotonic()
    r = osh.save_tensor(path, tensor, progress=progress)
    if not quiet:
        dt = time.monotonic() - t0
        print(f"{path}: {_size(r['size'])} in {dt:.2f}s "
              f"({r['size'] / max(dt, 1e-9) / 2**20:.0f} MiB/s), {r['checksum']}",
              file=sys.stderr)


def _nbytes(tensor: Any) -> int:
    if isinstance(tensor, dict):  # a group
        return sum(_nbytes(t) for t in tensor.values())
    n = getattr(tensor, "nbytes", None)  # numpy and torch
    return int(n) if n is not None else np.asarray(tensor).nbytes


def put_data(osh: Any, path: str, data: Any, quiet: bool, bar: TransferBar,
             group: bool = False) -> None:
    """Save what _read_file gave: a tensor at path, or a dict of them as one tensor
    per key under the directory path (a dict of one: that tensor at path), each
    with put's summary line unless quiet, all on one bar. group: all of it as one
    group at path (a lone tensor as its member "tensor")."""
    if group:
        t0 = time.monotonic()
        members = data if isinstance(data, dict) else {"tensor": data}
        r = osh.save_tensors(path, members, progress=bar.part(path))
        if not quiet:
            dt = time.monotonic() - t0
            print(f"{path}: a group of {len(members)}, {_size(r['size'])} in {dt:.2f}s "
                  f"({r['size'] / max(dt, 1e-9) / 2**20:.0f} MiB/s), {r['checksum']}",
                  file=sys.stderr)
        return
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if not isinstance(data, dict):
        _save(osh, path, data, quiet, bar.part(path))
        return
    try:
        osh.mkdir(path)
    except SyscallError as e:
        if e.errno != Errno.EEXIST:
            raise
    total, offset = sum(_nbytes(t) for t in data.values()), 0
    for name, t in data.items():
        p = f"{path.rstrip('/')}/{name}"
        _save(osh, p, t, quiet, bar.part(p, offset, total))
        offset += _nbytes(t)


def _errno_of(e: OSError) -> Errno:
    """The llmos errno of a local OS error (EIO for one llmos has no name for)."""
    try:
        return Errno(e.errno)
    except ValueError:
        return Errno.EIO


def check_storable(data: Any, split: bool) -> None:
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
        try:
            as_raw(t)
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


def _read_file(file: Path, bar: TransferBar | None = None) -> dict[str, Any] | Any:
    """A tensor, or a dict of name -> tensor, from a file by its suffix.

    A .npy or raw file is mapped, not read: its pages come in as save_tensor copies
    them (chunk by chunk, counted on the bar), with no copy of the file in memory
    first. A .pt or .safetensors file loads in one call: the bar pulses."""
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


def _write_file(file: Path, tensor: Any, progress: _tensors.Progress | None = None) -> None:
    """Export tensor to file by its suffix: .pt, .safetensors, .npy, else raw bytes.

    progress(done, total, phase): a .npy or raw file is written PROGRESS_CHUNK
    bytes at a time, each reported as "write" (a tensor from load_tensor is a
    mapping: this is where its bytes move), then "done"; a .pt or .safetensors
    file is one step between progress(0, total, "write") and "done"."""
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
    header = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:
        np.lib.format.write_array_header_2_0(f, header)


def _write_chunks(f: Any, data: np.ndarray, progress: _tensors.Progress | None) -> None:
    """Write a flat uint8 array: in one call without progress, else in chunks."""
    if progress is None:
        f.write(memoryview(data))
        return
    total, start = len(data), 0
    while True:
        stop = min(start + _tensors.PROGRESS_CHUNK, total)
        f.write(memoryview(data[start:stop]))
        progress(stop, total, "write")
        if stop == total:
            break
        start = stop
    progress(total, total, "done")


def remove(osh: Any, path: str, recursive: bool) -> None:
    """unlink path; with recursive, a directory's contents first. A file tensorfs
    cannot read (stat is EIO) is still removed: unlink does not need its header."""
    try:
        st = osh.stat(path)
    except SyscallError as e:
        if e.errno != Errno.EIO:
            raise
        st = {"type": "tensor"}
    if st["type"] == "dir" and recursive:
        for e in osh.listdir(path):
            remove(osh, e["path"], True)
    osh.unlink(path)


def add_commands(command: Callable[..., argparse.ArgumentParser],
                 connect: Callable[..., Any]) -> None:
    """Register the tensor commands with cli.py's `command(name, func, help)`."""

    def cmd_ls(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            st = osh.stat(args.path)
            entries = osh.listdir(args.path) if st["type"] == "dir" else [st]
        if args.json:
            print(json.dumps(entries, indent=2, sort_keys=True))
        for e in entries if not args.json else []:
            print(_line(e, args.long))
        return 0

    def cmd_stat(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            st = osh.stat(args.path)
        for k in sorted(st):
            v = st[k]
            if k == "mode":
                v = f"{v:04o}"
            elif k in ("ctime", "mtime"):
                v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
            elif k == "members":  # a group: one line each, below
                v = _tensors_count(st)
            print(f"{k:9} {v}")
        for m in st.get("members", []):
            print(f"  {m['name']}  {m['dtype']}{m['shape']}  {_size(m['size'])}")
        return 0

    def cmd_mkdir(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            for path in args.paths:
                parts = [x for x in path.split("/") if x]
                targets = ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))] \
                    if args.parents else [path]
                for target in targets:
                    try:
                        osh.mkdir(target, args.mode)
                    except SyscallError as e:
                        if not (args.parents and e.errno == Errno.EEXIST):
                            raise
        return 0

    def cmd_rm(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            for p in args.paths:
                remove(osh, p, args.recursive)
        return 0

    def cmd_mv(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            osh.rename(args.src, args.dst)
        return 0

    def cmd_put(home: Home, args: argparse.Namespace) -> int:
        file = Path(args.file)
        with TransferBar(args.path, show_bar(args.quiet, args.progress,
                                             file_size(file))) as bar:
            try:
                data = _read_file(file, bar)
            except OSError as e:
                raise SyscallError(_errno_of(e), f"{args.file}: {e.strerror}") from None
            except Exception as e:  # not the format its suffix says
                raise SyscallError(Errno.EINVAL, f"put: cannot read {file}: {e}") from None
            check_storable(data, not args.group)  # before anything is written
            with connect(home) as osh:
                put_data(osh, args.path, data, args.quiet, bar, args.group)
        return 0

    def cmd_get(home: Home, args: argparse.Namespace) -> int:
        file = Path(args.file)
        if not file.parent.is_dir():
            raise SyscallError(Errno.ENOENT, f"get: {file.parent}: no such directory")
        if file.is_dir():
            raise SyscallError(Errno.EISDIR, f"get: {file}: a directory")
        with connect(home) as osh:
            st = osh.stat(args.path)
            if st["type"] == "group" and file.suffix.lower() not in (".pt", ".safetensors"):
                raise SyscallError(Errno.EINVAL, f"{args.path} is a group of "
                                   f"{len(st['members'])} tensors: export it to a "
                                   ".safetensors or .pt file")
            with TransferBar(args.path, show_bar(args.quiet, args.progress,
                                                 st.get("size", 0))) as bar:
                _tensors._torch()  # load_tensor's import: before the bar's clock
                bar.reading()
                if st["type"] == "group":
                    t: Any = osh.load_tensors(args.path)
                else:
                    t = osh.load_tensor(args.path)
                _write_file(file, t, bar.part())
        return 0

    p = command("ls", cmd_ls, "list a tensorfs directory")
    p.add_argument("-l", "--long", action="store_true", help="mode, owner, size, time, dtype")
    p.add_argument("--json", action="store_true", help="print listdir() as JSON")
    p.add_argument("path", nargs="?", default="/")
    p = command("stat", cmd_stat, "metadata of a tensor or directory")
    p.add_argument("path")
    p = command("mkdir", cmd_mkdir, "make tensorfs directories")
    p.add_argument("-p", "--parents", action="store_true",
                   help="make missing parents too; an existing directory is no error")
    p.add_argument("-m", "--mode", type=lambda t: int(t, 8), default=0o755,
                   help="mode bits, octal (default 755)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p = command("rm", cmd_rm, "remove tensors or empty directories")
    p.add_argument("-r", "--recursive", action="store_true", help="directories and contents")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p = command("mv", cmd_mv, "rename a tensor or directory")
    p.add_argument("src")
    p.add_argument("dst")
    p = command("put", cmd_put, "import a .npy, .pt or .safetensors file (else raw bytes "
                "as uint8) as a tensor, or with -g several as one group")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no output: no summary, no progress bar")
    p.add_argument("--progress", action="store_true",
                   help="a progress bar whatever the size, also when stderr is not a "
                   "terminal (by default: from 64 MiB, on a terminal)")
    p.add_argument("-g", "--group", action="store_true",
                   help="store the file's tensors as one group at PATH (one safetensors "
                   "file, names kept) instead of one tensor per name under PATH/")
    p.add_argument("file", metavar="FILE")
    p.add_argument("path", metavar="PATH")
    p = command("get", cmd_get, "export a tensor to FILE (.npy, .pt, .safetensors, else raw; "
                "a group to .safetensors or .pt)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true",
                   help="a progress bar whatever the size, also when stderr is not a "
                   "terminal (by default: from 64 MiB, on a terminal)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("file", metavar="FILE")
