"""The tensorfs driver against a real kernel: round trips of every dtype (socket and
/dev/shm), slices, visibility at close, permissions between two uids, quotas and
sizes, bad input for every syscall, checksums, process death mid-transfer (no
segment leaks), crash leftovers, and SIGKILLs of the driver during a stream of
writes (every committed write intact, nothing torn)."""
from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import ROOT, Booted, wait_until
from syscalls import Errno, SyscallError

KiB = 1024
THRESHOLD = 64 * KiB
QUOTA_UID = 1002


CONFIG = {"drivers": ["tensorfs"], "tensor_shm_threshold": "64KiB",
          "tensor_max_size": "8MiB", "tensor_cache": "4MiB",
          "tensor_quota": {str(QUOTA_UID): "256KiB"}}


def shm_segments(b: Booted, kind: str = "") -> list[str]:
    """The home's segments (of every driver instance), of one kind ("x", "c")."""
    from drivers.tensorfs import shm_prefix
    return glob.glob(f"/dev/shm/{shm_prefix(b.root)}*-{kind}-*" if kind
                     else f"/dev/shm/{shm_prefix(b.root)}*")


@pytest.fixture(scope="module")
def kernel():
    with Booted(CONFIG) as b:
        yield b


@pytest.fixture
def fresh():
    b = Booted(CONFIG)
    try:
        yield b
    finally:
        b.stop()


