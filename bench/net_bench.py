"""What the TCP endpoint and the nodes cost, against raw ZeroMQ measured in the same run.

    python bench/net_bench.py [--n N] [--rounds R] [--mib M] [--nodes K] [--json]

On loopback (the namespaces of `llmos cluster up` are docs/cluster.md's):
  raw_ipc, raw_tcp, raw_curve   a pyzmq DEALER/ROUTER ping-pong with the llmos wire
                                shape (bench/syscall_latency.py's), over ipc://, over
                                tcp:// and over tcp:// with CURVE;
  nop_ipc_alone                 nop over ipc, on a kernel that does not listen on TCP;
  nop_ipc, nop_tcp, echo_tcp    on a kernel that listens (it then polls two sockets):
                                nop over ipc, nop and echo over CURVE TCP with a client key;
  spawn_local, spawn_node       spawn(["true"]) + wait, on the head and on a node agent;
  heartbeat                     the kernel's CPU time per node heartbeat (K agents'
                                worth of messages sent as fast as they go);
  read_ipc, read_tcp            a --mib MiB tensor loaded over ipc (/dev/shm) and by a
                                remote client over TCP (a data channel: the grant over
                                CURVE, the bytes over plain TCP), against raw_socket (a
                                plain TCP socket sending --mib MiB from memory, read
                                into one buffer or into a fresh one each time),
                                raw_bw_tcp and raw_bw_curve (1 MiB ZeroMQ messages).
Medians of the best of --rounds rounds. Timing never fails anything: it prints.
Every process it starts is ended by pid.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402

import userland  # noqa: E402
from kernelboot import BenchKernel, NodeAgent  # noqa: E402
from syscall_latency import RawClient, summarize, time_calls  # noqa: E402
from syscalls import curve_client, encode, read_credential, wire  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raw_server(endpoint: str, secret: bytes | None, ready: Any, port: Any) -> None:
    """bench/syscall_latency.py's raw server, over tcp, with CURVE when secret."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if secret is not None:
        sock.curve_server = True
        sock.curve_secretkey = secret
    sock.bind(endpoint)
    port.value = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]) \
        if endpoint.startswith("tcp") else 0
    ready.set()
    packb, unpackb = msgpack.packb, msgpack.unpackb
    while True:
        frames = sock.recv_multipart()
        if len(frames) > 2:  # bandwidth: send the payload back as it came
            sock.send_multipart(frames)
            continue
        req = unpackb(frames[1], raw=False)
        sock.send_multipart([frames[0], packb({"s": req["s"], "r": None})])


def start_raw(endpoint: str, secret: bytes | None = None) -> tuple[Any, str]:
    ready, port = mp.Event(), mp.Value("i", 0)
    p = mp.Process(target=raw_server, args=(endpoint, secret, ready, port), daemon=True)
    p.start()
    ready.wait(10)
    if endpoint.startswith("tcp"):
        endpoint = f"tcp://127.0.0.1:{port.value}"
    return p, endpoint


def raw_client(endpoint: str, keys: dict | None = None) -> RawClient:
    c = RawClient.__new__(RawClient)
    c.ctx = zmq.Context()
    c.sock = c.ctx.socket(zmq.DEALER)
    c.sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        curve_client(c.sock, keys)
    c.sock.connect(endpoint)
    c.seq = 0
    return c


def bandwidth(c: RawClient, mib: int) -> float:
    """MiB/s of mib 1 MiB messages sent to the raw server and back (both ways)."""
    chunk = b"\0" * (1 << 20)
    c.sock.send_multipart([b"bw", chunk])
    c.sock.recv_multipart()
    t0 = time.perf_counter()
    for _ in range(mib):
        c.sock.send_multipart([b"bw", chunk])
        c.sock.recv_multipart()
    return 2 * mib / (time.perf_counter() - t0)


def sock_server(mib: int, ready: Any, port: Any) -> None:
    """The raw floor for a data channel: a plain TCP socket that sends mib MiB from
    memory to whoever connects (the same sendall the channel makes)."""
    import socket
    srv = socket.create_server(("127.0.0.1", 0))
    port.value = srv.getsockname()[1]
    ready.set()
    data = bytes(mib << 20)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(data)


