"""The devices driver against a real kernel: alloc_gpu, free_gpu and devices()
on two simulated 1 GiB GPUs, every argument's bad values, quotas, the wait
queue's policy, process death, and a SIGKILLed driver that comes back with its
allocation table (and without the requests that were waiting)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

import userland
from conftest import ROOT, Booted, wait_until
from syscalls import BY_NAME, Errno, SyscallError, check_args
from syscalls._schema import parse_size

GiB = 2**30
MiB = 2**20
QUOTA_UID = 1001


CONFIG = {"gpus": "sim", "sim_gpus": "2x1GiB", "gpu_max_bypass": 2,
          "gpu_quota": {str(QUOTA_UID): "1GiB"}}


@pytest.fixture(scope="module")
def kernel():
    with Booted(CONFIG) as b:
        yield b


def devices(kernel: Booted) -> dict:
    with kernel.connect(uid=0, heartbeat=False) as osh:
        return osh.devices()


def allocations(kernel: Booted) -> list[dict]:
    return [a for g in devices(kernel)["gpus"] for a in g["allocations"]]


def check_invariants(info: dict) -> None:
    for g in info["gpus"]:
        assert g["simulated"] is True
        assert g["allocated"] == sum(a["bytes"] for a in g["allocations"])
        assert g["allocated"] <= g["capacity"], g
        if any(a["exclusive"] for a in g["allocations"]):
            assert len(g["allocations"]) == 1 and g["free"] == 0, g
        else:
            assert g["free"] == g["capacity"] - g["allocated"], g


@pytest.fixture
def clean(kernel):
    """Each test starts and ends with no allocations and an empty queue."""
    assert wait_until(lambda: not allocations(kernel) and not devices(kernel)["queue"], 5)
    yield kernel
    assert wait_until(lambda: not allocations(kernel) and not devices(kernel)["queue"], 5), \
        devices(kernel)
    check_invariants(devices(kernel))


def errno_of(fn, *a: Any, **kw: Any) -> Errno:
    with pytest.raises(SyscallError) as e:
        fn(*a, **kw)
    return e.value.errno


class Pending:
    """A blocking alloc_gpu on its own handle (its own process), in a thread."""

    def __init__(self, osh: userland.Llmos, **kw: Any) -> None:
        self.osh = osh
        self.out: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, kwargs=kw, daemon=True)
        self.thread.start()

    def _run(self, **kw: Any) -> None:
        try:
            self.out["r"] = self.osh.alloc_gpu(**kw)
        except SyscallError as e:
            self.out["e"] = e.errno

    def result(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "alloc_gpu did not answer"
        return self.out.get("r", self.out.get("e"))

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def queued(kernel: Booted, n: int) -> bool:
    return wait_until(lambda: len(devices(kernel)["queue"]) == n, 5)


# -- sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("text,n", [(1, 1), ("4096", 4096), ("2GiB", 2 * GiB),
                                    ("512MiB", 512 * MiB), ("512 MiB", 512 * MiB),
                                    ("1.5GB", 1_500_000_000), ("1KB", 1000), ("3B", 3),
                                    ("1.5KiB", 1536)])
def test_sizes_parse(text, n):
    assert parse_size(text) == n


BAD_SIZES = [0, -1, "0", "-1GiB", "", " 1GiB", "1GiB ", "abc", "1.5", "2gib", "2XB", "1e9",
             "0.1B", "1,5GiB", "１GiB", True, 1.5, None, [], {}, "1 024"]


@pytest.mark.parametrize("value", BAD_SIZES, ids=repr)
def test_bad_sizes_are_einval_before_the_driver(value):
    with pytest.raises(SyscallError) as e:
        check_args(BY_NAME["alloc_gpu"], {"mem": value})
    assert e.value.errno == Errno.EINVAL


# -- bad input over the wire -------------------------------------------------------

BAD_ARGS = [
    *({"mem": v} for v in BAD_SIZES),
    {"mem": 2**62 + 1},
    {},                                    # mem is required
    {"mem": "1GiB", "count": 0}, {"mem": "1GiB", "count": 65}, {"mem": "1GiB", "count": "1"},
    {"mem": "1GiB", "count": True}, {"mem": "1GiB", "count": 1.0},
    {"mem": "1GiB", "exclusive": 1}, {"mem": "1GiB", "exclusive": "yes"},
    {"mem": "1GiB", "wait": 1}, {"mem": "1GiB", "wait": None},
    {"mem": "1GiB", "timeout": -1}, {"mem": "1GiB", "timeout": "1"},
    {"mem": "1GiB", "timeout": float("nan")},
    {"mem": "1GiB", "priority": 21}, {"mem": "1GiB", "priority": -21},
    {"mem": "1GiB", "priority": 0.5},
    {"mem": "1GiB", "bogus": 1},
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=repr)
def test_alloc_gpu_bad_args_einval(clean, args):
    with clean.connect(heartbeat=False) as osh:
        assert errno_of(osh.call, "alloc_gpu", **args) == Errno.EINVAL


@pytest.mark.parametrize("args,errno", [
    ({"alloc_id": 5}, Errno.EINVAL), ({"alloc_id": None}, Errno.EINVAL),
    ({"alloc_id": "x" * 65}, Errno.EINVAL), ({}, Errno.EINVAL),
    ({"alloc_id": ""}, Errno.EBADF), ({"alloc_id": "0" * 24}, Errno.EBADF),
], ids=repr)
def test_free_gpu_bad_args(clean, args, errno):
    with clean.connect(heartbeat=False) as osh:
        assert errno_of(osh.call, "free_gpu", **args) == errno


def test_devices_takes_no_args(clean):
    with clean.connect(heartbeat=False) as osh:
        assert errno_of(osh.call, "devices", x=1) == Errno.EINVAL


# -- allocating -------------------------------------------------------------------


def test_devices_lists_simulated_gpus_cpus_and_memory(clean):
    info = devices(clean)
    assert info["simulated"] is True
    assert [(g["id"], g["capacity"], g["allocated"], g["free"]) for g in info["gpus"]] == \
        [("sim0", GiB, 0, GiB), ("sim1", GiB, 0, GiB)]
    assert info["cpus"]["logical"] >= 1 and info["memory"]["total"] > 0
    assert info["queue"] == []


def test_alloc_free_and_ps_shows_it(clean):
    with clean.connect() as osh:
        a = osh.alloc_gpu("512MiB")
        assert (a["devices"], a["bytes_each"], a["count"], a["simulated"]) == \
            (["sim0"], 512 * MiB, 1, True)
        me = next(p for p in osh.ps() if p["pid"] == osh.pid)
        assert me["resources"] == {"gpu": [a["id"]]}
        [g0, g1] = devices(clean)["gpus"]
        assert (g0["allocated"], g0["free"]) == (512 * MiB, 512 * MiB)
        assert g0["allocations"] == [{"id": a["id"], "pid": osh.pid, "uid": osh.uid,
                                      "bytes": 512 * MiB, "exclusive": False}]
        # best fit: the next one goes where it fits most snugly
        b = osh.alloc_gpu(256 * MiB)
        assert b["devices"] == ["sim0"]
        osh.free_gpu(a["id"])
        osh.free_gpu(b["id"])
        me = next(p for p in osh.ps() if p["pid"] == osh.pid)
        assert me["resources"].get("gpu", []) == []
        assert allocations(clean) == []


def test_best_fit_takes_the_fullest_device_that_fits(clean):
    with clean.connect(heartbeat=False) as osh:
        assert osh.alloc_gpu("512MiB")["devices"] == ["sim0"]   # a tie: the lower index
        assert osh.alloc_gpu("768MiB")["devices"] == ["sim1"]   # only sim1 fits
        assert osh.alloc_gpu("256MiB")["devices"] == ["sim1"]   # sim1 is the snugger fit
        assert osh.alloc_gpu("512MiB")["devices"] == ["sim0"]


def test_ids_are_random_tokens(clean):
    with clean.connect(heartbeat=False) as osh:
        ids = [osh.alloc_gpu(MiB)["id"] for _ in range(4)]
        assert len(set(ids)) == 4 and all(len(i) == 24 for i in ids)


def test_count_takes_distinct_devices_and_too_many_is_enomem(clean):
    with clean.connect(heartbeat=False) as osh:
        a = osh.alloc_gpu("1GiB", count=2)
        assert a["devices"] == ["sim0", "sim1"] and a["capacity"] == [GiB, GiB]
        assert errno_of(osh.alloc_gpu, 1) == Errno.ENOMEM  # both are full
        osh.free_gpu(a["id"])
        assert errno_of(osh.alloc_gpu, 1, count=3) == Errno.ENOMEM  # never: 2 GPUs


def test_larger_than_any_device_fails_at_once_even_with_wait(clean):
    with clean.connect(heartbeat=False) as osh:
        assert errno_of(osh.alloc_gpu, GiB + 1, wait=True) == Errno.ENOMEM
        assert errno_of(osh.alloc_gpu, "1GiB", count=3, wait=True) == Errno.ENOMEM
        assert devices(clean)["queue"] == []


def test_exclusive_shares_with_nothing(clean):
    with clean.connect(heartbeat=False) as osh:
        small = osh.alloc_gpu(MiB)                      # on sim0
        x = osh.alloc_gpu(MiB, exclusive=True)          # must take the empty sim1
        assert x["devices"] == ["sim1"]
        assert errno_of(osh.alloc_gpu, MiB, exclusive=True) == Errno.ENOMEM
        g = {g["id"]: g for g in devices(clean)["gpus"]}
        assert g["sim1"]["exclusive"] and g["sim1"]["free"] == 0
        osh.free_gpu(small["id"])
        # sim1 is held exclusively: a shared one must go to sim0
        assert osh.alloc_gpu(GiB)["devices"] == ["sim0"]
        check_invariants(devices(clean))


def test_non_root_may_not_raise_priority(clean):
    with clean.connect(heartbeat=False) as osh:
        assert errno_of(osh.alloc_gpu, MiB, priority=1) == Errno.EPERM
        osh.free_gpu(osh.alloc_gpu(MiB, priority=-5)["id"])
    with clean.connect(uid=0, heartbeat=False) as root:
        root.free_gpu(root.alloc_gpu(MiB, priority=20)["id"])


def test_free_of_another_process_is_eperm_but_root_may(clean):
    with clean.connect() as a, clean.connect() as b, clean.connect(uid=0) as root:
        x = a.alloc_gpu(MiB)
        assert errno_of(b.free_gpu, x["id"]) == Errno.EPERM
        assert [r["id"] for r in allocations(clean)] == [x["id"]]
        held = lambda: next(p for p in root.ps() if p["pid"] == a.pid)["resources"]  # noqa: E731
        assert held() == {"gpu": [x["id"]]}
        root.free_gpu(x["id"])
        assert allocations(clean) == []
        assert held() == {}  # ps shows the owner no longer holds it
        assert errno_of(b.free_gpu, x["id"]) == Errno.EBADF


def test_sysinfo_shows_the_devices_drivers_summary(clean):
    with clean.connect() as osh:
        x = osh.alloc_gpu(MiB)

        def summary() -> dict:
            return next(d for d in osh.sysinfo()["drivers"] if d["name"] == "devices")["info"]

        # the summary rides on the driver's heartbeat (every driver_heartbeat_s)
        assert wait_until(lambda: sum(g["allocations"] for g in summary()["gpus"]) == 1, 5)
        gpus = summary()["gpus"]
        assert len(gpus) == 2 and all(g["simulated"] for g in gpus)
        assert sorted(g["capacity"] - g["free"] for g in gpus) == [0, MiB]
        osh.free_gpu(x["id"])


def test_free_twice_is_harmless_and_unknown_is_ebadf(clean):
    with clean.connect(heartbeat=False) as osh:
        x = osh.alloc_gpu(MiB)
        osh.free_gpu(x["id"])
        osh.free_gpu(x["id"])   # idempotent for its owner: a retry after a driver restart
        assert errno_of(osh.free_gpu, x["id"][::-1]) == Errno.EBADF


def test_quota_is_edquot_and_counts_waiting_requests(clean):
    with clean.connect(uid=QUOTA_UID) as q, clean.connect(uid=QUOTA_UID) as q2, \
            clean.connect(uid=0, heartbeat=False) as root:
        assert errno_of(q.alloc_gpu, "1GiB", count=2) == Errno.EDQUOT
        a = q.alloc_gpu("768MiB")
        assert errno_of(q2.alloc_gpu, "512MiB") == Errno.EDQUOT  # uid-wide, not per process
        b = q2.alloc_gpu("256MiB")
        q.free_gpu(a["id"])
        # fill the GPUs so a request must wait; while it waits it counts too
        hog = root.alloc_gpu("768MiB", count=2)
        p = Pending(q, mem="768MiB", wait=True)
        assert queued(clean, 1)
        assert errno_of(q2.alloc_gpu, "1MiB", wait=True) == Errno.EDQUOT
        root.free_gpu(hog["id"])
        assert p.result()["bytes_each"] == 768 * MiB
        q2.free_gpu(b["id"])
        q.free_gpu(p.result()["id"])
        # other uids have no quota here
        assert root.alloc_gpu("1GiB", count=2)["count"] == 2


def test_wait_timeout_is_etimedout(clean):
    with clean.connect() as hog, clean.connect(heartbeat=False) as osh:
        hog.alloc_gpu("1GiB", count=2)
        assert errno_of(osh.alloc_gpu, MiB) == Errno.ENOMEM
        assert errno_of(osh.alloc_gpu, MiB, wait=True, timeout=0.2) == Errno.ETIMEDOUT
        assert errno_of(osh.alloc_gpu, MiB, wait=True, timeout=0) == Errno.ETIMEDOUT
        assert devices(clean)["queue"] == []


def test_waiters_are_served_by_priority_then_arrival(clean):
    with clean.connect() as hog, clean.connect(uid=0) as r1, clean.connect(uid=0) as r2, \
            clean.connect(uid=0) as r3:
        h = hog.alloc_gpu("1GiB", count=2)
        low = Pending(r1, mem="1GiB", count=2, wait=True, priority=-1)
        assert queued(clean, 1)
        first = Pending(r2, mem="1GiB", count=2, wait=True)
        assert queued(clean, 2)
        high = Pending(r3, mem="1GiB", count=2, wait=True, priority=5)
        assert queued(clean, 3)
        assert [w["priority"] for w in devices(clean)["queue"]] == [5, 0, -1]
        hog.free_gpu(h["id"])
        got = high.result()
        assert not first.done and not low.done and queued(clean, 2)
        r3.free_gpu(got["id"])
        got = first.result()
        assert not low.done and queued(clean, 1)
        r2.free_gpu(got["id"])
        r1.free_gpu(low.result()["id"])


def test_small_request_is_not_stuck_behind_a_big_one(clean):
    with clean.connect() as hog, clean.connect() as big, clean.connect() as small:
        h = hog.alloc_gpu("512MiB", count=2)
        pb = Pending(big, mem="1GiB", wait=True)           # cannot fit yet
        assert queued(clean, 1)
        # arrives later, fits now: served at once, past the big one
        s = small.alloc_gpu("256MiB", wait=True)
        assert s["bytes_each"] == 256 * MiB and not pb.done
        assert devices(clean)["queue"][0]["bypassed"] == 1
        small.free_gpu(s["id"])
        hog.free_gpu(h["id"])
        assert pb.result()["bytes_each"] == GiB


def test_a_big_request_is_bypassed_at_most_max_bypass_times(clean):
    """gpu_max_bypass = 2 here: after two grants behind it, the big request holds a
    reservation and later small ones wait (or fail, without wait) until it is met."""
    with clean.connect() as hog, clean.connect() as big, clean.connect() as small, \
            clean.connect() as late:
        h = hog.alloc_gpu("512MiB", count=2)
        pb = Pending(big, mem="1GiB", wait=True)
        assert queued(clean, 1)
        s1 = small.alloc_gpu(MiB)
        s2 = small.alloc_gpu(MiB)
        assert devices(clean)["queue"][0]["bypassed"] == 2
        assert errno_of(small.alloc_gpu, MiB) == Errno.ENOMEM  # fits, but reserved
        pl = Pending(late, mem=MiB, wait=True)
        assert queued(clean, 2)
        for x in (s1, s2):
            small.free_gpu(x["id"])
        assert not pb.done and not pl.done
        hog.free_gpu(h["id"])
        assert pb.result()["devices"] == ["sim0"]
        assert pl.result()["devices"] == ["sim1"]  # sim0 is full now


# -- processes ending -------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import json, sys, time, userland
    osh = userland.connect(sys.argv[1])
    a = osh.alloc_gpu(sys.argv[2], count=int(sys.argv[3]))
    print(json.dumps({"pid": osh.pid, "alloc": a, "env": userland.gpu_env(a)}), flush=True)
    time.sleep(120)
""")


