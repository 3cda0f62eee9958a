"""The client library: how a process makes syscalls (llmos's libc).

    from syscalls.client import connect
    with connect() as osh:
        print(osh.getpid(), osh.ps())

Every syscall is a method of the handle, named after it; a failing one raises
SyscallError (of its errno's family: NotFound, PermissionDenied...), whose
.errno is an Errno (ENOENT, EPERM, ...) and .message says why. It lives beside
the ABI it speaks, so userland programs and drivers alike (a driver that makes
syscalls of its own, as a MINIX driver uses libc) reach the kernel through
syscalls/ only; `userland` re-exports it for programs. It imports nothing of
ours but syscalls, and is not imported by `import syscalls` (the kernel does
without it).
"""
from syscalls import Errno, SyscallError

from ._client import SIGNAL_NAMES, Llmos, connect, signal_name
from ._gpu import apply_gpu_limits, gpu_env
from ._hftok import bpe_tokenizer, text_pieces
from ._proc import alive, lock_held, stop_kernel, wait_gone
from ._tensors import DTYPES, PROGRESS_CHUNK, Progress, as_raw, floating

__all__ = ["DTYPES", "Errno", "Llmos", "PROGRESS_CHUNK", "Progress", "SIGNAL_NAMES",
           "SyscallError", "alive", "apply_gpu_limits", "as_raw", "bpe_tokenizer", "connect",
           "floating", "gpu_env", "lock_held", "signal_name", "stop_kernel", "text_pieces",
           "wait_gone"]
