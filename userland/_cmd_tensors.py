"""The tensorfs commands: ls, cd, pwd, stat, cat, put, get, mkdir, rm, mv, chmod
(docs/tensorfs.md). Paths are relative to the session's working directory (the
shell's cd; "/" from the CLI); a group's member is PATH[name] wherever a path is.
cd and pwd exist only in the shell: a one-shot command has no working directory
to change."""
from __future__ import annotations

import argparse
import os
import posixpath
from pathlib import Path
from typing import Any

from syscalls import Errno, SyscallError
from syscalls.client import DTYPES

from . import _files, _views
from ._argtypes import count_arg
from ._command import Session, arg, command, each

FIRST_VALUES = 8
STAT_JSON = ("stat()'s record: {path, type (dir, tensor, group, member), owner, mode, "
             "ctime, mtime; dtype, shape, size, checksum; members [{name, dtype, shape, "
             "size}] of a group; compression, a compressed model's manifest}")


@command("ls", "tensors", "list tensorfs directories (default: the working directory)",
         arg("paths", nargs="*", metavar="PATH", complete="tensor"),
         arg("-l", "--long", action="store_true",
             help="mode, owner, size, modification time, and what it holds (dtype and "
                  "shape, or a group's member count)"),
         syscalls=("stat", "listdir"),
         view=lambda listing, s, a: _ls_lines(listing, a.long),
         json_keys="{PATH: [listdir()'s records: stat's, with name, and a group's "
                   "n_members instead of members]}",
         details="A directory's name ends in /. ll is ls -l (in the shell).")