def holder(kernel: Booted, mem: str, count: int = 1) -> tuple[subprocess.Popen, dict]:
    """A process started outside llmos that holds an allocation until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(kernel.root), mem, str(count)],
                         stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return p, json.loads(p.stdout.readline())


def test_process_death_frees_and_wakes_the_queue(clean):
    p, info = holder(clean, "1GiB", 2)
    try:
        assert {a["pid"] for a in allocations(clean)} == {info["pid"]}
        with clean.connect() as osh:
            w = Pending(osh, mem="1GiB", count=2, wait=True)
            assert queued(clean, 1)
            p.kill()
            got = w.result()
            assert got["count"] == 2
            assert {a["pid"] for a in allocations(clean)} == {osh.pid}
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


WAITER = textwrap.dedent("""
    import sys, userland
    osh = userland.connect(sys.argv[1])
    print(osh.pid, flush=True)
    osh.alloc_gpu(sys.argv[2], wait=True)
""")


def test_death_drops_queued_requests(clean):
    with clean.connect() as hog:
        h = hog.alloc_gpu("1GiB", count=2)
        p = subprocess.Popen([sys.executable, "-c", WAITER, str(clean.root), "1GiB"],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            pid = int(p.stdout.readline())
            assert queued(clean, 1) and devices(clean)["queue"][0]["pid"] == pid
            p.kill()
            assert queued(clean, 0)
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
        hog.free_gpu(h["id"])
        assert allocations(clean) == []
        with clean.connect(uid=0, heartbeat=False) as root:
            d = next(d for d in root.sysinfo()["drivers"] if d["name"] == "devices")
            assert d["inflight"] == 0  # the dropped call was settled, not leaked


def test_gpu_env_for_a_simulated_allocation(clean):
    p, info = holder(clean, "256MiB")
    try:
        env = info["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == "" and env["LLMOS_GPU_SIMULATED"] == "1"
        assert env["LLMOS_GPU_MEM_BYTES"] == str(256 * MiB)
        assert env["LLMOS_GPU_MEM_FRACTION"] == "0.250000"
        assert env["LLMOS_GPU_ALLOC"] == info["alloc"]["id"]
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


BOUNDED = textwrap.dedent("""
    import userland
    print(userland.apply_gpu_limits(), flush=True)
    small = bytearray(16 * 2**20)          # within the 64 MiB allocation
    try:
        big = bytearray(256 * 2**20)       # far past it
        print("big: allocated", flush=True)
    except MemoryError:
        print("big: MemoryError", flush=True)
