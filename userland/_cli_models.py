"""The model commands of `llmos`: corpus, train, jobs, infer, models (docs/executor.md).

    llmos corpus PATH [--max-bytes SIZE] [FILE...]   text files (default: the Python
                                                     standard library sources) as bytes
    llmos train NAME --data PATH [options]           spawn_train, then a progress line
    llmos jobs                                       processes that report progress
    llmos infer MODEL PROMPT [-n N] [-t T] [-k K]    streamed generation
    llmos models                                     what the executor holds loaded

cli.py registers these with add_commands.
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from syscalls import Errno, Home, SyscallError
from syscalls._schema import parse_size

POLL_S = 0.5


def stdlib_files() -> Iterator[Path]:
    """The .py files of this interpreter's standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" not in path.parts and "test" not in path.parts:
            yield path


def read_corpus(files: list[Path] | None, max_bytes: int) -> bytes:
    """The files' bytes, up to max_bytes; files named explicitly must be readable
    (OSError), the standard library's unreadable ones are skipped."""
    out = bytearray()
    for path in files if files else stdlib_files():
        try:
            out += path.read_bytes()
        except OSError:
            if files:
                raise
            continue
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def _mkdirs(osh: Any, path: str) -> None:
    parts = [p for p in path.split("/") if p][:-1]
    for i in range(len(parts)):
        try:
            osh.mkdir("/" + "/".join(parts[:i + 1]))
        except SyscallError as e:
            if e.errno != Errno.EEXIST:
                raise


def progress(info: dict[str, Any]) -> str:
    """One line of a job's progress: step 120/300 [#####.....] loss 2.41 (from 5.55) ..."""
    step, steps = info.get("step", 0), info.get("steps") or 0
    parts = [str(info.get("state", "?"))]
    if steps:
        done = min(1.0, step / steps)
        bar = "#" * int(done * 20) + "." * (20 - int(done * 20))
        parts.append(f"step {step}/{steps} [{bar}]")
    if isinstance(info.get("loss"), (int, float)):
        loss = f"loss {info['loss']:.3f}"
        if isinstance(info.get("loss0"), (int, float)):
            loss += f" (from {info['loss0']:.3f})"
        parts.append(loss)
    if isinstance(info.get("tokens_per_s"), (int, float)):
        parts.append(f"{info['tokens_per_s']:,.0f} tok/s")
    if info.get("error"):
        parts.append(f"error: {info['error']}")
    # what a process reported goes to other users' terminals: no control characters
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in "  ".join(parts))


def follow(osh: Any, pid: int, show: Callable[[str], None]) -> dict:
    """Call show(line) with pid's progress each time it changes, until it ends; its
    wait record."""
    last = ""
    while True:
        try:
            return osh.wait(pid, timeout=POLL_S)
        except SyscallError as e:
            if e.errno != Errno.ETIMEDOUT:
                raise
        me = next((p for p in osh.ps() if p["pid"] == pid), None)
        line = progress(me["info"]) if me and me.get("info") else "starting"
        if line != last:
            show(line)
        last = line


def show_line() -> Callable[[str], None]:
    """A progress display: one line rewritten in place on a terminal, else a line each."""
    width = [0]

    def show(line: str) -> None:
        if sys.stdout.isatty():
            line = line[:os.get_terminal_size().columns - 1]
            print("\r" + line.ljust(width[0]), end="", flush=True)
            width[0] = len(line)
        else:
            print(line, flush=True)
    return show


