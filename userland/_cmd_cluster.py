"""The cluster command: a cluster of llmos nodes on this one machine, made of Linux
network namespaces (docs/cluster.md).

`llmos cluster up --nodes N` makes, as root:

  - a bridge in the root namespace, llmosbr<T>, with 10.213.T.1/24 (T: the first
    subnet 10.213.T.0/24 that no address, route or other cluster uses);
  - per node, a network namespace llmos-<T>-<NAME> holding the far end of a veth
    pair (eth0, 10.213.T.<i+1>/24) and lo, its near end (llmos<T>v<i>) on the bridge;
  - the head kernel, started as `llmos start --listen 10.213.T.1:0` starts it,
    unless one runs on this home already (it must then listen on TCP);
  - the proxy (userland/_netproxy.py) on the bridge address, one port per node,
    forwarding to the kernel's TCP endpoint: delay, loss and partitions are made
    there, since `tc netem` is not available on these machines;
  - per node, a node key and its token, whose endpoint is the node's proxy port, and
    a node agent (python -m kernel.agent) run inside its namespace with its own
    LLMOS_HOME (HOME/cluster/<NAME>) and simulated GPUs;

and waits until every node has joined. Everything it makes is written to
HOME/cluster.json before it is made, so `llmos cluster down` removes exactly
that, and a half-made cluster too: the nodes (node_ctl remove, or their keys
revoked when the kernel is gone), the agents and the proxy (by their recorded
pids, each checked to be what was started), the namespaces (and any process still
in one), the veths, the bridge, the files, and the head if up started it. Nothing
listens outside these namespaces' addresses and loopback.

It never imports the kernel: the head (python -m kernel), the agents (python -m
kernel.agent) and the proxy are processes of their own. The proxy's module, which
loads asyncio, is imported only by the commands that talk to it (every llmos command
reads this module, with the command table).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from syscalls import (CredentialError, Home, Keyring, SyscallError, check_name,
                      write_credential)

from . import _kernelctl as kctl
from . import _views
from ._argtypes import seconds, sim_gpus
from ._base import call_timeout, os_error
from ._command import CliError, Session, UsageError, arg, command

RECORD = "cluster.json"       # in the head's home: what up made
WORKDIR = "cluster"           # in the head's home: node homes, tokens, the proxy's log
NET = "10.213.{}.0/24"
MAX_NODES = 64
UP_TIMEOUT_S = 30.0
DOWN_TIMEOUT_S = 10.0
POLL_S = 0.05
ACTIONS = ("up", "down", "status", "partition", "heal", "set")
CLUSTER_JSON = ("up, status: {home, tag, subnet, bridge, head: {pid, endpoint, started, "
                "running}, proxy: {pid, control}, nodes: [{name, netns, address, endpoint, "
                "agent_pid, home, state, epoch, link: {delay_ms, jitter_ms, loss, "
                "partitioned, connections, bytes_up, bytes_down}}]}; down: {found, "
                "removed: [TEXT], left: [TEXT]}; partition, heal, set: {links: {NAME: link}}")


# -- arguments -------------------------------------------------------------------------

def _nodes_arg(text: str) -> int:
    n = int(text) if text.isdigit() else 0
    if not 1 <= n <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"a count of nodes from 1 to {MAX_NODES}, not "
                                         f"{text!r}")
    return n


def _ms_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v <= 60_000:
        raise argparse.ArgumentTypeError(f"milliseconds from 0 to 60000, not {text!r}")
    return v


def _loss_arg(text: str) -> float:
    try:
        v = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        v = float("nan")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"a probability from 0 to 1 (or 0% to 100%), "
                                         f"not {text!r}")
    return v


def _prefix_arg(text: str) -> str:
    try:
        check_name(text + "1")
    except CredentialError:
        raise argparse.ArgumentTypeError(f"{text!r}: a node name's start (a-z, 0-9, '-', "
                                         "a letter first)") from None
    return text


@command("cluster", "cluster", "a cluster of nodes on this machine: up builds it from "
         "network namespaces, down removes it; partition, heal and set shape its links",
         arg("action", choices=ACTIONS,
             help="up (as root), down, status, partition NAME..., heal [NAME...], "
                  "set [NAME...] --delay-ms/--jitter-ms/--loss"),
         arg("names", nargs="*", metavar="NAME",
             help="partition, heal, set: the nodes (heal, set: default every node)"),
         arg("--nodes", type=_nodes_arg, default=2, metavar="N",
             help="up: how many nodes"),
         arg("--prefix", type=_prefix_arg, default="n",
             help="up: the nodes are named PREFIX1..PREFIXN"),
         arg("--sim-gpus", type=sim_gpus, default="2x8GiB", metavar="NxSIZE",
             help="up: the simulated GPUs each node reports"),
         arg("--delay-ms", type=_ms_arg, metavar="MS",
             help="up, set: added delay each way, per link (up: 0)"),
         arg("--jitter-ms", type=_ms_arg, metavar="MS",
             help="up, set: plus a random 0..MS each way (up: 0)"),
         arg("--loss", type=_loss_arg, metavar="P",
             help="up, set: chance a chunk is lost, as TCP sees it: held back 200 ms, "
                  "with what follows it (up: 0)"),
         arg("--timeout", type=seconds, metavar="S",
             help=f"up: seconds to wait for every node to join (default {UP_TIMEOUT_S:g}); "
                  f"down: for each process to stop before SIGKILL (default "
                  f"{DOWN_TIMEOUT_S:g})"),
         syscalls=("nodes", "node_ctl"), json_keys=CLUSTER_JSON,
         view=lambda r, s, a: _lines(r, s, a), scope="cli",
         details="The network is Linux's (ip netns, veth, a bridge), so up and down "
                 "need root; where ip netns add is refused, up says so and leaves "
                 "nothing behind. The head kernel is started with --listen on the "
                 "bridge's address unless one runs on this home. Each node reaches the "
                 "head through its own port of a user-space proxy, where delay, loss and "
                 "partitions are made. HOME/cluster.json records what up made; down "
                 "removes exactly that, the head too if up started it. See "
                 "docs/cluster.md.")
def cluster(s: Session, a: argparse.Namespace) -> Any:
    if os.environ.get("LLMOS_CREDENTIAL"):
        raise CliError("llmos: EINVAL: cluster: works on a local home only; unset "
                       "LLMOS_CREDENTIAL")
    if a.names and a.action in ("up", "down", "status"):
        raise UsageError(f"cluster {a.action} takes no node names")
    if a.action != "up":
        for flag in ("delay_ms", "jitter_ms", "loss") if a.action != "set" else ():
            if getattr(a, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for cluster up and set")
    if a.action == "up":
        return _up(s, a)
    if a.action == "down":
        return _down(s.home, DOWN_TIMEOUT_S if a.timeout is None else a.timeout)
    if a.action == "partition" and not a.names:
        raise UsageError("cluster partition: name the node(s) to cut off")
    settings: dict[str, Any] = {"partitioned": a.action == "partition"}
    if a.action == "set":
        settings = {k: getattr(a, k) for k in ("delay_ms", "jitter_ms", "loss")
                    if getattr(a, k) is not None}
        if not settings:
            raise UsageError("cluster set: give --delay-ms, --jitter-ms or --loss")
    rec = _load(s.home)
    if rec is None:
        raise CliError(f"llmos: ENOENT: cluster {a.action}: no cluster on {s.home.root} "
                       "(llmos cluster up makes one)")
    if a.action == "status":
        return _describe(s.home, rec)
    names = a.names or None
    known = [n["name"] for n in rec["nodes"]]
    for name in a.names:
        if name not in known:
            raise CliError(f"llmos: ENOENT: cluster {a.action}: no node {name!r} in the "
                           f"cluster ({', '.join(known) or 'none'})")
    return {"links": _proxy(rec, {"op": "set", "links": names, **settings})["links"]}


# -- the record ----------------------------------------------------------------------

def _record_path(home: Home) -> Path:
    return home.root / RECORD


def _load(home: Home) -> dict[str, Any] | None:
    try:
        rec = json.loads(_record_path(home).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CliError(f"llmos: EIO: cannot read {_record_path(home)}: {e}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("nodes"), list):
        raise CliError(f"llmos: EIO: {_record_path(home)} is not a cluster's record")
    return rec


def _save(home: Home, rec: dict[str, Any]) -> None:
    path = _record_path(home)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _control(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """The proxy's answer to request (OSError when none answers). Imported here: the
    proxy's module loads asyncio, which no other llmos command should pay for."""
    from ._netproxy import control
    return control(path, request)


