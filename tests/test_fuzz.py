"""The wire fuzzer (bench/fuzz.py) against a real kernel, and what it found.

A short run with a fixed seed (CI), a longer one (slow), and the command line end to
end. Each asserts what the fuzzer checks: the kernel that booted is alive and the one
serving, every connection kept being answered, every reply was a well-formed reply
to a seq that was sent, the well-behaved client got only right answers, the kernel
counted no internal error and restarted no driver, and its RSS grew less than the
bound after the warm-up. Nothing here asserts on timing.

The last two tests are the kernel bugs the fuzzer found, fixed since: a client
taking libzmq's predictable routing ids aborted the kernel, and parked waits were
unbounded (docs/fuzz-and-load.md has the reproductions).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import psutil
import pytest

from conftest import Booted
from rawclient import RawClient
from syscalls import ABI_VERSION, BY_NAME, TABLE, Errno

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import fuzz  # noqa: E402

SEED = 20240611


def assert_fuzz_held(report: "fuzz.FuzzReport", kernel: Booted) -> None:
    assert report.ok, report.render()
    assert report.failures == []
    # the same kernel, still serving
    assert report.kernel_pid == kernel.pid
    assert kernel.proc.poll() is None and kernel.home.kernel_pid() == kernel.pid
    with kernel.connect(heartbeat=False) as osh:
        assert osh.nop() is None
        assert osh.echo(b"after the fuzz") == b"after the fuzz"
        info = osh.sysinfo()
    assert info["dropped"].get("internal_error", 0) == 0, info["dropped"]
    assert all(d["state"] == "ready" and d["restarts"] == 0 for d in info["drivers"]), \
        info["drivers"]
    # it fuzzed both sockets, every syscall, and saw both answers and drops
    assert report.sent["kernel"] > 0 and report.sent["drivers"] > 0
    assert set(report.valid) == {s.name for s in TABLE}, sorted(report.valid)
    assert report.results > 0 and sum(report.errors.values()) > 0
    assert report.unanswerable > 0 and report.kernel_dropped.get("malformed", 0) > 0
    assert report.syncs > 0 and report.well_behaved_calls > 0
    assert report.rss_end_mib - report.rss_warm_mib <= report.rss_bound_mib
    assert report.driver_exceptions == {}, report.driver_exceptions
    assert report.processes_left == 0, report.left


@pytest.mark.timeout(180)
def test_short_fuzz_keeps_the_kernel_serving(booted: Booted) -> None:
    """~5,000 messages, fixed seed (a 60 s cap only guards a slow machine)."""
    report = fuzz.run_fuzz(booted.home, messages=5000, seconds=60, seed=SEED)
    print(report.render())
    assert report.messages >= 1000
    assert_fuzz_held(report, booted)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_longer_fuzz_keeps_the_kernel_serving(booted: Booted) -> None:
    report = fuzz.run_fuzz(booted.home, seconds=20, seed=SEED + 1)
    print(report.render())
    assert all(report.kinds[f"big-{name}"] > 0 for name in fuzz.BIG_CASES), report.kinds
    assert_fuzz_held(report, booted)


@pytest.mark.timeout(180)
def test_fuzz_over_tcp_keeps_the_kernel_serving_and_strangers_unanswered() -> None:
    """The CURVE TCP endpoint (issue 16): the same fuzzing with a client key, node
    messages a client may not send, and peers with no key or an unknown one that
    must never be answered (the fuzzer fails on any answer to them)."""
    with Booted(listen="127.0.0.1:0") as b:
        report = fuzz.run_fuzz(b.home, messages=4000, seconds=60, seed=SEED + 2, tcp=True)
        print(report.render())
        assert report.kinds["stranger"] > 0 and report.kinds["node"] > 0
        assert report.kernel_dropped.get("node_not_a_node", 0) > 0
        assert_fuzz_held(report, b)
        with b.connect(uid=0) as osh:
            assert osh.sysinfo()["tcp_refused"] > 0  # the unknown key's handshakes


@pytest.mark.timeout(180)
def test_fuzz_command_boots_its_own_kernel_and_stops_it() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--messages",
                           "1500", "--seed", "5", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-4000:]
    res = json.loads(done.stdout)
    assert res["ok"] and res["messages"] >= 1500 and res["seed"] == 5
    assert set(res["rss_mib"]) >= {"warm", "end", "growth", "bound"}
    # its kernel (and everything under it) is gone
    try:
        proc = psutil.Process(res["kernel_pid"])
        assert "kernel" not in " ".join(proc.cmdline()), "the fuzzer left its kernel"
    except psutil.NoSuchProcess:
        pass


# -- what the fuzzer found --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_claimed_routing_ids_do_not_abort_the_kernel(booted: Booted) -> None:
    report = fuzz.run_fuzz(booted.home, messages=300, seconds=30, seed=SEED,
                           reserved_ids=512)
    assert booted.proc.poll() is None, f"the kernel died: {booted.proc.returncode}"
    assert report.ok, report.render()


@pytest.mark.timeout(120)
def test_parked_waits_do_not_grow_the_kernel_without_bound(booted: Booted) -> None:
    n, bound_mib = 50_000, 8.0
    kernel = psutil.Process(booted.pid)
    with RawClient(booted.home.kernel_endpoint, timeout_ms=60_000) as c:
        assert "r" in c.attach(booted.home, host="elsewhere.invalid")  # no OS pid
        child = c.call(BY_NAME["spawn"].number, {"argv": ["sleep", "60"]})["r"]
        assert type(child) is int
        rss0 = kernel.memory_info().rss
        wait = BY_NAME["wait"].number
        for i in range(n):
            c.send([msgpack.packb({"v": ABI_VERSION, "s": 100_000 + i, "n": wait,
                                   "a": {"pid": child, "timeout": 3600.0}})])
        seq = c.request(BY_NAME["nop"].number)  # answered after every wait was handled
        refused = 0
        while True:
            reply = c.recv()
            if reply["s"] == seq:
                break
            refused += reply.get("e") == Errno.EAGAIN
        grown = (kernel.memory_info().rss - rss0) / 2**20
        c.call(BY_NAME["kill"].number, {"pid": child, "signal": "KILL"})
    assert grown < bound_mib, (f"{n} parked waits ({refused} refused with EAGAIN) grew "
                               f"the kernel's RSS by {grown:.1f} MiB")
    assert booted.proc.poll() is None


def test_fuzzer_never_sends_a_harmful_request() -> None:
    """defuse(): whatever the mutations made, what could pass the kernel's checks stays
    small and the fuzzer's own (no kernel needed: a Fuzzer on a fake home)."""
    home = fuzz.Home.resolve(f"/tmp/llmos-fuzz-defuse-{os.getpid()}")
    home.run.mkdir(parents=True, exist_ok=True)
    home.secretfile.write_text("s" * 64)
    try:
        f = fuzz.Fuzzer(home, 1, fuzz.FuzzReport(seed=1))
        f.owned = {42}
        cases = [
            ("kill", {"pid": 7}, {"pid": fuzz.NO_SUCH_PID}),
            ("kill", {"pid": 42}, None),
            ("kill", {"pid": 1}, None),
            ("spawn", {"argv": ["rm", "-rf", "/"]}, {"argv": [fuzz.NO_SUCH_PROGRAM, "-rf", "/"]}),
            ("spawn", {"argv": [fuzz.TRUE, "x"]}, None),
            ("attach", {"os_pid": os.getpid(), "secret": "s" * 64, "host": ""},
             {"os_pid": os.getpid(), "secret": "s" * 64, "host": fuzz.REMOTE_HOST}),
            ("attach", {"os_pid": 1, "secret": "s" * 64}, None),
            ("attach", {"os_pid": os.getpid(), "secret": "wrong"}, None),
            ("unlink", {"path": "/models"}, {"path": "/fuzz/models"}),
            ("rename", {"src": "/fuzz/a", "dst": "/b"}, {"src": "/fuzz/a", "dst": "/fuzz/b"}),
            ("open_tensor", {"path": "/fuzz/t", "mode": "w", "shape": [2**20, 2**10]},
             {"path": "/fuzz/t", "mode": "w", "shape": [4, 4]}),
            ("sleep", {"seconds": 3600}, {"seconds": 0.2}),
            ("wait", {"pid": None}, {"pid": None, "timeout": 0.5}),
            ("alloc_gpu", {"mem": 1, "wait": True}, {"mem": 1, "wait": True, "timeout": 0.5}),
            ("ticks", {"count": 10000, "interval": 10.0}, {"count": 200, "interval": 0.0}),
        ]
        for name, args, want in cases:
            head = {"v": ABI_VERSION, "s": 1, "n": BY_NAME[name].number, "a": dict(args)}
            changed = f.defuse(head)
            assert head["a"] == (want if want is not None else args), (name, args, head["a"])
            assert changed == (want is not None), (name, args)
        f.ctx.term()
    finally:
        home.secretfile.unlink()
        for d in (home.run, home.root):
            d.rmdir()

