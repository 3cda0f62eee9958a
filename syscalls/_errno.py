"""The errno enum shared by the kernel, the drivers and userland, and the errors
that carry one.

Values are Linux's, so an errno reads the same here as in strace. On the wire an
errno travels as a plain int; anything else that knows the number knows the name.

SyscallError is the one exception a failed syscall raises. As Python's OSError
does with FileNotFoundError, constructing it with an errno gives the subclass
of that errno's family, so a program can catch a family:

    SyscallError                 every failure: .errno (an Errno) and .message
     +-- NotFound                ENOENT, ESRCH, ECHILD
     +-- PermissionDenied        EACCES, EPERM
     +-- AlreadyExists           EEXIST
     +-- InvalidArgument         EINVAL, E2BIG, ENAMETOOLONG, EMSGSIZE
     +-- OutOfResources          ENOMEM, ENOSPC, EDQUOT, EFBIG, EMFILE
     +-- Busy                    EAGAIN, EBUSY (try again later)
     +-- TimedOut                ETIMEDOUT
     +-- Cancelled               ECANCELED
     +-- ConnectionLost          ECONNRESET, ENOTCONN (the kernel restarted or
                                 does not know this connection)

Any other errno (EIO, EBADF, ENOSYS, ENOTDIR, EISDIR, ENOTEMPTY, EPROTO, ENOTSUP,
EHOSTDOWN: the node is lost) is a plain SyscallError.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any


class Errno(IntEnum):
    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    EIO = 5
    E2BIG = 7
    EBADF = 9
    ECHILD = 10
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EBUSY = 16
    EEXIST = 17
    ENOTDIR = 20
    EISDIR = 21
    EINVAL = 22
    EMFILE = 24
    EFBIG = 27
    ENOSPC = 28
    ENAMETOOLONG = 36
    ENOSYS = 38
    ENOTEMPTY = 39
    EPROTO = 71
    ENOTSUP = 95
    EMSGSIZE = 90
    ECONNRESET = 104
    EHOSTDOWN = 112
    ENOTCONN = 107
    ETIMEDOUT = 110
    ECANCELED = 125
    EDQUOT = 122


class SyscallError(Exception):
    """A syscall failed: `errno` says how, `message` says why, for a person.

    Raised by handlers in the kernel and in drivers (and turned into an error
    reply), and raised again in userland when that reply arrives.
    SyscallError(errno, message) is an instance of errno's family (the module's
    docstring draws the tree)."""

    errno: Errno
    message: str

    def __new__(cls, errno: Errno | int = Errno.EIO, message: str = "") -> "SyscallError":
        if cls is SyscallError:
            cls = _FAMILY.get(int(errno) if type(errno) in (int, Errno) else 0,
                              SyscallError)
        return super().__new__(cls)

    def __init__(self, errno: Errno | int = Errno.EIO, message: str = "") -> None:
        try:
            self.errno = Errno(errno)
        except ValueError:
            self.errno = Errno.EIO
            message = f"unknown errno {errno}: {message}"
        self.message = message or self.errno.name
        super().__init__(f"{self.errno.name}: {self.message}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, for multiprocessing users
        return (SyscallError, (int(self.errno), self.message))


class NotFound(SyscallError):
    """ENOENT, ESRCH, ECHILD: no such tensor, directory, process or child."""


class PermissionDenied(SyscallError):
    """EACCES, EPERM: the caller's uid may not."""


class AlreadyExists(SyscallError):
    """EEXIST."""


class InvalidArgument(SyscallError):
    """EINVAL, E2BIG, ENAMETOOLONG, EMSGSIZE: the call itself is wrong."""


class OutOfResources(SyscallError):
    """ENOMEM, ENOSPC, EDQUOT, EFBIG, EMFILE: more than there is, or than is allowed."""


class Busy(SyscallError):
    """EAGAIN, EBUSY: not now; the same call may succeed later."""


class TimedOut(SyscallError):
    """ETIMEDOUT."""


class Cancelled(SyscallError):
    """ECANCELED: the caller gave up on the call."""


class ConnectionLost(SyscallError):
    """ECONNRESET, ENOTCONN: the kernel restarted, or does not know the connection.
    The handle's process is gone; connect() again."""


_FAMILY: dict[int, type[SyscallError]] = {
    **dict.fromkeys((Errno.ENOENT, Errno.ESRCH, Errno.ECHILD), NotFound),
    **dict.fromkeys((Errno.EACCES, Errno.EPERM), PermissionDenied),
    Errno.EEXIST: AlreadyExists,
    **dict.fromkeys((Errno.EINVAL, Errno.E2BIG, Errno.ENAMETOOLONG, Errno.EMSGSIZE),
                    InvalidArgument),
    **dict.fromkeys((Errno.ENOMEM, Errno.ENOSPC, Errno.EDQUOT, Errno.EFBIG, Errno.EMFILE),
                    OutOfResources),
    **dict.fromkeys((Errno.EAGAIN, Errno.EBUSY), Busy),
    Errno.ETIMEDOUT: TimedOut,
    Errno.ECANCELED: Cancelled,
    **dict.fromkeys((Errno.ECONNRESET, Errno.ENOTCONN), ConnectionLost),
}

ERROR_FAMILIES: tuple[type[SyscallError], ...] = tuple(dict.fromkeys(_FAMILY.values()))
