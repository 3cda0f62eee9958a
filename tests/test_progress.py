"""Progress of large tensor transfers against a real kernel: save_tensor's and
load_tensor's progress calls (chunks, then the commit, then done; a failing
callback discards the write), and the rich bar of `llmos put` / `llmos get` and
the shell's put / get: forced with --progress when stderr is not a terminal,
shown on its own from 64 MiB on a terminal, never with -q; the bytes that come
back out are the bytes that went in."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pexpect
import pytest
import torch

from conftest import ROOT, Booted
from syscalls import Errno, SyscallError
from syscalls.client import _tensors
from userland import _files

KiB, MiB = 1024, 2**20
CONFIG = {"drivers": ["tensorfs"], "tensor_shm_threshold": "64KiB",
          "tensor_max_size": "80MiB", "tensor_cache": "8MiB"}


@pytest.fixture(scope="module")
def kernel():
    with Booted(CONFIG) as b:
        yield b


def env_for(kernel: Booted, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLMOS_HOME=str(kernel.root), **extra)
    env.pop("LLMOS_SPAWN_TOKEN", None)
    env.pop("COLUMNS", None)  # rich's width for a file: 80
    return env


def llmos(kernel: Booted, *argv: str) -> subprocess.CompletedProcess:
    """`llmos ARGV...` with stdout and stderr pipes: no terminal."""
    return subprocess.run([sys.executable, "-m", "userland.cli", *argv], cwd=ROOT,
                          env=env_for(kernel), capture_output=True, text=True, timeout=60)


def bar_total(n: int) -> str:
    """What the finished bar shows for n bytes (rich's DownloadColumn, binary units)."""
    return f"{n / MiB:.1f}/{n / MiB:.1f} MiB"


# -- the library --------------------------------------------------------------------

def test_save_tensor_reports_each_chunk_then_the_commit_then_done(kernel, monkeypatch):
    monkeypatch.setattr(_tensors, "PROGRESS_CHUNK", 256 * KiB)
    x = np.random.default_rng(1).random(256 * KiB + 1, dtype=np.float32)  # 1 MiB + 4 bytes
    n = x.nbytes
    calls = []
    with kernel.connect() as osh:
        def progress(done: int, total: int, phase: str) -> None:
            try:  # the tensor is visible once the commit has returned, not before
                osh.stat("/chunked")
                visible = True
            except SyscallError as e:
                assert e.errno == Errno.ENOENT
                visible = False
            calls.append((done, total, phase, visible))

        r = osh.save_tensor("/chunked", x, progress=progress)
        assert r["size"] == n
        writes = [c for c in calls if c[2] == "write"]
        assert [c[0] for c in writes] == [256 * KiB, 512 * KiB, 768 * KiB, MiB, n]
        assert all(total == n for _, total, _, _ in calls)
        dones = [c[0] for c in calls]
        assert dones == sorted(dones) and dones[-1] == n
        assert calls[len(writes):] == [(n, n, "commit", False), (n, n, "done", True)]
        assert not any(c[3] for c in writes)

        loads = []
        y = osh.load_tensor("/chunked", progress=lambda *a: loads.append(a))
        assert loads == [(n, n, "done")]
        assert np.asarray(y).tobytes() == x.tobytes()
        osh.unlink("/chunked")


def test_a_small_tensor_reports_one_write_then_the_commit_then_done(kernel):
    x = np.arange(100, dtype=np.int16)  # below the threshold: one write_tensor
    calls: list[tuple] = []
    with kernel.connect() as osh:
        osh.save_tensor("/small", x, progress=lambda *a: calls.append(a))
        assert calls == [(200, 200, "write"), (200, 200, "commit"), (200, 200, "done")]
        assert np.asarray(osh.load_tensor("/small")).tobytes() == x.tobytes()
        osh.unlink("/small")


def test_a_progress_callback_that_raises_discards_the_write(kernel, monkeypatch):
    monkeypatch.setattr(_tensors, "PROGRESS_CHUNK", 64 * KiB)

    class Stop(Exception):
        pass

    def progress(done: int, total: int, phase: str) -> None:
        if done > 64 * KiB:
            raise Stop

    with kernel.connect() as osh:
        with pytest.raises(Stop):
            osh.save_tensor("/stopped", np.ones(MiB, np.uint8), progress=progress)
        with pytest.raises(SyscallError) as e:
            osh.stat("/stopped")
        assert e.value.errno == Errno.ENOENT
        osh.save_tensor("/stopped", np.full(MiB, 3, np.uint8))  # the descriptor is gone
        assert (np.asarray(osh.load_tensor("/stopped")) == 3).all()
        osh.unlink("/stopped")


# -- llmos put / get ----------------------------------------------------------------

def test_put_and_get_with_progress_show_the_bar_and_round_trip(kernel, tmp_path):
    raw = os.urandom(3 * MiB + 5)
    (tmp_path / "in.bin").write_bytes(raw)
    np.save(tmp_path / "in.npy", np.random.default_rng(2).random((384, 1024), np.float32))

    r = llmos(kernel, "put", "--progress", str(tmp_path / "in.bin"), "/p-raw")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    summary, *bar = r.stderr.splitlines()
    assert summary.startswith("/p-raw: 3MiB in ") and "MiB/s), crc32:" in summary
    assert bar and "/p-raw" in bar[0] and bar_total(len(raw)) in bar[0], r.stderr

    r = llmos(kernel, "get", "--progress", "/p-raw", str(tmp_path / "out.bin"))
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    assert bar_total(len(raw)) in r.stderr and "out.bin: uint8[3145733], 3MiB" in r.stderr
    assert (tmp_path / "out.bin").read_bytes() == raw

    r = llmos(kernel, "put", "--progress", str(tmp_path / "in.npy"), "/p-npy")
    assert r.returncode == 0 and bar_total(384 * 1024 * 4) in r.stderr, r.stderr
    r = llmos(kernel, "get", "--progress", "/p-npy", str(tmp_path / "out.npy"))
    assert r.returncode == 0 and bar_total(384 * 1024 * 4) in r.stderr, r.stderr
    # the header as np.save writes it, then the data
    assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "in.npy").read_bytes()

    # without --progress and no terminal: the summary alone
    r = llmos(kernel, "put", str(tmp_path / "in.bin"), "/p-raw")
    assert r.returncode == 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "MiB/s)" in r.stderr and bar_total(len(raw)) not in r.stderr


