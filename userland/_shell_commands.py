"""The commands of the llmos shell (userland/shell.py), one function each, with
their usage and help text: processes, tensors, devices, models and the shell's
own. docs/shell.md describes them.

A command function takes the shell and its parsed arguments and returns None or
True when it succeeded, False when it failed (having printed why); a
SyscallError, a UsageError or an OSError it raises is printed as one line by the
shell, which goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.columns import Columns
from rich.text import Text

from syscalls import BY_NAME, Errno, SyscallError
from syscalls._schema import parse_size
from userland import _shell_views as views
from userland._cli_models import _mkdirs, _scalar, progress, read_corpus
from userland._cli_models import follow as follow_job
from userland._cli_tensors import (TransferBar, _read_file, _write_file, check_storable,
                                   file_size, put_data, remove, show_bar)
from syscalls.client._tensors import NUMPY_DTYPES as _NP, TensorMethods, _torch
from userland.cli import LogTail, _wait_forwarding

FIRST_VALUES = 8


class UsageError(Exception):
    """Bad arguments: the shell prints the command's usage line with the reason."""


class ExitShell(Exception):
    def __init__(self, status: int | None = None) -> None:
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise UsageError((message or "").strip() or "bad arguments")


def arg(*flags: str, **kw: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, kw


@dataclass
class Command:
    name: str
    usage: str
    summary: str
    family: str
    func: Callable[[Any, argparse.Namespace], bool | None]
    args: list[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=list)
    details: str = ""
    # what TAB completes at each positional argument (the last one repeats):
    # tensor, local, pid, alloc, command, signal or "" (nothing); and after options
    complete: tuple[str, ...] = ()
    option_complete: dict[str, str] = field(default_factory=dict)
    remainder: bool = False  # a REMAINDER positional: no intermixed parsing
    _parser: Parser | None = None

    @property
    def parser(self) -> Parser:
        if self._parser is None:
            p = Parser(prog=self.name, usage=self.usage, add_help=False,
                       allow_abbrev=False)
            for flags, kw in self.args:
                p.add_argument(*flags, **kw)
            self._parser = p
        return self._parser

    def parse(self, argv: list[str]) -> argparse.Namespace:
        if self.remainder:
            return self.parser.parse_args(argv)
        return self.parser.parse_intermixed_args(argv)

    def takes_value(self, option: str) -> bool:
        action = self.parser._option_string_actions.get(option)
        return action is not None and action.nargs != 0

    def options(self) -> list[str]:
        return sorted(self.parser._option_string_actions)

    def help_text(self) -> str:
        text = f"usage: {self.usage}\n{self.summary}"
        if self.details:
            text += "\n\n" + self.details.strip("\n")
        return text


COMMANDS: dict[str, Command] = {}
ALIASES = {"quit": "exit", "?": "help", "ll": "ls -l"}
FAMILIES = ["processes", "tensors", "devices", "models", "shell"]


def command(name: str, usage: str, summary: str, family: str, *args: Any,
            details: str = "", complete: tuple[str, ...] = (),
            option_complete: dict[str, str] | None = None,
            remainder: bool = False) -> Callable[[Callable], Callable]:
    def register(func: Callable) -> Callable:
        COMMANDS[name] = Command(name, usage, summary, family, func, list(args), details,
                                 complete, option_complete or {}, remainder)
        return func
    return register


def each(sh: Any, items: list[str], fn: Callable[[str], None]) -> bool:
    """fn on every item; a SyscallError is printed and the rest still run."""
    ok = True
    for item in items:
        try:
            fn(item)
        except SyscallError as e:
            sh.syscall_error(e)
            ok = False
    return ok


# -- processes ---------------------------------------------------------------------

@command("ps", "ps", "the process table (the shell's own line in bold)", "processes",
         details="Columns: PID, PPID, UID, STATE, TIME (since it started), RESOURCES (what "
                 "it holds, by kind), COMMAND, and INFO (what a process published with "
                 "report: a training job's progress) when any process has some.")
def do_ps(sh: Any, a: argparse.Namespace) -> None:
    sh.show(views.ps_table(sh.osh.ps(), sh.osh.pid))


@command("jobs", "jobs", "processes that report progress: training jobs", "processes")
def do_jobs(sh: Any, a: argparse.Namespace) -> None:
    procs = [p for p in sh.osh.ps() if p.get("info")]
    if not procs:
        sh.line("no jobs")
        return
    sh.show(views.jobs_table(procs))


@command("top", "top [--once]", "a live view: processes, devices and allocations, the GPU "
         "queue, syscall rates and latency", "processes",
         arg("--once", action="store_true"),
         details="Refreshes every second; q or Ctrl-C leaves. Not on a terminal (a -c "
                 "command, a script), or with --once, it prints one snapshot. PER S is "
                 "each syscall's calls per second since the last refresh (top's own "
                 "ps, devices and sysinfo included); latencies are the kernel's "
                 "percentiles in microseconds.")
def do_top(sh: Any, a: argparse.Namespace) -> None:
    state = views.TopState()
    if a.once or not sh.live:
        procs, devices, info = _top_data(sh)
        sh.show(views.top_view(state, procs, devices, info, sh.osh.pid, sh.allocs))
        return
    _top_live(sh, state)


def _top_data(sh: Any) -> tuple[list, dict | None, dict]:
    procs = sh.osh.ps()
    try:
        devices = sh.osh.devices()
    except SyscallError:  # no devices driver: the rest is still worth a look
        devices = None
    return procs, devices, sh.osh.sysinfo()


def _top_live(sh: Any, state: views.TopState) -> None:
    import select
    import termios
    import tty
    from rich.live import Live

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def frame() -> Any:
        procs, devices, info = _top_data(sh)
        return views.top_view(state, procs, devices, info, sh.osh.pid, sh.allocs,
                              live=True, height=sh.out.size.height)

    try:
        tty.setcbreak(fd)
        with Live(frame(), console=sh.out, screen=True, auto_refresh=False) as live:
            while True:
                if select.select([fd], [], [], 1.0)[0]:
                    key = os.read(fd, 32)
                    if key[:1] in (b"q", b"Q", b"\x04") or key == b"\x1b":  # not arrows
                        break
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@command("run", "run [-d] [-e KEY=VALUE]... [--cwd DIR] PROGRAM [ARGS...]",
         "run a program as a child process of the shell and show its output", "processes",
         arg("-d", "--detach", action="store_true"),
         arg("-e", "--env", action="append", default=[]),
         arg("--cwd"),
         arg("command", nargs=argparse.REMAINDER),
         details="Spawns PROGRAM (\"python\" is the kernel's interpreter; a .py file runs "
                 "with it), copies its log ($LLMOS_HOME/log/proc/<pid>.log: stdout and "
                 "stderr) as it grows, and waits for it. Ctrl-C sends it TERM (twice: "
                 "KILL) and still waits. It fails (for -c's exit status) unless the "
                 "program exits 0. -d prints the new pid and returns at once: wait "
                 "reaps it later. --cwd defaults to the shell's own directory.",
         complete=("local",), option_complete={"--cwd": "local"}, remainder=True)
def do_run(sh: Any, a: argparse.Namespace) -> bool:
    argv = list(a.command)
    if argv[:1] == ["--"]:
        del argv[0]
    if not argv:
        raise UsageError("name a program to run")
    if argv[0].endswith(".py"):
        argv.insert(0, "python")
    env = {}
    for item in a.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"-e wants KEY=VALUE, not {item!r}")
        env[key] = value
    cwd = os.path.abspath(os.path.expanduser(a.cwd)) if a.cwd else None
    pid = sh.osh.spawn(argv, cwd=cwd, env=env or None)
    if a.detach:
        sh.line(str(pid))
        return True
    sys.stdout.flush()
    tail = LogTail(sh.home.log / "proc" / f"{pid}.log", sys.stdout.buffer)
    with sh.unbounded():
        try:
            record = _wait_forwarding(sh.osh, sh.home, pid, tail)
        finally:
            tail.stop()
    if record["status"] != 0:
        sh.note(views.wait_line(record))
        return False
    return True


