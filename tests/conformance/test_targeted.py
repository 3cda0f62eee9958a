"""The errnos the state machines do not reach, one small test each (attach's,
spawn's from the OS, parked waits past the limit, damaged tensors, commits against
a changed namespace, quotas, cancels, replies too big), and the errors every call
can get (docs/syscalls.md, "Errors every call can get") for every syscall: EPROTO,
ENOTCONN (unattached), EINVAL (schema), EAGAIN (driver calls in flight), and E2BIG,
ENOSYS and EIO where they can happen.

Most run on the shared kernel; the ones that need a full process table, a tiny
model cache or a missing driver run on a second, "tight" kernel."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import userland
from conftest import Booted, wait_until
from syscalls import ABI_VERSION, BY_NAME, TABLE, Errno, Syscall
from syscalls._table import MAX_ECHO

from ._util import (MAX_INFLIGHT, WAIT_S, answer, answers, call_number, errno_of, expect,
                    outcome, send, unattached)


def minimal_args(call: Syscall) -> dict[str, Any]:
    """Arguments that pass call's schema (whatever the call then makes of them)."""
    simple = {"int": 0, "float": 0.0, "str": "/conformance-none", "bytes": b"", "bool": False,
              "list[str]": ["x"], "dict[str,str]": {}, "size": 1, "list[int]": [1],
              "slice": [], "dict": {}}
    out: dict[str, Any] = {}
    for a in call.args:
        if not a.required:
            continue
        v = a.choices[0] if a.choices else simple[a.type]
        if a.lo is not None and not isinstance(v, (str, bytes, list, dict)):
            v = max(v, type(v)(a.lo))
        out[a.name] = v
    return out


def _secret(b: Booted) -> str:
    return b.home.secretfile.read_text().strip()


# -- the errors every call can get ---------------------------------------------------------

def test_every_call_checks_the_abi_version_first(system: Booted, monkeypatch) -> None:
    with system.connect() as osh:
        monkeypatch.setattr("syscalls._wire.ABI_VERSION", ABI_VERSION + 1)
        for call in TABLE:
            expect(Errno.EPROTO, call_number, osh, call.number, **minimal_args(call))
        monkeypatch.undo()
        assert osh.getpid() == osh.pid


def test_every_call_but_attach_needs_an_attached_connection(system: Booted) -> None:
    h = unattached(system.root)
    try:
        for call in TABLE:
            if call.name != "attach":
                expect(Errno.ENOTCONN, call_number, h, call.number, **minimal_args(call))
    finally:
        h._close()


def test_a_process_that_exited_is_no_longer_attached(system: Booted) -> None:
    osh = system.connect()
    try:
        assert osh._call(BY_NAME["exit"].number, {"status": 0}) is None
        expect(Errno.ENOTCONN, osh.getpid)
        expect(Errno.ENOTCONN, osh.echo, b"x")
    finally:
        osh._close()


def test_every_call_checks_its_arguments(system: Booted) -> None:
    with system.connect() as osh:
        for call in TABLE:
            expect(Errno.EINVAL, call_number, osh, call.number, no_such_argument=1)
            if call.args and any(a.required for a in call.args):
                expect(Errno.EINVAL, call_number, osh, call.number)   # a missing one


def test_unknown_syscall_numbers_are_enosys(system: Booted) -> None:
    with system.connect() as osh:
        for number in (13, 99, 103, 299, 9999, -1, 2**40):
            expect(Errno.ENOSYS, call_number, osh, number)


def test_bytes_over_their_bound_are_e2big(system: Booted) -> None:
    with system.connect() as osh:
        expect(Errno.E2BIG, osh.echo, bytes(MAX_ECHO + 1))
        assert len(osh.echo(bytes(MAX_ECHO))) == MAX_ECHO


