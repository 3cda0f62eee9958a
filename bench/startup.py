"""How long an llmos command takes to start, against Python importing the two
libraries it cannot do without.

    python bench/startup.py [--runs N] [--against REV]

Boots a kernel on a temporary home, then times, alternately and N times each:
the baseline `python -c "import zmq, msgpack"`, `llmos ps` (the whole command:
start, attach, ps, print, detach) and `llmos --help` (no kernel call). With
--against REV, also `llmos ps` of that git revision (checked out in a temporary
worktree, run as `python -m userland.cli ps` on the same kernel: the ABI is the
same). Prints the best and median wall times and the ratio of each to the
baseline's, measured in this run. The target (issue 11): `llmos ps` under 2x the
baseline. Never a test: timing decides nothing in CI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from syscalls import Home  # noqa: E402
from syscalls.client import stop_kernel  # noqa: E402


def llmos_program() -> list[str]:
    """The installed console script when there is one (what a user runs), else the
    module."""
    script = Path(sys.executable).parent / "llmos"
    return [str(script)] if script.exists() else [sys.executable, "-m", "userland.cli"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.decode()}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--against", metavar="REV", help="also time llmos ps of this revision")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmos-start-", dir="/tmp"))
    env = dict(os.environ, LLMOS_HOME=str(root))
    env.pop("LLMOS_SPAWN_TOKEN", None)
    # as on a user's machine: the warm-up runs write .pyc files, the timed ones use
    # them (with PYTHONDONTWRITEBYTECODE set, every run would compile what changed
    # since the last .pyc, and the figures would measure the compiler)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    program = llmos_program()
    cases = {"python -c 'import zmq, msgpack'": [sys.executable, "-c", "import zmq, msgpack"],
             "llmos ps": [*program, "ps"], "llmos --help": [*program, "--help"]}
    old = None
    if args.against:
        old = Path(tempfile.mkdtemp(prefix="llmos-old-", dir="/tmp"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        args.against], check=True, capture_output=True)
        cases[f"llmos ps at {args.against}"] = [
            "env", "-C", str(old), f"PYTHONPATH={old}", sys.executable, "-m",
            "userland.cli", "ps"]
    subprocess.run([*program, "start"], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        for argv in cases.values():  # warm the page cache and the .pyc files
            timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                times[name].append(timed(argv, env))
    finally:
        pid = Home.resolve(root).kernel_pid()
        if pid:
            stop_kernel(pid)
        shutil.rmtree(root, ignore_errors=True)
        if old is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(old)], capture_output=True)
    base = min(times["python -c 'import zmq, msgpack'"])
    print(f"{'command':34} {'best ms':>8} {'median ms':>10} {'best / baseline':>16}")
    for name, ts in times.items():
        print(f"{name:34} {min(ts) * 1e3:8.1f} {statistics.median(ts) * 1e3:10.1f} "
              f"{min(ts) / base:16.2f}")
    ratio = min(times["llmos ps"]) / base
    print(f"\nllmos ps / baseline: {ratio:.2f} (target < 2: {'met' if ratio < 2 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
