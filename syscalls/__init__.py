"""The llmos ABI: the syscall table, the errno enum and its errors, the wire
encoding, the home directory's layout and settings, and sizes as people write them.

Imported by the kernel, the drivers and userland alike; imports nothing of theirs.
The client library (`syscalls.client`) is a subpackage, not loaded by this one.
"""
from . import _wire as wire
from ._errno import (ERROR_FAMILIES, AlreadyExists, Busy, Cancelled, ConnectionLost,
                     Errno, InvalidArgument, NotFound, OutOfResources, PermissionDenied,
                     SyscallError, TimedOut)
from ._home import Home, default_home
from ._keys import (CredentialError, Keyring, check_name, curve_client, read_credential,
                    write_credential)
from ._schema import FrameRef, check_args
from ._table import (ABI_VERSION, BY_NAME, BY_NUMBER, REQUIRED, SERVICES, TABLE, TYPES,
                     Arg, Syscall)
from ._units import bounds, format_size, number, parse_sim_spec, parse_size
from ._wire import FRAME_EXT, MAX_HEADER, WireError, decode, encode, send_frames



def __getattr__(name: str) -> object:
    """Config and DEFAULTS load at first use (the dataclasses module they need
    costs an llmos command more than the rest of the ABI)."""
    if name in ("Config", "DEFAULTS"):
        from . import _config
        return getattr(_config, name)
    raise AttributeError(f"module 'syscalls' has no attribute {name!r}")


__all__ = [
    "ABI_VERSION", "AlreadyExists", "Arg", "BY_NAME", "BY_NUMBER", "Busy", "Cancelled",
    "Config", "ConnectionLost", "CredentialError", "DEFAULTS", "ERROR_FAMILIES", "Errno",
    "FRAME_EXT", "FrameRef", "Home", "InvalidArgument", "Keyring", "MAX_HEADER", "NotFound",
    "OutOfResources", "PermissionDenied", "REQUIRED", "SERVICES", "Syscall", "SyscallError",
    "TABLE", "TYPES", "TimedOut", "WireError", "bounds", "check_args", "check_name",
    "curve_client", "decode", "default_home", "encode", "format_size", "number",
    "parse_sim_spec", "parse_size", "read_credential", "send_frames", "wire",
    "write_credential",
]
