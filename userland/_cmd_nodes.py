"""The node commands: nodes, node (token, join, leave, drain, resume, remove), access
(docs/scaling.md).

A node is a host running a node agent (kernel/agent.py) joined to the head's
TCP endpoint (llmos start --listen HOST:PORT) with a node key. On the head,
`llmos node token NAME` makes that key and the token file that carries it; on the
node, `llmos node join --token FILE` starts the agent in the background. A remote
client gets its key from `llmos access new NAME --key-uid N` and uses it with
LLMOS_CREDENTIAL=FILE. The keys live in the head's LLMOS_HOME/keys; the kernel
reads them again when they change, so a key revoked is refused at once.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from syscalls import CredentialError, Keyring, check_name, read_credential, write_credential

from . import _kernelctl as kctl
from . import _views
from ._argtypes import seconds, sim_gpus, uid_arg
from ._base import os_error
from ._command import CliError, Session, UsageError, arg, command, shows

NODES_JSON = ("[{name, state, epoch, head, joined_at, heartbeat_age_s, lost_at, processes, "
              "host, cpus, memory, gpus}]")
JOIN_TIMEOUT_S = 15.0

shows("nodes", "nodes", "the nodes: the head and every node agent joined over TCP, their "
      "state, heartbeat age and resources", lambda nodes, s: _views.nodes_lines(nodes),
      NODES_JSON, details="STATE is ready, draining (no new processes) or lost (silent "
      "for node_timeout_s: its processes ended with reason node lost).")


def tcp_endpoint(text: str) -> str:
    """tcp://HOST:PORT, checked (argparse's type)."""
    host, sep, port = text.removeprefix("tcp://").rpartition(":")
    if not text.startswith("tcp://") or not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not tcp://HOST:PORT")
    return text


def _endpoint(s: Session, given: str | None) -> str:
    if given:
        return given
    try:
        endpoint = (s.home.run / "endpoint").read_text().strip()
    except OSError:
        raise CliError(f"llmos: ENOENT: the kernel on {s.home.root} does not listen on TCP "
                       "(llmos start --listen HOST:PORT), and no --endpoint was given"
                       ) from None
    if endpoint.startswith(("tcp://0.0.0.0:", "tcp://[::]:")):
        raise CliError(f"llmos: EINVAL: the kernel listens on {endpoint}, every address: "
                       "say with --endpoint tcp://HOST:PORT which one the other host "
                       "reaches")
    return endpoint


def _issue(s: Session, kind: str, name: str, endpoint: str | None, uid: int | None,
           out: str | None) -> dict[str, Any]:
    try:
        check_name(name)
    except CredentialError as e:
        raise CliError(f"llmos: EINVAL: {e}") from None
    path = Path(out or f"{name}.{kind}.json").absolute()
    if path.exists():
        raise CliError(f"llmos: EEXIST: {path} exists; not overwritten")
    if kind == "node" and name == s.home.config().node_name:
        raise CliError(f"llmos: EINVAL: {name} is the head's own node name (node_name)")
    ring = Keyring(s.home.root)
    try:
        cred = ring.issue(kind, name, _endpoint(s, endpoint), uid)
    except CredentialError as e:
        raise CliError(f"llmos: EEXIST: {e}") from None
    try:
        write_credential(path, cred)
    except OSError as e:  # no key without its credential: revoked at once
        ring.revoke(name, kind)
        raise CliError(f"llmos: {os_error(e)} (the key made for it is revoked)") from None
    return {"name": name, "kind": kind, "uid": uid, "endpoint": cred["endpoint"],
            "public": cred["public"], "file": str(path)}


def _issued_lines(r: dict[str, Any], s: Session, a: argparse.Namespace) -> list[str]:
    use = (f"on the node: llmos node join --token {r['file']}" if r["kind"] == "node" else
           f"on the client: LLMOS_CREDENTIAL={r['file']} llmos ps")
    return [f"{r['kind']} {r['name']}: key {r['public'][:12]}... for {r['endpoint']}",
            f"written to {r['file']} (mode 0600: whoever holds it is {r['name']})", use]


NODE_ACTIONS = ("token", "join", "leave", "drain", "resume", "remove")