@command("wait", "wait [PID] [--timeout S]", "wait for a child of the shell to end, reap "
         "it and show its status", "processes",
         arg("pid", nargs="?", type=int), arg("--timeout", type=float),
         details="Without PID, any child (run -d, train -d). Ctrl-C stops waiting. It "
                 "fails when the child's status is not 0, as sh's wait does; ECHILD when "
                 "the shell has no such child, ETIMEDOUT after --timeout seconds.",
         complete=("pid",))
def do_wait(sh: Any, a: argparse.Namespace) -> bool:
    with sh.unbounded():
        record = sh.osh.wait(a.pid, a.timeout)
    sh.line(views.wait_line(record))
    return record["status"] == 0


def _signal(text: str) -> str:
    name = text.upper().removeprefix("SIG")
    if name not in ("TERM", "KILL", "INT"):
        raise argparse.ArgumentTypeError(f"TERM, KILL or INT, not {text!r}")
    return name


@command("kill", "kill [-s TERM|KILL|INT] PID...", "send a signal (default TERM) to "
         "processes", "processes",
         arg("-s", "--signal", type=_signal, default="TERM"),
         arg("pids", nargs="+", type=int),
         details="Your own uid's processes only; init cannot be signalled. A failure is "
                 "one line per pid and the others are still signalled.",
         complete=("pid",), option_complete={"-s": "signal", "--signal": "signal"})
