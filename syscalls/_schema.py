"""Argument checking at the boundary: a request's args against its table entry.

check_args never trusts its input: any shape of value may arrive from a socket.
It returns a new dict with defaults filled in, or raises SyscallError(EINVAL).
"""
from __future__ import annotations

from typing import Any, Callable

from ._errno import Errno, SyscallError
from ._table import MAX_STR, Arg, Syscall
from ._units import HUGE, bounds, format_size, number, parse_size


class FrameRef:
    """A bytes argument carried in a raw frame; the kernel forwards the frame
    without reading it. `size` is the frame's length."""

    __slots__ = ("index", "size")

    def __init__(self, index: int, size: int) -> None:
        self.index = index
        self.size = size


def _shown(value: Any, fmt: Callable[[Any], str] = str) -> str:
    """A number a client sent, bounded: an int of a thousand digits is "too large"."""
    if type(value) is int and abs(value) >= 2**64:
        return f"a {len(str(abs(value)))}-digit number"
    return fmt(value)


def _out_of_range(call: Syscall, arg: Arg, value: Any,
                  fmt: Callable[[Any], str]) -> SyscallError:
    if arg.hi is not None and value > arg.hi and arg.hi >= HUGE:  # a typo guard
        return _fail(call, arg, f"is too large: {_shown(value, fmt)} (the most is "
                     f"{fmt(arg.hi)})")
    return _fail(call, arg, f"must be {bounds(arg.lo, arg.hi, fmt)}, got "
                 f"{_shown(value, fmt)}")


def _fail(call: Syscall, arg: Arg, why: str) -> SyscallError:
    return SyscallError(Errno.EINVAL, f"{call.name}: argument {arg.name!r} {why}")


ROLES = ("system", "user", "assistant", "tool")  # of a chat's messages


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
            raise _out_of_range(call, arg, value, format_size)
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
    elif t == "messages":
        if type(value) is not list or any(
                type(m) is not dict or set(m) != {"role", "content"}
                or type(m["role"]) is not str or type(m["content"]) is not str
                or "\x00" in m["content"] for m in value):
            raise _fail(call, arg, "must be a list of {role, content} maps of str")
        for m in value:
            if m["role"] not in ROLES:
                raise _fail(call, arg, f"has role {m['role'][:40]!r}; roles are "
                            f"{', '.join(ROLES)}")
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
    if arg.lo is not None and value < arg.lo or arg.hi is not None and value > arg.hi:
        raise _out_of_range(call, arg, value, number)
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