""")


def test_a_simulated_allocation_bounds_the_memory_of_the_work(clean):
    with clean.connect() as osh:
        alloc = osh.alloc_gpu("64MiB")
        child = osh.spawn(["python", "-c", BOUNDED], gpus=alloc)
        assert osh.wait(child, timeout=30)["status"] == 0
        out = (clean.root / "log" / "proc" / f"{child}.log").read_text()
        assert "'applied': True" in out and "'simulated': True" in out, out
        assert "big: MemoryError" in out, out
        osh.free_gpu(alloc["id"])


def test_llmos_devices_command(clean):
    with clean.connect(heartbeat=False) as osh:
        a = osh.alloc_gpu("0.75GB")
        env = dict(os.environ, LLMOS_HOME=str(clean.root), PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-m", "userland.cli", "devices"], env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "gpus (simulated)" in r.stdout and "llmos virtual GPU" in r.stdout
        assert a["id"] in r.stdout and "715.3MiB" in r.stdout
        r = subprocess.run([sys.executable, "-m", "userland.cli", "devices", "--json"],
                           env=env, capture_output=True, text=True, timeout=30)
        assert json.loads(r.stdout)["gpus"][0]["allocations"][0]["id"] == a["id"]


# -- the driver dies ----------------------------------------------------------------


def test_sigkilled_driver_keeps_its_allocations_and_fails_waiters_eio():
    b = Booted(CONFIG)
    try:
        with b.connect() as a, b.connect() as c, b.connect() as w1h, b.connect() as w2h:
            x = a.alloc_gpu("512MiB")                           # sim0
            p, held = holder(b, "512MiB")                        # sim0 (best fit): full
            try:
                y = c.alloc_gpu("768MiB")                        # sim1
                w1 = Pending(w1h, mem="1GiB", wait=True)
                w2 = Pending(w2h, mem="512MiB", wait=True, timeout=60)
                assert queued(b, 2)
                before = devices(b)
                old = b.driver_pid("devices")
                os.kill(old, signal.SIGKILL)
                p.kill()          # dies while the driver is down (or just after)
                p.wait()
                assert w1.result() == Errno.EIO and w2.result() == Errno.EIO
                # the kernel notices the holder's death (then tells the driver, by
                # an exit notice or by leaving it out of the new instance's welcome)
                assert wait_until(lambda: held["pid"] not in {r["pid"] for r in a.ps()})
            finally:
                p.kill()
                p.wait()
                p.stdout.close()
            after = devices(b)   # waits in the kernel's backlog for the new instance
            assert b.driver_pid("devices") != old
            check_invariants(after)
            assert after["queue"] == []
            ids = {r["id"]: r["pid"] for g in after["gpus"] for r in g["allocations"]}
            assert ids == {x["id"]: a.pid, y["id"]: c.pid}, _logs(b)
            was = {r["id"] for g in before["gpus"] for r in g["allocations"]}
            assert was == {x["id"], y["id"], held["alloc"]["id"]}
            # the holder's memory is free again, and only once
            z = w1h.alloc_gpu("512MiB")
            assert z["devices"] == ["sim0"]
            assert errno_of(w2h.alloc_gpu, "512MiB") == Errno.ENOMEM
            check_invariants(devices(b))
            # the journal's allocations are still their owners' to free
            assert errno_of(c.free_gpu, x["id"]) == Errno.EPERM
            a.free_gpu(x["id"])
            c.free_gpu(y["id"])
            w1h.free_gpu(z["id"])
            assert allocations(b) == []
        log = (b.root / "log" / "drivers" / "devices.log").read_text()
        assert "journal: took back 3 allocation(s)" in log or \
            "journal: took back 2 allocation(s)" in log, log[-2000:]
    finally:
        b.stop()


def _logs(b: Booted) -> str:
    return ((b.root / "log" / "drivers" / "devices.log").read_text()[-3000:]
            + b.boot_log()[-3000:])


def test_journal_from_another_boot_is_not_taken_back():
    b = Booted(CONFIG)
    try:
        with b.connect() as a:
            a.alloc_gpu("1GiB", count=2)
            journal = b.root / "devices" / "allocations.json"
            data = json.loads(journal.read_text())
            assert len(data["allocations"]) == 1
        data["boot"] = "1:0.0"   # as if written by an earlier kernel
        journal.write_text(json.dumps(data))
        os.kill(b.driver_pid("devices"), signal.SIGKILL)
        assert allocations(b) == []
        with b.connect() as a:
            assert a.alloc_gpu("1GiB", count=2)["count"] == 2
    finally:
        b.stop()
