"""What a call addresses inside a tensor: the whole of it, a group's member, a slice;
and the member list of a new group. Checks on metadata and arguments only
(EINVAL, ENOENT): nothing here touches the disk, a descriptor or a buffer.
"""
from __future__ import annotations

from typing import Any

from syscalls import Errno, SyscallError

from ._format import DTYPES, TensorMeta
from ._paths import MAX_NAME

MAX_DIMS_GROUP = 32     # dimensions of a group member (as the table's MAX_DIMS)


def member_specs(members: list[list[Any]], mode: str, dtype: str | None,
                 shape: list[int] | None) -> list[tuple[str, str, list[int]]]:
    """A group's [name, dtype, shape] triples, checked: EINVAL for anything off."""
    if mode not in ("w", "x"):
        raise SyscallError(Errno.EINVAL, "open_tensor: members are for modes w and x")
    if dtype is not None or shape is not None:
        raise SyscallError(Errno.EINVAL, "open_tensor: a group takes members, not "
                           "dtype and shape")
    seen: set[str] = set()
    out = []
    for name, mdtype, mshape in members:
        why = ("is empty" if not name else
               f"is over {MAX_NAME} bytes" if len(name.encode()) > MAX_NAME else
               "has a NUL" if "\x00" in name else
               "is reserved by the format" if name == "__metadata__" else
               "is given twice" if name in seen else
               f"has dtype {mdtype!r}, not one of {', '.join(DTYPES)}"
               if mdtype not in DTYPES else
               f"has {len(mshape)} dimensions, over {MAX_DIMS_GROUP}"
               if len(mshape) > MAX_DIMS_GROUP else None)
        if why:
            raise SyscallError(Errno.EINVAL, f"open_tensor: member {name[:80]!r} {why}")
        seen.add(name)
        out.append((name, mdtype, mshape))
    return out


def region(m: TensorMeta, member: str | None, call: str) -> tuple[str, list[int], int]:
    """(dtype, shape, byte offset) of what a read or write addresses: the tensor,
    a group's member, or (no member) a group's data as bytes."""
    if member is None:
        return m.dtype, m.shape, 0
    if m.members is None:
        raise SyscallError(Errno.EINVAL, f"{call}: member {member!r} of a tensor that "
                           "is not a group")
    g = m.member(member)
    if g is None:
        raise SyscallError(Errno.ENOENT, f"{call}: the group has no member {member!r}")
    return g.dtype, g.shape, g.offset


def slices(shape: list[int], slc: list[list[int]] | None, call: str) -> tuple[slice, ...]:
    """A checked [[start, stop], ...] as Python slices of the leading dimensions."""
    if slc is None:
        return ()
    if len(slc) > len(shape):
        raise SyscallError(Errno.EINVAL, f"{call}: slice has {len(slc)} dimensions, "
                           f"the tensor {len(shape)}")
    out = []
    for i, (pair, n) in enumerate(zip(slc, shape)):
        if len(pair) != 2 or not 0 <= pair[0] <= pair[1] <= n:
            raise SyscallError(Errno.EINVAL, f"{call}: slice {pair} of dimension {i} "
                               f"is not [start, stop] with 0 <= start <= stop <= {n}")
        out.append(slice(pair[0], pair[1]))
    return tuple(out)
