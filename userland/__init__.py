"""userland: the library llmos programs use to make syscalls (llmos's libc).

    import userland
    with userland.connect() as osh:
        print(osh.getpid(), osh.ps())

Every syscall is a method of the handle, named after it; a failing one raises
SyscallError, whose .errno is an Errno (ENOENT, EPERM, ...) and .message says why.
The library itself is syscalls.client (drivers use it too); this package adds the
`llmos` command, the shell and the example programs.
"""
from syscalls import Errno, SyscallError
from syscalls.client import Llmos, apply_gpu_limits, connect, gpu_env

__all__ = ["Errno", "Llmos", "SyscallError", "apply_gpu_limits", "connect", "gpu_env"]
