"""The llmos ABI: the syscall table, the errno enum and the wire encoding.

Imported by the kernel, the drivers and userland alike; imports nothing of theirs.
"""
from ._errno import Errno, SyscallError
from ._home import DEFAULTS, Home, default_home
from ._schema import FrameRef, check_args
from ._table import (ABI_VERSION, BY_NAME, BY_NUMBER, REQUIRED, SERVICES, TABLE, TYPES,
                     Arg, Syscall)
from ._wire import FRAME_EXT, MAX_HEADER, WireError, decode, encode

__all__ = [
    "ABI_VERSION", "Arg", "BY_NAME", "BY_NUMBER", "DEFAULTS", "Errno", "FRAME_EXT",
    "FrameRef", "Home", "MAX_HEADER", "REQUIRED", "SERVICES", "Syscall", "SyscallError",
    "TABLE", "TYPES", "WireError", "check_args", "decode", "default_home", "encode",
]
