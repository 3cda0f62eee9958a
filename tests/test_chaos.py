"""The chaos bench, short: clients writing, reading, allocating and generating while
drivers are SIGKILLed and stopped, the kernel is SIGKILLed and rebooted, and
stalled. Nothing acknowledged may be lost, no answer wrong, no call unanswered,
nobody lost to a stall (bench/chaos.py; its long run's figures are in
docs/performance.md). Its timings are printed, never judged."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import chaos  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_chaos_loses_nothing() -> None:
    args = argparse.Namespace(
        clients=2, driver_kills=8, driver_stops=2, kernel_kills=1, kernel_stalls=1,
        stall_s=4.0, seconds=240.0, seed=11)
    r = chaos.run(args)
    print(chaos.render(r))
    assert r["acknowledged_writes"] > 0 and sum(r["events"].values()) == 12, r
    assert not r["lost_writes"] and not r["wrong_answers"], r
    assert r["unanswered"] == 0 and r["lost_after_stall"] == 0 and not r["failures"], r