def do_kill(sh: Any, a: argparse.Namespace) -> bool:
    return each(sh, a.pids, lambda pid: sh.osh.kill(int(pid), a.signal))


@command("sysinfo", "sysinfo [--json]", "uptime, processes, drivers, per-syscall counts "
         "and latency, dropped messages", "processes",
         arg("--json", action="store_true"))
def do_sysinfo(sh: Any, a: argparse.Namespace) -> None:
    info = sh.osh.sysinfo()
    if a.json:
        sh.line(json.dumps(info, indent=2, sort_keys=True))
    else:
        sh.show(views.sysinfo_view(info))


# -- tensors -----------------------------------------------------------------------

@command("ls", "ls [-l] [PATH...]", "list tensorfs directories (default: the current one)",
         "tensors", arg("-l", "--long", action="store_true"), arg("paths", nargs="*"),
         details="-l adds mode, owner, size, modification time, dtype and shape. A "
                 "directory's name ends in /. ll is ls -l.",
         complete=("tensor",))
def do_ls(sh: Any, a: argparse.Namespace) -> bool:
    paths = a.paths or ["."]

    def one(p: str) -> None:
        path = sh.resolve(p)
        st = sh.osh.stat(path)
        entries = sh.osh.listdir(path) if st["type"] == "dir" else [st]
        if len(paths) > 1:
            sh.line(f"{path}:")
        if a.long:
            sh.show(views.ls_table(entries))
        elif sh.tty and entries:
            sh.show(Columns([views.entry_name(e) for e in entries], padding=(0, 2)))
        else:
            for e in entries:
                sh.show(views.entry_name(e))

    return each(sh, paths, one)


@command("cd", "cd [PATH]", "change the shell's tensorfs directory (default /; - the "
         "previous one)", "tensors", arg("path", nargs="?", default="/"),
         details="Relative tensorfs paths in every command start from it; the prompt "
                 "shows it.", complete=("tensor",))
def do_cd(sh: Any, a: argparse.Namespace) -> None:
    path = sh.previous if a.path == "-" else sh.resolve(a.path)
    st = sh.osh.stat(path)
    if st["type"] != "dir":
        raise SyscallError(Errno.ENOTDIR, f"cd: {path}: not a directory")
    sh.previous, sh.cwd = sh.cwd, path


@command("pwd", "pwd", "the shell's tensorfs directory", "tensors")
def do_pwd(sh: Any, a: argparse.Namespace) -> None:
    sh.line(sh.cwd)


@command("stat", "stat PATH...", "metadata of tensors or directories", "tensors",
         arg("paths", nargs="+"), complete=("tensor",))
def do_stat(sh: Any, a: argparse.Namespace) -> bool:
    first = [True]

    def one(p: str) -> None:
        st = sh.osh.stat(sh.resolve(p))
        if not first[0]:
            sh.line("")
        first[0] = False
        for line in views.stat_lines(st):
            sh.line(line)

    return each(sh, a.paths, one)


def load_numpy(osh: Any, path: str, member: str | None = None) -> np.ndarray:
    """A tensor (or a group's member) as a numpy array without torch: bfloat16
    becomes float32."""
    fd = osh.open_tensor(path, "r")["fd"]
    try:
        r = osh.read_tensor(fd, None, True, member)
    finally:
        osh.close_tensor(fd)
    dtype, shape = r["dtype"], r["shape"]
    count = int(np.prod(shape, dtype=np.int64))
    buf, _ = TensorMethods._received(r)  # the bytes, mapped or sent, as the library has them
    if dtype == "bfloat16":
        arr = (np.frombuffer(buf, dtype="<u2", count=count).astype(np.uint32) << 16) \
            .view(np.float32)
    else:
        arr = np.frombuffer(buf, dtype=_NP[dtype], count=count)
    return arr.reshape(shape)


def _number(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.6g}"


