"""tensorfs at scale and under faults: the scan of the store runs after the driver
is ready (calls that need usage wait for it, in order; its counts stay exact while
the tree changes beside it), each driver instance removes only what it made, a
full disk is ENOSPC and leaves nothing behind, and fsck finds damaged files and
moves them aside.

The scan's and the waiting calls' tests drive the driver's parts in this process
(a stand-in for the driver loop), so that what runs before the scan is done is
chosen, not raced; the others boot a real kernel."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, Booted, wait_until
from drivers import DEFERRED, Request
from drivers.tensorfs import TensorFS, TensorMeta, shm_prefix, write_data_and_crc
from drivers.tensorfs._commit import Store
from drivers.tensorfs._paths import DirMeta, Namespace
from drivers.tensorfs._scan import Scan
from drivers.tensorfs._staging import SHM_GRACE_S
from syscalls import Errno, Home, SyscallError, decode, wire

QUOTA_UID = 1002
DIR = DirMeta(0, 0o1777, 0.0)


def errno_of(fn: Callable[..., Any], *a: Any, **kw: Any) -> Errno:
    with pytest.raises(SyscallError) as e:
        fn(*a, **kw)
    return e.value.errno


def write_tiny_tensors(tdir: Path, n: int, owner: int, per_dir: int = 1000) -> None:
    """n int8[100] tensors of owner, /d<i>/t<j>, written as files in the store's
    format (as a crash-free driver would have left them), without fsync."""
    data = memoryview(np.arange(100, dtype=np.int8).tobytes())
    now = time.time()
    for i in range(n):
        d = tdir / f"d{i // per_dir}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"t{i % per_dir}.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
        write_data_and_crc(fd, TensorMeta("int8", [100], owner, 0o644, now, now, 0), data)
        os.close(fd)


@contextlib.contextmanager
def booted_on(root: Path, config: dict[str, Any]) -> Iterator[Booted]:
    """A kernel on the home root, prepared beforehand (Booted makes its own)."""
    b = Booted(config, root)
    try:
        yield b
    finally:
        b.stop()


def tensor_info(b: Booted) -> dict[str, Any]:
    with b.connect(uid=0, heartbeat=False) as osh:
        return next(d for d in osh.sysinfo()["drivers"] if d["name"] == "tensorfs")["info"]


# -- the scan, in this process ---------------------------------------------------------

class StandInLoop:
    """What TensorFS needs of the driver loop: posted callbacks and replies are
    kept for the test to run and read; background work runs at once."""
    service = "tensorfs"

    def __init__(self, root: Path) -> None:
        self.home = Home.resolve(root)
        self.config = self.home.config()
        self.posted: list[Callable[[], None]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.rids = iter(range(1, 1 << 30))

    def post(self, fn: Callable[[], None]) -> None:
        self.posted.append(fn)

    def call_later(self, seconds: float, fn: Callable[[], None]) -> None:
        pass

    def background(self, work: Callable[[], Any], done: Callable[[Any], None],
                   req: Request) -> object:
        done(work())
        return DEFERRED

    def send_frames(self, frames: list) -> None:
        head = decode(frames)
        self.replies[head[wire.ID]] = head

    def call(self, tfs: TensorFS, name: str, pid: int, uid: int, **args: Any) -> int:
        """Serve one call as the loop does; returns its request id."""
        req = Request(self, next(self.rids), name, pid, uid, args)  # type: ignore[arg-type]
        result = getattr(tfs, name)(req, **args)
        if result is not DEFERRED and not req.done:
            req.reply(result)
        return req.id


def home_with(tmp_path: Path, config: str) -> Path:
    root = tmp_path / "home"
    root.mkdir()
    (root / "config.toml").write_text(config)
    return root


def count_all(root: Path) -> dict[int, int]:
    scan = Scan(root, ".llmos-tmp-none-")
    scan.walk()
    return scan.counted


def test_the_scan_counts_exactly_while_the_tree_changes(tmp_path):
    """Commits, replacements, removals, tensor renames and mkdirs land at random
    between the scan's steps, on both sides of its place: its counts plus the
    changes accounted are what a scan of the final tree counts."""
    for seed in range(20):
        rng = random.Random(seed)
        ns = Namespace(tmp_path / f"tensors{seed}")
        store = Store(ns, 1 << 30, {}, "t0")
        store.prepare()
        dirs = ["/d0", "/d1", "/d1/e", "/d2"]
        for d in dirs[:3]:
            store.make_dir(ns.dir_path(ns.split(d)[:-1]), d.rsplit("/", 1)[1], DIR)
        paths = [f"{d}/t{j}" for d in ["", *dirs] for j in range(5)]

        def change() -> None:
            path = rng.choice(paths)
            parts = ns.split(path)
            p = ns.tensor_path(parts)
            if not ns.dir_path(parts[:-1]).is_dir():
                if path.startswith("/d2/"):
                    store.make_dir(ns.root, "d2", DIR)
                return
            if p.exists() and rng.random() < 0.3:
                store.remove_tensor(p, ns.tensor_meta(p, path))
            elif p.exists() and rng.random() < 0.5:
                dst = rng.choice(paths)
                dparts = ns.split(dst)
                if ns.dir_path(dparts[:-1]).is_dir() and not ns.taken(dparts):
                    store.move(p, ns.tensor_path(dparts), ns.tensor_meta(p, path))
            else:
                n = rng.choice([1, 10, 1000])
                store.commit(path, TensorMeta("int8", [n], rng.choice([1000, 1001]),
                                              0o644, 0.0, 0.0, 0), bytearray(n), False)

        for _ in range(40):
            change()
        scan = store.scan
        with scan.lock:
            scan.enter(ns.root)
        while scan.frames:
            scan.step(scan.frames[-1])
            for _ in range(rng.randint(0, 3)):
                change()
        scan.finish()
        store.scan_walked()
        for _ in range(10):
            change()
        assert {k: v for k, v in store.usage.items() if v} == count_all(ns.root), seed
        store.close()


def test_calls_that_need_usage_wait_for_the_scan_in_order(tmp_path, monkeypatch):
    """Before the scan is done every call is answered but an open for writing by
    an owner with a quota and a directory's rename: those wait, and are answered
    in the order they came once the scan has counted usage (a write over the
    quota of what the scan found is EDQUOT then); a waiting call of a process
    that ends goes with it."""
    root = home_with(tmp_path, f'tensor_quota = {{"{QUOTA_UID}" = "1KiB"}}\n')
    write_tiny_tensors(root / "tensors", 9, QUOTA_UID)   # 900 bytes of its 1 KiB
    walked: list[Callable[[], None]] = []
    monkeypatch.setattr(Scan, "start", lambda self, done: walked.append(done))
    loop = StandInLoop(root)
    tfs = TensorFS(loop)  # type: ignore[arg-type]
    try:
        r = loop.replies
        stat = loop.call(tfs, "stat", 5, 1000, path="/d0/t3")
        assert r[stat][wire.RESULT]["size"] == 100                     # at once
        big = loop.call(tfs, "open_tensor", 5, QUOTA_UID, path="/q", mode="w",
                        dtype="int8", shape=[200], perm=0o644, shm=False)
        free = loop.call(tfs, "open_tensor", 5, 1000, path="/f", mode="w",
                         dtype="int8", shape=[200], perm=0o644, shm=False)
        assert free in r and big not in r                              # 1000: no quota
        loop.call(tfs, "mkdir", 5, 0, path="/a", perm=0o755)
        moved = loop.call(tfs, "rename", 5, 0, src="/a", dst="/b")
        small = loop.call(tfs, "open_tensor", 5, QUOTA_UID, path="/q", mode="w",
                          dtype="int8", shape=[100], perm=0o644, shm=False)
        gone = loop.call(tfs, "open_tensor", 9, QUOTA_UID, path="/g", mode="w",
                         dtype="int8", shape=[1], perm=0o644, shm=False)
        assert not {big, moved, small, gone} & set(r)
        tfs.on_exit(9)
        assert r.pop(gone)[wire.ERRNO] == Errno.ECANCELED
        assert tfs.status()["scan"]["waiting"] == 3 and not tfs.status()["scan"]["done"]
        tfs.store.scan.walk()           # what the scan's thread does, then hands over
        tfs.store.scan.finish()
        walked[0]()
        assert not r.keys() & {big, moved, small}
        for fn in loop.posted:
            fn()
        assert list(r)[-3:] == [big, moved, small]                     # in order
        assert r[big][wire.ERRNO] == Errno.EDQUOT                      # 900 + 200 > 1024
        assert r[moved][wire.RESULT] is None and (root / "tensors" / "b").is_dir()
        assert r[small][wire.RESULT]["size"] == 100                    # 900 + 100 fits
        assert tfs.status()["scan"] == {**tfs.store.scan.summary(), "waiting": 0}
        assert tfs.status()["scan"]["done"] and tfs.status()["scan"]["files"] == 9
    finally:
        tfs.shutdown()


def test_a_big_store_is_served_at_once(tmp_path):
    """A kernel on a home of 2,000 tensors: the driver answers as soon as it is
    ready, the scan counts them all (a write over the quota of what it found is
    EDQUOT, whenever it comes) and removes an earlier instance's leftovers."""
    root = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    try:
        serve_a_big_store(root)
    finally:  # a home the test made, not Booted: it is the test's to remove
        shutil.rmtree(root, ignore_errors=True)