def test_driver_calls_past_max_inflight_are_eagain(system: Booted) -> None:
    """With max_inflight_per_process driver calls in flight, every driver syscall is
    EAGAIN at once, and kernel syscalls are still served."""
    drivers = [c for c in TABLE if c.service != "kernel"]
    osh = system.connect()
    try:
        for _ in range(MAX_INFLIGHT):
            send(osh, "sleep", seconds=60.0)
        for call in drivers:
            expect(Errno.EAGAIN, call_number, osh, call.number, **minimal_args(call))
        assert osh.getppid() == 1
    finally:
        osh.close()      # its sleeps' answers are dropped with it


def test_abandoned_streams_count_until_their_driver_ends_them(system: Booted) -> None:
    """The echo driver has no cancel hook: a ticks stream the caller closed runs to
    its end, and holds its place in max_inflight_per_process until then."""
    with system.connect() as osh:
        for _ in range(MAX_INFLIGHT):
            it = osh.ticks(10000, 0.01)
            next(it)
            it.close()
        expect(Errno.EAGAIN, osh.echo, b"x")
    # (closing the handle ended the process; the driver's replies are dropped)


def _restart(root: userland.Llmos, name: str) -> None:
    """SIGKILL driver name and wait for its next instance: it starts with nothing in
    flight (what earlier tests left running there is answered EIO, to no one)."""
    before = _driver(root, name)["restarts"]
    os.kill(_driver(root, name)["os_pid"], signal.SIGKILL)
    assert wait_until(lambda: _driver(root, name)["restarts"] == before + 1
                      and _driver(root, name)["state"] == "ready", WAIT_S)


def _driver(root: userland.Llmos, name: str) -> dict:
    return next(d for d in root.sysinfo()["drivers"] if d["name"] == name)


def test_a_driver_that_dies_mid_call_is_eio(system: Booted, root: userland.Llmos) -> None:
    _restart(root, "echo")
    with system.connect() as osh:
        seq = send(osh, "sleep", seconds=30.0)
        assert wait_until(lambda: _driver(root, "echo")["inflight"] == 1, WAIT_S)
        os.kill(_driver(root, "echo")["os_pid"], signal.SIGKILL)
        assert answer(osh, seq) == ("e", "EIO")          # sleep is not idempotent
        assert osh.echo(b"again") == b"again"             # idempotent: waits, then served
    assert wait_until(lambda: _driver(root, "echo")["state"] == "ready", WAIT_S)


def test_a_cancelled_generation_is_ecanceled(system: Booted, tiny_model: str) -> None:
    """A caller that cancels a generation and still waits gets ECANCELED (the library
    itself stops waiting when it cancels)."""
    with system.connect() as osh:
        seq = send(osh, "infer", model=tiny_model, prompt="abc", max_tokens=3000, stream=True)
        first = osh._recv(seq)
        assert first.get("p"), first                 # it is generating: cancel it
        osh._cancel(seq)
        head = first
        while head.get("p"):
            head = osh._recv(seq)                    # the rest, then the final answer
        assert head.get("e") == Errno.ECANCELED, head
        assert osh.infer(tiny_model, "x", 2)["tokens"] == 2


def test_a_spawn_train_cancelled_before_its_answer_starts_nothing(system: Booted) -> None:
    """The caller gives up (cancels) while the executor checks the job and still waits:
    ECANCELED, and no job. (The executor checks through the kernel, several round
    trips after the cancel is queued, so the cancel is there first.)"""
    from test_executor import as_bytes
    with system.connect() as osh:
        osh.save_tensor(f"/cancel{osh.pid}", as_bytes(b"z" * 4096))
        job = {"name": f"cancel{osh.pid}", "dataset": f"/cancel{osh.pid}", "steps": 1,
               "workers": 1, "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8,
               "batch_size": 1}
        seq = send(osh, "spawn_train", config=job, alloc_id=None)
        osh._cancel(seq)
        got = answer(osh, seq)
        if got[0] == "r":
            osh.kill(got[1], "KILL")
            osh.wait(got[1], timeout=WAIT_S)
        assert got == ("e", "ECANCELED"), got
        assert not [p for p in osh.ps() if p["ppid"] == osh.pid]
        osh.unlink(f"/cancel{osh.pid}")
        errno_of(osh.unlink, f"/models/cancel{osh.pid}")   # its out directory, if made


