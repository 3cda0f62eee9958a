"""The syscall benchmark runs end to end and reports every figure.

Timing decides nothing here: the test checks that bench/syscall_latency.py boots a
kernel, measures every figure (each a positive number), prints a verdict for each
target, exits 0, and leaves no kernel behind.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "syscall_latency.py"


def run_bench(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its kernel on SIGTERM
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_bench_reports_every_figure_and_cleans_up():
    done = run_bench("--n", "200", "--rounds", "1", "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads(done.stdout)

    assert set(res["latency_us"]) == {"raw", "relay", "nop", "echo"}
    for name, figures in res["latency_us"].items():
        assert set(figures) == {"mean", "p50", "p99"}, name
        assert all(v > 0 for v in figures.values()), (name, figures)
        assert figures["p50"] <= figures["p99"], (name, figures)
    assert set(res["throughput_calls_s"]) == {"raw_1", "raw_8", "llmos_1", "llmos_8"}
    assert all(v > 0 for v in res["throughput_calls_s"].values()), res["throughput_calls_s"]
    for name in ("nop/raw", "echo/raw", "llmos_8/raw_8"):
        ratio = res["ratios"][name]
        assert ratio["value"] > 0 and isinstance(ratio["pass"], bool), (name, ratio)
    for name in ("relay/raw", "echo/relay"):
        assert res["ratios"][name]["value"] > 0, name
    assert res["kernel_service_p50_us"]["nop"] > 0
    assert res["kernel_service_p50_us"]["echo"] > 0
    assert res["kernel_dropped"] == {}

    try:
        kernel = psutil.Process(res["kernel_pid"])
        assert "kernel" not in " ".join(kernel.cmdline()), "the benchmark left its kernel"
    except psutil.NoSuchProcess:
        pass


def test_bench_table_shows_a_verdict_per_target():
    done = run_bench("--n", "100", "--rounds", "1")
    assert done.returncode == 0, done.stderr[-4000:]
    verdicts = [line for line in done.stdout.splitlines()
                if line.rstrip().endswith(("PASS", "MISS"))]
    assert [line.split()[0] for line in verdicts] == ["nop/raw", "echo/raw", "llmos_8/raw_8"]
