"""32 client processes at once (bench/load.py) against a real kernel.

Every client attaches and makes a mix of nop, getpid, echo (random bytes, compared
byte for byte), ps and small tensor round trips; no reply may be lost (unanswered
within 10 s) or wrong, the kernel may drop no reply and must be the same live
process afterwards. Latency and calls/s are printed, never asserted.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import Booted

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import load  # noqa: E402

CLIENTS = 32


def assert_load_held(res: dict, kernel: Booted, clients: int, calls: int) -> None:
    assert res["ok"], load.render(res)
    assert res["reported"] == clients
    assert res["lost"] == 0 and res["wrong"] == 0 and res["errors"] == 0, res["failures"]
    assert res["operations"] == clients * calls
    assert set(res["by_op"]) == set(load.OPS), res["by_op"]
    assert res["kernel_alive"] and res["kernel_pid"] == kernel.pid
    assert not any(res["kernel_dropped"].get(k) for k in load.REPLY_DROPS), res["kernel_dropped"]
    assert res["driver_restarts"] == {}
    assert kernel.proc.poll() is None and kernel.home.kernel_pid() == kernel.pid
    with kernel.connect(heartbeat=False) as osh:
        assert osh.getpid() == osh.pid
        # every client ended: only init and this process are running
        assert [p["pid"] for p in osh.ps() if p["state"] == "running"] == [1, osh.pid]


@pytest.mark.timeout(120)
def test_32_clients_lose_no_reply(booted: Booted) -> None:
    calls = 100
    res = load.run_load(booted.home, clients=CLIENTS, calls=calls, seed=1, timeout=100)
    print(load.render(res))
    assert_load_held(res, booted, CLIENTS, calls)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_32_clients_lose_no_reply_longer(booted: Booted) -> None:
    calls = 1000
    res = load.run_load(booted.home, clients=CLIENTS, calls=calls, seed=2, timeout=280)
    print(load.render(res))
    assert_load_held(res, booted, CLIENTS, calls)


@pytest.mark.timeout(120)
def test_load_command_boots_its_own_kernel(tmp_path) -> None:
    import json
    import subprocess

    import psutil

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--clients", "4",
                           "--calls", "20", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-4000:]
    res = json.loads(done.stdout)
    assert res["ok"] and res["operations"] == 80 and res["lost"] == 0
    assert set(res["latency"]["all"]) == {"n", "p50_us", "p90_us", "p99_us", "max_us"}
    try:
        proc = psutil.Process(res["kernel_pid"])
        assert "kernel" not in " ".join(proc.cmdline()), "load.py left its kernel"
    except psutil.NoSuchProcess:
        pass