def test_a_reused_staging_segment_starts_zeroed(kernel):
    """A process's staging segment is reused for its next write of the same size;
    what an earlier write left in it must not show through a partial write."""
    n = 4 * THRESHOLD // 4  # float32 elements: above the shared-memory threshold
    with kernel.connect() as osh:
        osh.save_tensor("/reuse-a", np.ones(n, dtype=np.float32))
        fd = osh.open_tensor("/reuse-b", "w", "float32", [n], 0o644, True)["fd"]
        half = np.full(n // 2, 7, dtype=np.float32)
        osh.write_tensor(fd, half.tobytes(), [[0, n // 2]])
        osh.close_tensor(fd)
        got = np.asarray(osh.load_tensor("/reuse-b"))
        assert (got[: n // 2] == 7).all() and (got[n // 2:] == 0).all()
        assert len(shm_segments(kernel, "x")) == 1  # the spare, kept for this process
        for p in ("/reuse-a", "/reuse-b"):
            osh.unlink(p)
    # the process is gone: its spare goes too
    assert wait_until(lambda: not shm_segments(kernel, "x"), 5)


def errno_of(fn, *a, **kw) -> Errno:
    with pytest.raises(SyscallError) as e:
        fn(*a, **kw)
    return e.value.errno


def restarted(b: Booted, old: int) -> bool:
    """The driver is back: ready, with a new OS pid."""
    pid = b.driver_pid("tensorfs")
    return pid is not None and pid != old and b.drivers_ready()


def tensor_info(b: Booted) -> dict:
    with b.connect(uid=0, heartbeat=False) as osh:
        return next(d for d in osh.sysinfo()["drivers"] if d["name"] == "tensorfs")


# -- round trips --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8,
                                   torch.int16, torch.int32, torch.int64, torch.uint8,
                                   torch.bool])
@pytest.mark.parametrize("n", [7, 40_000])  # under and over the shm threshold
def test_every_dtype_round_trips(kernel, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 3, generator=g) * 50).to(dtype)
    path = f"/rt-{str(dtype)[6:]}-{n}"
    with kernel.connect() as osh:
        r = osh.save_tensor(path, x)
        assert r["size"] == x.numel() * x.element_size()
        y = osh.load_tensor(path)
        assert y.dtype == dtype and torch.equal(x, y)
        y.logical_not_() if dtype == torch.bool else y.add_(1)  # a private copy: the cache
        assert not torch.equal(x, y)                              # is untouched
        assert torch.equal(osh.load_tensor(path), x)
        st = osh.stat(path)
        assert st["shape"] == [n, 3] and st["dtype"] == str(dtype)[6:] and st["owner"] == 1000
        osh.unlink(path)


def test_files_are_plain_safetensors(kernel):
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    with kernel.connect() as osh:
        osh.mkdir("/plain")
        osh.save_tensor("/plain/x", x)
        got = load_file(str(kernel.root / "tensors" / "plain" / "x.safetensors"))
        np.testing.assert_array_equal(got["tensor"], x)
        osh.unlink("/plain/x")
        osh.unlink("/plain")


def data_offset(file) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_large_writes_go_direct_and_stay_plain_safetensors(kernel):
    """A tensor of 1 MiB and more is committed with direct I/O: its header is padded
    (with spaces, as the format allows) so the data starts on a page. Both ways of
    staging it, a /dev/shm segment and write_tensor over the socket, and a size that
    is not whole pages (the tail goes through the page cache) must give a file the
    safetensors library reads, whose data round-trips, and a small one stays packed."""
    MiB = 1 << 20
    big = np.random.default_rng(1).standard_normal(MiB // 4 + 123).astype(np.float32)
    small = np.arange(10, dtype=np.int16)
    with kernel.connect() as osh:
        osh.mkdir("/direct")
        osh.save_tensor("/direct/shm", big)
        fd = osh.open_tensor("/direct/sock", "w", "float32", [big.size])["fd"]
        osh.write_tensor(fd, big.tobytes())
        osh.close_tensor(fd)
        osh.save_tensor("/direct/small", small)
        disk = kernel.root / "tensors" / "direct"
        for name in ("shm", "sock"):
            assert data_offset(disk / f"{name}.safetensors") % 4096 == 0
            np.testing.assert_array_equal(load_file(str(disk / f"{name}.safetensors"))["tensor"],
                                          big)
            np.testing.assert_array_equal(osh.load_tensor(f"/direct/{name}").numpy(), big)
            assert osh.stat(f"/direct/{name}")["checksum"] == f"crc32:{zlib.crc32(big):08x}"
        assert data_offset(disk / "small.safetensors") % 4096 != 0
        np.testing.assert_array_equal(load_file(str(disk / "small.safetensors"))["tensor"],
                                      small)
        for name in ("shm", "sock", "small"):
            osh.unlink(f"/direct/{name}")
        osh.unlink("/direct")


def test_direct_io_write_unit(tmp_path):
    """write_data_and_crc on its own: whole pages go direct, an unaligned buffer and
    a tail do not; the file reads back the same either way."""
    import mmap
    from drivers.tensorfs import write_data_and_crc
    from drivers.tensorfs._format import TensorMeta, read_meta
    for n, aligned in ((3 << 20, True), ((1 << 20) + 7, True), (2 << 20, False)):
        raw = np.random.default_rng(n).integers(0, 255, n, dtype=np.uint8)
        if aligned:
            buf = mmap.mmap(-1, n)
            buf[:] = raw.tobytes()
            data = memoryview(buf)
        else:
            data = memoryview(bytearray(b"\0" + raw.tobytes()))[1:]  # off a page
        m = TensorMeta("uint8", [n], 1000, 0o644, 1.0, 2.0, 0)
        fd = os.open(tmp_path / f"t{n}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            write_data_and_crc(fd, m, data)
            got = read_meta(fd)
            assert got.crc32 == zlib.crc32(raw) == m.crc32
            assert (got.data_offset % 4096 == 0) == aligned
            assert os.pread(fd, n + 1, got.data_offset) == raw.tobytes()
        finally:
            os.close(fd)


def test_a_process_reuses_its_staging_segment(kernel):
    """save_tensor of the same size twice: the driver hands the same segment (its
    pages are already mapped), not zeroed (whole=True), and the second write's data
    is what is stored; whole=False still gets zeros (the test above)."""
    n = 4 * THRESHOLD
    with kernel.connect() as osh:
        a = osh.open_tensor("/reuse-c", "w", "uint8", [n], 0o644, True, True)
        osh.close_tensor(a["fd"], True)
        b = osh.open_tensor("/reuse-c", "w", "uint8", [n], 0o644, True, True)
        osh.close_tensor(b["fd"], True)
        assert a["shm"] == b["shm"]
        # two sizes in turn (a checkpoint's weights and moments): both are kept
        c = osh.open_tensor("/reuse-d", "w", "uint8", [2 * n], 0o644, True, True)
        osh.close_tensor(c["fd"], True)
        d = osh.open_tensor("/reuse-c", "w", "uint8", [n], 0o644, True, True)
        osh.close_tensor(d["fd"], True)
        assert d["shm"] == a["shm"] != c["shm"]
        assert len(shm_segments(kernel, "x")) == 2
        for v in (3, 5):
            osh.save_tensor("/reuse-c", np.full(n, v, np.uint8))
            assert (osh.load_tensor("/reuse-c").numpy() == v).all()
        osh.unlink("/reuse-c")


def test_a_replaced_large_file_is_freed_after_the_commit(kernel):
    """Replacing a large tensor frees the old file after the reply (a background
    unlink of a temporary link): a reader of the old version keeps it, and no
    temporary name stays behind."""
    n = (1 << 20) + 4096
    with kernel.connect() as osh:
        osh.mkdir("/repl")
        osh.save_tensor("/repl/t", np.zeros(n, np.uint8))
        fd = osh.open_tensor("/repl/t", "r")["fd"]
        osh.save_tensor("/repl/t", np.ones(n, np.uint8))
        disk = kernel.root / "tensors" / "repl"
        assert wait_until(lambda: [p.name for p in disk.iterdir()]
                          == ["t.safetensors"] or sorted(p.name for p in disk.iterdir())
                          == [".llmos-dir", "t.safetensors"], 10)
        assert np.frombuffer(osh.read_tensor(fd)["data"], np.uint8).sum() == 0
        osh.close_tensor(fd)
        assert osh.load_tensor("/repl/t").numpy().sum() == n
        osh.unlink("/repl/t")
        osh.unlink("/repl")


def test_groups_of_named_tensors(kernel):
    """A group (a state_dict, say) is one safetensors file of named tensors: it
    round-trips through save_tensors / load_tensors in every dtype, small (socket)
    and large (/dev/shm, cached, direct I/O); the safetensors library reads the file
    itself; members read and update by name; stat, listdir, chmod, rename and
    quota accounting treat it as one entry."""
    from safetensors.torch import load_file as load_torch
    g = torch.Generator().manual_seed(0)
    small = {"wte": torch.randn(5, 3, generator=g), "bias": torch.arange(7, dtype=torch.int16),
             "mask": torch.tensor([True, False, True]), "bf": torch.randn(4).bfloat16(),
             "step": torch.tensor([42], dtype=torch.int64), "empty": torch.zeros(0, 2),
             "scalar": torch.tensor(2.5), "bscalar": torch.tensor(1.0).bfloat16()}
    large = {"w": torch.randn(300, 1024, generator=g), "b": torch.randn(3)}  # direct I/O
    with kernel.connect() as osh:
        osh.mkdir("/grp")
        for name, state in (("small", small), ("large", large)):
            r = osh.save_tensors(f"/grp/{name}", state)
            want_size = sum(t.numel() * t.element_size() for t in state.values())
            assert r["size"] == want_size
            for _ in range(2):  # the second read of the large one is a cache hit
                got = osh.load_tensors(f"/grp/{name}")
                assert set(got) == set(state)
                for k, t in state.items():
                    assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
            on_disk = load_torch(str(kernel.root / "tensors" / "grp" / f"{name}.safetensors"))
            assert set(on_disk) == set(state)
            assert all(torch.equal(on_disk[k], t) for k, t in state.items())
            st = osh.stat(f"/grp/{name}")
            assert st["type"] == "group" and st["size"] == want_size and "dtype" not in st
            assert {m["name"]: m["shape"] for m in st["members"]} == \
                {k: list(t.shape) for k, t in state.items()}
        assert data_offset(kernel.root / "tensors" / "grp" / "large.safetensors") % 4096 == 0
        listing = {e["name"]: e for e in osh.listdir("/grp")}
        assert listing["small"]["type"] == "group" and listing["small"]["n_members"] == 8
        assert "members" not in listing["small"]
        # one member, a slice of it, without reading the rest
        assert torch.equal(osh.load_tensor("/grp/large", [[2, 4]], member="w"),
                           large["w"][2:4])
        with pytest.raises(SyscallError) as e:
            osh.load_tensor("/grp/small")
        assert e.value.errno == Errno.EINVAL and "group" in str(e.value)
        osh.save_tensor("/grp/one", torch.zeros(2))
        assert errno_of(osh.load_tensors, "/grp/one") == Errno.EINVAL
        assert errno_of(osh.load_tensor, "/grp/small", member="nope") == Errno.ENOENT
        # update one member in place (mode rw); the others stay
        fd = osh.open_tensor("/grp/small", "rw")["fd"]
        osh.write_tensor(fd, np.array([7], np.int64).tobytes(), None, "step")
        osh.close_tensor(fd)
        got = osh.load_tensors("/grp/small")
        assert got["step"].item() == 7 and torch.equal(got["wte"], small["wte"])
        osh.chmod("/grp/small", 0o600)
        osh.rename("/grp/small", "/grp/renamed")
        st = osh.stat("/grp/renamed")
        assert st["mode"] == 0o600 and len(st["members"]) == 8
        assert torch.equal(osh.load_tensors("/grp/renamed")["bias"], small["bias"])
        assert errno_of(osh.save_tensors, "/grp/renamed", small, exclusive=True) == Errno.EEXIST
        # replacing a group with a plain tensor and back is a replace like any other
        osh.save_tensor("/grp/renamed", torch.ones(3))
        assert osh.stat("/grp/renamed")["type"] == "tensor"
        for p in ("renamed", "large", "one"):
            osh.unlink(f"/grp/{p}")
        osh.unlink("/grp")


def test_a_scalar_keeps_its_shape(kernel):
    """0-d tensors stay 0-d (numpy's ascontiguousarray would make them [1])."""
    with kernel.connect() as osh:
        for i, x in enumerate((torch.tensor(3.5), np.array(5, np.int64),
                               torch.tensor(True), torch.tensor(1.0).bfloat16())):
            osh.save_tensor(f"/scalar{i}", x)
            assert osh.stat(f"/scalar{i}")["shape"] == []
            got = osh.load_tensor(f"/scalar{i}")
            assert got.shape == () and got.item() == (x.item() if hasattr(x, "item") else x)
            osh.unlink(f"/scalar{i}")


def test_a_members_read_maps_the_cached_group(kernel):
    """Reading one member of a cached group through /dev/shm copies nothing: the
    reply links the cache's segment and says where in it the member starts."""
    g = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(40000, generator=g), "b": torch.randn(50000, generator=g)}
    with kernel.connect() as osh:
        osh.save_tensors("/zc", state)
        osh.load_tensors("/zc")  # now cached
        info = osh.open_tensor("/zc", "r")
        offsets = {name: at for name, _, _, at in info["members"]}
        r = osh.read_tensor(info["fd"], None, True, "b")
        cache_inodes = {os.stat(p).st_ino for p in shm_segments(kernel, "c")}
        assert r["offset"] == offsets["b"] > 0 and os.stat(r["shm"]).st_ino in cache_inodes
        os.unlink(r["shm"])
        osh.close_tensor(info["fd"])
        for name, t in state.items():
            assert torch.equal(osh.load_tensor("/zc", member=name), t)
        assert torch.equal(osh.load_tensor("/zc", [[10, 20]], member="b"), state["b"][10:20])
        osh.unlink("/zc")


def test_group_quota_counts_every_member(kernel):
    with kernel.connect(uid=QUOTA_UID) as q:
        q.mkdir("/home-q-grp")
        half = np.zeros(100 * KiB, np.uint8)
        q.save_tensors("/home-q-grp/a", {"x": half, "y": half})  # 200 of 256 KiB
        assert errno_of(q.save_tensors, "/home-q-grp/b", {"x": half}) == Errno.EDQUOT
        q.unlink("/home-q-grp/a")
        q.save_tensors("/home-q-grp/b", {"x": half})
        q.unlink("/home-q-grp/b")
        q.unlink("/home-q-grp")


def test_slices_and_read_write_mode(kernel):
    x = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    with kernel.connect() as osh:
        osh.save_tensor("/sl", x)
        fd = osh.open_tensor("/sl", "r")["fd"]
        r = osh.read_tensor(fd, [[1, 3], [0, 2]])
        assert r["shape"] == [2, 2, 5]
        np.testing.assert_array_equal(np.frombuffer(r["data"], np.float32).reshape(2, 2, 5),
                                      x[1:3, 0:2])
        osh.close_tensor(fd)
        fd = osh.open_tensor("/sl", "rw")["fd"]
        patch = np.full((1, 4, 5), -1, np.float32)
        assert osh.write_tensor(fd, patch.tobytes(), [[2, 3]]) == patch.nbytes
        # not visible to others before close
        np.testing.assert_array_equal(osh.load_tensor("/sl").numpy(), x)
        np.testing.assert_array_equal(
            np.frombuffer(osh.read_tensor(fd, [[2, 3]])["data"], np.float32), patch.ravel())
        osh.close_tensor(fd)
        want = x.copy()
        want[2] = -1
        np.testing.assert_array_equal(osh.load_tensor("/sl").numpy(), want)
        np.testing.assert_array_equal(osh.load_tensor("/sl", [[0, 1], [1, 2], [2, 4]]).numpy(),
                                      want[0:1, 1:2, 2:4])
        osh.unlink("/sl")


def test_a_reader_keeps_what_it_opened(kernel):
    with kernel.connect() as osh:
        osh.save_tensor("/keep", np.zeros(10, np.int64))
        fd = osh.open_tensor("/keep", "r")["fd"]
        osh.save_tensor("/keep", np.ones(10, np.int64))
        osh.rename("/keep", "/kept")
        assert np.frombuffer(osh.read_tensor(fd)["data"], np.int64).sum() == 0
        osh.unlink("/kept")
        assert np.frombuffer(osh.read_tensor(fd)["data"], np.int64).sum() == 0
        osh.close_tensor(fd)


def test_exclusive_create_and_discard(kernel):
    with kernel.connect() as osh:
        fd = osh.open_tensor("/ex", "x", "uint8", [3])["fd"]
        osh.write_tensor(fd, b"abc")
        assert errno_of(osh.stat, "/ex") == Errno.ENOENT  # nothing before close
        osh.close_tensor(fd)
        assert errno_of(osh.open_tensor, "/ex", "x", "uint8", [3]) == Errno.EEXIST
        assert errno_of(osh.save_tensor, "/ex", np.zeros(3, np.uint8), exclusive=True) \
            == Errno.EEXIST
        fd = osh.open_tensor("/ex", "w", "uint8", [3])["fd"]
        osh.write_tensor(fd, b"xyz")
        osh.close_tensor(fd, discard=True)
        assert bytes(osh.load_tensor("/ex").numpy()) == b"abc"
        osh.unlink("/ex")


def test_a_commit_records_its_idempotency_key(kernel):
    """A write opened with a key records it in the committed file's header, and
    stat shows it (None without one), so a caller whose close failed can tell
    whether its write committed. w and x set it; rw replaces it when given one and
    keeps it otherwise; chmod and rename keep it."""
    from safetensors import safe_open

    def commit(path: str, mode: str, key: str | None = None, **kw) -> None:
        fd = osh.open_tensor(path, mode, key=key, **kw)["fd"]
        osh.write_tensor(fd, np.arange(4, dtype=np.int32).tobytes(), [[0, 4]])
        osh.close_tensor(fd)

    with kernel.connect() as osh:
        commit("/key", "w", "save-1", dtype="int32", shape=[4])
        assert osh.stat("/key")["key"] == "save-1"
        with safe_open(str(kernel.root / "tensors" / "key.safetensors"), "np") as f:
            assert f.metadata()["llmos.key"] == "save-1"
        commit("/key", "rw")
        assert osh.stat("/key")["key"] == "save-1"
        commit("/key", "rw", "save-2")
        assert osh.stat("/key")["key"] == "save-2"
        osh.chmod("/key", 0o600)
        osh.rename("/key", "/key2")
        assert osh.stat("/key2")["key"] == "save-2"
        commit("/key2", "w", dtype="int32", shape=[4])
        assert osh.stat("/key2")["key"] is None
        osh.save_tensor("/key2", np.ones(2, np.int8))  # the library's: one per save
        first = osh.stat("/key2")["key"]
        osh.save_tensor("/key2", np.ones(2, np.int8))
        assert len(first) == 32 and osh.stat("/key2")["key"] not in (first, None)
        commit("/key2", "w", dtype="int32", shape=[4])
        fd = osh.open_tensor("/keyg", "x", members=[["a", "int8", [2]]], key="k" * 64)["fd"]
        osh.close_tensor(fd)
        assert osh.stat("/keyg")["key"] == osh.stat("/keyg[a]")["key"] == "k" * 64
        assert {e["name"]: e["key"] for e in osh.listdir("/") if e["name"].startswith(
            "key")} == {"key2": None, "keyg": "k" * 64}
        assert errno_of(osh.open_tensor, "/key2", "r", key="k") == Errno.EINVAL
        assert errno_of(osh.open_tensor, "/key2", "w", "int8", [1], key="") == Errno.EINVAL
        assert errno_of(osh.open_tensor, "/key2", "w", "int8", [1], key="k" * 65) \
            == Errno.EINVAL
        osh.unlink("/key2")
        osh.unlink("/keyg")


def test_namespace_operations(kernel):
    with kernel.connect() as osh:
        osh.mkdir("/ns")
        osh.mkdir("/ns/a")
        osh.save_tensor("/ns/a/t", np.zeros(2, np.float16))
        assert [e["name"] for e in osh.listdir("/ns")] == ["a"]
        assert errno_of(osh.unlink, "/ns/a") == Errno.ENOTEMPTY
        assert errno_of(osh.rename, "/ns/a", "/ns/a/b") == Errno.EINVAL
        osh.rename("/ns/a", "/ns/b")
        assert osh.stat("/ns/b/t")["dtype"] == "float16"
        assert errno_of(osh.stat, "/ns/a/t") == Errno.ENOENT
        assert errno_of(osh.mkdir, "/ns/b/t") == Errno.EEXIST
        assert errno_of(osh.mkdir, "/ns/b/t/u") == Errno.ENOTDIR
        assert errno_of(osh.open_tensor, "/ns/b", "r") == Errno.EISDIR
        assert errno_of(osh.listdir, "/ns/b/t") == Errno.ENOTDIR
        osh.save_tensor("/ns/b/u", np.zeros(2, np.float16))
        assert errno_of(osh.rename, "/ns/b/t", "/ns/b/u") == Errno.EEXIST
        osh.unlink("/ns/b/t")
        osh.unlink("/ns/b/u")
        osh.unlink("/ns/b")
        osh.unlink("/ns")
        assert "ns" not in [e["name"] for e in osh.listdir("/")]


def test_a_staged_write_belongs_to_its_directory(kernel):
    """A tensor exists from its open (POSIX): its directory cannot be removed while
    the write is staged (ENOTEMPTY, naming the write), and renaming the directory
    moves the write along, so the commit lands at the new place. A reader inside a
    directory holds nothing up."""
    x = np.arange(6, dtype=np.int32)
    with kernel.connect() as osh:
        osh.mkdir("/sw")
        fd = osh.open_tensor("/sw/a", "w", "int32", [6])["fd"]
        osh.write_tensor(fd, x.tobytes())
        with pytest.raises(SyscallError) as e:
            osh.unlink("/sw")
        assert e.value.errno == Errno.ENOTEMPTY
        assert f"has a write in progress: /sw/a, by pid {osh.pid}" in str(e.value)
        assert osh.close_tensor(fd)["size"] == x.nbytes
        np.testing.assert_array_equal(osh.load_tensor("/sw/a").numpy(), x)
        # a rename carries the write (a group's too, and in mode rw) with the directory
        osh.mkdir("/sw/sub")
        fd = osh.open_tensor("/sw/sub/b", "w", "int32", [6])["fd"]
        osh.write_tensor(fd, (x + 1).tobytes())
        rw = osh.open_tensor("/sw/a", "rw")["fd"]
        osh.write_tensor(rw, (x * 2).tobytes())
        osh.rename("/sw", "/sw2")
        assert errno_of(osh.unlink, "/sw2/sub") == Errno.ENOTEMPTY
        osh.close_tensor(fd)
        osh.close_tensor(rw)
        assert errno_of(osh.stat, "/sw/sub/b") == Errno.ENOENT
        np.testing.assert_array_equal(osh.load_tensor("/sw2/sub/b").numpy(), x + 1)
        np.testing.assert_array_equal(osh.load_tensor("/sw2/a").numpy(), x * 2)
        # a discarded write holds nothing up either, once closed; a reader never does
        fd = osh.open_tensor("/sw2/sub/c", "w", "int32", [6])["fd"]
        osh.close_tensor(fd, discard=True)
        reader = osh.open_tensor("/sw2/sub/b", "r")["fd"]
        osh.unlink("/sw2/sub/b")
        osh.unlink("/sw2/sub")
        np.testing.assert_array_equal(np.frombuffer(osh.read_tensor(reader)["data"],
                                                    np.int32), x + 1)
        osh.close_tensor(reader)
        osh.unlink("/sw2/a")
        osh.unlink("/sw2")


def test_a_member_path_names_a_groups_member(kernel):
    """PATH[name] is the member name of the group at PATH: stat gives its record,
    load_tensor reads it (the descriptor open_tensor gives reads that member); a
    call that would make, change or remove it on its own is EINVAL; a member the
    group lacks is ENOENT. Where PATH is not a group, the brackets are an ordinary
    part of a name."""
    g = torch.Generator().manual_seed(3)
    state = {"ln_f.bias": torch.randn(4, generator=g),
             "wte": torch.randn(40_000, generator=g),          # through /dev/shm
             "h/0[a]": torch.arange(3, dtype=torch.int16)}     # '/' and brackets
    with kernel.connect() as osh:
        osh.mkdir("/mp")
        osh.save_tensors("/mp/model", state)
        group = osh.stat("/mp/model")
        st = osh.stat("/mp/model[ln_f.bias]")
        assert st == {"path": "/mp/model[ln_f.bias]", "type": "member",
                      "group": "/mp/model", "name": "ln_f.bias", "dtype": "float32",
                      "shape": [4], "size": 16, "owner": group["owner"],
                      "mode": group["mode"], "ctime": group["ctime"],
                      "mtime": group["mtime"], "checksum": group["checksum"],
                      "key": group["key"]}
        for name, t in state.items():
            assert torch.equal(osh.load_tensor(f"/mp/model[{name}]"), t), name
        assert torch.equal(osh.load_tensor("/mp/model[wte]", [[5, 9]]), state["wte"][5:9])
        info = osh.open_tensor("/mp/model[h/0[a]]", "r")
        assert (info["dtype"], info["shape"], info["size"], info["members"]) == \
            ("int16", [3], 6, None)
        assert osh.read_tensor(info["fd"], [[1, 3]])["data"] == \
            np.array([1, 2], np.int16).tobytes()
        assert osh.read_tensor(info["fd"], None, False, "ln_f.bias")["shape"] == [4]
        osh.close_tensor(info["fd"])
        for call in (osh.stat, osh.load_tensor):
            with pytest.raises(SyscallError) as e:
                call("/mp/model[nope]")
            assert e.value.errno == Errno.ENOENT and "'nope'" in str(e.value), e.value
        member = "/mp/model[wte]"
        for call, args, verb in [
                ("open_tensor", {"mode": "w", "dtype": "int8", "shape": [1]}, "written"),
                ("open_tensor", {"mode": "x", "dtype": "int8", "shape": [1]}, "written"),
                ("open_tensor", {"mode": "rw"}, "written"),
                ("listdir", {}, "listed"), ("mkdir", {}, "made"), ("unlink", {}, "removed"),
                ("chmod", {"perm": 0o600}, "given a mode"),
                ("rename", {"src": member, "dst": "/mp/w"}, "renamed or moved"),
                ("rename", {"src": "/mp/model", "dst": "/mp/model[x]"}, "renamed or moved")]:
            if call != "rename":
                args = {"path": member, **args}
            with pytest.raises(SyscallError) as e:
                osh.call(call, **args)
            assert e.value.errno == Errno.EINVAL, (call, args)
            assert f"a member cannot be {verb} on its own" in str(e.value), e.value
        assert errno_of(osh.unlink, "/mp/model[nope]") == Errno.EINVAL  # not removable
        assert osh.stat("/mp/model")["size"] == group["size"]           # all still there
        # not a group: an ordinary name, brackets and all
        osh.save_tensor("/mp/plain", np.zeros(2, np.int8))
        osh.save_tensor("/mp/plain[0]", np.ones(2, np.int8))
        osh.mkdir("/mp/dir[1]")
        assert errno_of(osh.stat, "/mp/none[0]") == Errno.ENOENT
        assert osh.stat("/mp/plain[0]")["type"] == "tensor"
        assert osh.load_tensor("/mp/plain[0]").tolist() == [1, 1]
        assert [e["name"] for e in osh.listdir("/mp")] == \
            ["dir[1]", "model", "plain", "plain[0]"]
        for p in ("dir[1]", "model", "plain", "plain[0]"):
            osh.unlink(f"/mp/{p}")
        osh.unlink("/mp")


# -- bad input ------------------------------------------------------------------------

BAD_PATHS = ["", "rel", "/a/../b", "/..", "/a/./b", "//a", "/a/", "/.hidden", "/a\\b",
             "/" + "n" * 201, "/a\x00b"]


@pytest.mark.parametrize("path", BAD_PATHS)
@pytest.mark.parametrize("call,extra", [
    ("open_tensor", {"mode": "r"}), ("stat", {}), ("listdir", {}), ("mkdir", {}),
    ("unlink", {}), ("chmod", {"perm": 0o600}), ("rename_src", {}), ("rename_dst", {})])
def test_bad_paths_are_einval(kernel, path, call, extra):
    with kernel.connect(heartbeat=False) as osh:
        if call == "rename_src":
            e = errno_of(osh.rename, path, "/ok")
        elif call == "rename_dst":
            e = errno_of(osh.rename, "/", path)
        else:
            e = errno_of(osh.call, call, path=path, **extra)
        assert e == Errno.EINVAL


@pytest.mark.parametrize("args", [
    {"path": "/b", "mode": "a"}, {"path": "/b", "mode": "w"},
    {"path": "/b", "mode": "w", "dtype": "float64", "shape": [1]},
    {"path": "/b", "mode": "w", "dtype": "float32", "shape": [-1]},
    {"path": "/b", "mode": "w", "dtype": "float32", "shape": [1.5]},
    {"path": "/b", "mode": "w", "dtype": "float32", "shape": "3"},
    {"path": "/b", "mode": "w", "dtype": "float32", "shape": [1] * 33},
    {"path": "/b", "mode": "w", "dtype": "float32", "shape": [1], "perm": 0o7777},
    {"path": "/b", "mode": "w", "dtype": "float32", "shape": [1], "shm": 1},
    {"path": 5, "mode": "r"}, {"path": "/b", "mode": "r", "bogus": 1},
])
def test_bad_open_arguments(kernel, args):
    with kernel.connect(heartbeat=False) as osh:
        assert errno_of(osh.call, "open_tensor", **args) == Errno.EINVAL


def test_bad_descriptor_and_data_arguments(kernel):
    with kernel.connect() as osh, kernel.connect() as other:
        fd = osh.open_tensor("/bad", "w", "int32", [2, 3])["fd"]
        for call, kw in [("read_tensor", {}), ("write_tensor", {"data": b""}),
                         ("close_tensor", {})]:
            assert errno_of(osh.call, call, fd="nope", **kw) == Errno.EBADF
            assert errno_of(other.call, call, fd=fd, **kw) == Errno.EBADF  # not its fd
            assert errno_of(osh.call, call, fd=7, **kw) == Errno.EINVAL
        assert errno_of(osh.read_tensor, fd) == Errno.EBADF  # write-only
        for data, slc in [(b"x" * 23, None), (b"x" * 25, None), (b"x" * 12, [[0, 2]]),
                          (b"", [[0, 3]]), (b"", [[0, 1], [0, 1], [0, 1]]),
                          (b"", [[2, 1]]), (b"", [[0]]), (b"", [[-1, 1]]), (b"", "0:1"),
                          ("str", None)]:
            assert errno_of(osh.write_tensor, fd, data, slc) == Errno.EINVAL, (data, slc)
        assert osh.write_tensor(fd, b"y" * 12, [[1, 2]]) == 12
        assert osh.write_tensor(fd, b"", [[1, 1]]) == 0
        osh.close_tensor(fd)
        assert errno_of(osh.close_tensor, fd) == Errno.EBADF
        fd = osh.open_tensor("/bad", "r")["fd"]
        assert errno_of(osh.write_tensor, fd, b"z" * 24) == Errno.EBADF
        assert errno_of(osh.read_tensor, fd, [[0, 3]]) == Errno.EINVAL
        assert np.frombuffer(osh.read_tensor(fd, [[1, 2]])["data"], np.uint8).tolist() \
            == [ord("y")] * 12
        osh.close_tensor(fd)
        assert errno_of(osh.open_tensor, "/bad", "r", "int32") == Errno.EINVAL
        assert errno_of(osh.open_tensor, "/missing", "r") == Errno.ENOENT
        assert errno_of(osh.open_tensor, "/missing", "rw") == Errno.ENOENT
        assert errno_of(osh.open_tensor, "/nodir/x", "w", "int8", [1]) == Errno.ENOENT
        assert errno_of(osh.unlink, "/") == Errno.EINVAL
        assert errno_of(osh.unlink, "/missing") == Errno.ENOENT
        assert errno_of(osh.rename, "/missing", "/m2") == Errno.ENOENT
        assert errno_of(osh.rename, "/bad", "/nodir/x") == Errno.ENOENT
        assert errno_of(osh.stat, "/missing") == Errno.ENOENT
        assert errno_of(osh.listdir, "/missing") == Errno.ENOENT
        assert errno_of(osh.mkdir, "/nodir/x") == Errno.ENOENT
        assert errno_of(osh.chmod, "/missing", 0o600) == Errno.ENOENT
        assert errno_of(osh.chmod, "/bad", -1) == Errno.EINVAL
        osh.unlink("/bad")


def test_size_limits_and_quota(kernel):
    with kernel.connect() as osh:
        assert errno_of(osh.open_tensor, "/huge", "w", "float32", [2**21 + 1]) == Errno.EFBIG
        assert errno_of(osh.open_tensor, "/huge", "w", "int64", [2**60, 2**60]) == Errno.EFBIG
    with kernel.connect(uid=QUOTA_UID) as q:
        q.mkdir(f"/q{QUOTA_UID}")
        q.save_tensor(f"/q{QUOTA_UID}/a", np.zeros(100 * KiB, np.uint8))
        fd = q.open_tensor(f"/q{QUOTA_UID}/b", "w", "uint8", [100 * KiB])["fd"]
        # staged writes count too
        assert errno_of(q.open_tensor, f"/q{QUOTA_UID}/c", "w", "uint8", [100 * KiB]) \
            == Errno.EDQUOT
        q.close_tensor(fd, discard=True)
        q.save_tensor(f"/q{QUOTA_UID}/b", np.zeros(100 * KiB, np.uint8))
        assert errno_of(q.save_tensor, f"/q{QUOTA_UID}/c", np.zeros(100 * KiB, np.uint8)) \
            == Errno.EDQUOT
        # replacing its own tensor counts only the difference
        q.save_tensor(f"/q{QUOTA_UID}/b", np.zeros(150 * KiB, np.uint8))
        q.unlink(f"/q{QUOTA_UID}/a")
        q.save_tensor(f"/q{QUOTA_UID}/c", np.zeros(100 * KiB, np.uint8))
        for n in "bc":
            q.unlink(f"/q{QUOTA_UID}/{n}")
        q.unlink(f"/q{QUOTA_UID}")


# -- permissions ----------------------------------------------------------------------

def test_permissions_between_two_uids(kernel):
    with kernel.connect(uid=1000) as a, kernel.connect(uid=1001) as b, \
            kernel.connect(uid=0) as root:
        a.mkdir("/pa", 0o755)
        a.save_tensor("/pa/private", np.ones(4, np.float32), perm=0o600)
        a.save_tensor("/pa/public", np.ones(4, np.float32), perm=0o644)
        a.save_tensor("/pa/shared", np.ones(4, np.float32), perm=0o666)
        assert errno_of(b.load_tensor, "/pa/private") == Errno.EACCES
        assert b.load_tensor("/pa/public").sum() == 4
        assert errno_of(b.open_tensor, "/pa/public", "w", "float32", [4]) == Errno.EACCES
        assert errno_of(b.open_tensor, "/pa/public", "rw") == Errno.EACCES
        b.save_tensor("/pa/shared", np.zeros(4, np.float32))  # o+w: allowed, keeps owner
        assert a.stat("/pa/shared")["owner"] == 1000
        assert errno_of(b.save_tensor, "/pa/new", np.ones(1, np.int8)) == Errno.EACCES  # dir 755
        assert errno_of(b.mkdir, "/pa/d") == Errno.EACCES
        assert errno_of(b.unlink, "/pa/public") == Errno.EACCES
        assert errno_of(b.rename, "/pa/public", "/stolen") == Errno.EACCES
        assert errno_of(b.chmod, "/pa/private", 0o644) == Errno.EPERM
        assert errno_of(b.chmod, "/pa", 0o777) == Errno.EPERM
        # the root is sticky: b may create there but not remove a's entries
        b.save_tensor("/b-own", np.ones(1, np.int8))
        assert errno_of(b.unlink, "/pa") == Errno.EACCES
        assert errno_of(a.unlink, "/b-own") == Errno.EACCES
        a.chmod("/pa", 0o700)
        assert errno_of(b.listdir, "/pa") == Errno.EACCES
        a.chmod("/pa/private", 0o644)
        assert a.stat("/pa/private")["mode"] == 0o644
        assert b.load_tensor("/pa/private").sum() == 4  # chmod kept the data
        a.chmod("/pa/private", 0o400)
        assert errno_of(a.open_tensor, "/pa/private", "w", "float32", [4]) == Errno.EACCES
        assert root.load_tensor("/pa/private").sum() == 4  # uid 0 may do anything
        root.unlink("/pa/private")
        for n in ("public", "shared"):
            a.unlink(f"/pa/{n}")
        a.unlink("/pa")
        b.unlink("/b-own")


# -- integrity ------------------------------------------------------------------------

def test_a_damaged_tensor_reads_eio(kernel):
    with kernel.connect() as osh:
        osh.save_tensor("/dmg", np.arange(1000, dtype=np.int32))
        p = kernel.root / "tensors" / "dmg.safetensors"
        raw = bytearray(p.read_bytes())
        raw[-5] ^= 0xFF
        tmp = p.with_name("dmg.new")
        tmp.write_bytes(raw)
        os.replace(tmp, p)  # a new inode: the cache cannot answer for it
        assert errno_of(osh.load_tensor, "/dmg") == Errno.EIO
        assert wait_until(lambda: tensor_info(kernel)["info"]["checksum_errors"] >= 1, 5)
        osh.unlink("/dmg")


def test_cache_hits_and_misses_show_in_sysinfo(kernel):
    with kernel.connect() as osh:
        osh.save_tensor("/hot", np.arange(50_000, dtype=np.int32))
        for _ in range(3):
            osh.load_tensor("/hot")
        assert wait_until(lambda: tensor_info(kernel).get("info", {}).get("cache", {})
                          .get("hits", 0) >= 2, 5)
        before = tensor_info(kernel)["info"]["cache"]
        assert before["misses"] >= 1 and before["bytes"] <= before["budget"]
        osh.unlink("/hot")


def test_lru_evicts_within_the_budget(kernel):
    with kernel.connect() as osh:
        for i in range(6):  # 6 x 1 MiB through a 4 MiB cache
            osh.save_tensor(f"/lru{i}", np.full(2**18, i, np.int32))
            assert int(osh.load_tensor(f"/lru{i}")[0]) == i
        assert wait_until(lambda: tensor_info(kernel)["info"]["cache"]["evictions"] >= 2, 5)
        c = tensor_info(kernel)["info"]["cache"]
        assert c["bytes"] <= c["budget"]
        for i in range(6):
            osh.unlink(f"/lru{i}")


# -- processes that end --------------------------------------------------------------

CHILD = textwrap.dedent("""
    import mmap, os, sys, time, numpy as np, userland
    osh = userland.connect(sys.argv[1])
    info = osh.open_tensor("/dying", "w", "uint8", [4 << 20], 0o644, True)
    fd = os.open(info["shm"], os.O_RDWR)  # mapped but never unlinked: the driver must
    mm = mmap.mmap(fd, 4 << 20)
    mm[: 1 << 20] = b"x" * (1 << 20)
    r = osh.read_tensor(osh.open_tensor("/present", "r")["fd"], None, True)
    print("ready", info["shm"], r["shm"], flush=True)
    time.sleep(60)
""")


def test_sigkill_mid_transfer_leaks_nothing(fresh):
    with fresh.connect() as osh:
        osh.save_tensor("/present", np.ones(1 << 18, np.float32))
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLMOS_HOME=str(fresh.root))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(fresh.root)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().split()
        assert line and line[0] == "ready", line
        assert os.path.exists(line[1]) and os.path.exists(line[2])
        assert shm_segments(fresh, "x")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert wait_until(lambda: not shm_segments(fresh, "x"), 5), shm_segments(fresh, "x")
    with fresh.connect() as osh:
        assert errno_of(osh.stat, "/dying") == Errno.ENOENT  # discarded, never visible
        assert wait_until(lambda: tensor_info(fresh)["info"]["open"] == 0, 5)
    assert not list((fresh.root / "tensors").glob(".llmos-tmp-*"))


def test_driver_start_removes_crash_leftovers(fresh):
    tdir = fresh.root / "tensors"
    with fresh.connect() as osh:
        osh.mkdir("/d")
        osh.save_tensor("/d/t", np.ones(3, np.int16))
    (tdir / "d" / ".llmos-tmp-deadbeef").write_bytes(b"torn")
    (tdir / "d" / ".llmos-tmp-0123abcd-4567").write_bytes(b"an earlier instance's")
    (tdir / ".llmos-tmp-dir").mkdir()
    (tdir / ".llmos-tmp-dir" / "x").write_bytes(b"")
    from drivers.tensorfs import shm_prefix
    stray = f"/dev/shm/{shm_prefix(fresh.root)}x-stray"
    open(stray, "wb").close()
    long_ago = time.time() - 60  # a recent one is spared a while: a reply may name it
    os.utime(stray, (long_ago, long_ago))
    old = fresh.driver_pid("tensorfs")
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: restarted(fresh, old), 15)
    assert not os.path.exists(stray)  # swept before the driver is ready
    # the scan, after the driver is ready
    assert wait_until(lambda: not list(tdir.rglob(".llmos-tmp-*")), 10)
    with fresh.connect() as osh:
        assert osh.load_tensor("/d/t").tolist() == [1, 1, 1]


def run_fault(b: Booted, kills: int, seed: int) -> None:
    """Writers commit versions of a few tensors while the driver is SIGKILLed at
    random moments. A version whose close returned must be there (or a later one);
    every file is a whole version; no temporary file survives the restarts."""
    rng = random.Random(seed)
    committed: dict[str, int] = {}
    attempted: dict[str, int] = {}
    stop_flag = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with b.connect() as osh:
                v = 0
                while not stop_flag.is_set():
                    v += 1
                    path = f"/f{v % 3}"
                    n = rng.choice([10, 70_000])  # both transfer paths
                    attempted[path] = v
                    try:
                        osh.save_tensor(path, np.full(n, v, np.int32))
                    except SyscallError as e:
                        assert e.errno in (Errno.EIO, Errno.EBADF), e
                        continue
                    committed[path] = v
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, 0.4))
            pid = b.driver_pid("tensorfs")
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: restarted(b, pid), 20)
        time.sleep(0.3)
    finally:
        stop_flag.set()
        t.join(60)
    assert not errors, errors
    assert committed, "no write committed"
    with b.connect() as osh:
        for path, v in committed.items():
            got = osh.load_tensor(path).numpy()
            assert (got == got[0]).all(), f"{path} is torn"
            assert v <= int(got[0]) <= attempted[path], (path, v, int(got[0]))
            assert got.size in (10, 70_000)
    assert wait_until(lambda: not list((b.root / "tensors").rglob(".llmos-tmp-*")), 10)