def summary_lines(path: str, st: dict[str, Any], arr: np.ndarray, first: int) -> list[str]:
    lines = [path, f"dtype   {st['dtype']}", f"shape   {st['shape']}",
             f"size    {views.size(st['size'])} ({arr.size:,} elements)"]
    flat = arr.reshape(-1)
    if flat.size == 0:
        lines.append("values  (empty)")
        return lines
    if arr.dtype == np.bool_:
        lines.append(f"true    {int(flat.sum()):,} of {flat.size:,}")
    else:
        values = flat.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size < values.size:
            lines.append(f"nan     {int(np.isnan(values).sum()):,}  "
                         f"inf {int(np.isinf(values).sum()):,}")
        if finite.size:
            lines.append(f"min     {_number(finite.min())}  max {_number(finite.max())}  "
                         f"mean {_number(finite.mean())}  std {_number(finite.std())}")
    shown = ", ".join(_number(x) for x in flat[:first])
    more = f", ... ({flat.size - first:,} more)" if flat.size > first else ""
    lines.append(f"values  [{shown}{more}]")
    if arr.dtype == np.uint8 and arr.ndim == 1:  # text, most likely: a dataset, a name
        head = bytes(flat[:200]).decode("utf-8", errors="replace")
        lines.append(f"text    {head!r}{' ...' if flat.size > 200 else ''}")
    return lines


@command("cat", "cat [-n N] PATH...", "a summary of tensors: dtype, shape, min, max, mean, "
         "std and the first values", "tensors",
         arg("-n", "--values", type=int, default=FIRST_VALUES), arg("paths", nargs="+"),
         details="-n: how many of the first values (in C order) to show, default "
                 f"{FIRST_VALUES}. A 1-D uint8 tensor (a dataset, a checkpoint's name) "
                 "also shows its first bytes as text. bfloat16 is summarised as float32.",
         complete=("tensor",))
def do_cat(sh: Any, a: argparse.Namespace) -> bool:
    if a.values < 0:
        raise UsageError("-n wants a count >= 0")
    first = [True]

    def one(p: str) -> None:
        path = sh.resolve(p)
        st = sh.osh.stat(path)
        if st["type"] == "dir":
            raise SyscallError(Errno.EISDIR, f"cat: {path}: a directory")
        parts = [(path, st, None)] if st["type"] != "group" else [
            (f"{path}[{m['name']}]", m, m["name"]) for m in st["members"]]
        for title, meta, member in parts:  # a group: each member in turn
            arr = load_numpy(sh.osh, path, member)
            if not first[0]:
                sh.line("")
            first[0] = False
            for line in summary_lines(title, meta, arr, a.values):
                sh.line(line)

    return each(sh, a.paths, one)


@command("put", "put [-q] [--progress] [-g] FILE PATH", "import a local file as a tensor: "
         ".npy, .pt, .safetensors, else its bytes as uint8", "tensors",
         arg("-q", "--quiet", action="store_true"), arg("--progress", action="store_true"),
         arg("-g", "--group", action="store_true"), arg("file"), arg("path"),
         details="A .pt or .safetensors file with several tensors becomes a directory "
                 "PATH with one tensor per key, or with -g one group at PATH (one "
                 "safetensors file, names kept). Prints the size, speed and checksum "
                 "(stderr) unless -q, and a progress bar from 64 MiB when stderr is a "
                 "terminal (--progress: always; -q: never).", complete=("local", "tensor"))
def do_put(sh: Any, a: argparse.Namespace) -> None:
    file = Path(os.path.expanduser(a.file))
    path = sh.resolve(a.path)
    with TransferBar(path, show_bar(a.quiet, a.progress, file_size(file))) as bar:
        try:
            data = _read_file(file, bar)
        except OSError:
            raise  # the shell prints it as ENOENT: ... and the like
        except Exception as e:  # not the format its suffix says
            raise SyscallError(Errno.EINVAL, f"put: cannot read {file}: {e}") from None
        check_storable(data, not a.group)  # before anything is written
        try:
            put_data(sh.osh, path, data, a.quiet, bar, a.group)
        except TypeError as e:  # a dtype tensorfs does not store (float64...)
            raise SyscallError(Errno.EINVAL, f"put: {e}") from None


