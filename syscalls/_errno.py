"""The errno enum shared by the kernel, the drivers and userland.

Values are Linux's, so an errno reads the same here as in strace. On the wire an
errno travels as a plain int; anything else that knows the number knows the name.
"""
from __future__ import annotations

from enum import IntEnum


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
    EMSGSIZE = 90
    ETIMEDOUT = 110
    ECANCELED = 125
    EDQUOT = 122


class SyscallError(Exception):
    """A syscall failed: `errno` says how, `message` says why, for a person.

    Raised by handlers in the kernel and in drivers (and turned into an error
    reply), and raised again in userland when that reply arrives.
    """

    def __init__(self, errno: Errno | int, message: str = "") -> None:
        try:
            self.errno = Errno(errno)
        except ValueError:
            self.errno = Errno.EIO
            message = f"unknown errno {errno}: {message}"
        self.message = message or self.errno.name
        super().__init__(f"{self.errno.name}: {self.message}")

    def __reduce__(self):  # keep it picklable for multiprocessing users
        return (SyscallError, (int(self.errno), self.message))
