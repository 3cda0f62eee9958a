"""Many client processes at once: every reply must come back, and be the right one.

    python bench/load.py [--clients 32] [--calls 500] [--seed N] [--home DIR]
                         [--no-tensors] [--json]

Starts --clients client processes (from a forkserver, so none inherits a ZeroMQ
context), each of which attaches (userland.connect) and, after a common start
barrier, makes --calls operations, chosen at random:
  nop       must return None
  getpid    must return the pid attach gave this process
  echo      random bytes (0-16 KiB) through the echo driver, compared byte for byte
  ps        must list this process, running, with its uid
  tensor    a small random int32 tensor saved to /load/<client>-<k> and loaded back
            (save_tensor, load_tensor: six tensorfs syscalls), compared element for
            element; skipped with --no-tensors
Every call waits at most 10 s for its reply (userland's timeout): a reply that does
not come is counted as lost, an answer that is not the expected one as wrong, and
any error reply as an error. At the end the kernel must be the same live process,
and its own counters must show no reply dropped (reply_queue_full,
reply_unroutable), no internal error, no driver restarted.

It prints p50/p90/p99/max latency per operation and over all of them, and the
aggregate rate (operations and syscalls per second, over first start to last end on
one monotonic clock). Timing never fails anything: the exit status is 1 only for a
lost, wrong or failed call, a client that died, or a dead kernel. Without --home it
boots its own kernel on a temporary home and stops it at the end, by pid.

The clients attach without heartbeats: 32 processes on 2 cores can be starved for
longer than the 1.5 s after which the kernel declares a heartbeating process lost
and SIGKILLs it, which is right for a real program and wrong for a load test. The
clients keep torch out (load_tensor returns numpy arrays), so 32 of them fit in
memory.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import psutil  # noqa: E402

import userland  # noqa: E402
from syscalls import Errno, Home, SyscallError  # noqa: E402

HANG_S = 10.0
LOAD_DIR = "/load"
OPS = ("nop", "getpid", "echo", "ps", "tensor")
WEIGHTS = (30, 20, 30, 10, 10)
SYSCALLS_PER_OP = {"nop": 1, "getpid": 1, "echo": 1, "ps": 1, "tensor": 6}
REPLY_DROPS = ("reply_queue_full", "reply_unroutable", "internal_error")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- one client ---------------------------------------------------------------------------


def client_main(root: str, index: int, calls: int, seed: int, tensors: bool,
                barrier: Any, results: Any) -> None:
    """One client process: attach, meet the others, make `calls` operations, report."""
    sys.modules["torch"] = None  # type: ignore[assignment]  # numpy arrays: 32 torches do not fit
    import numpy as np

    rng = random.Random(seed * 1000 + index)
    out: dict[str, Any] = {"index": index, "ops": Counter(), "lost": 0, "wrong": [],
                           "errors": [], "lat": {op: [] for op in OPS}, "t0": 0, "t1": 0,
                           "syscalls": 0}
    ops = [op for op in OPS if tensors or op != "tensor"]
    weights = [w for op, w in zip(OPS, WEIGHTS) if tensors or op != "tensor"]
    try:
        osh = userland.connect(root, heartbeat=False, timeout=HANG_S)
    except SyscallError as e:
        out["errors"].append(f"connect: {e}")
        barrier.abort()
        results.put(out)
        return
    try:
        pid, uid = osh.pid, osh.uid
        for _ in range(5):  # warm the connection (and the echo path) up
            osh.nop()
            osh.echo(b"warm")
        barrier.wait(120)
        clock = time.perf_counter_ns
        out["t0"] = clock()
        for k in range(calls):
            op = rng.choices(ops, weights)[0]
            t = clock()
            try:
                if op == "nop":
                    ok = osh.nop() is None
                elif op == "getpid":
                    ok = osh.getpid() == pid
                elif op == "echo":
                    data = rng.randbytes(rng.choice([0, 1, 64, 1024, 16384]))
                    got = osh.echo(data)
                    ok = type(got) is bytes and got == data
                elif op == "ps":
                    me = [p for p in osh.ps() if p["pid"] == pid]
                    ok = len(me) == 1 and me[0]["state"] == "running" and me[0]["uid"] == uid
                else:
                    arr = np.frombuffer(rng.randbytes(4 * rng.randrange(1, 257)), dtype="<i4")
                    path = f"{LOAD_DIR}/c{index}-{k % 4}"
                    osh.save_tensor(path, arr)
                    back = osh.load_tensor(path)
                    ok = isinstance(back, np.ndarray) and back.dtype == arr.dtype \
                        and np.array_equal(back, arr)
            except SyscallError as e:
                if e.errno == Errno.ETIMEDOUT:
                    out["lost"] += 1
                    out["errors"].append(f"{op}: no reply in {HANG_S:g} s")
                else:
                    out["errors"].append(f"{op}: {e}")
                if e.errno == Errno.EIO or len(out["errors"]) > 20:
                    break  # the kernel is gone, or nothing works: stop here
                continue
            out["lat"][op].append(clock() - t)
            out["ops"][op] += 1
            out["syscalls"] += SYSCALLS_PER_OP[op]
            if not ok:
                out["wrong"].append(f"{op} (call {k})")
        out["t1"] = clock()
    except Exception as e:  # reported, not lost
        out["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        try:
            osh.close()
        except Exception:
            pass
    results.put(out)


# -- the run ------------------------------------------------------------------------------------


def _quantile(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else 0


def _summary(samples: list[int]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "p50_us": round(_quantile(s, 0.50) / 1e3, 1),
            "p90_us": round(_quantile(s, 0.90) / 1e3, 1),
            "p99_us": round(_quantile(s, 0.99) / 1e3, 1),
            "max_us": round((s[-1] if s else 0) / 1e3, 1)}


def run_load(home: str | os.PathLike | Home, clients: int = 32, calls: int = 500,
             seed: int = 0, tensors: bool = True, timeout: float = 600.0) -> dict[str, Any]:
    """Run the load against the kernel on home; returns the results (see render())."""
    home = home if isinstance(home, Home) else Home.resolve(home)
    kernel_pid = home.kernel_pid()
    if kernel_pid is None:
        raise RuntimeError(f"no kernel is running on {home.root}")
    with userland.connect(home.root, uid=0, heartbeat=False, timeout=HANG_S) as control:
        before = control.sysinfo()
        if tensors:
            try:
                control.mkdir(LOAD_DIR, 0o1777)
            except SyscallError as e:
                if e.errno != Errno.EEXIST:
                    raise
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["userland", "numpy", "load"])
    barrier = ctx.Barrier(clients)
    results = ctx.Queue()
    procs = [ctx.Process(target=client_main, name=f"llmos-load-{i}",
                         args=(str(home.root), i, calls, seed, tensors, barrier, results))
             for i in range(clients)]
    t_start = time.monotonic()
    for p in procs:
        p.start()
    outs: list[dict] = []
    try:
        deadline = t_start + timeout
        while len(outs) < clients and time.monotonic() < deadline:
            try:
                outs.append(results.get(timeout=1.0))
            except Exception:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    res = _aggregate(outs, clients, calls, kernel_pid)
    res["wall_s"] = round(time.monotonic() - t_start, 2)
    alive = psutil.pid_exists(kernel_pid) and home.kernel_pid() == kernel_pid
    res["kernel_alive"] = alive
    if alive:
        with userland.connect(home.root, uid=0, heartbeat=False, timeout=HANG_S) as control:
            after = control.sysinfo()
        d0, d1 = before["dropped"], after["dropped"]
        res["kernel_dropped"] = {k: d1[k] - d0.get(k, 0) for k in d1 if d1[k] - d0.get(k, 0)}
        r0 = {d["name"]: d["restarts"] for d in before["drivers"]}
        res["driver_restarts"] = {d["name"]: d["restarts"] - r0.get(d["name"], 0)
                                  for d in after["drivers"]
                                  if d["restarts"] != r0.get(d["name"], d["restarts"])}
    else:
        res["failures"].append(f"the kernel (pid {kernel_pid}) died")
    for k in REPLY_DROPS:
        if res.get("kernel_dropped", {}).get(k):
            res["failures"].append(f"the kernel counted {res['kernel_dropped'][k]} {k}")
    for name, n in res.get("driver_restarts", {}).items():
        res["failures"].append(f"driver {name} was restarted {n} time(s)")
    res["ok"] = not res["failures"]
    return res


def _aggregate(outs: list[dict], clients: int, calls: int, kernel_pid: int) -> dict[str, Any]:
    lat: dict[str, list[int]] = {op: [] for op in OPS}
    ops: Counter = Counter()
    failures: list[str] = []
    lost = wrong = errors = syscalls = 0
    for o in outs:
        for op in OPS:
            lat[op] += o["lat"][op]
        ops.update(o["ops"])
        lost += o["lost"]
        wrong += len(o["wrong"])
        errors += len(o["errors"]) - o["lost"]
        syscalls += o["syscalls"]
        for w in o["wrong"][:3]:
            failures.append(f"client {o['index']}: wrong answer to {w}")
        for e in o["errors"][:3]:
            failures.append(f"client {o['index']}: {e}")
        done = sum(o["ops"].values())
        if done + o["lost"] + len(o["errors"]) - o["lost"] < calls and not o["errors"]:
            failures.append(f"client {o['index']} made {done} of {calls} calls")
    if len(outs) < clients:
        failures.append(f"{clients - len(outs)} of {clients} clients reported nothing "
                        "(died or hung)")
    timed = [o for o in outs if o["t0"] and o["t1"]]
    span = (max(o["t1"] for o in timed) - min(o["t0"] for o in timed)) / 1e9 if timed else 0.0
    total = sum(ops.values())
    return {"clients": clients, "calls_per_client": calls, "kernel_pid": kernel_pid,
            "reported": len(outs), "operations": total, "syscalls": syscalls,
            "by_op": dict(ops), "lost": lost, "wrong": wrong, "errors": errors,
            "seconds": round(span, 3),
            "ops_per_s": round(total / span, 1) if span else 0.0,
            "syscalls_per_s": round(syscalls / span, 1) if span else 0.0,
            "latency": {"all": _summary([x for v in lat.values() for x in v]),
                        **{op: _summary(v) for op, v in lat.items() if v}},
            "failures": failures[:40]}


def render(res: dict[str, Any]) -> str:
    lines = [f"llmos load: {res['clients']} client processes x {res['calls_per_client']} "
             f"operations, kernel pid {res['kernel_pid']}",
             f"  done:      {res['operations']} operations ({res['syscalls']} syscalls) in "
             f"{res['seconds']:.2f} s: {res['ops_per_s']:.0f} ops/s, "
             f"{res['syscalls_per_s']:.0f} syscalls/s",
             f"  replies:   {res['lost']} lost, {res['wrong']} wrong, {res['errors']} errors; "
             f"{res['reported']}/{res['clients']} clients reported",
             f"  kernel:    {'alive' if res['kernel_alive'] else 'DEAD'}, dropped "
             f"{res.get('kernel_dropped') or 'nothing'}, driver restarts "
             f"{res.get('driver_restarts') or 'none'}",
             "  latency (us)      n      p50      p90      p99      max"]
    for op, s in res["latency"].items():
        lines.append(f"    {op:<8} {s['n']:>8} {s['p50_us']:>8.0f} {s['p90_us']:>8.0f} "
                     f"{s['p99_us']:>8.0f} {s['max_us']:>8.0f}")
    lines.append("  result:    " + ("OK" if res["ok"] else "FAILED: " + "; ".join(
        res["failures"][:10])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--calls", type=int, default=500, help="operations per client")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--home", help="use the kernel running on this LLMOS_HOME "
                    "(default: boot one on a temporary home)")
    ap.add_argument("--no-tensors", action="store_true", help="leave out the tensor round trips")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from kernelboot import BenchKernel  # the same boot and stop, by pid

    own = None
    try:
        if args.home:
            home = Home.resolve(args.home)
        else:
            own = BenchKernel(prefix="llmos-load-")
            home = own.home
            log(f"load: booted kernel pid {own.pid} on {own.root}")
        res = run_load(home, args.clients, args.calls, args.seed, not args.no_tensors)
    except RuntimeError as e:
        log(f"load: {e}")
        return 2
    finally:
        if own is not None:
            own.stop()
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