@command("get", "get [-q] [--progress] PATH FILE", "export a tensor to a local file (.npy, "
         ".pt, .safetensors, else its raw bytes)", "tensors",
         arg("-q", "--quiet", action="store_true"), arg("--progress", action="store_true"),
         arg("path"), arg("file"),
         details="A group goes to a .safetensors or .pt file, its names kept. Prints "
                 "what it wrote unless -q, and a progress bar (stderr) from 64 MiB "
                 "when stderr is a terminal (--progress: always; -q: never).",
         complete=("tensor", "local"))
def do_get(sh: Any, a: argparse.Namespace) -> None:
    path = sh.resolve(a.path)
    st = sh.osh.stat(path)
    if st["type"] == "dir":
        raise SyscallError(Errno.EISDIR, f"get: {path}: a directory")
    file = Path(os.path.expanduser(a.file))
    if st["type"] == "group":
        if file.suffix.lower() not in (".pt", ".safetensors"):
            raise SyscallError(Errno.EINVAL, f"get: {path} is a group of "
                               f"{len(st['members'])} tensors: export it to a "
                               ".safetensors or .pt file")
        with TransferBar(path, show_bar(a.quiet, a.progress, st["size"])) as bar:
            _torch()
            bar.reading()
            _write_file(file, sh.osh.load_tensors(path), bar.part())
        if not a.quiet:
            sh.line(f"{file}: a group of {len(st['members'])}, {views.size(st['size'])}")
        return
    with TransferBar(path, show_bar(a.quiet, a.progress, st["size"])) as bar:
        if st["dtype"] == "bfloat16" or file.suffix.lower() in (".pt", ".safetensors"):
            _torch()  # load_tensor's import: before the bar's clock starts
            bar.reading()
            t = sh.osh.load_tensor(path)  # torch: keeps bfloat16
        else:
            bar.reading()
            t = load_numpy(sh.osh, path)  # numpy alone: no torch to import
        _write_file(file, t, bar.part())
    if not a.quiet:
        sh.line(f"{file}: {st['dtype']}{st['shape']}, {views.size(st['size'])}")


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o1777:
        raise argparse.ArgumentTypeError(f"an octal mode such as 644, not {text!r}")
    return mode


@command("mkdir", "mkdir [-p] [-m MODE] PATH...", "make tensorfs directories", "tensors",
         arg("-p", "--parents", action="store_true"),
         arg("-m", "--mode", type=_mode, default=0o755), arg("paths", nargs="+"),
         details="-p: make missing parents too, and an existing directory is no error. "
                 "-m: the mode, octal (default 755).", complete=("tensor",))
def do_mkdir(sh: Any, a: argparse.Namespace) -> bool:
    def one(p: str) -> None:
        path = sh.resolve(p)
        parts = [x for x in path.split("/") if x]
        targets = ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))] \
            if a.parents else [path]
        for target in targets:
            try:
                sh.osh.mkdir(target, a.mode)
            except SyscallError as e:
                if not (a.parents and e.errno == Errno.EEXIST):
                    raise

    return each(sh, a.paths, one)


@command("rm", "rm [-r] PATH...", "remove tensors or empty directories", "tensors",
         arg("-r", "--recursive", action="store_true"), arg("paths", nargs="+"),
         details="-r: directories with everything in them.", complete=("tensor",))
def do_rm(sh: Any, a: argparse.Namespace) -> bool:
    return each(sh, a.paths, lambda p: remove(sh.osh, sh.resolve(p), a.recursive))


@command("mv", "mv SRC DST", "rename a tensor or directory; into DST if it is a "
         "directory", "tensors", arg("src"), arg("dst"), complete=("tensor",))
def do_mv(sh: Any, a: argparse.Namespace) -> None:
    src, dst = sh.resolve(a.src), sh.resolve(a.dst)
    try:
        if sh.osh.stat(dst)["type"] == "dir":
            dst = posixpath.join(dst, posixpath.basename(src))
    except SyscallError as e:
        if e.errno not in (Errno.ENOENT, Errno.ENOTDIR):
            raise
    sh.osh.rename(src, dst)


@command("chmod", "chmod MODE PATH...", "set the mode bits (octal) of tensors or "
         "directories: the owner's or root's", "tensors",
         arg("mode", type=_mode), arg("paths", nargs="+"), complete=("", "tensor"))
def do_chmod(sh: Any, a: argparse.Namespace) -> bool:
    return each(sh, a.paths, lambda p: sh.osh.chmod(sh.resolve(p), a.mode))


# -- devices -----------------------------------------------------------------------

@command("devices", "devices [--json]", "CPUs, memory, GPUs (real or simulated), their "
         "allocations and the queue", "devices", arg("--json", action="store_true"),
         details="Allocations this shell holds are marked *.")
