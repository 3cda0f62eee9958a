"""The device commands: devices, alloc, free (docs/devices.md).

An allocation belongs to the process that made it and is freed when that process
ends, so alloc works as Slurm's salloc: with a program, the program runs as a
child with the allocation's environment (CUDA_VISIBLE_DEVICES, its memory bound)
and the allocation is freed when it ends; without one, the calling process holds
it: the shell for its whole session, a one-shot `llmos alloc` until Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

from syscalls import format_size

from . import _views
from ._cmd_procs import exit_status, program, wait_forwarding
from ._argtypes import seconds, sized
from ._command import Session, UsageError, arg, command, each, shows
from ._kernelctl import LogTail

ALLOC_JSON = "{id, devices, bytes_each, count, exclusive, simulated, capacity}"


shows("devices", "devices", "CPUs, memory, GPUs (real or simulated), their allocations "
      "and the requests waiting for one", lambda info, s: _views.devices_lines(info, s.allocs),
      "devices()'s record: {gpus: [{id, index, name, simulated, capacity, allocated, free, "
      "exclusive, allocations}], cpus, memory, queue, simulated}",
      details="Allocations this session holds are marked *.")


def alloc_line(r: dict[str, Any]) -> str:
    kind = " (simulated)" if r.get("simulated") else ""
    excl = ", exclusive" if r.get("exclusive") else ""
    return (f"{r['id']}  {format_size(r['bytes_each'])} on each of "
            f"{', '.join(map(str, r['devices']))}{kind}{excl}")


@command("alloc", "devices", "allocate GPU memory: for a program run with it, or held by "
         "this session",
         arg("size", type=sized, metavar="SIZE",
             help="bytes on each device: 4096, 512MiB, 2GiB, 1.5GB"),
         arg("--count", type=int, default=1, metavar="N", help="how many distinct GPUs"),
         arg("--exclusive", action="store_true",
             help="share the GPUs with no other allocation"),
         arg("--wait", action="store_true",
             help="queue until it can be met (Ctrl-C gives up) instead of ENOMEM"),
         arg("--timeout", type=seconds, metavar="S", help="with --wait: ETIMEDOUT after S"),
         arg("--priority", type=int, default=0, metavar="P",
             help="queue order, higher first; above 0 for uid 0 only"),
         arg("command", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS...]",
             complete="local",
             help="run this with the allocation (its environment says which GPUs and "
                  "how much), then free it"),
         syscalls=("alloc_gpu", "free_gpu", "spawn", "wait"),
         json_keys=ALLOC_JSON, remainder=True,
         details="Prints the allocation's id first. Without PROGRAM the allocation is "
                 "held by this session: the shell's, until free or until it exits; a "
                 "one-shot llmos alloc's, until Ctrl-C or SIGTERM. train --alloc ID "
                 "(in the shell) trains on it. With PROGRAM, the exit status is the "
                 "program's.")
def alloc(s: Session, a: argparse.Namespace) -> dict[str, Any] | None:
    with s.unbounded() if a.wait else contextlib.nullcontext():
        r = s.osh.alloc_gpu(a.size, a.count, a.exclusive, a.wait, a.timeout, a.priority)
    s.allocs[r["id"]] = r
    if s.json:  # the allocation first; a program's output follows
        s.line(json.dumps(r, indent=2, sort_keys=True))
    if a.command:
        _run_with(s, r, program(a.command))
        return None
    if not s.json:
        s.line(alloc_line(r))
    if not s.shell:
        _hold(s, r)
    return None


def _run_with(s: Session, r: dict[str, Any], argv: list[str]) -> None:
    """Run argv as a child with allocation r's environment; then free r."""
    pid = s.osh.spawn(argv, gpus=r)
    s.note(f"{alloc_line(r)}: running pid {pid}")
    tail = LogTail(s.home.proc_log(pid), sys.stdout.buffer)
    try:
        with s.unbounded():
            try:
                record = wait_forwarding(s, pid, tail)
            finally:
                tail.stop()
    finally:
        s.osh.free_gpu(r["id"])
        s.allocs.pop(r["id"], None)
    s.status = exit_status(record)
    return None


def _hold(s: Session, r: dict[str, Any]) -> None:
    """Keep this one-shot process (and with it the allocation) alive until Ctrl-C
    or SIGTERM; then free it."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    s.note(f"holding {r['id']} (pid {s.osh.pid}); Ctrl-C frees it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    s.osh.free_gpu(r["id"])
    s.allocs.pop(r["id"], None)
    s.note(f"freed {r['id']}")


def alloc_id(s: Session, text: str) -> str:
    """One of the session's allocations by its id or a unique prefix; else text as is."""
    if text in s.allocs:
        return text
    matches = [i for i in s.allocs if i.startswith(text)]
    return matches[0] if len(matches) == 1 else text


@command("free", "devices", "free GPU allocations",
         arg("ids", nargs="*", metavar="ID", complete="alloc",
             help="an allocation, or a unique prefix of one of this session's"),
         arg("--all", action="store_true", help="every allocation this session holds"),
         syscalls=("free_gpu",),
         details="An allocation of another process is EPERM unless you act as uid 0 "
                 "(--uid 0).")
def free(s: Session, a: argparse.Namespace) -> None:
    ids = list(s.allocs) if a.all else [alloc_id(s, i) for i in a.ids]
    if not ids and not a.all:
        raise UsageError("name an allocation, or --all")

    def one(i: str) -> None:
        s.osh.free_gpu(i)
        s.allocs.pop(i, None)

    each(s, ids, one)
