"""API keys: each one acts as an llmos uid over HTTP.

A key is printed once, when it is made (`llmos keys create --uid N`); the home keeps
only its SHA-256 (keys/api.json, mode 0600), its name, uid and a short prefix to
recognise it by. A key has 256 random bits, so a plain hash is as good as a slow one
(GitHub's tokens are stored the same way). `llmos serve` reads the file again when it
changes, so a revoked key stops working at once.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import Any

from syscalls import Errno, Home, SyscallError

from ._store import read_json, rewrite_json

PREFIX = "llmos-"


def keys_file(home: Home) -> Path:
    return home.root / "keys" / "api.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(home: Home) -> list[dict[str, Any]]:
    """Every key's record (never the key itself); [] when none was made."""
    return list((read_json(keys_file(home), "keys") or {}).get("keys", []))


def _rewrite(home: Home, change: Any) -> Any:
    return rewrite_json(keys_file(home), lambda: read_keys(home), change,
                        lambda records: {"keys": records})


def create_key(home: Home, uid: int, name: str = "") -> tuple[str, dict[str, Any]]:
    """A new key for uid: (the key, printed once; its record)."""
    if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 2**31:
        raise SyscallError(Errno.EINVAL, f"keys: uid must be 0..2^31-1, not {uid!r}")
    key = PREFIX + secrets.token_urlsafe(32)
    record = {"id": secrets.token_hex(4), "name": name or f"uid{uid}", "uid": uid,
              "prefix": key[:len(PREFIX) + 4], "sha256": _digest(key),
              "created": round(time.time(), 3)}

    def add(records: list) -> None:
        if name and any(r["name"] == name for r in records):
            raise SyscallError(Errno.EEXIST, f"keys: a key named {name!r} exists; revoke "
                               "it first or choose another name")
        records.append(record)
    _rewrite(home, add)
    return key, record


def revoke_key(home: Home, which: str) -> dict[str, Any]:
    """Remove the key whose id or name is which; its record."""
    def drop(records: list) -> dict:
        for i, r in enumerate(records):
            if which in (r["id"], r["name"]):
                return records.pop(i)
        raise SyscallError(Errno.ENOENT, f"keys: no key with id or name {which!r}")
    return _rewrite(home, drop)


class KeyRing:
    """The keys as serve sees them: re-read when the file changes (checked at most
    every `every` seconds)."""

    def __init__(self, home: Home, every: float = 0.5) -> None:
        self.home, self.every = home, every
        self._seen: tuple | None = None
        self._checked = 0.0
        self._by_digest: dict[str, dict] = {}

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.every:
            return
        self._checked = now
        try:
            st = keys_file(self.home).stat()
            sig: tuple | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if sig != self._seen:
            self._seen = sig
            self._by_digest = {r["sha256"]: r for r in read_keys(self.home)} if sig else {}

    @property
    def configured(self) -> bool:
        self.refresh()
        return bool(self._by_digest)

    def lookup(self, key: str) -> dict[str, Any] | None:
        self.refresh()
        digest = _digest(key)
        for d, record in self._by_digest.items():
            if hmac.compare_digest(d, digest):
                return record
        return None
