"""Argument checking at the boundary: a request's args against its table entry.

check_args never trusts its input: any shape of value may arrive from a socket.
It returns a new dict with defaults filled in, or raises SyscallError(EINVAL).
"""
from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from ._errno import Errno, SyscallError
from ._table import MAX_STR, Arg, Syscall


class FrameRef:
    """A bytes argument carried in a raw frame; the kernel forwards the frame
    without reading it. `size` is the frame's length."""

    __slots__ = ("index", "size")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.size = size


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?) ?([A-Za-z]{0,3})")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string: "1024", "2GiB", "512 MiB", "1.5GB" (units:
    B, KB, MB, GB, TB in powers of 1000, KiB, MiB, GiB, TiB in powers of 1024,
    spelt exactly so; a fraction of a byte is dropped). Anything else, and sizes
    under one byte, raise ValueError."""
    if type(value) is int:
        n = value
    elif type(value) is str:
        m = _SIZE.fullmatch(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size such as 4096, \"512MiB\" or \"2GiB\"")
        number, unit = m.groups()
        if unit and unit not in SIZE_UNITS:
            raise ValueError(f"unknown unit {unit!r} in {value!r} (use one of "
                             f"{', '.join(SIZE_UNITS)})")
        if "." in number and not unit:
            raise ValueError(f"{value!r} is a fraction of a byte")
        n = int(Decimal(number) * SIZE_UNITS[unit or "B"])
    else:
        raise ValueError(f"a size must be an int or a str, not {type(value).__name__}")
    if n < 1:
        raise ValueError(f"a size must be at least 1 byte, got {value!r}")
    return n


def number(x: float) -> str:
    """A bound as a person reads it: 2147483648, not 2.14748e+09."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _fail(call: Syscall, arg: Arg, why: str) -> SyscallError:
    return SyscallError(Errno.EINVAL, f"{call.name}: argument {arg.name!r} {why}")


def _check_one(call: Syscall, arg: Arg, value: Any) -> Any:
    if value is None:
        if arg.nullable:
            return None
        raise _fail(call, arg, "must not be None")
    t = arg.type
    if t == "int":
        if type(value) is not int:
            raise _fail(call, arg, f"must be an int, not {type(value).__name__}")
    elif t == "float":
        if type(value) not in (int, float):
            raise _fail(call, arg, f"must be a number, not {type(value).__name__}")
        if value != value or value in (float("inf"), float("-inf")):
            raise _fail(call, arg, f"must be a finite number, not {value}")
        value = float(value)
    elif t == "bool":
        if type(value) is not bool:
            raise _fail(call, arg, f"must be a bool, not {type(value).__name__}")
    elif t == "str":
        if type(value) is not str:
            raise _fail(call, arg, f"must be a str, not {type(value).__name__}")
        if "\x00" in value:
            raise _fail(call, arg, "must not contain NUL")
    elif t == "bytes":
        if isinstance(value, FrameRef):
            size = value.size
        elif isinstance(value, (bytes, bytearray, memoryview)):
            size = len(value)
        else:
            raise _fail(call, arg, f"must be bytes, not {type(value).__name__}")
        if arg.max_len is not None and size > arg.max_len:
            raise SyscallError(Errno.E2BIG, f"{call.name}: argument {arg.name!r} is "
                               f"{size} bytes, over the limit of {arg.max_len}")
        return value
    elif t == "size":
        try:
            value = parse_size(value)
        except ValueError as e:
            raise _fail(call, arg, str(e)) from None
        if arg.lo is not None and value < arg.lo or arg.hi is not None and value > arg.hi:
            raise _fail(call, arg, f"must be between {arg.lo:g} and {arg.hi:g} bytes, "
                        f"got {value}")
        return value
    elif t == "list[str]":
        if type(value) is not list or any(type(v) is not str or "\x00" in v for v in value):
            raise _fail(call, arg, "must be a list of str without NUL")
        if any(len(v) > 65536 for v in value):
            raise _fail(call, arg, "has an item over 65536 characters")
    elif t == "list[int]":
        if type(value) is not list or any(type(v) is not int or not 0 <= v < 2**62
                                          for v in value):
            raise _fail(call, arg, "must be a list of ints from 0 to 2**62")
    elif t == "slice":
        if type(value) is not list or any(
                type(p) is not list or len(p) != 2
                or any(type(v) is not int or not 0 <= v < 2**62 for v in p) for p in value):
            raise _fail(call, arg, "must be a list of [start, stop] pairs of ints >= 0")
    elif t == "members":
        if type(value) is not list or any(
                type(m) is not list or len(m) != 3 or type(m[0]) is not str
                or type(m[1]) is not str or type(m[2]) is not list
                or any(type(v) is not int or not 0 <= v < 2**62 for v in m[2])
                for m in value):
            raise _fail(call, arg, "must be a list of [name, dtype, shape] triples")
    elif t == "dict[str,str]":
        if type(value) is not dict or any(
                type(k) is not str or type(v) is not str or "\x00" in k + v
                for k, v in value.items()):
            raise _fail(call, arg, "must be a dict of str to str without NUL")
    elif t == "dict":
        if type(value) is not dict:
            raise _fail(call, arg, f"must be a map, not {type(value).__name__}")
        for k, v in value.items():
            if type(k) is not str or not 0 < len(k) <= 64 or "\x00" in k:
                raise _fail(call, arg, f"has a key that is not a name of 1 to 64 "
                            f"characters: {str(k)[:80]!r}")
            if type(v) is float and (v != v or v in (float("inf"), float("-inf"))):
                raise _fail(call, arg, f"key {k!r}: must be a finite number, not {v}")
            if type(v) is str and (len(v) > MAX_STR or "\x00" in v):
                raise _fail(call, arg, f"key {k!r}: a str over {MAX_STR} characters or "
                            "with NUL")
            if v is not None and type(v) not in (int, float, str, bool):
                raise _fail(call, arg, f"key {k!r}: must be an int, float, str, bool or "
                            f"None, not {type(v).__name__}")
    else:  # pragma: no cover - a table error, caught by tests/test_table.py
        raise SyscallError(Errno.EIO, f"{call.name}: unknown type {t!r} in the table")
    if arg.lo is not None and value < arg.lo:
        raise _fail(call, arg, f"must be >= {number(arg.lo)}, got {value}")
    if arg.hi is not None and value > arg.hi:
        raise _fail(call, arg, f"must be <= {number(arg.hi)}, got {value}")
    if arg.max_len is not None and len(value) > arg.max_len:
        raise _fail(call, arg, f"is too long ({len(value)} > {arg.max_len})")
    if arg.choices is not None and value not in arg.choices:
        raise _fail(call, arg, f"must be one of {', '.join(arg.choices)}, got {value!r}")
    return value


def check_args(call: Syscall, args: Any) -> dict[str, Any]:
    """Return args checked against call's schema, with defaults filled in."""
    if type(args) is not dict:
        raise SyscallError(Errno.EINVAL, f"{call.name}: arguments must be a map, "
                           f"not {type(args).__name__}")
    for name in args:
        if name not in call.by_name:
            raise SyscallError(Errno.EINVAL, f"{call.name}: unknown argument {name!r}")
    out: dict[str, Any] = {}
    for arg in call.args:
        if arg.name in args:
            out[arg.name] = _check_one(call, arg, args[arg.name])
        elif arg.required:
            raise SyscallError(Errno.EINVAL, f"{call.name}: missing argument {arg.name!r}")
        else:
            d = arg.default
            out[arg.name] = list(d) if isinstance(d, list) else d
    return out
