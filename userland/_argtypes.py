"""argparse types and parsers of the command table's arguments: a uid, a count, a
home, a size, seconds, KEY=VALUE words. Each refuses a bad word with a message that
names what it wants; none imports more than the standard library needs.
"""
from __future__ import annotations

import argparse

from ._base import UsageError


def uid_arg(text: str) -> int:
    """An argparse type: a uid, 0 to 2**31 - 1."""
    try:
        uid = int(text)
    except ValueError:
        uid = -1
    if not 0 <= uid < 2**31:
        raise argparse.ArgumentTypeError(f"a uid from 0 to {2**31 - 1}, not {text!r}")
    return uid


def count_arg(text: str) -> int:
    """An argparse type: a count, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"a count of 0 or more, not {text!r}")
    return n


def home_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("wants a path, not an empty string")
    return text


def sim_gpus(text: str) -> str:
    """A simulated GPUs spec, COUNTxSIZE (4x24GiB), checked."""
    from syscalls import parse_sim_spec
    try:
        parse_sim_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def sized(value: str) -> int:
    """An argparse type: bytes from "2GiB", "512MiB" or "4096"."""
    from syscalls import parse_size
    try:
        return parse_size(int(value) if value.isdigit() else value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seconds(text: str) -> float:
    """An argparse type: seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"wants seconds >= 0, not {text!r}")
    return value


def key_values(items: list[str], what: str = "settings") -> dict[str, str]:
    """KEY=VALUE words as a dict; UsageError for a word without '='."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} are KEY=VALUE, not {item!r}")
        out[key] = value
    return out