def test_a_reply_too_big_for_the_wire(system: Booted) -> None:
    """A reply over 1 MiB of header is E2BIG, the kernel's own (a ps of processes that
    attached with huge argv) and a driver's alike (a listdir of thousands of entries,
    made on disk directly: thousands of mkdir calls take too long)."""
    big = ["a" * 60_000] * 15                          # 900 kB of argv, under 1 MiB
    secret = _secret(system)
    hs = [unattached(system.root) for _ in range(2)]
    try:
        for h in hs:
            call_number(h, BY_NAME["attach"].number, os_pid=os.getpid(), secret=secret,
                        argv=big)
        with system.connect() as osh:
            expect(Errno.E2BIG, osh.ps)
            for h in hs:
                h._call(BY_NAME["exit"].number, {"status": 0})
            assert len(osh.ps()) > 1                     # small again
            d = f"/huge{osh.pid}"
            osh.mkdir(d)
            on_disk = system.root / "tensors" / d.lstrip("/")
            for i in range(3000):
                (on_disk / f"{i:04d}{'n' * 180}").mkdir()
            expect(Errno.E2BIG, osh.listdir, d)
            for child in on_disk.iterdir():
                if child.is_dir():
                    child.rmdir()
            osh.unlink(d)
    finally:
        for h in hs:
            h._close()


# -- attach ----------------------------------------------------------------------------

def test_attach_errors(system: Booted, root: userland.Llmos) -> None:
    secret, me = _secret(system), os.getpid()
    h = unattached(system.root)
    try:
        attach = BY_NAME["attach"].number
        expect(Errno.EACCES, call_number, h, attach, os_pid=me)                 # no credential
        expect(Errno.EACCES, call_number, h, attach, os_pid=me, secret="0" * 64)
        expect(Errno.EACCES, call_number, h, attach, os_pid=me, token="no-such-token")
        expect(Errno.EINVAL, call_number, h, attach, os_pid=2**31 - 1, secret=secret)
        expect(Errno.EINVAL, call_number, h, attach, os_pid=_driver(root, "echo")["os_pid"],
               secret=secret)                                                  # no heartbeat
        expect(Errno.EPERM, call_number, h, attach, os_pid=system.pid, secret=secret)
        expect(Errno.EPERM, call_number, h, attach, os_pid=1, secret=secret)
    finally:
        h._close()
    with system.connect() as osh:
        expect(Errno.EBUSY, call_number, osh, attach, os_pid=me, secret=secret)


# -- processes ---------------------------------------------------------------------------

def test_spawn_errors_from_the_os(system: Booted, tmp_path: Path) -> None:
    with system.connect() as osh:
        expect(Errno.EINVAL, osh.spawn, ["sleep", "1"], env={"A=B": "x"})
        expect(Errno.ENOENT, osh.spawn, ["sleep", "1"], cwd="/nonexistent-dir")
        (tmp_path / "file").write_text("")
        expect(Errno.ENOENT, osh.spawn, ["sleep", "1"], cwd=str(tmp_path / "file"))
        expect(Errno.ENAMETOOLONG, osh.spawn, ["/" + "a" * 300])
        prog = tmp_path / "garbage"
        prog.write_bytes(b"\x00\x01 not a program")
        prog.chmod(0o644)
        expect(Errno.EACCES, osh.spawn, [str(prog)])
        prog.chmod(0o755)
        expect(Errno.EIO, osh.spawn, [str(prog)])               # ENOEXEC
        assert not [p for p in osh.ps() if p["ppid"] == osh.pid]