def ls(s: Session, a: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    listing: dict[str, list[dict[str, Any]]] = {}

    def one(p: str) -> None:
        path = s.resolve(p)
        st = s.osh.stat(path)
        listing[path] = s.osh.listdir(path) if st["type"] == "dir" else [st]

    each(s, a.paths or ["."], one)
    return listing


def _ls_lines(listing: dict[str, list[dict[str, Any]]], long: bool) -> list[str]:
    lines: list[str] = []
    for path, entries in listing.items():  # a directory under a header when several
        directory = not (len(entries) == 1 and entries[0].get("path") == path)
        if len(listing) > 1 and directory:
            lines += ([""] if lines else []) + [f"{path}:"]
        lines += _views.ls_lines(entries, long)
    return lines


@command("cd", "tensors", "change the session's tensorfs directory (default /; - the "
         "previous one)", arg("path", nargs="?", default="/", complete="tensor"),
         syscalls=("stat",), scope="shell",
         details="Relative tensorfs paths in every command start from it; the prompt "
                 "shows it.")
def cd(s: Session, a: argparse.Namespace) -> None:
    path = s.previous if a.path == "-" else s.resolve(a.path)
    st = s.osh.stat(path)
    if st["type"] != "dir":
        raise SyscallError(Errno.ENOTDIR, f"cd: {path}: not a directory")
    s.previous, s.cwd = s.cwd, path


@command("pwd", "tensors", "the session's tensorfs directory", scope="shell")
def pwd(s: Session, a: argparse.Namespace) -> None:
    s.line(s.cwd)


@command("stat", "tensors", "metadata of tensors, groups, members or directories",
         arg("paths", nargs="+", metavar="PATH", complete="tensor"),
         syscalls=("stat", "open_tensor", "read_tensor", "close_tensor"),
         details="A compressed model's directory shows its manifest too "
                 "(compression.json: docs/compression.md).",
         view=lambda sts, s, a: _blank_between([_views.stat_lines(st) for st in sts]),
         json_keys=f"[{STAT_JSON}]")
def stat(s: Session, a: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    each(s, a.paths, lambda p: out.append(with_manifest(s.osh, s.osh.stat(s.resolve(p)))))
    return out


def with_manifest(osh: Any, st: dict[str, Any]) -> dict[str, Any]:
    """st, with "compression" (its compression.json) when it is a compressed model's
    directory (docs/compression.md)."""
    if st.get("type") != "dir":
        return st
    try:
        manifest = osh.read_manifest(st["path"])
    except SyscallError:  # unreadable (EACCES) or not JSON (EIO): stat shows the rest
        return st
    return {**st, "compression": manifest} if manifest else st


def _blank_between(blocks: list[list[str]]) -> list[str]:
    lines: list[str] = []
    for block in blocks:
        lines += ([""] if lines else []) + block
    return lines


def _number(x: Any) -> str:
    if isinstance(x, (bool, int)):
        return str(x)
    return f"{float(x):.6g}"


def summary(path: str, meta: dict[str, Any], arr: Any, first: int) -> dict[str, Any]:
    """What cat shows of a tensor: dtype, shape, size, count, the first values, and
    for numbers min, max, mean, std (of the finite ones) and the non-finite counts."""
    import numpy as np
    flat = arr.reshape(-1)
    out: dict[str, Any] = {"path": path, "dtype": meta["dtype"], "shape": meta["shape"],
                           "size": meta["size"], "elements": int(flat.size),
                           "values": flat[:first].tolist()}
    if flat.size and arr.dtype == np.bool_:
        out["true"] = int(flat.sum())
    elif flat.size:
        values = flat.astype(np.float64)
        finite = values[np.isfinite(values)]
        out["nan"], out["inf"] = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if finite.size:
            out.update(min=float(finite.min()), max=float(finite.max()),
                       mean=float(finite.mean()), std=float(finite.std()))
    if arr.dtype == np.uint8 and arr.ndim == 1:  # text, most likely: a dataset, a name
        out["text"] = bytes(flat[:200]).decode("utf-8", errors="replace")
    return out


def summary_lines(x: dict[str, Any]) -> list[str]:
    lines = [x["path"], f"dtype   {x['dtype']}", f"shape   {x['shape']}",
             f"size    {_views.size(x['size'])} ({x['elements']:,} elements)"]
    if not x["elements"]:
        return lines + ["values  (empty)"]
    if "true" in x:
        lines.append(f"true    {x['true']:,} of {x['elements']:,}")
    if x.get("nan") or x.get("inf"):
        lines.append(f"nan     {x['nan']:,}  inf {x['inf']:,}")
    if "min" in x:
        lines.append(f"min     {_number(x['min'])}  max {_number(x['max'])}  "
                     f"mean {_number(x['mean'])}  std {_number(x['std'])}")
    more = x["elements"] - len(x["values"])
    lines.append(f"values  [{', '.join(_number(v) for v in x['values'])}"
                 f"{f', ... ({more:,} more)' if more > 0 else ''}]")
    if "text" in x:
        lines.append(f"text    {x['text']!r}{' ...' if x['elements'] > 200 else ''}")
    return lines


@command("cat", "tensors", "a summary of tensors: dtype, shape, min, max, mean, std and "
         "the first values (a group: each member)",
         arg("paths", nargs="+", metavar="PATH", complete="tensor"),
         arg("-n", "--values", type=count_arg, default=FIRST_VALUES, metavar="N",
             help="how many of the first values (in C order) to show"),
         syscalls=("stat", "open_tensor", "read_tensor", "close_tensor"),
         view=lambda xs, s, a: _blank_between([summary_lines(x) for x in xs]),
         json_keys="[{path, dtype, shape, size, elements, values, min, max, mean, std, "
                   "nan, inf, true (bool), text (1-D uint8)}]",
         details="A 1-D uint8 tensor (a dataset, a checkpoint's name) also shows its "
                 "first bytes as text. bfloat16 is summarised as float32.")
def cat(s: Session, a: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def one(p: str) -> None:
        path = s.resolve(p)
        st = s.osh.stat(path)
        if st["type"] == "dir":
            raise SyscallError(Errno.EISDIR, f"cat: {path}: a directory")
        parts = [(path, st, None)] if st["type"] != "group" else [
            (f"{path}[{m['name']}]", m, m["name"]) for m in st["members"]]
        for title, meta, member in parts:  # a group: each member in turn
            out.append(summary(title, meta, s.osh.load_array(path, member=member),
                               a.values))

    each(s, a.paths, one)
    return out


def _dtype(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"one of {', '.join(DTYPES)}, not {text!r}")
    return text


@command("put", "tensors", "import a local file as a tensor: .npy, .pt, .safetensors, "
         "else its bytes as uint8",
         arg("file", metavar="FILE", complete="local"),
         arg("path", metavar="PATH", complete="tensor"),
         arg("-g", "--group", action="store_true",
             help="the file's tensors as one group at PATH (one safetensors file, names "
                  "kept) instead of one tensor per name under the directory PATH"),
         arg("--dtype", type=_dtype, metavar="DTYPE",
             help="store floating-point data cast to DTYPE (float64 needs one: "
                  "tensorfs stores " + ", ".join(DTYPES) + "); integer and bool tensors "
                  "of a file of several keep theirs"),
         arg("-q", "--quiet", action="store_true",
             help="no output: no summary, no progress bar"),
         arg("--progress", action="store_true",
             help="a progress bar whatever the size, also when stderr is not a terminal "
                  "(by default: from 64 MiB, on a terminal)"),
         syscalls=("open_tensor", "write_tensor", "close_tensor", "mkdir"),
         details="PATH may be a directory: the tensor (or the group) goes into it, named "
                 "after FILE. What the file holds is checked before anything is written, "
                 "so a refused file leaves nothing half imported. Each tensor written "
                 "prints its size, speed and checksum on stderr unless -q.")
def put(s: Session, a: argparse.Namespace) -> None:
    file = Path(os.path.expanduser(a.file))
    path = s.resolve(a.path)
    with _files.TransferBar(path, _files.show_bar(a.quiet, a.progress,
                                                  _files.file_size(file))) as bar:
        try:
            data = _files.read_file(file, bar)
        except OSError:
            raise  # printed as ENOENT: ... and the like
        except Exception as e:  # not the format its suffix says: the gist, one line
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SyscallError(Errno.EINVAL, f"put: cannot read {file}: {why}") from None
        _files.check_storable(data, not a.group, a.dtype)  # before anything is written
        one = not isinstance(data, dict) or len(data) == 1
        if (one or a.group) and _is_dir(s, path):  # into the directory, as cp does
            path = f"{path.rstrip('/')}/{file.stem}"
        _files.put_data(s.osh, path, data, a.quiet, bar, a.group, a.dtype)


def _is_dir(s: Session, path: str) -> bool:
    try:
        return s.osh.stat(path)["type"] == "dir"
    except SyscallError as e:
        if e.errno in (Errno.ENOENT, Errno.ENOTDIR):
            return False
        raise


@command("get", "tensors", "export a tensor to a local file (.npy, .pt, .safetensors, "
         "else its raw bytes); a group to .safetensors or .pt",
         arg("path", metavar="PATH", complete="tensor"),
         arg("file", metavar="FILE", complete="local"),
         arg("-q", "--quiet", action="store_true",
             help="no output: no summary (on stderr, as put's), no progress bar"),
         arg("--progress", action="store_true",
             help="a progress bar whatever the size, also when stderr is not a terminal "
                  "(by default: from 64 MiB, on a terminal)"),
         syscalls=("stat", "open_tensor", "read_tensor", "close_tensor"))
def get(s: Session, a: argparse.Namespace) -> None:
    path = s.resolve(a.path)
    file = Path(os.path.expanduser(a.file))
    if not file.parent.is_dir():
        raise SyscallError(Errno.ENOENT, f"get: {file.parent}: no such directory")
    if file.is_dir():
        raise SyscallError(Errno.EISDIR, f"get: {file}: a directory")
    st = s.osh.stat(path)
    if st["type"] == "dir":
        raise SyscallError(Errno.EISDIR, f"get: {path}: a directory")
    group = st["type"] == "group"
    suffix = file.suffix.lower()
    if group and suffix not in (".pt", ".safetensors"):
        raise SyscallError(Errno.EINVAL, f"get: {path} is a group of "
                           f"{len(st['members'])} tensors: export it to a .safetensors "
                           "or .pt file")
    with _files.TransferBar(path, _files.show_bar(a.quiet, a.progress, st["size"])) as bar:
        bf16_npy = not group and st["dtype"] == "bfloat16" and suffix == ".npy"
        via_torch = group or suffix in (".pt", ".safetensors") or (
            st["dtype"] == "bfloat16" and not bf16_npy)  # raw: bfloat16's own bits
        if via_torch:
            import torch  # noqa: F401 (load_tensor's import, before the bar's clock starts)
        bar.reading()
        if group:
            t: Any = s.osh.load_tensors(path)
        else:  # torch keeps bfloat16; numpy alone needs no torch (and has no bfloat16:
            # load_array gives it as float32, exactly)
            t = s.osh.load_tensor(path) if via_torch else s.osh.load_array(path)
        _files.write_file(file, t, bar.part())
    if not a.quiet:
        what = f"a group of {len(st['members'])}" if group else f"{st['dtype']}{st['shape']}"
        s.note(f"{file}: {what}{' as float32 (.npy has no bfloat16)' if bf16_npy else ''}, "
               f"{_views.size(st['size'])}")


def mode_arg(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o1777:
        raise argparse.ArgumentTypeError(f"an octal mode such as 644, not {text!r}")
    return mode


@command("mkdir", "tensors", "make tensorfs directories",
         arg("paths", nargs="+", metavar="PATH", complete="tensor"),
         arg("-p", "--parents", action="store_true",
             help="make missing parents too; an existing directory is no error"),
         arg("-m", "--mode", type=mode_arg, default="755", metavar="MODE",
             help="mode bits, octal"),  # a str default: argparse converts it too
         syscalls=("mkdir",))
def mkdir(s: Session, a: argparse.Namespace) -> None:
    def one(p: str) -> None:
        path = s.resolve(p)
        parts = [x for x in path.split("/") if x]
        targets = ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))] \
            if a.parents else [path]
        for target in targets:
            try:
                s.osh.mkdir(target, a.mode)
            except SyscallError as e:
                if not (a.parents and e.errno == Errno.EEXIST):
                    raise

    each(s, a.paths, one)


@command("rm", "tensors", "remove tensors or empty directories",
         arg("paths", nargs="+", metavar="PATH", complete="tensor"),
         arg("-r", "--recursive", action="store_true",
             help="directories with everything in them (not /); a failure is reported "
                  "and the rest still removed"),
         syscalls=("stat", "listdir", "unlink"))
def rm(s: Session, a: argparse.Namespace) -> None:
    def failed(e: SyscallError) -> None:
        s.error(f"{e.errno.name}: {e.message}")
        s.status = 1

    for p in a.paths:
        path = s.resolve(p)
        if path == "/" and a.recursive:
            failed(SyscallError(Errno.EINVAL, "rm: refusing to remove / (the root) and "
                                "everything in it"))
            continue
        _files.remove(s.osh, path, a.recursive, failed)


@command("mv", "tensors", "rename a tensor or directory; into DST if it is a directory",
         arg("src", metavar="SRC", complete="tensor"),
         arg("dst", metavar="DST", complete="tensor"), syscalls=("stat", "rename"))
def mv(s: Session, a: argparse.Namespace) -> None:
    src, dst = s.resolve(a.src), s.resolve(a.dst)
    try:
        if s.osh.stat(dst)["type"] == "dir":
            dst = posixpath.join(dst, posixpath.basename(src))
    except SyscallError as e:
        if e.errno not in (Errno.ENOENT, Errno.ENOTDIR):
            raise
    s.osh.rename(src, dst)


@command("chmod", "tensors", "set the mode bits (octal) of tensors or directories: the "
         "owner's or root's",
         arg("mode", type=mode_arg, metavar="MODE", help="octal, e.g. 640"),
         arg("paths", nargs="+", metavar="PATH", complete="tensor"),
         syscalls=("chmod",))
def chmod(s: Session, a: argparse.Namespace) -> None:
    each(s, a.paths, lambda p: s.osh.chmod(s.resolve(p), a.mode))



def _fsck_lines(r: dict[str, Any]) -> list[str]:
    moved = {m["path"]: m["to"] for m in r["moved"]}
    lines = [f"{d['path']}: {d['why']}" + (f" (moved to {moved[d['path']]})"
                                          if d["path"] in moved else "")
             for d in r["damaged"]]
    return lines + [f"{r['checked']:,} checked, {len(r['damaged'])} damaged, "
                    f"{len(r['moved'])} moved to /lost+found"]


@command("fsck", "tensors", "check every tensor's header and checksum; --repair moves "
         "damaged ones into /lost+found (uid 0 only: llmos --uid 0 fsck)",
         arg("path", nargs="?", default="/", metavar="PATH", complete="tensor",
             help="the directory to check, everything under it (or one tensor)"),
         arg("--repair", action="store_true",
             help="move each damaged file into /lost+found, under a name that says "
                  "where it was, so the namespace stays usable"),
         syscalls=("fsck",), view=lambda r, s, a: _fsck_lines(r),
         json_keys="fsck()'s record: {checked, damaged: [{path, why}], moved: [{path, "
                   "to}]}",
         details="Reads every byte of every tensor and group under PATH (from /, "
                 "/lost+found is left out) and says, one line each, which are damaged "
                 "and why. Exit status 1 when a damaged file is left in place.")
def fsck(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    r = s.osh.fsck(s.resolve(a.path), a.repair)
    if len(r["moved"]) < len(r["damaged"]):
        s.status = 1
    return r
