"""What llmos does so far, from a userland program's side.

Run it inside llmos (`llmos run python userland/examples/hello.py`) or from the
host while llmos runs (`python userland/examples/hello.py`).
"""
from pathlib import Path

import numpy as np

import userland

HERE = Path(__file__).resolve().parent

with userland.connect() as osh:  # this Python process is now an llmos process
    print(f"I am llmos pid {osh.getpid()} (uid {osh.uid}), child of pid {osh.getppid()}")

    print("\nThe process table:")
    print(f"  {'PID':>4} {'PPID':>4} {'UID':>5} {'STATE':<8} COMMAND")
    for p in osh.ps():
        print(f"  {p['pid']:>4} {p['ppid']:>4} {p['uid']:>5} {p['state']:<8} "
              f"{' '.join(p['argv'])[:60]}")

    child = osh.spawn(["python", str(HERE / "child.py"), "7"])
    print(f"\nSpawned pid {child} (child.py, told to exit with status 7); it runs as a "
          "real OS process. Waiting for it...")
    print(f"  wait -> {osh.wait(child)}")
    log = osh.home.root / "log" / "proc" / f"{child}.log"
    print(f"  its output, from {log}:")
    print(log.read_text().rstrip())

    print("\nA syscall served by a driver process (echo):", osh.echo(b"hello, driver"))
    print("A streamed syscall (ticks), replies as they come:", end="")
    for tick in osh.ticks(5, 0.05):
        print(f" {tick}", end="", flush=True)
    print()

    alloc = osh.alloc_gpu("1GiB")  # on simulated GPUs where the machine has none
    print(f"\nalloc_gpu('1GiB') -> {alloc['devices']} (simulated: {alloc['simulated']})")
    for g in osh.devices()["gpus"]:
        print(f"  {g['id']}: {g['allocated'] >> 20} MiB of {g['capacity'] >> 20} MiB allocated")
    osh.free_gpu(alloc["id"])

    path = f"/hello-{osh.pid}"
    osh.save_tensor(path, np.arange(6, dtype=np.float32).reshape(2, 3))  # durable on return
    st = osh.stat(path)
    print(f"\nsave_tensor({path!r}): {st['dtype']} {st['shape']}, {st['size']} bytes, "
          f"{st['checksum']}")
    print(f"load_tensor({path!r}) -> {osh.load_tensor(path).tolist()}")
    osh.unlink(path)

    try:
        osh.wait(12345)
    except userland.SyscallError as e:
        print(f"\nErrors carry an errno and a message: {e.errno.name}: {e.message}")

    info = osh.sysinfo()
    print(f"\nsysinfo: up {info['uptime_s']:.1f}s, {info['processes']['running']} processes running")
    for d in info["drivers"]:
        print(f"  driver {d['name']}: {d['state']}, epoch {d['epoch']}, restarts {d['restarts']}")
    print("  syscalls served so far:")
    for name, s in info["syscalls"].items():
        print(f"    {name:<8} {s['count']:>5} calls, p50 {s['p50_us']} us")
