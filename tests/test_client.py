"""The userland library's edges: no kernel, bad arguments, threads, timeouts,
and what a kernel that dies takes with it."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest

import userland
from conftest import wait_until
from syscalls import Errno, Home, SyscallError


def errno_of(fn, *args, **kw) -> Errno:
    with pytest.raises(SyscallError) as e:
        fn(*args, **kw)
    return e.value.errno


def test_connect_without_a_kernel_is_enoent(tmp_path):
    assert errno_of(userland.connect, tmp_path) == Errno.ENOENT


def test_connect_after_the_kernel_was_sigkilled_is_enoent_not_a_hang(booted):
    os.kill(booted.pid, signal.SIGKILL)
    booted.proc.wait()
    assert (booted.root / "run" / "secret").exists()  # left behind, as after a crash
    assert errno_of(userland.connect, booted.root) == Errno.ENOENT


def test_a_home_too_deep_for_the_socket_is_enametoolong(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    (deep / "run").mkdir()
    (deep / "run" / "kernel.pid").write_text(f"{os.getpid()}\n")  # looks alive
    assert errno_of(userland.connect, deep) == Errno.ENAMETOOLONG


def test_arguments_that_cannot_be_sent_are_einval(shared_kernel):
    with shared_kernel.connect() as osh:
        assert errno_of(osh.kill, 2**70) == Errno.EINVAL
        assert errno_of(osh.spawn, None) == Errno.EINVAL
        assert errno_of(osh.spawn, "sleep 1") == Errno.EINVAL  # a str is not an argv
        assert errno_of(osh.wait, 1.5) == Errno.EINVAL
        assert osh.nop() is None  # the handle still works


def test_spawn_takes_paths(shared_kernel, tmp_path):
    with shared_kernel.connect() as osh:
        child = osh.spawn([Path("/bin/sh"), "-c", "pwd"], cwd=tmp_path)
        assert osh.wait(child, timeout=20)["status"] == 0
    log = shared_kernel.root / "log" / "proc" / f"{child}.log"
    assert log.read_text().strip() == str(tmp_path)


def test_threads_can_share_a_handle(shared_kernel):
    with shared_kernel.connect() as osh:
        results: list[int] = []
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for i in range(50):
                    assert osh.echo(f"{k}-{i}".encode()) == f"{k}-{i}".encode()
                results.append(k)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and sorted(results) == [0, 1, 2, 3]


def test_a_call_with_a_timeout_gets_etimedout_from_a_frozen_kernel(booted):
    with booted.connect(timeout=1.0, heartbeat=False) as osh:
        os.kill(booted.pid, signal.SIGSTOP)
        try:
            assert errno_of(osh.nop) == Errno.ETIMEDOUT
        finally:
            os.kill(booted.pid, signal.SIGCONT)
        assert osh.getpid() == osh.pid  # the late nop reply is skipped, not mistaken


def test_a_sigkilled_kernel_takes_its_processes_with_it(booted):
    with booted.connect(heartbeat=False) as osh:
        child = osh.spawn(["python", "-c", "import time; time.sleep(120)"])
        os_pid = next(p["os_pid"] for p in osh.ps() if p["pid"] == child)
        os.kill(booted.pid, signal.SIGKILL)
        booted.proc.wait()
        assert wait_until(lambda: not _running(os_pid), timeout=5)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("text,why", [
    ("default_uid = \"root\"\n", "default_uid must be int"),
    ("client_heartbeat_s = -1\n", "client_heartbeat_s must be > 0"),
    ("drivers = [1]\n", "drivers must be list"),
    ("nonsense = 1\n", "unknown settings"),
    ("default_uid = \n", "config.toml"),
])
def test_bad_settings_are_refused_with_the_file_named(tmp_path, text, why):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ValueError) as e:
        Home.resolve(tmp_path).config()
    assert why in str(e.value) and str(tmp_path / "config.toml") in str(e.value)


# -- what a review found: each of these once hung a client or hurt the kernel ----------

def test_spawn_with_an_unusable_environment_is_einval_and_leaves_nothing(shared_kernel):
    with shared_kernel.connect() as osh:
        before = {p["pid"] for p in osh.ps()}
        assert errno_of(osh.spawn, ["true"], env={"A=B": "x"}) == Errno.EINVAL
        assert {p["pid"] for p in osh.ps()} == before
        assert errno_of(osh.wait, timeout=0) == Errno.ECHILD  # no phantom child


def test_no_process_may_claim_the_kernels_os_pid(shared_kernel):
    from rawclient import RawClient
    with RawClient(shared_kernel.home.kernel_endpoint) as raw:
        reply = raw.attach(shared_kernel.home, os_pid=shared_kernel.pid, heartbeat=True)
    assert reply["e"] == Errno.EPERM, reply
    assert shared_kernel.proc.poll() is None


def test_a_driver_attaches_unsignalled_and_only_with_heartbeats(shared_kernel):
    """A driver may make syscalls (the executor loads models through tensorfs); the
    process it attaches as is never signalled, so killing it cannot hurt the driver."""
    from rawclient import RawClient
    driver = shared_kernel.driver_pid("echo")
    with RawClient(shared_kernel.home.kernel_endpoint) as raw:
        assert raw.attach(shared_kernel.home, os_pid=driver)["e"] == Errno.EINVAL
    with RawClient(shared_kernel.home.kernel_endpoint) as raw:
        reply = raw.attach(shared_kernel.home, os_pid=driver, heartbeat=True)
        pid = reply["r"]["pid"]
        with shared_kernel.connect(uid=0) as root:
            assert next(p for p in root.ps() if p["pid"] == pid)["os_pid"] is None
            root.kill(pid, "KILL")
            assert pid not in {p["pid"] for p in root.ps() if p["state"] == "running"}
    assert psutil.pid_exists(driver) and shared_kernel.driver_pid("echo") == driver


def test_report_publishes_progress_that_ps_and_wait_show(shared_kernel):
    prog = ("import userland; o = userland.connect(); "
            "o.report({'step': 3, 'loss': 2.5, 'state': 'running', 'ok': True}); "
            "o.report({'state': None, 'loss': 1.25})")
    with shared_kernel.connect() as osh:
        child = osh.spawn(["python", "-c", prog])
        status = osh.wait(child, timeout=30)
        assert status["status"] == 0, shared_kernel.boot_log()
        assert status["info"] == {"step": 3, "loss": 1.25, "ok": True}
        osh.report({"step": 7})
        me = next(p for p in osh.ps() if p["pid"] == osh.getpid())
        assert me["info"] == {"step": 7}
        assert errno_of(osh.report, {"x": 1}, pid=1) == Errno.EPERM  # not my parent...
        assert errno_of(osh.report, {"x": [1]}) == Errno.EINVAL
        assert errno_of(osh.report, {f"k{i}": i for i in range(33)}) == Errno.EINVAL
        assert errno_of(osh.report, {"big": "x" * 3000}) == Errno.EINVAL  # ps carries it
        assert me["info"] == next(p for p in osh.ps() if p["pid"] == osh.getpid())["info"]


def test_a_wait_given_up_on_does_not_swallow_the_exit_status(shared_kernel):
    with shared_kernel.connect(timeout=0.5) as osh:
        child = osh.spawn(["python", "-c", "import sys, time; time.sleep(1.5); sys.exit(7)"])
        assert errno_of(osh.wait, child) == Errno.ETIMEDOUT  # the client's own timeout
        osh.timeout = None
        assert osh.wait(child) == {"pid": child, "status": 7, "reason": "exited", "info": {}}


def test_a_second_wait_for_the_only_child_gets_echild(shared_kernel):
    """Two waits pipelined on one connection: the child answers one; the other can
    never be answered, so it gets ECHILD rather than hanging (as POSIX)."""
    from rawclient import RawClient
    from syscalls import BY_NAME
    with RawClient(shared_kernel.home.kernel_endpoint, timeout_ms=20_000) as raw:
        raw.attach(shared_kernel.home)
        child = raw.call(BY_NAME["spawn"].number,
                         {"argv": ["python", "-c", "import time; time.sleep(0.5)"]})["r"]
        first = raw.request(BY_NAME["wait"].number, {})
        second = raw.request(BY_NAME["wait"].number, {})
        replies = {r["s"]: r for r in (raw.recv(), raw.recv())}
        raw.call(BY_NAME["exit"].number, {"status": 0})
    assert replies[first]["r"]["pid"] == child
    assert replies[second]["e"] == Errno.ECHILD
