"""serve's small JSON files in the home (keys/api.json, serve/deployments.json):
read whole, changed under an exclusive lock, written whole and atomically."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable

from syscalls import Errno, SyscallError


def read_json(path: Path, what: str) -> dict[str, Any] | None:
    """The file's object; None when there is none; EIO when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SyscallError(Errno.EIO, f"{what}: {path} is unreadable: {e}") from None


def rewrite_json(path: Path, read: Callable[[], Any], change: Callable[[Any], Any],
                 dump: Callable[[Any], dict]) -> Any:
    """change(read()) under the directory's lock, then dump(it) written to path
    atomically (fsynced, renamed into place, mode 0600); change's result."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read()
        result = change(data)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dump(data), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return result