def serve_a_big_store(root: Path) -> None:
    tdir = root / "tensors"
    write_tiny_tensors(tdir, 2000, QUOTA_UID)                  # 200,000 bytes
    (tdir / "d1" / ".llmos-tmp-0badc0de-1").write_bytes(b"torn")
    with booted_on(root, {"drivers": ["tensorfs"],
                          "tensor_quota": {str(QUOTA_UID): "256KiB"}}) as b:
        with b.connect(uid=QUOTA_UID) as osh:
            assert osh.stat("/d1/t999")["size"] == 100
            assert errno_of(osh.save_tensor, "/over", np.zeros(70_000, np.int8)) \
                == Errno.EDQUOT
            osh.save_tensor("/under", np.zeros(50_000, np.int8))
        assert wait_until(lambda: tensor_info(b)["scan"]["done"], 10)
        scan = tensor_info(b)["scan"]
        assert scan["files"] >= 2000 and scan["leftovers"] == 1 and scan["waiting"] == 0
        assert not list(tdir.rglob(".llmos-tmp-*"))


# -- each instance removes only what it made ----------------------------------------------

def test_an_instance_removes_only_its_own_segments(tmp_path, monkeypatch):
    """At start an instance removes the segments earlier ones left, but those made
    in the last SHM_GRACE_S (a dead instance's last reply may name one its client
    is about to map): its sweep takes them once older. At shutdown it removes
    only its own, even while a newer instance has segments of the same home (the
    old driver of a kernel that died, shutting down after the new boot)."""
    root = home_with(tmp_path, 'tensor_shm_threshold = "64KiB"\n')

    def segments() -> set[str]:
        return set(glob.glob(f"/dev/shm/{shm_prefix(root)}*"))

    def staging(tfs: TensorFS, loop: StandInLoop, path: str) -> str:
        rid = loop.call(tfs, "open_tensor", 7, 1000, path=path, mode="w",
                        dtype="uint8", shape=[1 << 17], perm=0o644, shm=True)
        return loop.replies[rid][wire.RESULT]["shm"]

    monkeypatch.setenv("LLMOS_DRIVER_ID", "tensorfs.1.aaaa")
    old_loop = StandInLoop(root)
    old = TensorFS(old_loop)  # type: ignore[arg-type]
    left, recent = staging(old, old_loop, "/a"), staging(old, old_loop, "/a2")
    long_ago = time.time() - SHM_GRACE_S - 1
    os.utime(left, (long_ago, long_ago))
    monkeypatch.setenv("LLMOS_DRIVER_ID", "tensorfs.2.bbbb")
    new_loop = StandInLoop(root)
    new = TensorFS(new_loop)  # type: ignore[arg-type]
    try:
        assert left not in segments() and recent in segments()  # swept; spared
        new.status()
        assert recent in segments()                    # still in its grace
        os.utime(recent, (long_ago, long_ago))
        new.status()                                   # the heartbeat's sweep
        assert recent not in segments()
        mine = staging(new, new_loop, "/b")
        theirs = staging(old, old_loop, "/c")
        assert {mine, theirs} <= segments()
        old.shutdown()
        assert segments() == {mine}
    finally:
        new.shutdown()
    assert not segments()