def test_parked_waits_past_max_inflight_are_eagain(system: Booted) -> None:
    with system.connect() as osh:
        child = osh.spawn(["sleep", "600"])
        waits = [send(osh, "wait", pid=child) for _ in range(MAX_INFLIGHT)]
        expect(Errno.EAGAIN, osh.wait, child, timeout=5.0)
        kill = send(osh, "kill", pid=child, signal="KILL")
        got = answers(osh, [*waits, kill])
        assert got[kill] == ("r", None)
        done = [g for s, g in got.items() if s in waits]
        # one wait reaps it; the others have no child left to wait for: ECHILD
        assert sorted(g[0] for g in done) == ["e"] * (MAX_INFLIGHT - 1) + ["r"], done
        assert {g[1] for g in done if g[0] == "e"} == {"ECHILD"}


# -- tensorfs ------------------------------------------------------------------------------

@pytest.fixture
def tdir(system: Booted) -> Iterator[tuple[userland.Llmos, str]]:
    with system.connect(uid=1000) as osh:
        d = f"/targeted{osh.pid}"
        osh.mkdir(d)
        yield osh, d
    with system.connect(uid=0) as root:
        _rmtree(root, d)


def _rmtree(osh: userland.Llmos, path: str) -> None:
    """Remove path and all below it (a tensor and a directory of one name too)."""
    got = outcome(osh.listdir, path)
    for e in got[1] if got[0] == "r" else []:
        _rmtree(osh, e["path"])
    while errno_of(osh.unlink, path) is None:
        pass


def _on_disk(system: Booted, path: str) -> Path:
    return system.root / "tensors" / (path.lstrip("/") + ".safetensors")


