"""llmos cluster: a cluster of nodes on this machine, from network namespaces, and the
user-space proxy that makes its delays and partitions (docs/cluster.md).

The tests that build namespaces need root (ip netns add): where that is refused
they skip, saying why. The proxy's and the command's own checks need neither.
Everything a test makes is removed in a finally: cluster down, then whatever it
recorded that is still there, processes by their recorded pid (each checked to be
what was started), never by name.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

import userland
from syscalls import Home, Keyring
from syscalls.client import stop_kernel

ROOT = Path(__file__).resolve().parent.parent
NODE_TIMEOUT_S = 2.0
HEARTBEAT_S = 0.5


def _netns_refused() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    probe = f"llmos-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns add is refused here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="module")
def netns() -> None:
    why = _netns_refused()
    if why is not None:
        print(f"test_cluster: skipped: {why}", file=sys.stderr)
        pytest.skip(why)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until(cond: Any, timeout: float, what: str) -> float:
    """Seconds until cond() held; AssertionError after timeout."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


class Home_:
    """A temporary head home, the llmos command on it, and a cleanup that leaves
    nothing of what the cluster recorded."""

    def __init__(self, config: str = "") -> None:
        # short: ipc socket paths must fit in sun_path
        self.root = Path(tempfile.mkdtemp(prefix="/tmp/lc"))
        if config:
            (self.root / "config.toml").write_text(config)
        self.env = dict(os.environ, LLMOS_HOME=str(self.root), PYTHONPATH=str(ROOT))
        for name in ("LLMOS_SPAWN_TOKEN", "LLMOS_CREDENTIAL", "LLMOS_PID"):
            self.env.pop(name, None)
        self.seen: dict[str, Any] = {}  # the last cluster record read

    def llmos(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "userland.cli", *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def record(self) -> dict[str, Any] | None:
        try:
            self.seen = json.loads((self.root / "cluster.json").read_text())
            return self.seen
        except FileNotFoundError:
            return None

    def cleanup(self) -> None:
        rec = self.record() or self.seen
        if (self.root / "cluster.json").exists():
            self.llmos("cluster", "down", "--timeout", "5")
        for pid, mark in [*[(n.get("agent_pid"), "kernel.agent")
                            for n in rec.get("nodes", [])],
                          ((rec.get("proxy") or {}).get("pid"), "userland._netproxy")]:
            try:
                if pid and mark in " ".join(psutil.Process(pid).cmdline()):
                    os.killpg(pid, signal.SIGKILL)
            except (psutil.Error, OSError):
                pass
        for ns in rec.get("namespaces", []):
            if os.path.exists(f"/run/netns/{ns}"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for dev in [*rec.get("links", []), rec.get("bridge")]:
            if dev and os.path.exists(f"/sys/class/net/{dev}"):
                subprocess.run(["ip", "link", "del", dev], capture_output=True)
        pid = Home.resolve(self.root).kernel_pid()
        if _alive(pid):
            try:
                if str(self.root) in " ".join(psutil.Process(pid).cmdline()):
                    stop_kernel(pid)
            except psutil.Error:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def home() -> Iterator[Home_]:
    h = Home_(f"node_timeout_s = {NODE_TIMEOUT_S}\nnode_heartbeat_s = {HEARTBEAT_S}\n")
    try:
        yield h
    finally:
        h.cleanup()


def _node(osh: Any, name: str) -> dict[str, Any]:
    return next(n for n in osh.nodes() if n["name"] == name)


def _ns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def test_a_cluster_runs_loses_heals_and_goes(netns, home):
    t_start = time.monotonic()
    r = home.llmos("cluster", "up", "--nodes", "2", "--json")
    assert r.returncode == 0, r.stderr
    up = json.loads(r.stdout)
    rec = home.record()
    assert rec is not None and rec["head"]["started"]
    assert [n["name"] for n in up["nodes"]] == ["n1", "n2"]
    assert all(n["state"] == "ready" and n["epoch"] == 1 for n in up["nodes"])
    net = up["subnet"].rsplit(".", 1)[0]  # 10.213.T
    assert up["head"]["endpoint"].startswith(f"tcp://{net}.1:")
    for n in up["nodes"]:
        # in its namespace, on the cluster's subnet; reaching the head by its proxy port
        addr = subprocess.run(["ip", "-n", n["netns"], "-4", "-o", "addr", "show", "eth0"],
                              capture_output=True, text=True).stdout
        assert f"inet {n['address']}/24" in addr and n["address"].startswith(net + ".")
        assert n["endpoint"].startswith(f"tcp://{net}.1:")
        assert n["endpoint"] != up["head"]["endpoint"]
    print(f"cluster up: {time.monotonic() - t_start:.1f} s")

    osh = userland.connect(home.root, uid=0)
    try:
        # a process on each node, in that node's namespace
        where = "import os; print(os.environ['LLMOS_NODE'], os.stat('/proc/self/ns/net').st_ino)"
        for n in up["nodes"]:
            pid = osh.spawn(["python", "-c", where], node=n["name"])
            assert osh.wait(pid)["status"] == 0
            out = (Path(n["home"]) / "log" / "proc" / f"{pid}.log").read_text().split()
            assert out == [n["name"], str(_ns_inode(n["netns"]))]

        # n2 cut off by the proxy: lost within 2 x node_timeout_s, its process ends
        n2 = up["nodes"][1]
        sleeper = osh.spawn(["python", "-c", "import time; time.sleep(120)"], node="n2")
        t0 = time.monotonic()
        r = home.llmos("cluster", "partition", "n2", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["links"]["n2"]["partitioned"] is True
        assert json.loads(r.stdout)["links"]["n1"]["partitioned"] is False
        _wait_until(lambda: _node(osh, "n2")["state"] == "lost", 2 * NODE_TIMEOUT_S,
                    "n2 lost")
        lost_s = time.monotonic() - t0
        assert lost_s <= 2 * NODE_TIMEOUT_S
        assert osh.wait(sleeper)["reason"] == "node lost"
        assert _node(osh, "n1")["state"] == "ready"
        print(f"n2 lost {lost_s:.2f} s after the partition (node_timeout_s "
              f"{NODE_TIMEOUT_S})")

        # healed: it rejoins with a higher epoch, nothing of the old epoch left running
        r = home.llmos("cluster", "heal", "n2")
        assert r.returncode == 0, r.stderr
        rejoin_s = _wait_until(lambda: _node(osh, "n2")["state"] == "ready", 10,
                               "n2 rejoined")
        assert _node(osh, "n2")["epoch"] > 1
        pids = subprocess.run(["ip", "netns", "pids", n2["netns"]], capture_output=True,
                              text=True).stdout.split()
        assert pids == [str(n2["agent_pid"])]
        pid = osh.spawn(["python", "-c", "pass"], node="n2")
        assert osh.wait(pid)["status"] == 0
        print(f"n2 rejoined {rejoin_s:.2f} s after the heal")

        r = home.llmos("cluster", "status", "--json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert [(n["state"], n["link"]["partitioned"]) for n in status["nodes"]] == \
            [("ready", False), ("ready", False)]
    finally:
        osh.close()

    # down: nothing it made is left
    r = home.llmos("cluster", "down", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["left"] == []
    assert home.record() is None and not (home.root / "cluster").exists()
    for ns in rec["namespaces"]:
        assert not os.path.exists(f"/run/netns/{ns}"), ns
    for dev in [*rec["links"], rec["bridge"]]:
        assert not os.path.exists(f"/sys/class/net/{dev}"), dev
    for pid in [*(n["agent_pid"] for n in rec["nodes"]), rec["proxy"]["pid"],
                rec["head"]["pid"]]:
        assert not _alive(pid), pid
    keys = [e for e in Keyring(home.root).load().values() if e["name"] in ("n1", "n2")]
    assert len(keys) == 2 and all(e["revoked"] for e in keys)
    r = home.llmos("cluster", "down")
    assert r.returncode == 0 and r.stdout == f"no cluster on {home.root}\n"
    print(f"whole test: {time.monotonic() - t_start:.1f} s")


def _ours_now() -> set[str]:
    return {f"netns {n}" for n in os.listdir("/run/netns") if n.startswith("llmos-")} | \
        {f"link {d}" for d in os.listdir("/sys/class/net") if d.startswith("llmos")}


def test_a_cluster_up_that_fails_leaves_nothing_behind(netns, home):
    # n2's name is taken by a key that is not the cluster's: up fails at n2, after the
    # namespaces, the head, the proxy and n1 were made
    Keyring(home.root).issue("node", "n2", "tcp://127.0.0.1:1")
    before = _ours_now()
    r = home.llmos("cluster", "up", "--nodes", "2")
    assert r.returncode == 1
    assert r.stderr.startswith("llmos: EEXIST: cluster up: node n2 has a key already"), \
        r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert home.record() is None and not (home.root / "cluster").exists()
    assert _ours_now() == before
    assert Home.resolve(home.root).kernel_pid() is None or \
        not _alive(Home.resolve(home.root).kernel_pid())
    keys = {e["name"]: e["revoked"] for e in Keyring(home.root).load().values()}
    assert keys == {"n1": True, "n2": False}  # its own revoked, the other's untouched


def test_cluster_up_refuses_a_kernel_that_does_not_listen(home):
    r = home.llmos("start")
    assert r.returncode == 0, r.stderr
    try:
        r = home.llmos("cluster", "up")
        assert r.returncode == 1
        assert r.stderr.startswith("llmos: EINVAL: cluster up: the kernel on "), r.stderr
        assert "does not listen on TCP" in r.stderr and len(r.stderr.splitlines()) == 1
        assert home.record() is None
    finally:
        home.llmos("stop")


@pytest.mark.parametrize("args, status, start", [
    (["partition"], 2, "usage: llmos cluster"),
    (["set", "--loss", "2"], 2, "usage: llmos cluster"),
    (["set", "--delay-ms", "-1"], 2, "usage: llmos cluster"),
    (["up", "--nodes", "0"], 2, "usage: llmos cluster"),
    (["up", "--prefix", "9x"], 2, "usage: llmos cluster"),
    (["up", "n1"], 2, "usage: llmos cluster"),
    (["status", "--delay-ms", "5"], 2, "usage: llmos cluster"),
    (["status"], 1, "llmos: ENOENT: cluster status: no cluster on "),
    (["heal", "n1"], 1, "llmos: ENOENT: cluster heal: no cluster on "),
])
def test_cluster_bad_input_is_one_clear_error(home, args, status, start):
    r = home.llmos("cluster", *args)
    assert r.returncode == status, (r.stdout, r.stderr)
    assert r.stderr.startswith(start), r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    if status == 2:  # the usage, then one line saying what is wrong
        assert lines[-1].startswith("llmos cluster: error: "), r.stderr
    else:
        assert len(lines) == 1, r.stderr


def test_cluster_down_without_a_cluster_is_done(home):
    r = home.llmos("cluster", "down")
    assert r.returncode == 0 and r.stdout == f"no cluster on {home.root}\n", r.stderr


# -- the proxy alone, on loopback --------------------------------------------------------

class Echo:
    """A TCP echo server on loopback, in threads."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c: socket.socket) -> None:
        with c:
            while data := c.recv(65536):
                c.sendall(data)


def _round_trip(port: int, timeout: float = 5.0, conn: socket.socket | None = None
                ) -> float:
    c = conn or socket.create_connection(("127.0.0.1", port), timeout=timeout)
    c.settimeout(timeout)
    try:
        t0 = time.monotonic()
        c.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += c.recv(4)
        assert got == b"ping"
        return time.monotonic() - t0
    finally:
        if conn is None:
            c.close()


def test_the_proxy_delays_partitions_and_heals():
    from userland._netproxy import control
    echo = Echo()
    sockdir = tempfile.mkdtemp(prefix="/tmp/lcp")
    ctl = f"{sockdir}/proxy.sock"
    proxy = subprocess.Popen([sys.executable, "-m", "userland._netproxy", "--control", ctl,
                              "--upstream", f"127.0.0.1:{echo.port}", "--host", "127.0.0.1",
                              "--link", "a", "--link", "b"], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             stderr=subprocess.DEVNULL)
    try:
        _wait_until(lambda: os.path.exists(ctl), 10, "the proxy's control socket")
        links = control(ctl, {"op": "status"})["links"]
        port = {n: int(k["listen"].rsplit(":", 1)[1]) for n, k in links.items()}
        assert _round_trip(port["a"]) < 0.5

        # delay: each way, per link
        reply = control(ctl, {"op": "set", "links": ["a"], "delay_ms": 40})
        assert reply["links"]["a"]["delay_ms"] == 40 and reply["links"]["b"]["delay_ms"] == 0
        assert _round_trip(port["a"]) >= 0.08
        assert _round_trip(port["b"]) < 0.08
        control(ctl, {"op": "set", "delay_ms": 0})

        # partition: an open connection goes silent, not closed; a new one is held
        held = socket.create_connection(("127.0.0.1", port["a"]))
        assert _round_trip(port["a"], conn=held) < 0.5
        control(ctl, {"op": "set", "links": ["a"], "partitioned": True})
        held.sendall(b"ping")
        held.settimeout(0.5)
        with pytest.raises(socket.timeout):
            held.recv(4)
        late = socket.create_connection(("127.0.0.1", port["a"]))
        late.sendall(b"ping")
        late.settimeout(0.3)
        with pytest.raises(socket.timeout):
            late.recv(4)
        assert _round_trip(port["b"]) < 0.5  # the other link is not cut
        # healed: both get their answers, where they stopped
        control(ctl, {"op": "set", "links": ["a"], "partitioned": False})
        for c in (held, late):
            c.settimeout(5)
            assert c.recv(4) == b"ping"
            c.close()

        # loss as TCP sees it: a lost chunk is held back one retransmission timeout
        control(ctl, {"op": "set", "links": ["b"], "loss": 1.0})
        assert _round_trip(port["b"]) >= 0.4  # both ways lost: 2 x 200 ms

        # bad requests are refused, with why
        assert control(ctl, {"op": "set", "links": ["z"], "loss": 0})["error"].startswith(
            "no link 'z'")
        assert "loss" in control(ctl, {"op": "set", "loss": 2})["error"]
        assert control(ctl, {"op": "nope"})["ok"] is False
    finally:
        proxy.terminate()
        proxy.wait(10)
        echo.sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)
