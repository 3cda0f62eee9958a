"""Who may connect over TCP: the kernel's CURVE keypair, the public keys it accepts,
and the credential files that carry a key to a node or a remote client.

Everything lives in LLMOS_HOME/keys (mode 0700), written by the llmos command on the
head (`llmos access new`, `llmos node token`) and read by the kernel, which reloads
keys/registry.json when it changes: a key added is accepted, and a key revoked is
refused, from the next message on (docs/scaling.md).

    keys/kernel.json     the kernel's keypair (its public half is in every credential)
    keys/registry.json   {public key: {name, kind: node|client, uid, revoked, added}}

A credential file (mode 0600) is what `llmos node join --token FILE` and a remote
client (LLMOS_CREDENTIAL=FILE) need: the endpoint, the kernel's public key, and
the holder's own keypair. Whoever holds it is that node or that client, so it is
handed over like an SSH private key. Keys are z85 text, as zmq.curve_keypair()
makes them.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import zmq

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
KINDS = ("node", "client")


class CredentialError(ValueError):
    """A bad name, a name taken, a file that is not a credential."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise CredentialError(f"{name!r} is not a name: 1-32 of a-z, 0-9 and '-', a letter "
                        "first")
    return name


def _write_private(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class Keyring:
    """The keys directory of one home."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "keys"
        self.registry_path = self.dir / "registry.json"
        self.server_path = self.dir / "kernel.json"

    def _mkdir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def server_keys(self, create: bool = False) -> tuple[str, str]:
        """(public, secret) of the kernel; made on first use when create."""
        try:
            data = json.loads(self.server_path.read_text())
            return data["public"], data["secret"]
        except FileNotFoundError:
            if not create:
                raise CredentialError(f"no kernel keypair in {self.dir}: start the kernel with "
                                "--listen once, ") from None
        except (ValueError, KeyError, TypeError):
            raise CredentialError(f"{self.server_path} is not a keypair") from None
        self._mkdir()
        public, secret = (k.decode() for k in zmq.curve_keypair())
        _write_private(self.server_path, {"public": public, "secret": secret})
        return public, secret

    def load(self) -> dict[str, dict[str, Any]]:
        """{public key: entry}; {} when there is none."""
        try:
            data = json.loads(self.registry_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise CredentialError(f"{self.registry_path}: {e}") from None
        if not isinstance(data, dict):
            raise CredentialError(f"{self.registry_path} is not a map of keys")
        return data

    def mtime(self) -> float:
        try:
            return self.registry_path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _save(self, reg: dict[str, dict[str, Any]]) -> None:
        self._mkdir()
        _write_private(self.registry_path, reg)

    def issue(self, kind: str, name: str, endpoint: str, uid: int | None = None) -> dict:
        """A new keypair for node or client `name`, registered; the credential to hand
        over. CredentialError when the name is taken by a key not revoked."""
        assert kind in KINDS
        check_name(name)
        reg = self.load()
        for entry in reg.values():  # one name, one live key, whatever its kind
            if entry["name"] == name and not entry.get("revoked"):
                raise CredentialError(f"{entry['kind']} {name} has a key already (llmos "
                                      "access revoke, or llmos node remove, first)")
        server_public, _ = self.server_keys(create=True)
        public, secret = (k.decode() for k in zmq.curve_keypair())
        reg[public] = {"name": name, "kind": kind, "uid": uid, "revoked": False,
                       "added": time.time()}
        self._save(reg)
        return {"llmos": "credential", "kind": kind, "name": name, "endpoint": endpoint,
                "server_key": server_public, "public": public, "secret": secret,
                "uid": uid}

    def revoke(self, name: str, kind: str | None = None) -> int:
        """Revoke every live key of name (of kind, if given); how many."""
        reg = self.load()
        n = 0
        for entry in reg.values():
            if entry["name"] == name and not entry.get("revoked") and (
                    kind is None or entry["kind"] == kind):
                entry["revoked"] = True
                entry["revoked_at"] = time.time()
                n += 1
        if n:
            self._save(reg)
        return n


def write_credential(path: Path, cred: dict) -> None:
    _write_private(path, cred)


def read_credential(path: str | os.PathLike) -> dict[str, Any]:
    """A credential file, checked; CredentialError saying what is wrong."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise CredentialError(f"cannot read credential {p}: {e.strerror}") from None
    except ValueError:
        raise CredentialError(f"{p} is not an llmos credential (not JSON)") from None
    need = ("kind", "name", "endpoint", "server_key", "public", "secret")
    if not isinstance(data, dict) or data.get("llmos") != "credential" or not all(
            isinstance(data.get(k), str) for k in need) or data["kind"] not in KINDS:
        raise CredentialError(f"{p} is not an llmos credential")
    return data


def curve_client(sock: zmq.Socket, cred: dict[str, Any]) -> None:
    """Make sock a CURVE client with cred's keys (before it connects)."""
    sock.curve_serverkey = cred["server_key"].encode()
    sock.curve_publickey = cred["public"].encode()
    sock.curve_secretkey = cred["secret"].encode()