# -- ip ----------------------------------------------------------------------------------

class IpError(Exception):
    def __init__(self, argv: list[str], text: str) -> None:
        super().__init__(text)
        self.argv, self.text = argv, text

    def line(self, action: str) -> str:
        low = self.text.lower()
        name = ("EPERM" if "not permitted" in low else "EACCES" if "permission denied" in low
                else "EEXIST" if "exists" in low else "EIO")
        why = (": it needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
               if name in ("EPERM", "EACCES") else "")
        return f"{name}: cluster {action}: `{' '.join(self.argv)}` failed ({self.text}){why}"


def _ip(*args: str) -> str:
    argv = ["ip", *args]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise CliError("llmos: ENOENT: cluster: the ip command (iproute2) is not "
                       "installed") from None
    if r.returncode:
        raise IpError(argv, " ".join(r.stderr.split()) or f"exit status {r.returncode}")
    return r.stdout


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _used_networks() -> list[Any]:
    """Every IPv4 network this namespace has an address or a route in."""
    import ipaddress
    nets = []
    for line in _ip("-o", "-4", "addr", "show").splitlines():
        m = re.search(r"\binet (\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        word = line.split(" ", 1)[0]
        if word[:1].isdigit():
            try:
                nets.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    return nets


def _free_tags() -> list[int]:
    import ipaddress
    used = _used_networks()
    taken = set()
    try:
        for ns in os.listdir("/run/netns"):
            m = re.match(r"llmos-(\d+)-", ns)
            if m:
                taken.add(int(m.group(1)))
    except FileNotFoundError:
        pass
    return [t for t in range(1, 255) if t not in taken
            and not _link_exists(f"llmosbr{t}")
            and not any(n.overlaps(ipaddress.ip_network(NET.format(t))) for n in used)]


# -- processes ---------------------------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """pid runs (reaped when it is our zombie; a zombie of another is gone too)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _ours(pid: Any, *marks: str) -> bool:
    """pid is a live process whose command line holds every mark (so a recorded pid
    that now names someone else's process is never signalled)."""
    if type(pid) is not int or pid <= 1 or not _alive(pid):
        return False
    words = _cmdline(pid)
    return all(any(m in w for w in words) for m in marks)


def _stop_pids(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM each, wait up to timeout, SIGKILL each one left (and its process
    group, which it leads); the pids that still run after that."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(POLL_S)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(_alive(p) for p in left):
        time.sleep(POLL_S)
    return [p for p in left if _alive(p)]


# -- up ------------------------------------------------------------------------------------

def _up(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    import shutil
    home = s.home
    kctl.prepare_home(home)
    try:
        control = home.socket("proxy").removeprefix("ipc://")
    except ValueError as e:
        raise CliError(f"llmos: ENAMETOOLONG: {e}") from None
    rec = _load(home)
    if rec is not None:
        raise CliError(f"llmos: EEXIST: cluster up: a cluster is up on {home.root} "
                       f"already ({len(rec['nodes'])} nodes; llmos cluster status shows "
                       "it, llmos cluster down removes it)")
    if shutil.which("ip") is None:
        raise CliError("llmos: ENOENT: cluster up: the ip command (iproute2) is not "
                       "installed")
    names = [f"{a.prefix}{i}" for i in range(1, a.nodes + 1)]
    for name in names:
        try:
            check_name(name)
        except CredentialError as e:
            raise UsageError(f"cluster up: --prefix {a.prefix!r}: {e}") from None
    kernel = kctl.running_kernel(home)
    if kernel is not None and _endpoint(home) is None:
        raise CliError(f"llmos: EINVAL: cluster up: the kernel on {home.root} (pid {kernel}) "
                       "does not listen on TCP; stop it (llmos stop) and cluster up starts "
                       "one that does, or start it with --listen HOST:PORT")
    work = home.root / WORKDIR
    if work.exists():  # what a cluster down that could not finish left: ours to reuse
        shutil.rmtree(work, ignore_errors=True)
    link = {"delay_ms": a.delay_ms or 0.0, "jitter_ms": a.jitter_ms or 0.0,
            "loss": a.loss or 0.0}
    rec = {"home": str(home.root), "created": time.time(), "dir": str(work), "tag": None,
           "namespaces": [], "links": [], "bridge": None, "proxy": None,
           "head": {"started": False, "pid": kernel}, "keys": [], "nodes": []}
    timeout = UP_TIMEOUT_S if a.timeout is None else a.timeout
    try:
        _save(home, rec)
        _claim(home, rec, names)
        _network(home, rec, names)
        _head(home, rec)
        _start_proxy(home, rec, names, control, link)
        _agents(home, rec, names, a.sim_gpus)
        _wait_joined(home, rec, timeout)
    except BaseException as e:
        done = _teardown(home, rec, DOWN_TIMEOUT_S)
        if isinstance(e, IpError):
            msg = f"llmos: {e.line('up')}"
        elif isinstance(e, CliError):
            msg = str(e)
        elif isinstance(e, OSError):
            msg = f"llmos: {os_error(e)} (cluster up)"
        else:
            raise
        if done["left"]:
            msg += ("\nllmos: and could not remove: " + "; ".join(done["left"]) +
                    " (llmos cluster down tries again)")
        raise CliError(msg) from None
    return _describe(home, rec)


def _claim(home: Home, rec: dict[str, Any], names: list[str]) -> None:
    """A free subnet and tag, claimed by making the first node's namespace (an ip netns
    add refused for want of privilege fails here, before anything else is made)."""
    for tag in _free_tags():
        ns = f"llmos-{tag}-{names[0]}"
        rec["tag"] = tag
        rec["namespaces"] = [ns]
        _save(home, rec)
        try:
            _ip("netns", "add", ns)
            return
        except IpError as e:
            rec["namespaces"] = []
            if "exists" in e.text.lower():
                continue  # another cluster took it meanwhile
            raise
    raise CliError("llmos: EADDRINUSE: cluster up: no free subnet 10.213.T.0/24 (T 1-254) "
                   "is left for a cluster")


def _network(home: Home, rec: dict[str, Any], names: list[str]) -> None:
    import ipaddress
    tag = rec["tag"]
    net = ipaddress.ip_network(NET.format(tag))
    bridge, gateway = f"llmosbr{tag}", str(net.network_address + 1)
    rec.update(bridge=bridge, subnet=str(net), address=gateway)
    _save(home, rec)
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{gateway}/{net.prefixlen}", "dev", bridge)
    _ip("link", "set", bridge, "up")
    work = Path(rec["dir"])
    for i, name in enumerate(names, 1):
        ns, veth, peer = f"llmos-{tag}-{name}", f"llmos{tag}v{i}", f"llmos{tag}p{i}"
        addr = str(net.network_address + 1 + i)
        node_home = work / name
        rec["nodes"].append({"name": name, "netns": ns, "veth": veth, "address": addr,
                             "home": str(node_home), "token": str(work / f"{name}.node.json"),
                             "state_file": str(node_home / "run" / "agent.json"),
                             "log": str(node_home / "log" / "agent.log"),
                             "endpoint": None, "agent_pid": None})
        if ns not in rec["namespaces"]:
            rec["namespaces"].append(ns)
        rec["links"].append(veth)
        _save(home, rec)
        if i > 1:
            _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns)
        _ip("-n", ns, "link", "set", peer, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "set", veth, "master", bridge)
        _ip("link", "set", veth, "up")


def _endpoint(home: Home) -> str | None:
    try:
        return (home.run / "endpoint").read_text().strip() or None
    except OSError:
        return None


def _head(home: Home, rec: dict[str, Any]) -> None:
    """The kernel: the one running (which listens on TCP), or one started here."""
    if kctl.running_kernel(home) is not None:
        rec["head"] = {"started": False, "pid": kctl.running_kernel(home),
                       "endpoint": _endpoint(home)}
        _save(home, rec)
        if rec["head"]["endpoint"] is None:
            raise CliError(f"llmos: EINVAL: cluster up: the kernel on {home.root} does not "
                           "listen on TCP (llmos start --listen HOST:PORT)")
        return
    rec["head"] = {"started": True, "pid": None, "endpoint": None}
    _save(home, rec)
    offset = kctl.log_sizes(home).get(home.kernel_log, 0)
    with open(home.kernel_log, "ab") as out:  # as llmos start does, the pid known at once
        kernel = subprocess.Popen(kctl.kernel_argv(home, listen=f"{rec['address']}:0"),
                                  env=kctl.kernel_env(home), cwd=home.root,
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    rec["head"]["pid"] = kernel.pid
    _save(home, rec)
    deadline = time.monotonic() + kctl.START_TIMEOUT_S
    watch = kctl.DriverWatch(home, kernel.pid)
    try:
        while True:
            drivers = watch.drivers(deadline)
            if drivers is not None and all(d["state"] == "ready" for d in drivers):
                break
            if kernel.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {kernel.returncode}" if kernel.returncode
                       is not None else f"is not ready after {kctl.START_TIMEOUT_S:g} s")
                raise CliError(f"llmos: EIO: cluster up: the head kernel {why} "
                               f"({home.kernel_log}):\n"
                               f"{kctl.log_tail(home.kernel_log, offset)}")
            time.sleep(POLL_S)
    finally:
        watch.close()
    rec["head"]["endpoint"] = _endpoint(home)
    _save(home, rec)
    if rec["head"]["endpoint"] is None:
        raise CliError(f"llmos: EIO: cluster up: the head kernel started but wrote no TCP "
                       f"endpoint in {home.run / 'endpoint'}")


def _upstream(endpoint: str) -> str:
    """Where the proxy reaches the kernel: its endpoint, a wildcard one on loopback."""
    hostport = endpoint.removeprefix("tcp://")
    host, _, port = hostport.rpartition(":")
    if host in ("0.0.0.0", "*", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def _start_proxy(home: Home, rec: dict[str, Any], names: list[str], control: str,
                 link: dict[str, float]) -> None:
    work = Path(rec["dir"])
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = work / "proxy.log"
    argv = [sys.executable, "-m", "userland._netproxy", "--control", control,
            "--upstream", _upstream(rec["head"]["endpoint"]), "--host", rec["address"],
            "--delay-ms", str(link["delay_ms"]), "--jitter-ms", str(link["jitter_ms"]),
            "--loss", str(link["loss"]), *[w for n in names for w in ("--link", n)]]
    with open(log, "ab") as out:
        proxy = subprocess.Popen(argv, env=kctl.kernel_env(home), cwd=home.root,
                                 stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    rec["proxy"] = {"pid": proxy.pid, "control": control, "log": str(log)}
    _save(home, rec)
    deadline = time.monotonic() + 10
    while True:
        if proxy.poll() is not None:
            raise CliError(f"llmos: EIO: cluster up: the proxy exited ({proxy.returncode}):\n"
                           f"{kctl.log_tail(log)}")
        try:
            links = _control(control, {"op": "status"})["links"]
            break
        except OSError:
            if time.monotonic() > deadline:
                raise CliError(f"llmos: ETIMEDOUT: cluster up: the proxy (pid {proxy.pid}) did not "
                               f"answer on {control}:\n{kctl.log_tail(log)}") from None
            time.sleep(POLL_S)
    for node in rec["nodes"]:
        node["endpoint"] = f"tcp://{links[node['name']]['listen']}"
    _save(home, rec)


def _agents(home: Home, rec: dict[str, Any], names: list[str], sim_gpus: str) -> None:
    ring = Keyring(home.root)
    for node in rec["nodes"]:
        name, node_home = node["name"], Path(node["home"])
        rec["keys"].append(name)
        _save(home, rec)
        try:
            cred = ring.issue("node", name, node["endpoint"])
        except CredentialError as e:
            rec["keys"].remove(name)  # not ours to revoke
            _save(home, rec)
            raise CliError(f"llmos: EEXIST: cluster up: {e}") from None
        write_credential(Path(node["token"]), cred)
        for d in (node_home, node_home / "run", node_home / "log"):
            d.mkdir(mode=0o700, exist_ok=True)
        argv = ["ip", "netns", "exec", node["netns"], sys.executable, "-m", "kernel.agent",
                "--token", node["token"], "--home", str(node_home), "--sim-gpus", sim_gpus,
                "--state", node["state_file"]]
        with open(node["log"], "ab") as out:
            agent = subprocess.Popen(argv, env=kctl.kernel_env(Home(node_home)),
                                     cwd=node_home, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        node["agent_pid"] = agent.pid  # ip netns exec execs the agent: the same pid
        _save(home, rec)


def _wait_joined(home: Home, rec: dict[str, Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(rec["nodes"])
    while waiting:
        for node in list(waiting):
            try:
                state = json.loads(Path(node["state_file"]).read_text())
                node["epoch"] = state["epoch"]
                waiting.remove(node)
                continue
            except (OSError, ValueError, KeyError):
                pass
            if not _alive(node["agent_pid"]):
                raise CliError(f"llmos: EIO: cluster up: node {node['name']}'s agent exited "
                               f"({node['log']}):\n{kctl.log_tail(Path(node['log']))}")
        if waiting and time.monotonic() > deadline:
            node = waiting[0]
            raise CliError(f"llmos: ETIMEDOUT: cluster up: node {node['name']} did not join "
                           f"in {timeout:g} s ({node['log']}):\n"
                           f"{kctl.log_tail(Path(node['log']))}")
        time.sleep(POLL_S)
    _save(home, rec)


# -- status ------------------------------------------------------------------------------

def _proxy(rec: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    proxy = rec.get("proxy") or {}
    try:
        reply = _control(proxy["control"], request)
    except (OSError, KeyError):
        raise CliError(f"llmos: ECONNREFUSED: cluster: the proxy (pid {proxy.get('pid')}) "
                       "does not answer (llmos cluster down, then up, makes the cluster "
                       "again)") from None
    if not reply.get("ok"):
        raise CliError(f"llmos: EINVAL: cluster: {reply.get('error')}")
    return reply


def _kernel_nodes(home: Home) -> dict[str, dict[str, Any]]:
    """The kernel's node records by name ({} when it does not run)."""
    if kctl.running_kernel(home) is None:
        return {}
    from syscalls.client import connect
    try:
        osh = connect(home.root, uid=0, heartbeat=False, timeout=call_timeout(),
                      argv=["llmos", "cluster"])
        try:
            return {n["name"]: n for n in osh.nodes()}
        finally:
            osh.close()
    except SyscallError:
        return {}


def _describe(home: Home, rec: dict[str, Any]) -> dict[str, Any]:
    try:
        links = _proxy(rec, {"op": "status"})["links"]
    except CliError:
        links = {}
    known = _kernel_nodes(home)
    nodes = []
    for n in rec["nodes"]:
        k = known.get(n["name"], {})
        nodes.append({"name": n["name"], "netns": n["netns"], "address": n["address"],
                      "endpoint": n["endpoint"], "agent_pid": n["agent_pid"],
                      "home": n["home"], "state": k.get("state", "unknown"),
                      "epoch": k.get("epoch"), "link": links.get(n["name"])})
    return {"home": rec["home"], "tag": rec["tag"], "subnet": rec.get("subnet"),
            "bridge": rec["bridge"],
            "head": {**rec["head"], "running": kctl.running_kernel(home) is not None},
            "proxy": {k: (rec.get("proxy") or {}).get(k) for k in ("pid", "control")},
            "nodes": nodes}


def _link_text(link: dict[str, Any] | None) -> str:
    if link is None:
        return "proxy down"
    if link["partitioned"]:
        return "partitioned"
    parts = [f"+{link['delay_ms']:g}ms" if link["delay_ms"] else "",
             f"~{link['jitter_ms']:g}ms" if link["jitter_ms"] else "",
             f"loss {link['loss']:.3g}" if link["loss"] else ""]
    return " ".join(p for p in parts if p) or "clean"


def _lines(r: dict[str, Any], s: Session, a: argparse.Namespace) -> list[str]:
    if a.action == "down":
        if not r["found"]:
            return [f"no cluster on {s.home.root}"]
        return [f"cluster on {s.home.root} removed:", *_views.indented(r["removed"])]
    if "links" in r:
        return _views.table(["NODE", "LINK", "DELAY", "JITTER", "LOSS", "CONNS",
                             "BYTES UP", "BYTES DOWN"],
                            [[n, "partitioned" if k["partitioned"] else "open",
                              f"{k['delay_ms']:g}ms", f"{k['jitter_ms']:g}ms",
                              f"{k['loss']:g}", k["connections"], k["bytes_up"],
                              k["bytes_down"]] for n, k in r["links"].items()], "llrrrrrr")
    head = r["head"]
    lines = [f"cluster on {r['home']}: {len(r['nodes'])} nodes on {r['subnet']} (bridge "
             f"{r['bridge']}); head kernel pid {head['pid']} "
             f"({'started by cluster up' if head['started'] else 'already running'}), "
             + (f"listening on {head['endpoint']}" if head["running"] else "NOT RUNNING "
                "(the nodes cannot join; llmos cluster down, then up)")]
    lines += _views.table(["NODE", "STATE", "EPOCH", "NAMESPACE", "ADDRESS", "VIA PROXY",
                           "LINK", "AGENT PID"],
                          [[n["name"], n["state"], n["epoch"], n["netns"], n["address"],
                            n["endpoint"], _link_text(n["link"]), n["agent_pid"]]
                           for n in r["nodes"]], "llrlllll")
    if a.action == "up":
        lines.append("llmos cluster partition|heal|set shape the links; llmos cluster "
                     "down removes it all")
    return lines


# -- down --------------------------------------------------------------------------------

def _down(home: Home, timeout: float) -> dict[str, Any]:
    rec = _load(home)
    if rec is None:
        return {"found": False, "removed": [], "left": []}
    done = {"found": True, **_teardown(home, rec, timeout)}
    if done["left"]:
        raise CliError("llmos: EBUSY: cluster down: could not remove: " + "; ".join(done["left"]) +
                       f" (what is left stays in {_record_path(home)}; run cluster down "
                       "again)")
    return done


def _teardown(home: Home, rec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Remove everything rec names, each step on its own (a failure does not stop the
    next); the record goes when nothing is left, else it keeps what is."""
    removed: list[str] = []
    left: list[str] = []
    nodes = rec.get("nodes", [])
    # the nodes: removed from the kernel (its agents told to stop), keys revoked
    keys = list(rec.get("keys", []))
    if keys:
        kept = _remove_nodes(home, keys, left)
        removed += [f"node {n}" for n in keys if n not in kept]
        rec["keys"] = kept
    # the agents, then anything else still inside a namespace, then the proxy
    agents = [n["agent_pid"] for n in nodes
              if _ours(n.get("agent_pid"), "kernel.agent", n.get("token", "?"))]
    stuck = _stop_pids(agents, timeout) if agents else []
    removed += [f"agent {p}" for p in agents if p not in stuck]
    left += [f"agent {p}" for p in stuck]
    proxy = rec.get("proxy") or {}
    if _ours(proxy.get("pid"), "userland._netproxy", proxy.get("control", "?")):
        if _stop_pids([proxy["pid"]], timeout):
            left.append(f"proxy {proxy['pid']}")
        else:
            removed.append(f"proxy {proxy['pid']}")
    # the head, if up started it (and it is still that kernel)
    head = rec.get("head") or {}
    if head.get("started") and _ours(head.get("pid"), "kernel", str(home.root),
                                     f"{rec.get('address')}:0"):
        try:
            kctl.stop(head["pid"], timeout)
            removed.append(f"head kernel {head['pid']}")
        except CliError as e:
            left.append(f"head kernel {head['pid']} ({e})")
    # the network
    for ns in list(rec.get("namespaces", [])):
        if not _netns_exists(ns):
            continue
        try:
            pids = [int(p) for p in _ip("netns", "pids", ns).split()]
            if pids:
                _stop_pids(pids, 1.0)
                removed += [f"process {p} in {ns}" for p in pids]
            _ip("netns", "del", ns)
            removed.append(f"netns {ns}")
        except IpError as e:
            left.append(f"netns {ns} ({e.text})")
    for dev in [*rec.get("links", []), *([rec["bridge"]] if rec.get("bridge") else [])]:
        if not _link_exists(dev):
            continue  # a veth goes with its namespace
        try:
            _ip("link", "del", dev)
        except IpError as e:
            if _link_exists(dev):  # else: it went with its namespace meanwhile
                left.append(f"link {dev} ({e.text})")
                continue
        removed.append(f"{'bridge' if dev == rec.get('bridge') else 'link'} {dev}")
    if left:
        rec["left"] = left
        try:
            _save(home, rec)
        except OSError:
            pass
        return {"removed": removed, "left": left}
    import shutil
    shutil.rmtree(rec.get("dir") or home.root / WORKDIR, ignore_errors=True)
    _record_path(home).unlink(missing_ok=True)
    return {"removed": removed, "left": left}


def _remove_nodes(home: Home, names: list[str], left: list[str]) -> list[str]:
    """Remove each node from the running kernel (its processes end, its agent is told
    to stop, its key is revoked), or revoke its key when the kernel is not running
    or never knew it; the names whose key could not be revoked."""
    osh = None
    if kctl.running_kernel(home) is not None:
        from syscalls.client import connect
        try:
            osh = connect(home.root, uid=0, heartbeat=False, timeout=call_timeout(),
                          argv=["llmos", "cluster", "down"])
        except SyscallError:
            osh = None
    kept = []
    try:
        for name in names:
            if osh is not None:
                try:
                    osh.node_ctl(name, "remove")
                    continue
                except SyscallError:  # never joined (ENOENT), or the kernel is going
                    pass
            try:
                Keyring(home.root).revoke(name, "node")
            except (OSError, CredentialError) as e:
                left.append(f"key of node {name} ({e})")
                kept.append(name)
    finally:
        if osh is not None:
            try:
                osh.close()
            except SyscallError:
                pass
    return kept
