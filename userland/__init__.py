"""userland: the library llmos programs use to make syscalls (llmos's libc).

    import userland
    with userland.connect() as osh:
        print(osh.getpid(), osh.ps())

Every syscall is a method of the handle, named after it; a failing one raises
SyscallError, whose .errno is an Errno (ENOENT, EPERM, ...) and .message says why.
"""
from syscalls import Errno, SyscallError

from ._client import Llmos, connect
from ._gpu import apply_gpu_limits, gpu_env

__all__ = ["Errno", "Llmos", "SyscallError", "apply_gpu_limits", "connect", "gpu_env"]