def do_devices(sh: Any, a: argparse.Namespace) -> None:
    info = sh.osh.devices()
    if a.json:
        sh.line(json.dumps(info, indent=2, sort_keys=True))
    else:
        sh.show(views.devices_view(info, sh.allocs))


@command("alloc", "alloc SIZE [--count N] [--exclusive] [--wait] [--timeout S] "
         "[--priority P]", "allocate GPU memory, held for the shell's life", "devices",
         arg("size"), arg("--count", type=int, default=1),
         arg("--exclusive", action="store_true"), arg("--wait", action="store_true"),
         arg("--timeout", type=float), arg("--priority", type=int, default=0),
         details="SIZE is bytes on each device: 4096, 512MiB, 2GiB, 1.5GB. Prints the "
                 "allocation's id first, then what it got. Without --wait, ENOMEM when "
                 "it cannot be met now; with it, it queues (Ctrl-C gives up; --timeout "
                 "S: ETIMEDOUT). The allocation lasts until free, or until the shell "
                 "exits. train --alloc ID trains on it.")
def do_alloc(sh: Any, a: argparse.Namespace) -> None:
    size: int | str = int(a.size) if a.size.isdigit() else a.size
    with sh.unbounded() if a.wait else _nothing():
        r = sh.osh.alloc_gpu(size, a.count, a.exclusive, a.wait, a.timeout, a.priority)
    sh.allocs[r["id"]] = r
    kind = " (simulated)" if r.get("simulated") else ""
    excl = ", exclusive" if r.get("exclusive") else ""
    sh.line(f"{r['id']}  {views.size(r['bytes_each'])} on each of {', '.join(r['devices'])}"
            f"{kind}{excl}")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def alloc_id(sh: Any, text: str) -> str:
    """One of the shell's allocations by its id or a unique prefix; else text as is."""
    if text in sh.allocs:
        return text
    matches = [i for i in sh.allocs if i.startswith(text)]
    return matches[0] if len(matches) == 1 else text


@command("free", "free ID... | free --all", "free GPU allocations", "devices",
         arg("ids", nargs="*"), arg("--all", action="store_true"),
         details="ID may be a unique prefix of an allocation of this shell. --all frees "
                 "every allocation the shell holds.", complete=("alloc",))
def do_free(sh: Any, a: argparse.Namespace) -> bool:
    ids = list(sh.allocs) if a.all else [alloc_id(sh, i) for i in a.ids]
    if not ids and not a.all:
        raise UsageError("name an allocation, or --all")

    def one(i: str) -> None:
        sh.osh.free_gpu(i)
        sh.allocs.pop(i, None)

    return each(sh, ids, one)


# -- models ------------------------------------------------------------------------

@command("corpus", "corpus PATH [FILE...] [--max-bytes SIZE]", "store text files "
         "(default: Python's standard library sources) as one uint8 tensor: a dataset",
         "models", arg("path"), arg("files", nargs="*"),
         arg("--max-bytes", type=parse_size, default=8 * 2**20),
         details="Makes PATH's missing parent directories. --max-bytes: default 8MiB.",
         complete=("tensor", "local"))
def do_corpus(sh: Any, a: argparse.Namespace) -> None:
    data = read_corpus([Path(os.path.expanduser(f)) for f in a.files], a.max_bytes)
    if not data:
        raise SyscallError(Errno.ENOENT, "corpus: no text found in the files given")
    path = sh.resolve(a.path)
    _mkdirs(sh.osh, path)
    sh.osh.save_tensor(path, np.frombuffer(data, dtype=np.uint8))
    sh.line(f"{path}: {len(data):,} bytes of text")


@command("train", "train NAME --data PATH [KEY=VALUE...] [--alloc ID] [-d]",
         "train a byte-level GPT (spawn_train), with a progress line until it ends",
         "models", arg("name"), arg("settings", nargs="*"), arg("--data", required=True),
         arg("--alloc"), arg("-d", "--detach", action="store_true"),
         details="KEY=VALUE sets any config key (docs/executor.md): steps=300 workers=2 "
                 "n_layer=4 n_head=4 n_embd=128 block_size=128 batch_size=12 lr=1e-3 "
                 "checkpoint_every=100 restarts=0 gpus=0 seed=0 resume=true out=PATH... "
                 "--alloc: one of the shell's allocations (a prefix will do). Ctrl-C stops "
                 "the job (TERM). -d prints the job's pid and returns; jobs and top show "
                 "it, wait reaps it. It fails unless the job ends with status 0.",
         complete=("",), option_complete={"--data": "tensor", "--alloc": "alloc"})