def sock_bandwidth(port: int, mib: int, times: int = 3, fresh: bool = False) -> float:
    """MiB/s of mib MiB received from sock_server with recv_into: into one buffer
    reused, or (fresh) into a new one each time, as a read that makes a new tensor
    must (its pages are faulted in as the bytes land)."""
    import socket
    buf = bytearray(mib << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for _ in range(times):
        if fresh:
            buf = bytearray(mib << 20)
            view = memoryview(buf)
        with socket.create_connection(("127.0.0.1", port)) as s:
            got = 0
            while got < len(buf):
                got += s.recv_into(view[got:], min(len(buf) - got, 1 << 22))
    return times * mib / (time.perf_counter() - t0)


def spawn_wait(osh: Any, node: str | None) -> None:
    osh.wait(osh.spawn(["true"], node=node), timeout=30)


def heartbeat_cost(head: BenchKernel, cred: dict, count: int) -> float:
    """Kernel CPU microseconds per node heartbeat: count nhb messages of a joined
    node's epoch sent as fast as they go, the kernel's CPU time measured around them."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    curve_client(sock, cred)
    sock.connect(cred["endpoint"])
    sock.send_multipart(encode(wire.node("join", name=cred["name"], res={})))
    joined = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
    epoch = joined["epoch"]
    kernel = psutil.Process(head.pid)
    msg = encode(wire.node("nhb", epoch=epoch, res={"cpus": 2}, pids=[]))
    with userland.connect(head.root, uid=0, heartbeat=False) as osh:
        osh.nop()
        c0 = sum(kernel.cpu_times()[:2])
        for _ in range(count):
            sock.send_multipart(msg)
        osh.nop()  # the kernel read everything before this (one loop, in turn)
        time.sleep(0.2)
        osh.nop()
        c1 = sum(kernel.cpu_times()[:2])
        osh.node_ctl(cred["name"], "remove")
    sock.close(0)
    ctx.term()
    return (c1 - c0) / count * 1e6


def measure(n: int, rounds: int, mib: int, hb: int) -> dict[str, Any]:
    """Every target up at once, then --rounds rounds each timing every target in
    turn (a VM's noise drifts: interleaving puts it on all of them alike)."""
    runs: dict[str, list[dict[str, float]]] = {}
    rates: dict[str, float] = {}
    procs = []
    sock_path = f"/tmp/llmos-netbench-{os.getpid()}.sock"
    try:
        p, ep_ipc = start_raw(f"ipc://{sock_path}")
        p2, ep_tcp = start_raw("tcp://127.0.0.1:*")
        public, secret = zmq.curve_keypair()
        p3, ep_curve = start_raw("tcp://127.0.0.1:*", secret)
        procs += [p, p2, p3]
        ck, cs = zmq.curve_keypair()
        raws = {"raw_ipc": raw_client(ep_ipc), "raw_tcp": raw_client(ep_tcp),
                "raw_curve": raw_client(ep_curve, {"server_key": public.decode(),
                                                   "public": ck.decode(),
                                                   "secret": cs.decode()})}
        with BenchKernel() as alone, BenchKernel(listen="127.0.0.1:0") as k:
            cred = k.credential("client", "bench", uid=1000)
            with userland.connect(alone.root, heartbeat=False) as a, \
                    userland.connect(k.root, heartbeat=False) as osh, \
                    userland.connect(credential=cred, heartbeat=False) as r:
                targets = {**{name: c.nop for name, c in raws.items()},
                           "nop_ipc_alone": a.nop, "nop_ipc": osh.nop, "nop_tcp": r.nop,
                           "echo_ipc": lambda: osh.echo(b"x"),
                           "echo_tcp": lambda: r.echo(b"x")}
                for rnd in range(rounds):
                    for name, fn in targets.items():
                        runs.setdefault(name, []).append(summarize(time_calls(fn, n)))
                    log(f"round {rnd + 1} of {rounds}")
                ready, port = mp.Event(), mp.Value("i", 0)
                ps = mp.Process(target=sock_server, args=(mib, ready, port), daemon=True)
                ps.start()
                procs.append(ps)
                ready.wait(10)
                rates["raw_socket"] = sock_bandwidth(port.value, mib)
                rates["raw_socket_fresh"] = sock_bandwidth(port.value, mib, fresh=True)
                rates["raw_bw_tcp"] = bandwidth(raws["raw_tcp"], mib)
                rates["raw_bw_curve"] = bandwidth(raws["raw_curve"], mib)
                data = np.random.default_rng(0).standard_normal(mib << 18,
                                                                dtype=np.float32)
                osh.save_tensor("/bench.t", data, perm=0o644)
                for name, h in (("read_ipc", osh), ("read_tcp", r)):
                    h.load_tensor("/bench.t")
                    t0 = time.perf_counter()
                    for _ in range(3):
                        h.load_tensor("/bench.t")
                    rates[name] = 3 * mib / (time.perf_counter() - t0)
            for c in raws.values():
                c.close()
            with NodeAgent(k, "b1"), userland.connect(k.root, uid=0,
                                                      heartbeat=False) as osh:
                spawns = max(10, n // 100)
                for _ in range(rounds):
                    for name, node in (("spawn_local", None), ("spawn_node", "b1")):
                        runs.setdefault(name, []).append(summarize(time_calls(
                            lambda: spawn_wait(osh, node), spawns)))
            log("spawns done")
            node_cred = read_credential(k.credential("node", "hb"))
            rates["heartbeat_us"] = heartbeat_cost(k, node_cred, hb)
    finally:
        for p in procs:
            p.terminate()
            p.join(5)
        Path(sock_path).unlink(missing_ok=True)
    lat = {name: min(rs, key=lambda r: r["p50"]) for name, rs in runs.items()}
    return {"latency_us": lat, "rates": rates, "n": n, "rounds": rounds, "mib": mib}


def ratios(res: dict[str, Any]) -> dict[str, float]:
    lat, rates = res["latency_us"], res["rates"]
    r = {
        "nop_ipc/raw_ipc (listening)": lat["nop_ipc"]["p50"] / lat["raw_ipc"]["p50"],
        "nop_ipc/nop_ipc_alone (the relay's price)":
            lat["nop_ipc"]["p50"] / lat["nop_ipc_alone"]["p50"],
        "nop_tcp/raw_curve": lat["nop_tcp"]["p50"] / lat["raw_curve"]["p50"],
        "nop_tcp/raw_tcp": lat["nop_tcp"]["p50"] / lat["raw_tcp"]["p50"],
        "echo_tcp/raw_curve": lat["echo_tcp"]["p50"] / lat["raw_curve"]["p50"],
        "spawn_node/spawn_local": lat["spawn_node"]["p50"] / lat["spawn_local"]["p50"],
        "read_tcp/raw_bw_curve": rates["read_tcp"] / rates["raw_bw_curve"],
        "read_tcp/raw_bw_tcp": rates["read_tcp"] / rates["raw_bw_tcp"],
        "read_tcp/raw_socket (target >= 0.7)": rates["read_tcp"] / rates["raw_socket"],
        "read_tcp/raw_socket_fresh": rates["read_tcp"] / rates["raw_socket_fresh"],
        "raw_bw_curve/raw_bw_tcp": rates["raw_bw_curve"] / rates["raw_bw_tcp"],
    }
    return {k: round(v, 2) for k, v in r.items()}


def render(res: dict[str, Any]) -> str:
    out = [f"net bench: {res['n']} calls x best of {res['rounds']}, {res['mib']} MiB reads"]
    for name, s in res["latency_us"].items():
        out.append(f"  {name:16s} p50 {s['p50']:9.1f} us   p99 {s['p99']:9.1f} us")
    rates = res["rates"]
    for name in ("raw_socket", "raw_socket_fresh", "raw_bw_tcp", "raw_bw_curve", "read_ipc",
                 "read_tcp"):
        out.append(f"  {name:16s} {rates[name]:9.1f} MiB/s")
    out.append(f"  heartbeat        {rates['heartbeat_us']:9.1f} us of kernel CPU each")
    out.append("ratios:")
    out += [f"  {k:45s} {v:6.2f}" for k, v in res["ratios"].items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--heartbeats", type=int, default=20000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = measure(a.n, a.rounds, a.mib, a.heartbeats)
    res["ratios"] = ratios(res)
    print(json.dumps(res, indent=1) if a.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