def add_commands(command: Callable[..., argparse.ArgumentParser],
                 connect: Callable[..., Any]) -> None:
    def cmd_corpus(home: Home, args: argparse.Namespace) -> int:
        data = read_corpus([Path(f) for f in args.files], args.max_bytes)
        if not data:
            raise SyscallError(Errno.ENOENT, "corpus: no text found in the files given")
        with connect(home) as osh:
            _mkdirs(osh, args.path)
            osh.save_tensor(args.path, np.frombuffer(data, dtype=np.uint8))
        print(f"{args.path}: {len(data):,} bytes of text")
        return 0

    def cmd_train(home: Home, args: argparse.Namespace) -> int:
        config: dict[str, Any] = {"name": args.name, "dataset": args.data}
        for key in ("steps", "workers", "n_layer", "n_head", "n_embd", "block_size",
                    "batch_size", "lr", "checkpoint_every", "restarts", "gpus", "seed",
                    "out"):
            if getattr(args, key) is not None:
                config[key] = getattr(args, key)
        if args.resume:
            config["resume"] = True
        for item in args.set:
            key, _, value = item.partition("=")
            config[key] = _scalar(value)
        with connect(home, heartbeat=True) as osh:
            pid = osh.spawn_train(config)
            if args.detach:
                print(pid)
                return 0
            print(f"training job {pid}: {args.name} on {args.data} "
                  f"(llmos jobs; Ctrl-C stops it)", flush=True)
            try:
                record = follow(osh, pid, show_line())
            except KeyboardInterrupt:
                osh.kill(pid, "TERM")
                osh.timeout = 30
                record = osh.wait(pid)
            if sys.stdout.isatty():
                print()  # below the progress line rewritten in place
            info = record.get("info") or {}
            if record["reason"] != "exited":
                print(f"job {pid} {record['reason']} (status {record['status']})")
            elif info:
                print(progress(info))
            if info.get("checkpoint"):
                print(f"checkpoint: {info['checkpoint']}")
            status = record["status"]
            return status if status >= 0 else 128 - status


    def cmd_jobs(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            procs = [p for p in osh.ps() if p.get("info")]
        if not procs:
            print("no jobs")
            return 0
        now = time.time()
        for p in sorted(procs, key=lambda p: p["pid"]):
            print(f"{p['pid']:>5}  {_elapsed(now - p['start_time']):>7}  "
                  f"{' '.join(p['argv'][-1:])[:24]:<24}  {progress(p['info'])}")
        return 0

    def cmd_infer(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            it = osh.infer(args.model, args.prompt, args.max_tokens, args.temperature,
                           args.top_k, args.seed, stream=True)
            final: dict = {}
            echo = "" if args.quiet else args.prompt  # once the model answers
            for part in it:
                if part.get("finish_reason"):
                    final = part
                else:
                    sys.stdout.write(echo + part["text"])
                    sys.stdout.flush()
                    echo = ""
        sys.stdout.write("\n")
        if args.verbose:
            rate = final["tokens"] / final["time_s"] if final.get("time_s") else 0.0
            print(f"[{final['tokens']} tokens in {final['time_s']:.2f}s, {rate:.0f} tok/s, "
                  f"seed {final['seed']}, {final['finish_reason']}]", file=sys.stderr)
        return 0

    def cmd_models(home: Home, args: argparse.Namespace) -> int:
        with connect(home) as osh:
            m = osh.models()
        if not m["models"]:
            print("no models loaded")
        for x in m["models"]:
            loss = f"{x['loss']:.3f}" if isinstance(x["loss"], (int, float)) else "-"
            print(f"{x['path']}  {x['bytes'] / 2**20:.1f}MiB  step {x['step']}  "
                  f"loss {loss}  {x['requests']} requests")
        e = m["engine"]
        if e:
            print(f"engine: {e.get('steps', 0)} steps, {e.get('tokens', 0)} tokens, mean batch "
                  f"{e.get('mean_batch', 0):.2f}, {e.get('running', 0)} running, "
                  f"{e.get('queued', 0)} queued")
        return 0

    p = command("corpus", cmd_corpus, "store text files (default: the Python standard "
                "library's sources) as one uint8 tensor, a training dataset")
    p.add_argument("path", metavar="PATH", help="e.g. /datasets/pystdlib")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--max-bytes", type=_size, default=parse_size("8MiB"), metavar="SIZE",
                   help="stop at this many bytes (default 8MiB)")
    p = command("train", cmd_train, "start a training job (spawn_train) and show its "
                "progress")
    p.add_argument("name", metavar="NAME", help="the model's name: it goes to /models/NAME")
    p.add_argument("--data", required=True, metavar="PATH", help="a uint8 tensor of text")
    for flag, key, kind in (("--steps", "steps", int), ("--workers", "workers", int),
                            ("--layers", "n_layer", int), ("--heads", "n_head", int),
                            ("--width", "n_embd", int), ("--context", "block_size", int),
                            ("--batch", "batch_size", int), ("--lr", "lr", float),
                            ("--checkpoint-every", "checkpoint_every", int),
                            ("--restarts", "restarts", int), ("--gpus", "gpus", int),
                            ("--seed", "seed", int), ("--out", "out", str)):
        p.add_argument(flag, dest=key, type=kind, default=None)
    p.add_argument("--resume", action="store_true", help="go on from the last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key (docs/executor.md)")
    p.add_argument("-d", "--detach", action="store_true", help="print the pid and return")
    command("jobs", cmd_jobs, "processes that report progress: training jobs")
    p = command("infer", cmd_infer, "generate text with a model, streamed")
    p.add_argument("model", metavar="MODEL", help="e.g. /models/NAME")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-n", "--max-tokens", type=int, default=200)
    p.add_argument("-t", "--temperature", type=float, default=0.8)
    p.add_argument("-k", "--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the prompt")
    p.add_argument("-v", "--verbose", action="store_true", help="tokens/s and seed after")
    command("models", cmd_models, "the models the executor holds loaded")


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _elapsed(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
