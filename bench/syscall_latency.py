"""Syscall latency and throughput through llmos, against raw ZeroMQ measured in the same run.

    python bench/syscall_latency.py [--n N] [--rounds R] [--json]

Measures, on one freshly booted kernel in a temporary LLMOS_HOME:
  raw      a pyzmq DEALER/ROUTER ping-pong over ipc:// with the llmos wire shape:
           the client packs {v, s, n, a}, the server unpacks it and packs {s, r};
  nop      the null syscall, answered by the kernel itself;
  echo     echo(b"x"), routed through the kernel to the echo driver and back;
  calls/s  1 and 8 client processes, each on its own connection, making nop calls
           after a common start barrier, through llmos and against the raw server.
Then it prints the ratios against the targets. Latency ratios compare medians (the
mean is noisier on a small shared VM); every figure is the best of --rounds
interleaved rounds. Timing never fails anything: the exit status is 0 whatever the
ratios; it is non-zero only when something breaks (the kernel does not boot).
It must never leave a process behind: the kernel and everything under it are killed
by pid (SIGTERM, then SIGKILL), the raw server and the clients are our own children.
See docs/performance.md for figures measured on the development VM.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import zmq  # noqa: E402

import userland  # noqa: E402
from syscalls import ABI_VERSION, BY_NAME  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from kernelboot import BenchKernel  # noqa: E402

NOP = BY_NAME["nop"].number
WARMUP = 200
CLIENTS = (1, 8)
TARGETS = {  # name: (numerator, denominator, comparison, target)
    "nop/raw": ("nop", "raw", "<=", 1.3),
    "echo/raw": ("echo", "raw", "<=", 2.2),
    "llmos_8/raw_8": ("llmos_8", "raw_8", ">=", 0.8),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the raw baseline: the wire shape without llmos ------------------------------------

def raw_server(endpoint: str, ready: Any) -> None:
    """A single-threaded ROUTER that answers every request as the kernel answers nop."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    ready.set()
    packb, unpackb = msgpack.packb, msgpack.unpackb
    while True:
        conn, head = sock.recv_multipart()
        req = unpackb(head, raw=False)
        sock.send_multipart([conn, packb({"s": req["s"], "r": None})])


def raw_relay(front: str, back: str, ready: Any) -> None:
    """The raw floor for a driver-routed call: a ROUTER that forwards each request to
    a backend process and its answer back, doing only the msgpack work it must."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(front)
    sock.bind(back)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    backend, _ = sock.recv_multipart()  # the backend says hello first
    ready.set()
    pending: dict[int, tuple[bytes, int]] = {}
    rid = 0
    while True:
        conn, head = sock.recv_multipart()
        msg = unpackb(head, raw=False)
        if conn == backend:
            client, seq = pending.pop(msg["i"])
            sock.send_multipart([client, packb({"s": seq, "r": msg["r"]})])
        else:
            rid += 1
            pending[rid] = (conn, msg["s"])
            sock.send_multipart([backend, packb({"t": "req", "i": rid, "a": msg["a"]})])


def raw_backend(back: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(back)
    sock.send(b"hello")
    packb, unpackb = msgpack.packb, msgpack.unpackb
    while True:
        msg = unpackb(sock.recv(), raw=False)
        sock.send(packb({"t": "rep", "i": msg["i"], "r": None}))


class RawClient:
    """The client half of the baseline: pack a request, send, receive, unpack."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seq = 0

    def nop(self) -> None:
        self.seq += 1
        self.sock.send(msgpack.packb({"v": ABI_VERSION, "s": self.seq, "n": NOP, "a": {}}))
        rep = msgpack.unpackb(self.sock.recv(), raw=False)
        assert rep["s"] == self.seq

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# -- the kernel under test --------------------------------------------------------------

# -- measurements -------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], n: int) -> list[int]:
    """Warm up, then n calls of fn, each timed alone; nanoseconds."""
    for _ in range(WARMUP):
        fn()
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t0 = clock()
        fn()
        samples[i] = clock() - t0
    return samples