@command("node", "nodes", "make a node's join token, join this host as a node, leave, or "
         "drain, resume or remove a node",
         arg("action", choices=NODE_ACTIONS,
             help="token NAME (on the head), join [ENDPOINT] --token FILE (on the node), "
                  "leave (stop this home's agent), drain|resume|remove NAME"),
         arg("target", nargs="?", metavar="NAME|ENDPOINT",
             help="the node's name; for join, the head's tcp:// endpoint (default: the "
                  "token's)"),
         arg("--token", metavar="FILE", complete="local",
             help="join: the node's token (llmos node token NAME made it)"),
         arg("--out", metavar="FILE", complete="local",
             help="token: where to write it (default NAME.node.json)"),
         arg("--endpoint", metavar="tcp://HOST:PORT", type=tcp_endpoint,
             help="token: the endpoint nodes reach the head at (default: the one the "
                  "kernel listens on)"),
         arg("--sim-gpus", metavar="NxSIZE", default="0x1GiB", type=sim_gpus,
             help="join: simulated GPUs this node reports (default none)"),
         arg("--foreground", action="store_true",
             help="join: run the agent here, logging to the terminal, until Ctrl-C"),
         arg("--timeout", type=seconds, default=JOIN_TIMEOUT_S, metavar="S",
             help="join: seconds to wait until the node joined"),
         syscalls=("node_ctl",), json_keys="token: {name, kind, public, endpoint, file}; "
         "join: {name, epoch, pid, log}; leave: {pid}; drain|resume|remove: the node's "
         "record",
         view=lambda r, s, a: _node_lines(r, s, a), scope="cli",
         details="token and join touch files on this host (the head's keys, the node's "
                 "agent), so they exist in the CLI only; the node's LLMOS_HOME (--home) "
                 "keeps the agent's pid and log and its processes' logs.")
def node(s: Session, a: argparse.Namespace) -> Any:
    if a.action in ("token", "join", "leave"):
        kctl.local_only(f"node {a.action}")
    if a.action == "token":
        name = _need_name(a)
        return _issue(s, "node", name, a.endpoint, None, a.out)
    if a.action == "join":
        return _join(s, a)
    if a.action == "leave":
        return _leave(s)
    name = _need_name(a)
    if s.uid is None:  # the home's owner administers its nodes: as uid 0
        osh = s.connect(uid=0)
        try:
            return osh.node_ctl(name, a.action)
        finally:
            osh.close()
    return s.osh.node_ctl(name, a.action)


def _need_name(a: argparse.Namespace) -> str:
    if not a.target:
        raise UsageError(f"node {a.action}: name the node")
    try:
        return check_name(a.target)
    except CredentialError as e:
        raise UsageError(f"node {a.action}: {e}") from None


def _node_lines(r: dict[str, Any], s: Session, a: argparse.Namespace) -> list[str]:
    if a.action == "token":
        return _issued_lines(r, s, a)
    if a.action == "join":
        return [f"node {r['name']} joined (epoch {r['epoch']}; agent pid {r['pid']}, log "
                f"{r['log']})"]
    if a.action == "leave":
        return [f"node agent {r['pid']} stopped"]
    if a.action == "remove":
        return [f"node {r['name']} removed: its processes ended, its agent was told to "
                "stop, its key is revoked"]
    return _views.nodes_lines([r])


def _agent_files(s: Session) -> tuple[Path, Path, Path]:
    return s.home.run / "agent.pid", s.home.run / "agent.json", s.home.log / "agent.log"


