"""How long a kernel takes to boot on a home whose tensor store holds many small
tensors, against one whose store is empty, in the same run.

    python bench/tensorfs_boot.py [--files N] [--runs R] [--cold] [--json]

Writes N int8[16] tensors (300,000 by default), 1,000 to a directory, straight
into a scratch home's store in the store's format (drivers.tensorfs's TensorMeta
and write_data_and_crc: through the syscalls it would take far longer). Then,
alternately and R times each, boots a kernel with every default driver
(tests/conftest.py's Booted) on that home and on a home with an empty store, and
times from the kernel's start to every driver ready (when Booted returns), and
from then until tensorfs's scan of the store is done (its status in sysinfo,
sent with each heartbeat: up to a second late). --cold drops the page cache
before each boot (root only). Prints the best and median of each and the ratio
of the big store's boot to the empty one's; the target (issue 12) is 2x at most.
Never a test: timing decides nothing in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Booted  # noqa: E402
from drivers.tensorfs import (TensorMeta, shm_prefix, sweep_segments,  # noqa: E402
                              write_data_and_crc)
from syscalls.client import stop_kernel  # noqa: E402

PER_DIR = 1000


def write_store(home: Path, n: int) -> float:
    """n tiny tensors in home's store, as the driver would have left them (no
    fsync: the page cache is dropped before a cold boot anyway). Returns seconds."""
    t0 = time.perf_counter()
    data = memoryview(bytes(range(16)))
    now = time.time()
    for i in range(n):
        d = home / "tensors" / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"t{i % PER_DIR:04d}.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
        write_data_and_crc(fd, TensorMeta("int8", [16], 1000, 0o644, now, now, 0), data)
        os.close(fd)
    return time.perf_counter() - t0


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def scan_status(b: Booted) -> dict[str, Any]:
    with b.connect(uid=0, heartbeat=False) as osh:
        d = next(d for d in osh.sysinfo()["drivers"] if d["name"] == "tensorfs")
    return d["info"].get("scan", {})


def boot(home: Path, cold: bool) -> dict[str, float]:
    """Boot a kernel on home (keeping the home: Booted.stop would remove it):
    seconds to every driver ready, then to the end of tensorfs's scan."""
    shutil.rmtree(home / "run", ignore_errors=True)  # the last boot's secret and sockets
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    with mock.patch.object(tempfile, "mkdtemp", lambda **kw: str(home)):
        b = Booted()
    ready = time.perf_counter() - t0
    try:
        while not (scan := scan_status(b)).get("done"):
            time.sleep(0.05)
        scanned = time.perf_counter() - t0 - ready
    finally:
        stop_kernel(b.pid)
        b.proc.wait()
        b.log.close()
        sweep_segments(shm_prefix(home))
    return {"ready_s": ready, "scan_done_after_s": scanned, "scan_s": scan["seconds"],
            "files": scan["files"]}


def figures(xs: list[float]) -> dict[str, float]:
    return {"best": round(min(xs), 3), "median": round(statistics.median(xs), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=300_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each boot")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    homes = {"empty": Path(tempfile.mkdtemp(prefix="llmos-b0-", dir="/tmp")),
             "big": Path(tempfile.mkdtemp(prefix="llmos-b1-", dir="/tmp"))}
    try:
        wrote = write_store(homes["big"], args.files)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in homes}
        for _ in range(args.runs):
            for name, home in homes.items():
                runs[name].append(boot(home, args.cold))
    finally:
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
    out = {"files": args.files, "write_store_s": round(wrote, 1), "cold": args.cold,
           **{name: {"ready_s": figures([r["ready_s"] for r in rs]),
                     "scan_done_after_ready_s": figures([r["scan_done_after_s"] for r in rs]),
                     "scan_s": figures([r["scan_s"] for r in rs]),
                     "files_scanned": rs[-1]["files"]} for name, rs in runs.items()}}
    ratio = out["big"]["ready_s"]["median"] / out["empty"]["ready_s"]["median"]
    out["ratio_ready_big_over_empty"] = {"value": round(ratio, 2), "target": 2.0,
                                         "pass": ratio <= 2.0}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"store of {args.files:,} tensors written in {wrote:.1f} s; "
          f"{args.runs} boot(s) each{', cold page cache' if args.cold else ''}")
    for name in homes:
        o = out[name]
        print(f"  {name:5}  ready best {o['ready_s']['best']:.3f} s, median "
              f"{o['ready_s']['median']:.3f} s; scan done "
              f"{o['scan_done_after_ready_s']['median']:.2f} s after ready "
              f"({o['files_scanned']:,} files, scan {o['scan_s']['median']:.2f} s)")
    verdict = "met" if ratio <= 2.0 else "not met"
    print(f"  big / empty time to ready (medians): {ratio:.2f} (target <= 2: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