def summarize(samples: list[int]) -> dict[str, float]:
    """Mean, median and 99th percentile of nanosecond samples, in microseconds."""
    s = sorted(samples)
    return {"mean": round(statistics.fmean(s) / 1e3, 1),
            "p50": round(_quantile(s, 0.50) / 1e3, 1), "p99": round(_quantile(s, 0.99) / 1e3, 1)}


def _quantile(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def load_worker(kind: str, target: str, calls: int, barrier: Any, results: Any) -> None:
    """One client process of a throughput run: connect, warm up, meet the others at the
    barrier, make `calls` nop calls, report (start ns, end ns, calls)."""
    if kind == "llmos":
        client: Any = userland.connect(target)
    else:
        client = RawClient(target)
    try:
        for _ in range(WARMUP // 4):
            client.nop()
        barrier.wait(60)
        nop, clock = client.nop, time.perf_counter_ns  # CLOCK_MONOTONIC: one clock for all
        t0 = clock()
        for _ in range(calls):
            nop()
        results.put((t0, clock(), calls))
    finally:
        client.close()


def throughput(ctx: Any, kind: str, target: str, clients: int, calls: int) -> float:
    """Aggregate calls/s of `clients` processes: all calls over first start to last end."""
    barrier = ctx.Barrier(clients)
    results = ctx.Queue()
    procs = [ctx.Process(target=load_worker, args=(kind, target, calls, barrier, results))
             for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        runs = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    start = min(r[0] for r in runs)
    end = max(r[1] for r in runs)
    return sum(r[2] for r in runs) / ((end - start) / 1e9)


def measure(n: int, rounds: int, calls: int) -> dict[str, Any]:
    ctx = mp.get_context("forkserver")  # children forked from a clean server, not from us
    ctx.set_forkserver_preload(["zmq", "msgpack", "psutil", "userland", "syscalls"])
    tmp = Path(tempfile.mkdtemp(prefix="llmos-bench-", dir="/tmp"))  # short: sun_path
    raw_endpoint = f"ipc://{tmp}/raw.sock"
    server_ready = ctx.Event()
    server = ctx.Process(target=raw_server, args=(raw_endpoint, server_ready), daemon=True)
    relay_endpoint = f"ipc://{tmp}/relay.sock"
    relay_ready = ctx.Event()
    relay = ctx.Process(target=raw_relay, daemon=True,
                        args=(relay_endpoint, f"ipc://{tmp}/backend.sock", relay_ready))
    backend = ctx.Process(target=raw_backend, args=(f"ipc://{tmp}/backend.sock",), daemon=True)
    kernel = None
    raw = relayed = osh = None
    try:
        server.start()
        relay.start()
        backend.start()
        kernel = BenchKernel(root=tmp / "home")
        if not server_ready.wait(30):
            raise RuntimeError("the raw server did not start")
        log(f"kernel {kernel.pid} up on {kernel.root}; raw server {server.pid}")
        if not relay_ready.wait(30):
            raise RuntimeError("the raw relay did not start")
        raw = RawClient(raw_endpoint)
        relayed = RawClient(relay_endpoint)
        osh = userland.connect(kernel.root)
        latency: dict[str, list[list[int]]] = {"raw": [], "relay": [], "nop": [], "echo": []}
        calls_s: dict[str, list[float]] = {f"{k}_{c}": [] for c in CLIENTS
                                           for k in ("raw", "llmos")}
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}: latency")
            latency["raw"].append(time_calls(raw.nop, n))
            latency["relay"].append(time_calls(relayed.nop, n))
            latency["nop"].append(time_calls(osh.nop, n))
            latency["echo"].append(time_calls(lambda: osh.echo(b"x"), n))
            for c in CLIENTS:
                log(f"round {r + 1}/{rounds}: throughput, {c} client(s)")
                calls_s[f"raw_{c}"].append(throughput(ctx, "raw", raw_endpoint, c, calls))
                calls_s[f"llmos_{c}"].append(throughput(ctx, "llmos", str(kernel.root), c,
                                                        calls))
        info = osh.sysinfo()
    finally:
        if osh is not None:
            osh.close()
        for client in (raw, relayed):
            if client is not None:
                client.close()
        for proc in (server, relay, backend):
            if proc.pid is not None:
                proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        if kernel is not None:
            kernel.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    # best round: the one with the lowest median (latency), the highest rate (throughput)
    best_latency = {k: min((summarize(s) for s in v), key=lambda x: x["p50"])
                    for k, v in latency.items()}
    best_rate = {k: round(max(v)) for k, v in calls_s.items()}
    return {
        "n": n, "rounds": rounds, "calls_per_client": calls, "cpus": os.cpu_count(),
        "kernel_pid": kernel.pid,
        "latency_us": best_latency, "throughput_calls_s": best_rate,
        "ratios": ratios(best_latency, best_rate),
        "kernel_service_p50_us": {name: info["syscalls"].get(name, {}).get("p50_us")
                                  for name in ("nop", "echo")},
        "kernel_dropped": info.get("dropped", {}),
    }


def ratios(lat: dict[str, dict[str, float]], rate: dict[str, float]) -> dict[str, Any]:
    values = {**{k: v["p50"] for k, v in lat.items()}, **rate}
    out = {}
    for name, (num, den, cmp, target) in TARGETS.items():
        value = round(values[num] / values[den], 3)
        ok = value <= target if cmp == "<=" else value >= target
        out[name] = {"value": value, "target": f"{cmp} {target}", "pass": ok}
    out["nop/raw (mean)"] = {"value": round(lat["nop"]["mean"] / lat["raw"]["mean"], 3)}
    out["echo/raw (mean)"] = {"value": round(lat["echo"]["mean"] / lat["raw"]["mean"], 3)}
    out["relay/raw"] = {"value": round(lat["relay"]["p50"] / lat["raw"]["p50"], 3)}
    out["echo/relay"] = {"value": round(lat["echo"]["p50"] / lat["relay"]["p50"], 3)}
    out["llmos_1/raw_1"] = {"value": round(rate["llmos_1"] / rate["raw_1"], 3)}
    return out


def render(res: dict[str, Any]) -> str:
    lines = [f"llmos syscall benchmark: n={res['n']} per round, best of {res['rounds']} "
             f"rounds, {res['calls_per_client']} calls per client, {res['cpus']} CPUs", "",
             f"{'round trip (us)':<28}{'mean':>9}{'p50':>9}{'p99':>9}"]
    names = {"raw": "raw zmq+msgpack (baseline)", "relay": "raw relay, two hops",
             "nop": "llmos nop", "echo": "llmos echo(b'x')"}
    for key, label in names.items():
        v = res["latency_us"][key]
        lines.append(f"{label:<28}{v['mean']:>9.1f}{v['p50']:>9.1f}{v['p99']:>9.1f}")
    lines += ["", f"{'throughput (calls/s)':<28}" + "".join(f"{f'{c} client(s)':>13}"
                                                            for c in CLIENTS)]
    for kind, label in (("raw", "raw zmq+msgpack"), ("llmos", "llmos nop")):
        lines.append(f"{label:<28}" + "".join(
            f"{res['throughput_calls_s'][f'{kind}_{c}']:>13,.0f}" for c in CLIENTS))
    lines += ["", f"{'ratio':<28}{'value':>9}  target"]
    for name, r in res["ratios"].items():
        verdict = f"{r['target']:<8}{'PASS' if r['pass'] else 'MISS'}" if "target" in r else ""
        label = name + (" (p50)" if name in ("nop/raw", "echo/raw", "relay/raw",
                                             "echo/relay") else "")
        lines.append(f"{label:<28}{r['value']:>8.2f}x  {verdict}".rstrip())
    service = res["kernel_service_p50_us"]
    lines += ["", "time inside the kernel (its own p50, last 4096 calls): "
              + ", ".join(f"{k} {v} us" for k, v in service.items())]
    if res["kernel_dropped"]:
        lines += ["", f"kernel dropped messages: {res['kernel_dropped']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000,
                   help="timed calls per latency measurement per round (default 3000); "
                        "each throughput client makes n calls")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    if a.n < 1 or a.rounds < 1:
        p.error("--n and --rounds must be positive")
    # a SIGTERM must still run measure()'s cleanup: the kernel is in its own session
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.monotonic()
    res = measure(a.n, a.rounds, a.n)
    res["wall_s"] = round(time.monotonic() - t0, 2)
    print(json.dumps(res, indent=2) if a.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
