"""tensorfs against memcpy, safetensors and torch.save/torch.load, in one run.

    python bench/tensorfs_bench.py [--mib 256] [--repeat 3] [--home DIR]

Boots a kernel on a temporary home (or uses a running one with --home), then
times, best of --repeat:
  - read:  load_tensor of a cached tensor (a hard link to the cache's /dev/shm
           segment, mapped copy-on-write), then one pass over its bytes so the
           pages are really mapped; against a memcpy of the same bytes (numpy
           copyto into a warm buffer) and torch.load;
  - write: save_tensor, durable when it returns (fsync of file and directory);
           against safetensors save_file to the same disk, the same plus an fsync,
           and torch.save.
Prints the ratios the issue asks for. Never fails on timing: it reports.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import userland  # noqa: E402


def best(fn, repeat: int, prepare=None) -> float:
    """The fastest of repeat runs. Before each, untimed: prepare() (its result is
    fn's argument) and os.sync, so no run pays for another's writeback."""
    times = []
    for _ in range(repeat):
        arg = prepare() if prepare else None
        os.sync()
        t0 = time.perf_counter()
        fn(arg) if prepare else fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fresh(disk: Path):
    """A prepare for the baseline writes: a new file name each time, the previous
    files removed, so save_file and torch.save never pay for truncating an old file
    (their best case)."""
    count = iter(range(1 << 30))

    def prepare() -> Path:
        for old in disk.glob("fresh-*"):
            old.unlink()
        return disk / f"fresh-{next(count)}"
    return prepare


def touch(a: np.ndarray) -> None:
    """Read every page once (a sum over one uint64 per 4 KiB page)."""
    flat = a.reshape(-1).view(np.uint8)
    flat[::4096].sum()


def run(osh: userland.Llmos, disk: Path, mib: int, repeat: int) -> dict[str, float]:
    import torch
    from safetensors.torch import save_file

    n = mib * 2**20 // 4
    x = torch.randn(n)
    arr = x.numpy()
    dst = np.empty_like(arr)
    np.copyto(dst, arr)
    gib = mib / 1024
    r: dict[str, float] = {}
    r["memcpy"] = best(lambda: np.copyto(dst, arr), repeat)
    osh.save_tensor("/bench", x)
    osh.load_tensor("/bench")  # now cached

    def tfs_read() -> None:
        y = osh.load_tensor("/bench")
        touch(y.numpy())

    r["tfs_read"] = best(tfs_read, repeat)
    r["tfs_read_nottouched"] = best(lambda: osh.load_tensor("/bench"), repeat)
    pt = disk / "bench.pt"
    torch.save(x, pt)
    r["torch_load"] = best(lambda: touch(torch.load(pt).numpy()), repeat)
    r["torch_save"] = best(lambda p: torch.save(x, p), repeat, fresh(disk))
    r["tfs_write"] = best(lambda: osh.save_tensor("/bench", x), repeat)
    r["st_save"] = best(lambda p: save_file({"tensor": x}, p), repeat, fresh(disk))

    def st_save_fsync(p: Path) -> None:
        save_file({"tensor": x}, p)
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    r["st_save_fsync"] = best(st_save_fsync, repeat, fresh(disk))
    osh.unlink("/bench")
    labels = {
        "memcpy": "memcpy (numpy copyto, warm)",
        "tfs_read": "tensorfs read, cached, every page touched",
        "tfs_read_nottouched": "tensorfs read, cached, a mapping (untouched)",
        "torch_load": "torch.load, every page touched",
        "torch_save": "torch.save (page cache, no fsync)",
        "tfs_write": "tensorfs durable write (fsynced)",
        "st_save": "safetensors save_file (no fsync)",
        "st_save_fsync": "safetensors save_file + fsync",
    }
    for k, v in r.items():
        rate = "" if k == "tfs_read_nottouched" else f"{gib / v:7.2f} GiB/s"
        print(f"{labels[k]:46} {v * 1000:9.1f} ms  {rate}")
    # each: how many times faster tensorfs is (the baseline's time / tensorfs's time)
    ratios = {
        "read speed / memcpy speed": (r["memcpy"] / r["tfs_read"], 0.5),
        "read speed / torch.load speed": (r["torch_load"] / r["tfs_read"], 10),
        "durable write speed / save_file speed": (r["st_save"] / r["tfs_write"], 0.9),
        "durable write speed / save_file+fsync speed": (r["st_save_fsync"] / r["tfs_write"],
                                                        None),
        "durable write speed / torch.save speed": (r["torch_save"] / r["tfs_write"], 10),
    }
    print()
    for k, (v, target) in ratios.items():
        verdict = "" if target is None else \
            f"  target >= {target:g}: {'met' if v >= target else 'not met'}"
        print(f"{k:46} {v:6.2f}x{verdict}")
    ratios = {k: v for k, (v, _) in ratios.items()}
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--home", help="use the kernel running on this home")
    args = ap.parse_args(argv)
    booted = None
    if args.home is None:
        from conftest import Booted
        booted = Booted({"tensor_cache": f"{max(2 * args.mib, 1)}MiB",
                         "tensor_max_size": f"{max(2 * args.mib, 1)}MiB"})
        home = booted.root
    else:
        home = Path(args.home)
    disk = Path(tempfile.mkdtemp(prefix="tfs-bench-", dir=home))
    try:
        with userland.connect(home) as osh:
            print(f"tensor of {args.mib} MiB, best of {args.repeat}; home {home}")
            run(osh, disk, args.mib, args.repeat)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        if booted is not None:
            booted.stop()  # the home's /dev/shm segments too
    return 0


if __name__ == "__main__":
    sys.exit(main())