def do_train(sh: Any, a: argparse.Namespace) -> bool:
    config: dict[str, Any] = {"name": a.name, "dataset": sh.resolve(a.data)}
    for item in a.settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"settings are KEY=VALUE, not {item!r}")
        config[key] = sh.resolve(value) if key == "out" else _scalar(value)
    with sh.unbounded():
        pid = sh.osh.spawn_train(config, alloc_id(sh, a.alloc) if a.alloc else None)
    if a.detach:
        sh.line(str(pid))
        return True
    sh.line(f"training job {pid}: {a.name} on {config['dataset']} (Ctrl-C stops it)")
    try:
        record = follow(sh, pid)
    except KeyboardInterrupt:
        sh.clear_status()
        sh.osh.kill(pid, "TERM")
        with sh.unbounded():
            record = sh.osh.wait(pid)
    info = record.get("info") or {}
    sh.line(progress(info) if info else views.wait_line(record))
    if info.get("checkpoint"):
        sh.line(f"checkpoint: {info['checkpoint']}")
    if record["status"] != 0:
        sh.note(views.wait_line({**record, "info": {}}))
        return False
    return True


def follow(sh: Any, pid: int) -> dict[str, Any]:
    """Show job pid's progress until it ends (a line rewritten in place on a
    terminal, else a line per change); its wait record."""
    try:
        return follow_job(sh.osh, pid, sh.status)
    finally:
        sh.clear_status()


def _infer_args(default_tokens: int) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    return [arg("-n", "--max-tokens", type=int, default=default_tokens),
            arg("-t", "--temperature", type=float, default=0.8),
            arg("-k", "--top-k", type=int, default=40), arg("--seed", type=int)]


def stream(sh: Any, model: str, prompt: str, a: argparse.Namespace,
           echo: str = "") -> dict[str, Any]:
    """Generate after prompt, writing echo and then the text as it comes; the final
    record. Nothing is written if the call fails before it generates."""
    final: dict[str, Any] = {}
    wrote = False
    with sh.unbounded():
        it: Iterator[dict] = sh.osh.infer(model, prompt, a.max_tokens, a.temperature,
                                          a.top_k, a.seed, stream=True)
        try:
            for part in it:
                if not wrote:
                    sys.stdout.write(echo)
                    wrote = True
                if part.get("finish_reason"):
                    final = part
                else:
                    sys.stdout.write(part["text"])
                    sys.stdout.flush()
        finally:
            it.close()  # Ctrl-C: stop the generation too
            if wrote:
                sys.stdout.write("\n")
                sys.stdout.flush()
    return final


@command("infer", "infer MODEL PROMPT... [-n N] [-t T] [-k K] [--seed N] [-q] [-v]",
         "generate text after PROMPT with a model, streamed", "models",
         arg("model"), arg("prompt", nargs="+"), *_infer_args(200),
         arg("-q", "--quiet", action="store_true"), arg("-v", "--verbose", action="store_true"),
         details="MODEL: a tensorfs model directory (its latest checkpoint) or a "
                 "checkpoint. The words of PROMPT are joined with spaces. Defaults: 200 "
                 "tokens (-n), temperature 0.8 (-t; 0 is greedy), top-k 40 (-k), a random "
                 "seed. -q: do not echo the prompt; -v: tokens, time and seed after. "
                 "Ctrl-C stops the generation.", complete=("tensor", ""))
def do_infer(sh: Any, a: argparse.Namespace) -> None:
    prompt = " ".join(a.prompt)
    model = sh.resolve(a.model)
    final = stream(sh, model, prompt, a, echo="" if a.quiet else prompt)
    if a.verbose and final:
        rate = final["tokens"] / final["time_s"] if final.get("time_s") else 0.0
        sh.note(f"[{final['tokens']} tokens in {final['time_s']:.2f}s, {rate:.0f} tok/s, "
                f"seed {final['seed']}, {final['finish_reason']}]")


@command("chat", "chat MODEL [-t T] [-n N] [-k K] [--seed N]", "talk to a model: each line "
         "you type is a prompt, its continuation is streamed back", "models",
         arg("model"), *_infer_args(100),
         details="The model is a byte-level GPT that continues text: each line is a fresh "
                 "prompt (no memory of the earlier ones). An empty line or Ctrl-D leaves; "
                 "Ctrl-C stops a generation. When stdin is not a terminal (a script) the "
                 "lines come from it, up to an empty line, each echoed before its "
                 "continuation. "
                 "Defaults: 100 tokens, temperature 0.8, top-k 40.",
         complete=("tensor",))