def test_driver_sigkilled_during_writes(fresh):
    run_fault(fresh, kills=3, seed=1)


@pytest.mark.slow
def test_driver_sigkilled_during_writes_soak(fresh):
    run_fault(fresh, kills=8, seed=2)


# -- the llmos command --------------------------------------------------------------

def test_cli_put_get_ls_stat_mv_rm(kernel, tmp_path, capsys):
    from userland.cli import main

    def llmos(b: Booted, *argv: str) -> subprocess.CompletedProcess:
        """The command's main in this process (torch imports once, not per command)."""
        capsys.readouterr()
        rc = main(["--home", str(b.root), *argv])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, rc, out.out, out.err)

    from safetensors.numpy import save_file
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    torch.save(torch.ones(2, 2, dtype=torch.bfloat16), tmp_path / "y.pt")
    save_file({"a": np.zeros(3, np.int8), "b": np.ones(2, np.int64)}, tmp_path / "g.safetensors")
    (tmp_path / "t.txt").write_text("hello")
    assert llmos(kernel, "put", str(tmp_path / "x.npy"), "/cli-x").returncode == 0
    assert llmos(kernel, "put", "-q", str(tmp_path / "y.pt"), "/cli-y").returncode == 0
    assert llmos(kernel, "put", "-q", str(tmp_path / "g.safetensors"), "/cli-g").returncode == 0
    assert llmos(kernel, "put", "-q", str(tmp_path / "t.txt"), "/cli-t").returncode == 0
    ls = llmos(kernel, "ls", "-l", "/")
    assert ls.returncode == 0 and "cli-x" in ls.stdout and "float32[3, 4]" in ls.stdout
    assert set(llmos(kernel, "ls", "/cli-g").stdout.split()) == {"a", "b"}
    st = llmos(kernel, "stat", "/cli-y")
    assert "bfloat16" in st.stdout and "crc32:" in st.stdout
    assert llmos(kernel, "mv", "/cli-x", "/cli-x2").returncode == 0
    for name, check in [("x2.npy", lambda p: np.testing.assert_array_equal(np.load(p), x)),
                        ("y.pt", lambda p: torch.equal(torch.load(p), torch.ones(2, 2,
                                                      dtype=torch.bfloat16)) or 1 / 0),
                        ("t.bin", lambda p: p.read_bytes() == b"hello" or 1 / 0),
                        ("b.safetensors", lambda p: load_file(str(p))["tensor"].tolist()
                         == [1, 1] or 1 / 0)]:
        src = {"x2.npy": "/cli-x2", "y.pt": "/cli-y", "t.bin": "/cli-t",
               "b.safetensors": "/cli-g/b"}[name]
        r = llmos(kernel, "get", src, str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        check(tmp_path / name)
    r = llmos(kernel, "stat", "/nope")
    assert r.returncode == 1 and "ENOENT" in r.stderr
    # -g: the file's tensors as one group, exported back with their names
    assert llmos(kernel, "put", "-g", str(tmp_path / "g.safetensors"), "/cli-grp").returncode == 0
    ls = llmos(kernel, "ls", "-l", "/")
    assert any(line.startswith("-") and "cli-grp" in line and "2 tensors" in line
               for line in ls.stdout.splitlines()), ls.stdout
    assert llmos(kernel, "get", "/cli-grp", str(tmp_path / "back.safetensors")).returncode == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == {"a", "b"} and back["b"].tolist() == [1, 1]
    r = llmos(kernel, "get", "/cli-grp", str(tmp_path / "grp.npy"))
    assert r.returncode == 1 and "EINVAL" in r.stderr and "group" in r.stderr
    ls = llmos(kernel, "ls", "-l", "/cli-grp")  # a group's own stat record
    assert ls.returncode == 0 and "2 tensors" in ls.stdout, ls
    st = llmos(kernel, "stat", "/cli-grp")
    assert "members   2 tensors" in st.stdout and "  b  int64[2]  16B" in st.stdout
    # errors: clear lines, nothing half imported
    np.save(tmp_path / "f64.npy", np.zeros(3))
    torch.save({"a": torch.zeros(2), "nested": {"x": 1}}, tmp_path / "nested.pt")
    save_file({"ok": np.zeros(2, np.int8), ".hidden": np.zeros(2, np.int8)},
              tmp_path / "odd.safetensors")
    for argv, errno, text in (
            (("put", str(tmp_path / "f64.npy"), "/cli-f64"), "EINVAL", "float64"),
            (("put", str(tmp_path / "nested.pt"), "/cli-nested"), "EINVAL", "'nested'"),
            (("put", str(tmp_path / "odd.safetensors"), "/cli-odd"), "EINVAL", "'.hidden'"),
            (("put", str(tmp_path), "/cli-dir"), "EISDIR", "directory"),
            (("get", "/cli-grp", str(tmp_path / "nope" / "x.safetensors")), "ENOENT", "nope")):
        r = llmos(kernel, *argv)
        assert r.returncode == 1 and r.stderr.startswith(f"llmos: {errno}") \
            and text in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
    names = llmos(kernel, "ls").stdout.split()
    assert not {"cli-f64", "cli-nested", "cli-odd", "cli-dir"} & set(names), names
    # a file tensorfs cannot read: listed as unreadable, and rm removes it
    assert llmos(kernel, "mkdir", "-p", "/cli-d/e").returncode == 0
    (kernel.root / "tensors" / "cli-d" / "e" / "junk.safetensors").write_bytes(b"not one")
    ls = llmos(kernel, "ls", "-l", "/cli-d/e")
    assert ls.returncode == 0 and "junk" in ls.stdout and "EIO: unreadable" in ls.stdout
    assert llmos(kernel, "rm", "-r", "/cli-d").returncode == 0
    assert llmos(kernel, "rm", "-r", "/cli-g", "/cli-x2", "/cli-y", "/cli-t",
                 "/cli-grp").returncode == 0
    assert "cli-" not in llmos(kernel, "ls").stdout


def test_bench_smoke(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import tensorfs_bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert tensorfs_bench.main(["--mib", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "read speed / memcpy speed" in out and "durable write speed" in out
    assert "target >= 10: " in out  # a verdict, met or not
