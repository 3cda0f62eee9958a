"""A kernel that dies, stalls or is starting must cost nothing (issue 12): drivers
die with their kernel and a new boot's files are not touched by the old one's; a
stall of the kernel itself is never blamed on processes or drivers; a read
survives a tensorfs restart between its read and its close; connect() waits for
a kernel that is starting. Each boots real kernels on temporary homes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import Booted, wait_until

import userland
from syscalls import Errno, SyscallError


def driver_pids(b: Booted) -> dict[str, int]:
    with b.connect(uid=0, heartbeat=False) as osh:
        return {d["name"]: d["os_pid"] for d in osh.sysinfo()["drivers"]}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_drivers_die_with_their_kernel_even_a_stopped_one(booted: Booted) -> None:
    pids = driver_pids(booted)
    os.kill(pids["tensorfs"], signal.SIGSTOP)  # busy or stopped: it must go all the same
    os.kill(booted.pid, signal.SIGKILL)
    booted.proc.wait()
    assert wait_until(lambda: all(gone(p) for p in pids.values()), 5), pids


def test_a_new_boot_keeps_its_cache_when_the_old_tensorfs_was_stopped(booted: Booted) -> None:
    """Issue 12's reproduction: the old tensorfs, stopped when its kernel died, once
    lived on and its shutdown swept the new boot's /dev/shm cache (EIO on every
    read of a cached tensor of 1 MiB or more after). It dies with its kernel now,
    and an instance removes only what it made."""
    old = driver_pids(booted)["tensorfs"]
    os.kill(old, signal.SIGSTOP)
    os.kill(booted.pid, signal.SIGKILL)
    booted.proc.wait()
    booted.reboot()
    big = np.ones(1 << 20, np.float32)
    with booted.connect() as osh:
        osh.save_tensor("/big", big)
        assert np.array_equal(osh.load_array("/big"), big)  # cached now
        try:
            os.kill(old, signal.SIGCONT)  # were it alive, it would exit now
        except ProcessLookupError:
            pass
        assert wait_until(lambda: gone(old), 5)
        time.sleep(0.5)
        for _ in range(3):
            assert np.array_equal(osh.load_array("/big"), big)
        assert driver_pids(booted)["tensorfs"] != old


def test_a_driver_killed_at_work_restarts_at_once_however_often(booted: Booted) -> None:
    """Backoff is for a crash loop (a driver that dies starting, or within a second
    of ready): one that was killed after serving for a while restarts after the
    first delay every time, not after a delay doubled by each earlier kill."""
    def echo() -> dict[str, Any]:
        with booted.connect(uid=0, heartbeat=False) as osh:
            return next(d for d in osh.sysinfo()["drivers"] if d["name"] == "echo")

    for n in range(1, 5):
        time.sleep(1.2)  # ready (and serving) longer than STABLE_S
        before = echo()
        os.kill(before["os_pid"], signal.SIGKILL)
        assert wait_until(lambda: echo()["epoch"] > before["epoch"]
                          and echo()["state"] == "ready", 10)
        d = echo()
        assert (d["restarts"], d["restart_delay_s"]) == (n, 0.1), d


def test_a_kernel_stall_costs_no_process_and_no_driver(booted: Booted) -> None:
    loop = ("import time, userland\n"
            "o = userland.connect()\n"
            "while True:\n"
            "    o.nop(); time.sleep(0.2)")
    env = dict(os.environ, LLMOS_HOME=str(booted.root))
    clients = [subprocess.Popen([sys.executable, "-c", loop], env=env) for _ in range(3)]
    try:
        with booted.connect(uid=0) as osh:
            assert wait_until(lambda: sum(p["argv"][-1:] == ["-c"] or "-c" in p["argv"]
                                          for p in osh.ps()) >= 3, 30)
            before = {d["name"]: (d["epoch"], d["os_pid"]) for d in osh.sysinfo()["drivers"]}
        # longer than the clients' liveness (1.5 s) and the drivers' (3 s)
        os.kill(booted.pid, signal.SIGSTOP)
        time.sleep(4.5)
        os.kill(booted.pid, signal.SIGCONT)
        time.sleep(2.0)  # a few more heartbeat periods, judged after the stall
        assert [c.poll() for c in clients] == [None] * 3  # nobody was lost
        with booted.connect(uid=0) as osh:
            info = osh.sysinfo()
        after = {d["name"]: (d["epoch"], d["os_pid"]) for d in info["drivers"]}
        assert after == before  # no driver declared dead and restarted
        assert info["stalls"]["count"] >= 1 and info["stalls"]["longest_s"] >= 4.0
    finally:
        for c in clients:
            c.kill()
            c.wait()


def test_a_read_survives_a_tensorfs_restart_before_its_close(booted: Booted,
                                                              monkeypatch: Any) -> None:
    """The data is mapped before the descriptor is closed, and a close that a
    restarted tensorfs no longer knows (EBADF) costs a read nothing."""
    from syscalls.client import Llmos
    data = np.arange(1 << 19, dtype=np.float32)  # 2 MiB: through /dev/shm
    with booted.connect() as osh:
        osh.save_tensor("/r", data)
        real_close = Llmos.close_tensor

        def close_on_a_new_instance(self: Llmos, fd: str, discard: bool = False) -> Any:
            real_close(self, fd, discard)  # the old instance's descriptor goes
            raise SyscallError(Errno.EBADF, f"close_tensor: {fd!r} is not an open "
                               "descriptor of this process")  # as a new instance says

        monkeypatch.setattr(Llmos, "close_tensor", close_on_a_new_instance)
        assert np.array_equal(osh.load_tensor("/r").numpy(), data)
        assert np.array_equal(osh.load_array("/r"), data)


def test_a_read_is_done_again_when_tensorfs_dies_under_it(booted: Booted,
                                                          monkeypatch: Any) -> None:
    """tensorfs restarted between open and read: the kernel retries read_tensor
    (idempotent) on the new instance, which never saw the descriptor (EBADF); or
    it died while reading (EIO). A read has no effect, so the library reads
    again, once; a second failure is the caller's to hear."""
    from syscalls.client import Llmos
    data = np.arange(1 << 19, dtype=np.float32)
    real_read = Llmos.read_tensor
    failures: list[Errno] = []

    def read_on_a_new_instance(self: Llmos, fd: str, *a: Any) -> Any:
        if failures:
            raise SyscallError(failures.pop(0), "read_tensor: the driver restarted")
        return real_read(self, fd, *a)

    monkeypatch.setattr(Llmos, "read_tensor", read_on_a_new_instance)
    with booted.connect() as osh:
        osh.save_tensor("/r", data)
        osh.save_tensors("/g", {"a": data[:5], "b": data})
        for load in (lambda: osh.load_array("/r"), lambda: osh.load_tensor("/r").numpy(),
                     lambda: osh.load_tensors("/g")["b"].numpy()):
            for errno in (Errno.EBADF, Errno.EIO):
                failures[:] = [errno]
                assert np.array_equal(load(), data) and not failures
            failures[:] = [Errno.EIO, Errno.EIO]
            with pytest.raises(SyscallError) as e:
                load()
            assert e.value.errno == Errno.EIO

        def open_fds() -> int:  # as tensorfs's last heartbeat says (once a second)
            tfs = next(d for d in osh.sysinfo()["drivers"] if d["name"] == "tensorfs")
            return tfs["info"]["open"]

        assert wait_until(lambda: open_fds() == 0, 5)  # no descriptor left open