def _join(s: Session, a: argparse.Namespace) -> dict[str, Any]:
    if not a.token:
        raise UsageError("node join: --token FILE (llmos node token NAME, on the head, "
                         "makes it)")
    try:
        cred = read_credential(a.token)
    except CredentialError as e:
        raise CliError(f"llmos: EINVAL: {e}") from None
    if cred["kind"] != "node":
        raise CliError(f"llmos: EINVAL: {a.token} is a {cred['kind']}'s credential, not a "
                       "node's (llmos node token NAME makes one)")
    endpoint = []
    if a.target:
        try:
            endpoint = ["--endpoint", tcp_endpoint(a.target)]
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"node join: {e}") from None
    kctl.prepare_home(s.home)
    pidfile, state, log = _agent_files(s)
    pid = _agent_pid(pidfile)
    if pid is not None:
        raise CliError(f"llmos: a node agent runs for {s.home.root} already (pid {pid}); "
                       "llmos node leave stops it")
    argv = [sys.executable, "-m", "kernel.agent", "--token", str(Path(a.token).absolute()),
            "--home", str(s.home.root), "--sim-gpus", a.sim_gpus,
            "--state", str(state), *endpoint]
    env = kctl.kernel_env(s.home)
    if a.foreground:
        sys.stdout.flush()
        os.execve(sys.executable, argv, env)
    state.unlink(missing_ok=True)
    with open(log, "ab") as out:
        agent = subprocess.Popen(argv, env=env, cwd=s.home.root, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    pidfile.write_text(f"{agent.pid}\n")
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            pidfile.unlink(missing_ok=True)
            raise CliError(f"llmos: the node agent exited ({agent.returncode}):\n"
                           f"{kctl.log_tail(log)}")
        try:
            joined = json.loads(state.read_text())
            return {"name": joined["name"], "epoch": joined["epoch"], "pid": agent.pid,
                    "log": str(log)}
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise CliError(f"llmos: node {cred['name']} did not join in {a.timeout:g} s (the "
                   f"agent, pid {agent.pid}, goes on trying; {log}):\n{kctl.log_tail(log)}")


def _agent_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _leave(s: Session) -> dict[str, Any]:
    pidfile, state, _ = _agent_files(s)
    pid = _agent_pid(pidfile)
    if pid is None:
        raise CliError(f"llmos: ESRCH: no node agent runs for {s.home.root}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _agent_pid(pidfile) is not None:
        try:  # our child only when join ran in this process; else poll its pid
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    state.unlink(missing_ok=True)
    return {"pid": pid}


@command("access", "nodes", "the keys the kernel accepts over TCP: list them, make a "
         "remote client's, revoke one",
         arg("action", choices=("list", "new", "revoke"), nargs="?", default="list"),
         arg("name", nargs="?", help="new, revoke: the key's name"),
         arg("--key-uid", type=uid_arg, metavar="UID",
             help="new: the uid the client's processes get (default: default_uid)"),
         arg("--out", metavar="FILE", complete="local",
             help="new: where to write the credential (default NAME.client.json)"),
         arg("--endpoint", metavar="tcp://HOST:PORT", type=tcp_endpoint,
             help="new: the endpoint the client reaches the kernel at"),
         json_keys="list: [{name, kind, uid, public, revoked, added}]; new: {name, kind, "
         "uid, public, endpoint, file}; revoke: {name, revoked}",
         view=lambda r, s, a: _access_lines(r, s, a), scope="cli",
         details="Node keys are made by llmos node token. A revoked key's handshakes "
                 "are refused and its open connections' messages dropped; the processes "
                 "it attached end (reason key revoked).")
def access(s: Session, a: argparse.Namespace) -> Any:
    kctl.local_only("access")
    ring = Keyring(s.home.root)
    if a.action == "list":
        return [{"public": k, **v} for k, v in sorted(ring.load().items(),
                                                      key=lambda kv: kv[1]["added"])]
    if not a.name:
        raise UsageError(f"access {a.action}: name the key")
    if a.action == "new":
        return _issue(s, "client", a.name, a.endpoint, a.key_uid, a.out)
    n = ring.revoke(a.name, "client")  # a node's key goes with llmos node remove
    if not n:
        raise CliError(f"llmos: ENOENT: no live client key is named {a.name!r} (a node's "
                       "key is revoked by llmos node remove)")
    return {"name": a.name, "revoked": n}


def _access_lines(r: Any, s: Session, a: argparse.Namespace) -> list[str]:
    if a.action == "new":
        return _issued_lines(r, s, a)
    if a.action == "revoke":
        return [f"revoked {r['revoked']} key(s) of {r['name']}"]
    return _views.table(["NAME", "KIND", "UID", "KEY", "STATE"], [
        [k["name"], k["kind"], k.get("uid"), k["public"][:12] + "...",
         "revoked" if k.get("revoked") else "accepted"] for k in r],
        empty="no keys: llmos node token NAME, or llmos access new NAME")
