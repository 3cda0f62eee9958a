"""The tensor commands of `llmos`: ls, stat, rm, mv, put, get (docs/tensorfs.md).

    llmos ls [-l] [PATH]        llmos stat PATH         llmos rm [-r] PATH
    llmos mv SRC DST            llmos put FILE PATH     llmos get PATH FILE

put imports .npy, .pt (a tensor, or a dict of tensors: one tensorfs tensor per
key under PATH/) and .safetensors files (one tensor per key when there are
several), and anything else as raw bytes, uint8. get exports by FILE's suffix:
.npy, .pt, .safetensors, else raw bytes. cli.py registers these with add_commands.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from syscalls import Errno, Home, SyscallError

from ._tensors import as_raw


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _line(e: dict[str, Any], long: bool) -> str:
    name = e.get("name", e["path"]) + ("/" if e["type"] == "dir" else "")
    if not long:
        return name
    kind = "d" if e["type"] == "dir" else "-"
    what = f"{e['dtype']}{e['shape']}" if e["type"] == "tensor" else ""
    size = _size(e["size"]) if e["type"] == "tensor" else "-"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["mtime"]))
    return f"{kind}{e['mode']:04o} {e['owner']:>6} {size:>9} {when}  {name}  {what}"


def _save(osh: Any, path: str, tensor: Any, quiet: bool) -> None:
    t0 = time.monotonic()
    r = osh.save_tensor(path, tensor)
    if not quiet:
        dt = time.monotonic() - t0
        print(f"{path}: {_size(r['size'])} in {dt:.2f}s "
              f"({r['size'] / max(dt, 1e-9) / 2**20:.0f} MiB/s), {r['checksum']}",
              file=sys.stderr)


def _read_file(file: Path) -> dict[str, Any] | Any:
    """A tensor, or a dict of name -> tensor, from a file by its suffix."""
    suffix = file.suffix.lower()
    if suffix == ".npy":
        return np.load(file, allow_pickle=False)
    if suffix == ".pt":
        import torch
        return torch.load(file, map_location="cpu", weights_only=True)
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            return load_file(file)
        except Exception:  # bfloat16 and friends: torch reads them
            from safetensors.torch import load_file as load_torch
            return load_torch(file)
    return np.frombuffer(file.read_bytes(), dtype=np.uint8)


def _write_file(file: Path, tensor: Any) -> None:
    suffix = file.suffix.lower()
    if suffix == ".pt":
        import torch
        torch.save(tensor if hasattr(tensor, "dtype") and not isinstance(tensor, np.ndarray)
                   else torch.from_numpy(np.asarray(tensor)), file)
        return
    if suffix == ".safetensors":
        try:
            import torch
            from safetensors.torch import save_file
            t = tensor if isinstance(tensor, torch.Tensor) else torch.from_numpy(tensor)
            save_file({"tensor": t.contiguous()}, file)
        except ImportError:
            from safetensors.numpy import save_file as save_np
            save_np({"tensor": np.ascontiguousarray(tensor)}, file)
        return
    _, _, arr = as_raw(tensor)
    if suffix == ".npy":
        np.save(file, np.asarray(tensor) if isinstance(tensor, np.ndarray) else arr)
    else:
        file.write_bytes(arr.tobytes())


def remove(osh: Any, path: str, recursive: bool) -> None:
    """unlink path; with recursive, a directory's contents first."""
    st = osh.stat(path)
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
            print(f"{k:9} {v}")
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
        try:
            data = _read_file(Path(args.file))
        except OSError as e:
            raise SyscallError(Errno.ENOENT, f"{args.file}: {e.strerror}") from None
        with connect(home) as osh:
            if isinstance(data, dict) and len(data) == 1:
                data = next(iter(data.values()))
            if isinstance(data, dict):
                try:
                    osh.mkdir(args.path)
                except SyscallError as e:
                    if e.errno != Errno.EEXIST:
                        raise
                for name, t in data.items():
                    _save(osh, f"{args.path.rstrip('/')}/{name}", t, args.quiet)
            else:
                _save(osh, args.path, data, args.quiet)
        return 0

    def cmd_get(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            t = osh.load_tensor(args.path)
        _write_file(Path(args.file), t)
        return 0

    p = command("ls", cmd_ls, "list a tensorfs directory")
    p.add_argument("-l", "--long", action="store_true", help="mode, owner, size, time, dtype")
    p.add_argument("--json", action="store_true", help="print listdir() as JSON")
    p.add_argument("path", nargs="?", default="/")
    p = command("stat", cmd_stat, "metadata of a tensor or directory")
    p.add_argument("path")
    p = command("rm", cmd_rm, "remove tensors or empty directories")
    p.add_argument("-r", "--recursive", action="store_true", help="directories and contents")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p = command("mv", cmd_mv, "rename a tensor or directory")
    p.add_argument("src")
    p.add_argument("dst")
    p = command("put", cmd_put, "import a .npy, .pt or .safetensors file (else raw bytes "
                "as uint8) as a tensor")
    p.add_argument("-q", "--quiet", action="store_true", help="no transfer summary")
    p.add_argument("file", metavar="FILE")
    p.add_argument("path", metavar="PATH")
    p = command("get", cmd_get, "export a tensor to FILE (.npy, .pt, .safetensors, else raw)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("file", metavar="FILE")