@pytest.mark.parametrize("size", [16, 1 << 19])  # through the socket; through /dev/shm
def test_a_save_happens_exactly_once_when_its_commit_reply_is_lost(
        booted: Booted, monkeypatch: Any, size: int) -> None:
    """tensorfs dies mid-commit: the caller hears EIO and cannot know whether the
    file is written. save_tensor's idempotency key tells it: committed, it
    returns the commit's {size, checksum}; not, it saves once more; a second
    failure is the caller's to hear. The previous tensor is never half-replaced."""
    from syscalls.client import Llmos
    real_open, real_close = Llmos.open_tensor, Llmos.close_tensor
    opens: list[str] = []
    script: list[str] = []  # what each commit does: "commit" or "lose", then raise EIO

    def counting_open(self: Llmos, path: str, mode: str, *a: Any, **kw: Any) -> Any:
        opens.append(mode)
        return real_open(self, path, mode, *a, **kw)

    def dying_close(self: Llmos, fd: str, discard: bool = False) -> Any:
        if discard or not script:
            return real_close(self, fd, discard)
        real_close(self, fd, script.pop(0) == "lose")
        raise SyscallError(Errno.EIO, "close_tensor: the tensorfs driver died")

    monkeypatch.setattr(Llmos, "open_tensor", counting_open)
    monkeypatch.setattr(Llmos, "close_tensor", dying_close)
    old, new = np.zeros(size, np.float32), np.arange(size, dtype=np.float32)
    with booted.connect() as osh:
        osh.save_tensor("/t", old)
        opens.clear()
        script[:] = ["commit"]  # written, but the reply lost: no second write
        r = osh.save_tensor("/t", new, exclusive=False)
        st = osh.stat("/t")
        assert (r, opens) == ({"size": st["size"], "checksum": st["checksum"]}, ["w"])
        assert np.array_equal(osh.load_array("/t"), new)
        osh.save_tensor("/t", old)
        opens.clear()
        script[:] = ["lose"]  # not written: the save runs again
        r = osh.save_tensor("/t", new)
        assert r["checksum"] == osh.stat("/t")["checksum"] and opens == ["w", "w"]
        assert np.array_equal(osh.load_array("/t"), new)
        script[:] = ["commit"]  # x: the retry must not find its own file EEXIST
        osh.save_tensors("/g", {"a": new, "b": old}, exclusive=True)
        assert np.array_equal(osh.load_tensors("/g")["a"].numpy(), new)
        script[:] = ["lose", "lose"]
        with pytest.raises(SyscallError) as e:
            osh.save_tensor("/t", old)
        assert e.value.errno == Errno.EIO
        assert np.array_equal(osh.load_array("/t"), new)  # untouched


def test_connect_waits_for_a_kernel_that_is_starting(booted: Booted) -> None:
    """A home whose lock is held but whose kernel's pid is not written yet is a
    kernel starting: connect() waits for it (EAGAIN after its wait), where a home
    with no kernel at all is ENOENT at once."""
    empty = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    try:
        t0 = time.monotonic()
        with pytest.raises(userland.NotFound):
            userland.connect(empty, wait=5)
        assert time.monotonic() - t0 < 2  # no kernel: said at once, not waited out
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    pidfile = booted.home.pidfile
    hidden = pidfile.with_name("kernel.pid.later")
    pidfile.rename(hidden)  # the kernel holds the lock: as one that is starting
    try:
        with pytest.raises(userland.Busy) as e:
            userland.connect(booted.root, wait=0.3)
        assert "starting" in e.value.message
        later = threading.Timer(0.5, hidden.rename, args=(pidfile,))  # it is up
        later.start()
        with userland.connect(booted.root, wait=30) as osh:
            assert osh.kernel_pid == booted.pid and osh.getpid() > 1
        later.join()
    finally:
        if hidden.exists():
            hidden.rename(pidfile)
