"""What every part of userland's commands shares: their exceptions and the
one-shot command's reply timeout. Imports nothing of userland."""
from __future__ import annotations

import errno
import math
import os

CALL_TIMEOUT_S = 10.0  # a one-shot command's wait for each reply ($LLMOS_CALL_TIMEOUT)


class UsageError(Exception):
    """Bad arguments: reported with the command's usage line, status 2."""


class ExitShell(Exception):
    """The shell's exit command."""

    def __init__(self, status: int | None = None) -> None:
        super().__init__(status)
        self.status = status


class CliError(Exception):
    """A failure reported as its message alone (no errno), with an exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def call_timeout() -> float:
    """Seconds a one-shot command waits for each reply: CALL_TIMEOUT_S or
    $LLMOS_CALL_TIMEOUT, so a stopped kernel is ETIMEDOUT, not a hang."""
    text = os.environ.get("LLMOS_CALL_TIMEOUT")
    if not text:
        return CALL_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise CliError(f"llmos: LLMOS_CALL_TIMEOUT wants seconds > 0, not {text!r}", 2)
    return value


def os_error(e: OSError) -> str:
    """One line for a local OSError: ENOTDIR: Not a directory: /etc/passwd/log."""
    name = errno.errorcode.get(e.errno or 0, "EIO")
    where = f": {e.filename}" if e.filename is not None else ""
    return f"{name}: {e.strerror or e}{where}"