def test_quiet_prints_nothing_even_with_progress(kernel, tmp_path):
    data = os.urandom(2 * MiB)
    (tmp_path / "q.bin").write_bytes(data)
    for argv in (["put", "-q", str(tmp_path / "q.bin"), "/q"],
                 ["put", "-q", "--progress", str(tmp_path / "q.bin"), "/q"],
                 ["get", "-q", "--progress", "/q", str(tmp_path / "q.out")]):
        r = llmos(kernel, *argv)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), argv
    assert (tmp_path / "q.out").read_bytes() == data


def test_shell_put_and_get_use_the_same_bar(kernel, tmp_path):
    np.save(tmp_path / "a.npy", np.arange(MiB // 4, dtype=np.int32))
    torch.save({"w": torch.ones(MiB // 4), "b": torch.zeros(MiB // 8)}, tmp_path / "two.pt")
    commands = (f"put --progress {tmp_path}/a.npy /sh-a; get --progress /sh-a {tmp_path}/b.npy; "
                f"put --progress {tmp_path}/two.pt /sh-pt; put -q --progress {tmp_path}/a.npy "
                f"/sh-q; get -q --progress /sh-q {tmp_path}/q.npy")
    r = subprocess.run([sys.executable, "-m", "userland.cli", "shell", "-c", commands],
                       cwd=ROOT, env=env_for(kernel), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # the summaries go to stderr, as from the command
    assert f"{tmp_path}/b.npy: int32[{MiB // 4}], 1MiB\n" in r.stderr  # get's, not -q's
    assert r.stderr.count(bar_total(MiB)) == 2, r.stderr  # put's bar and get's
    assert bar_total(MiB + MiB // 2) in r.stderr  # the .pt's two tensors: one bar
    assert "/sh-pt/w: 1MiB" in r.stderr and "/sh-pt/b: 512KiB" in r.stderr
    assert "/sh-q" not in r.stderr and "q.npy" not in r.stderr
    for out in ("b.npy", "q.npy"):
        assert (tmp_path / out).read_bytes() == (tmp_path / "a.npy").read_bytes()


def test_a_terminal_gets_the_bar_from_64_mib(kernel, tmp_path):
    """No --progress: a terminal shows the bar for BAR_BYTES and more, not below."""
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    with open(big, "wb") as f:
        f.truncate(_files.BAR_BYTES)  # sparse: no disk to write
    small.write_bytes(b"x" * MiB)
    env = env_for(kernel, TERM="xterm", NO_COLOR="1")
    outs = {}
    for file in (big, small):
        child = pexpect.spawn(sys.executable, ["-m", "userland.cli", "put", str(file),
                                               f"/tty-{file.stem}"],
                              cwd=str(ROOT), env=env, dimensions=(40, 120),
                              encoding="utf-8", codec_errors="replace", timeout=60)
        outs[file.stem] = child.read()
        child.close()
        assert child.exitstatus == 0, outs[file.stem]
    assert bar_total(_files.BAR_BYTES) in outs["big"]
    assert "/tty-big: 64MiB in " in outs["big"]
    assert "/tty-small: 1MiB in " in outs["small"] and "1.0/1.0 MiB" not in outs["small"]
    with kernel.connect() as osh:
        assert osh.stat("/tty-big")["size"] == _files.BAR_BYTES
