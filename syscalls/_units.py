"""Sizes and bounds as people read and write them: "2GiB" in, "16 GiB" out.

Used by argument checking (a `size` argument), the configuration, the drivers'
error messages and userland's tables, so that a byte count reads the same
everywhere.
"""
from __future__ import annotations

import re
from typing import Any, Callable

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?) ?([A-Za-z]{0,3})")
_BINARY = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
# bounds at or past this are "no bound" to a person: 2**62 is a typo guard, not a limit
HUGE = 2**53


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
        if "." in number:  # exact: 1.1GB is 1100000000 bytes, not float's idea of it
            from decimal import Decimal
            n = int(Decimal(number) * SIZE_UNITS[unit])
        else:
            n = int(number) * SIZE_UNITS[unit or "B"]
    else:
        raise ValueError(f"a size must be an int or a str, not {type(value).__name__}")
    if n < 1:
        raise ValueError(f"a size must be at least 1 byte, got {value!r}")
    return n


def format_size(n: int | float) -> str:
    """A byte count as a person reads it: 512 B, 1.5 KiB, 16 GiB, 1 TiB (binary
    units, one decimal where it is not whole)."""
    n = int(n)
    for unit, size in _BINARY:
        if abs(n) >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def number(x: float) -> str:
    """A bound as a person reads it: 2147483648, not 2.14748e+09; 2**62 and up as
    a power of two (4611686018427387904 reads as noise)."""
    if float(x).is_integer() and abs(x) < 2**64:
        n = int(x)
        if abs(n) >= HUGE and abs(n) & (abs(n) - 1) == 0:
            return f"{'-' if n < 0 else ''}2**{abs(n).bit_length() - 1}"
        return str(n)
    return f"{x:g}"


def bounds(lo: float | None, hi: float | None,
           fmt: Callable[[Any], str] = number) -> str:
    """'at least 1', 'at most 10', 'between 1 and 16' for a range check's message
    (fmt: how a bound reads, format_size for bytes); an upper bound past any real
    value (2**53 and up) is left out."""
    if hi is not None and abs(hi) >= HUGE:
        hi = None
    if lo is not None and hi is not None:
        return f"between {fmt(lo)} and {fmt(hi)}"
    if lo is not None:
        return f"at least {fmt(lo)}"
    return f"at most {fmt(hi)}" if hi is not None else "any value"


MAX_SIM_GPUS = 64
_SIM = re.compile(r"([0-9]{1,2})x(.+)")


def parse_sim_spec(spec: Any) -> tuple[int, int]:
    """Simulated GPUs as COUNTxSIZE: "2x16GiB" -> (2, 17179869184); "0x1GiB" is none.
    ValueError for anything else."""
    m = _SIM.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"simulated GPUs {spec!r}: want COUNTxSIZE, such as 2x16GiB")
    count = int(m.group(1))
    if count > MAX_SIM_GPUS:
        raise ValueError(f"simulated GPUs {spec!r}: at most {MAX_SIM_GPUS}")
    return count, parse_size(m.group(2))
