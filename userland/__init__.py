"""userland: the library llmos programs use to make syscalls (llmos's libc), and
the `llmos` command and shell.

    import userland
    with userland.connect() as osh:
        print(osh.getpid(), osh.ps())

Every syscall is a method of the handle, named after it; a failing one raises
SyscallError, whose .errno is an Errno (ENOENT, EPERM, ...) and .message says
why, and which is an instance of its errno's family, so a program can catch
`userland.NotFound` (ENOENT, ESRCH, ECHILD), `userland.PermissionDenied` (EACCES,
EPERM) and the others (syscalls/_errno.py draws the tree). The library itself is
syscalls.client (drivers use it too); this package adds the `llmos` command and
the shell (the command table, _command.py) and the example programs.
"""
from syscalls import (AlreadyExists, Busy, Cancelled, ConnectionLost, Errno,
                      InvalidArgument, NotFound, OutOfResources, PermissionDenied,
                      SyscallError, TimedOut)
from syscalls.client import Llmos, apply_gpu_limits, connect, gpu_env

__all__ = ["AlreadyExists", "Busy", "Cancelled", "ConnectionLost", "Errno",
           "InvalidArgument", "Llmos", "NotFound", "OutOfResources", "PermissionDenied",
           "SyscallError", "TimedOut", "apply_gpu_limits", "connect", "gpu_env"]