# -- a full disk ------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs_home(size: str, config: dict[str, Any]) -> Iterator[Booted]:
    """A kernel whose home is a tmpfs of size (mounted here: tests run as root;
    skipped, saying why, where mounting is refused), unmounted after."""
    mnt = Path(tempfile.mkdtemp(prefix="llmos-fs-", dir="/tmp"))  # short: ipc paths
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
    try:
        with booted_on(mnt, config) as b:
            yield b
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        mnt.rmdir()


def free_bytes(b: Booted) -> int:
    st = os.statvfs(b.root)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_is_enospc_and_leaves_nothing(tmp_path):
    """On an 8 MiB file system: a tensor bigger than what is left is ENOSPC, no
    temporary file stays, the tensors there read back bit-exact, and a smaller
    write after it succeeds; a chmod (which rewrites the tensor) with no room
    for the copy is ENOSPC and changes nothing."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, 1 << 20, dtype=np.uint8)
    b_ = rng.standard_normal(1 << 19).astype(np.float32)          # 2 MiB
    with tmpfs_home("8m", {"drivers": ["tensorfs"]}) as k, k.connect(uid=0) as osh:
        tdir = k.root / "tensors"
        osh.save_tensor("/a", a)
        osh.save_tensor("/b", b_)
        big = np.ones(free_bytes(k) + (1 << 20), np.uint8)
        e = pytest.raises(SyscallError, osh.save_tensor, "/c", big).value
        assert e.errno == Errno.ENOSPC and "full" in e.message, e
        assert not list(tdir.rglob(".llmos-tmp-*"))
        assert errno_of(osh.stat, "/c") == Errno.ENOENT
        assert sorted(x["name"] for x in osh.listdir("/")) == ["a", "b"]
        np.testing.assert_array_equal(np.asarray(osh.load_tensor("/a")), a)
        np.testing.assert_array_equal(load_file(tdir / "b.safetensors")["tensor"], b_)
        osh.save_tensor("/d", np.full(1 << 20, 3, np.uint8))
        osh.save_tensor("/fill", np.zeros(free_bytes(k) - (1 << 20), np.uint8))
        assert errno_of(osh.chmod, "/b", 0o600) == Errno.ENOSPC    # no room for the copy
        assert osh.stat("/b")["mode"] == 0o644
        assert not list(tdir.rglob(".llmos-tmp-*"))
        np.testing.assert_array_equal(load_file(tdir / "b.safetensors")["tensor"], b_)
        osh.unlink("/fill")
        osh.chmod("/b", 0o600)
        assert int(np.asarray(osh.load_tensor("/d"))[0]) == 3


# -- fsck --------------------------------------------------------------------------------------

def damage(p: Path, at: int) -> None:
    """Flip the byte at offset at (from the end when negative), in a new inode."""
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0xFF
    tmp = p.with_name("damaged.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, p)


@pytest.fixture
def booted_tensorfs() -> Iterator[Booted]:
    with Booted({"drivers": ["tensorfs"]}) as b:
        yield b


def test_fsck_finds_damage_and_repair_moves_it_aside(booted_tensorfs, capsys):
    """A flipped byte in one tensor's data and another's header: fsck (uid 0's
    only) finds both, naming them; --repair moves them into /lost+found, after
    which their directories list cleanly and fsck is clean."""
    from userland.cli import main
    b = booted_tensorfs
    tdir = b.root / "tensors"
    with b.connect(uid=1000) as osh:
        osh.mkdir("/f")
        osh.mkdir("/f/sub")
        osh.save_tensor("/f/a", np.arange(1000, dtype=np.float32))
        osh.save_tensors("/f/g", {"x": np.ones(3, np.int8), "y": np.zeros(2, np.int64)})
        osh.save_tensor("/f/sub/b", np.ones(10, np.int16))
        osh.save_tensor("/ok", np.ones(1, np.bool_))
        damage(tdir / "f" / "a.safetensors", -3)                  # its data
        damage(tdir / "f" / "sub" / "b.safetensors", 20)          # its header
        assert errno_of(osh.fsck) == Errno.EPERM
    with b.connect(uid=0) as root:
        r = root.fsck()
        assert r["checked"] == 4 and r["moved"] == []
        why = {d["path"]: d["why"] for d in r["damaged"]}
        assert set(why) == {"/f/a", "/f/sub/b"}, why
        assert why["/f/a"].startswith("data") and why["/f/sub/b"].startswith("header")
        assert root.fsck("/f/sub")["checked"] == 1
        assert root.fsck("/f/a")["damaged"][0]["path"] == "/f/a"

        def llmos(*argv: str) -> tuple[int, str]:
            capsys.readouterr()
            rc = main(["--home", str(b.root), "--uid", "0", *argv])
            return rc, capsys.readouterr().out

        rc, out = llmos("fsck")
        assert rc == 1 and "/f/a: data" in out and "4 checked, 2 damaged, 0 moved" in out
        rc, out = llmos("fsck", "--repair")
        assert rc == 0 and "(moved to /lost+found/f%2Fsub%2Fb)" in out, out
        assert [e["name"] for e in root.listdir("/f")] == ["g", "sub"]
        assert root.listdir("/f/sub") == []
        assert sorted(e["name"] for e in root.listdir("/lost+found")) == [
            "f%2Fa", "f%2Fsub%2Fb"]
        assert root.stat("/lost+found")["mode"] == 0o700
        rc, out = llmos("fsck", "--json")
        assert rc == 0 and '"damaged": []' in out and '"checked": 2' in out
        assert root.fsck("/lost+found")["checked"] == 2     # asked for: checked, not moved
        for e in root.listdir("/lost+found"):
            root.unlink(e["path"])
        root.unlink("/lost+found")


def test_the_boot_bench_runs(capsys):
    """bench/tensorfs_boot.py end to end, tiny: both boots, every figure."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import tensorfs_boot
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert tensorfs_boot.main(["--files", "50", "--runs", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["big"]["files_scanned"] == 50 and out["empty"]["files_scanned"] == 0
    assert out["big"]["ready_s"]["best"] > 0 and "pass" in out["ratio_ready_big_over_empty"]