def do_chat(sh: Any, a: argparse.Namespace) -> bool:
    model = sh.resolve(a.model)
    sh.osh.stat(model)  # ENOENT now rather than after the first line
    typed = sys.stdin.isatty()  # else the lines come from a script: echo them
    if typed:
        sh.note(f"chat with {model}: each line is a prompt; an empty line or Ctrl-D leaves")
    ok = True
    while True:
        line = sh.read_line("chat> ")
        if line is None or not line.strip():
            return ok
        try:
            stream(sh, model, line, a, echo="" if typed else line)
        except KeyboardInterrupt:
            ok = False
        except SyscallError as e:
            sh.syscall_error(e)
            ok = False


@command("models", "models", "the models the executor holds loaded, and its batching "
         "statistics", "models")
def do_models(sh: Any, a: argparse.Namespace) -> None:
    sh.show(views.models_view(sh.osh.models()))


# -- the shell itself --------------------------------------------------------------

@command("help", "help [COMMAND]", "list the commands, or show how to use one", "shell",
         arg("name", nargs="?"), complete=("command",))
def do_help(sh: Any, a: argparse.Namespace) -> bool:
    if a.name:
        cmd = lookup(a.name)
        if cmd is None:
            sh.error(unknown(a.name))
            return False
        sh.line(cmd.help_text())
        return True
    for family in FAMILIES:
        sh.show(Text(family, style="bold"))
        for cmd in COMMANDS.values():
            if cmd.family == family:
                sh.line(f"  {cmd.name:<9} {cmd.summary}")
    sh.line("\nhelp COMMAND (or COMMAND --help) shows its usage. Commands are separated by "
            "; or newlines; # starts a comment. TAB completes commands and paths.")
    return True


@command("exit", "exit [STATUS]", "leave the shell (quit and Ctrl-D too)", "shell",
         arg("status", nargs="?", type=int),
         details="With -c or a script, the exit status is STATUS if given, else 0 if "
                 "every command succeeded and 1 if one failed.")
def do_exit(sh: Any, a: argparse.Namespace) -> None:
    if a.status is not None and not 0 <= a.status <= 255:
        raise UsageError("STATUS is 0 to 255")
    raise ExitShell(a.status)


def _value(text: str) -> Any:
    if text.startswith("b:"):  # bytes: the UTF-8 of the rest
        return text[2:].encode()
    try:
        return json.loads(text)
    except ValueError:
        return text


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return repr(bytes(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@command("syscall", "syscall NAME [KEY=VALUE...]", "make any syscall by name and print "
         "its result as JSON", "shell", arg("name"), arg("args", nargs="*"),
         details="VALUEs are JSON (12, 1.5, true, null, [1, 2], {\"a\": 1}), b:TEXT for "
                 "the bytes of TEXT, else text: syscall nop, syscall getppid, syscall echo "
                 "data=b:hi, syscall sleep seconds=0.5, syscall report "
                 "'info={\"step\": 1}'. A streaming syscall prints its final reply. "
                 "docs/syscalls.md lists them all.", complete=("syscall",))
def do_syscall(sh: Any, a: argparse.Namespace) -> None:
    if a.name not in BY_NAME or a.name == "attach":
        raise SyscallError(Errno.ENOSYS, f"no syscall named {a.name!r}"
                           + (" (the shell is attached already)" if a.name == "attach"
                              else ""))
    kwargs = {}
    for item in a.args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"arguments are KEY=VALUE, not {item!r}")
        kwargs[key] = _value(value)
    if a.name == "exit":
        raise UsageError("use the exit command to leave the shell")
    with sh.unbounded():
        result = sh.osh.call(a.name, **kwargs)
    sh.line(json.dumps(_plain(result), indent=2, sort_keys=True))


# -- lookup ------------------------------------------------------------------------

def lookup(name: str) -> Command | None:
    alias = ALIASES.get(name)
    if alias is not None:
        name = alias.split()[0]
    return COMMANDS.get(name)


def names() -> list[str]:
    return sorted([*COMMANDS, *ALIASES])


def unknown(name: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, names(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; help lists the commands"
    return f"ENOSYS: {name}: unknown command{hint}"