def test_damaged_tensors_are_eio(system: Booted, tdir) -> None:
    osh, d = tdir
    for name in ("head", "data"):
        osh.save_tensor(f"{d}/{name}", np.arange(100, dtype=np.int32))
    reader = osh.open_tensor(f"{d}/data", "r")["fd"]          # opened while sound
    with open(_on_disk(system, f"{d}/head"), "r+b") as f:
        f.write(b"\xff" * 8)                                   # the header's length
    with open(_on_disk(system, f"{d}/data"), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")                           # a data byte: the checksum
    expect(Errno.EIO, osh.open_tensor, f"{d}/head", "r")
    expect(Errno.EIO, osh.stat, f"{d}/head")
    expect(Errno.EIO, osh.chmod, f"{d}/head", 0o600)
    expect(Errno.EIO, osh.read_tensor, reader)
    osh.close_tensor(reader)
    expect(Errno.EIO, osh.open_tensor, f"{d}/data", "rw")
    expect(Errno.EIO, osh.chmod, f"{d}/data", 0o600)
    osh.unlink(f"{d}/head")                                    # a damaged one can go
    osh.unlink(f"{d}/data")


def test_a_commit_checks_the_namespace_as_it_is_then(tdir) -> None:
    osh, d = tdir
    a = osh.open_tensor(f"{d}/x", "x", "int8", [1])["fd"]
    b = osh.open_tensor(f"{d}/x", "x", "int8", [1])["fd"]
    assert osh.close_tensor(a)["size"] == 1
    expect(Errno.EEXIST, osh.close_tensor, b)                  # another writer won
    expect(Errno.EBADF, osh.close_tensor, b)                   # and it is closed
    osh.mkdir(f"{d}/sub")
    fd = osh.open_tensor(f"{d}/sub/y", "w", "int8", [1])["fd"]
    expect(Errno.ENOTEMPTY, osh.unlink, f"{d}/sub")             # a write in progress
    osh.rename(f"{d}/sub", f"{d}/moved")                         # takes the write along
    assert osh.close_tensor(fd)["size"] == 1
    assert osh.stat(f"{d}/moved/y")["size"] == 1
    osh.unlink(f"{d}/moved/y")
    osh.unlink(f"{d}/moved")
    osh.save_tensor(f"{d}/sub", np.zeros(1, np.int8))
    for call, args in [("stat", {}), ("listdir", {}), ("mkdir", {}), ("unlink", {}),
                       ("chmod", {"perm": 0o600}), ("open_tensor", {"mode": "r"})]:
        expect(Errno.ENOTDIR, osh.call, call, path=f"{d}/sub/y", **args)
    expect(Errno.ENOTDIR, osh.rename, f"{d}/sub/y", f"{d}/z")
    expect(Errno.ENOTDIR, osh.rename, f"{d}/x", f"{d}/sub/y")
    expect(Errno.ENOTDIR, osh.listdir, f"{d}/sub")


def test_size_and_quota(system: Booted, tdir) -> None:
    osh, d = tdir
    expect(Errno.EFBIG, osh.open_tensor, f"{d}/big", "w", "float32", [2**21 + 1])
    with system.connect(uid=1002) as q:
        qd = f"{d}/q"
        osh.chmod(d, 0o777)
        q.mkdir(qd)
        fd = q.open_tensor(f"{qd}/a", "w", "uint8", [200 << 10])["fd"]
        expect(Errno.EDQUOT, q.open_tensor, f"{qd}/b", "w", "uint8", [100 << 10])  # staged
        q.close_tensor(fd)
        expect(Errno.EDQUOT, q.open_tensor, f"{qd}/b", "w", "uint8", [100 << 10])  # owned
        fd = q.open_tensor(f"{qd}/a", "w", "uint8", [250 << 10])["fd"]            # replaced
        q.close_tensor(fd, discard=True)   # a write in progress would keep qd (ENOTEMPTY)
        q.unlink(f"{qd}/a")
        q.unlink(qd)


def test_a_tensor_and_a_directory_never_share_a_name(tdir) -> None:
    """A directory made at a path while a write to it is staged wins: the commit is
    EISDIR and discards the write (the staged tensor was invisible until then)."""
    osh, d = tdir
    fd = osh.open_tensor(f"{d}/n", "w", "int8", [1])["fd"]
    osh.mkdir(f"{d}/n")
    expect(Errno.EISDIR, osh.close_tensor, fd)
    names = [e["name"] for e in osh.listdir(d)]
    assert names.count("n") == 1 and osh.stat(f"{d}/n")["type"] == "dir"
    expect(Errno.EBADF, osh.close_tensor, fd)  # closed all the same
    osh.unlink(f"{d}/n")


def test_groups_members_and_their_errors(tdir) -> None:
    """A group: members by name for read_tensor and write_tensor (ENOENT for a name
    it lacks, EINVAL for a member of a plain tensor), members only with w or x."""
    osh, d = tdir
    ms = [["w", "float32", [2, 2]], ["b", "uint8", [3]]]
    fd = osh.open_tensor(f"{d}/g", "w", None, None, 0o644, False, False, ms)["fd"]
    expect(Errno.ENOENT, osh.write_tensor, fd, b"123", None, "nope")
    osh.write_tensor(fd, b"abc", None, "b")
    osh.close_tensor(fd)
    expect(Errno.EINVAL, osh.open_tensor, f"{d}/g", "r", None, None, 0o644, False, False, ms)
    expect(Errno.EINVAL, osh.open_tensor, f"{d}/h", "w", "uint8", [1], 0o644, False, False,
           ms)
    expect(Errno.EINVAL, osh.open_tensor, f"{d}/h", "w", None, None, 0o644, False, False,
           [["b", "uint8", [1]], ["b", "uint8", [1]]])
    fd = osh.open_tensor(f"{d}/g", "r")["fd"]
    assert osh.read_tensor(fd, None, False, "b")["data"] == b"abc"
    expect(Errno.ENOENT, osh.read_tensor, fd, None, False, "nope")
    osh.close_tensor(fd)
    osh.save_tensor(f"{d}/plain", np.zeros(2, np.uint8))
    fd = osh.open_tensor(f"{d}/plain", "rw")["fd"]
    expect(Errno.EINVAL, osh.read_tensor, fd, None, False, "b")
    expect(Errno.EINVAL, osh.write_tensor, fd, b"a", None, "b")
    osh.close_tensor(fd, True)
    for p in ("g", "plain"):
        osh.unlink(f"{d}/{p}")
    # a bool is one byte, 0 or 1: anything else is refused at the commit
    fd = osh.open_tensor(f"{d}/b", "w", "bool", [3])["fd"]
    osh.write_tensor(fd, b"\x01\x05\x00")
    expect(Errno.EINVAL, osh.close_tensor, fd)
    fd = osh.open_tensor(f"{d}/b", "w", None, None, 0o644, False, False,
                         [["f", "float32", [1]], ["m", "bool", [2]]])["fd"]
    osh.write_tensor(fd, b"\x00\xff", None, "m")
    expect(Errno.EINVAL, osh.close_tensor, fd)
    expect(Errno.ENOENT, osh.stat, f"{d}/b")  # nothing was committed


def test_a_path_too_long_for_the_disk_is_enametoolong(system: Booted, tdir) -> None:
    """Every path the schema allows (4096 characters) but whose file on disk would be
    over PATH_MAX: ENAMETOOLONG from each call that takes a path, never EIO."""
    osh, d = tdir
    root = len(str(system.root / "tensors").encode())
    p = d
    while root + len(p) + 1 + 200 + len(".safetensors") < 4096:
        p += "/" + "a" * 200
        osh.mkdir(p)
    last = p + "/" + "b" * min(200, 4096 - len(p) - 1)
    assert len(last) <= 4096 and root + len(last) + len(".safetensors") >= 4096
    for call, args in (("mkdir", (last,)), ("stat", (last,)), ("listdir", (last,)),
                       ("unlink", (last,)), ("chmod", (last, 0o600)),
                       ("open_tensor", (last, "w", "int8", [1])),
                       ("rename", (p, last)), ("rename", (last, p + "x"))):
        expect(Errno.ENAMETOOLONG, getattr(osh, call), *args)
    while p != d:
        osh.unlink(p)
        p = p.rsplit("/", 1)[0]


# -- the tight kernel: a full process table, a tiny model cache, no echo driver, 4 open
# tensors per process ---------------------------------------------------------------------

TIGHT = {"drivers": ["tensorfs", "executor"], "max_processes": 8, "model_cache": "1KiB",
         "tensor_max_open": 4}


def test_a_full_process_table_and_a_tiny_model_cache() -> None:
    from test_executor import as_bytes, write_model
    b = Booted(TIGHT)
    extra: list[userland.Llmos] = []
    try:
        with b.connect() as osh, b.connect(uid=1001) as other:
            expect(Errno.ENOSYS, osh.echo, b"x")                 # no echo driver
            write_model(osh, "/m")
            expect(Errno.ENOMEM, osh.infer, "/m", "x", 1)        # over model_cache
            osh.save_tensor("/data", as_bytes(b"z" * 4096))
            fds = [osh.open_tensor("/data", "r")["fd"] for _ in range(4)]
            expect(Errno.EMFILE, osh.open_tensor, "/data", "r")  # tensor_max_open
            with b.connect() as third:                           # per process
                third.close_tensor(third.open_tensor("/data", "r")["fd"])
            osh.close_tensor(fds.pop())
            fds.append(osh.open_tensor("/data", "r")["fd"])      # room again
            for fd in fds:
                osh.close_tensor(fd)
            while True:                                          # fill the table
                try:
                    extra.append(b.connect(uid=0, heartbeat=False))
                except userland.SyscallError as e:
                    assert e.errno == Errno.EAGAIN, e
                    break
                assert len(extra) < 16
            expect(Errno.EAGAIN, osh.spawn, ["sleep", "1"])
            # the executor needs a connection of its own for a new uid: no room
            expect(Errno.EAGAIN, other.infer, "/m", "x", 1)
            job = {"name": "t", "dataset": "/data", "steps": 1, "workers": 1, "n_layer": 1,
                   "n_head": 1, "n_embd": 8, "block_size": 8, "batch_size": 1}
            got = errno_of(osh.spawn_train, job)                 # checked, then no room
            if got is None:
                pytest.fail("spawn_train started a job in a full process table")
            assert got == Errno.EAGAIN, got
            expect(Errno.ENOENT, osh.stat, "/models/t")  # the refused job made nothing
    finally:
        for h in extra:
            h.close()
        b.stop()
