"""The on-disk format: one safetensors file per tensor, metadata in its header.

A tensor /a/b is LLMOS_HOME/tensors/a/b.safetensors: the 8-byte little-endian
header length, the JSON header, then the raw data, exactly as the safetensors
library writes it, so safetensors.safe_open reads it directly. The tensor is
stored under the key "tensor"; llmos's own metadata (owner, mode, times,
checksum, the idempotency key of the write that made it) lives in the header's
"__metadata__" map of strings, which the safetensors library carries but
ignores. Nothing here touches sockets.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from syscalls import format_size

KEY = "tensor"
SUFFIX = ".safetensors"
MAX_HEADER = 1 << 20

# llmos dtype name -> (safetensors name, bytes per element, numpy dtype of that width
# used to slice the raw bytes; bfloat16 and bool are moved as uint16 and uint8)
DTYPES: dict[str, tuple[str, int, str]] = {
    "float32": ("F32", 4, "<f4"), "float16": ("F16", 2, "<f2"),
    "bfloat16": ("BF16", 2, "<u2"), "int8": ("I8", 1, "i1"), "int16": ("I16", 2, "<i2"),
    "int32": ("I32", 4, "<i4"), "int64": ("I64", 8, "<i8"), "uint8": ("U8", 1, "u1"),
    "bool": ("BOOL", 1, "u1"),
}
BY_ST_NAME = {v[0]: k for k, v in DTYPES.items()}


class FormatError(ValueError):
    """A file that is not a tensor this driver wrote (or it was damaged)."""


@dataclass
class Member:
    """One named tensor of a group, at offset bytes into the group's data."""
    name: str
    dtype: str
    shape: list[int]
    offset: int

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass
class TensorMeta:
    """A tensor's metadata. A group (several named tensors in one file) has
    members, and dtype uint8 with shape [total bytes]: its data as raw bytes."""
    dtype: str
    shape: list[int]
    owner: int
    mode: int
    ctime: float
    mtime: float
    crc32: int
    data_offset: int = 0  # where the data starts in the file
    members: list[Member] | None = None
    key: str | None = None  # the idempotency key the write that made it gave (open_tensor)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def member(self, name: str) -> Member | None:
        """A group's member of that name (None: no such member, or not a group)."""
        return next((m for m in self.members or [] if m.name == name), None)


def layout(specs: list[tuple[str, str, list[int]]]) -> list[Member]:
    """Members laid out back to back, widest dtype first (as the safetensors library
    orders them), so each starts aligned to its element size when the data starts on
    8 bytes; the format allows no gaps."""
    order = sorted(specs, key=lambda m: -DTYPES[m[1]][1])
    out, offset = [], 0
    for name, dtype, shape in order:
        out.append(Member(name, dtype, list(shape), offset))
        offset += nbytes(dtype, shape)
    return out


def group_meta(members: list[Member], owner: int, mode: int, ctime: float,
               mtime: float) -> TensorMeta:
    total = sum(m.nbytes for m in members)
    return TensorMeta("uint8", [total], owner, mode, ctime, mtime, 0, members=members)


def nbytes(dtype: str, shape: list[int]) -> int:
    return DTYPES[dtype][1] * math.prod(shape)


def header(meta: TensorMeta, align: int = 8) -> bytes:
    """The length prefix and JSON header for a file whose data follows, padded with
    spaces (which the safetensors format allows) so the data starts at a multiple
    of align: 8 as the safetensors library does, or a page for direct I/O."""
    doc = {"__metadata__": {"llmos.owner": str(meta.owner), "llmos.mode": oct(meta.mode),
                            "llmos.ctime": repr(meta.ctime), "llmos.mtime": repr(meta.mtime),
                            # fixed width, so the header can be written before the
                            # checksum is known and rewritten in place after
                            "llmos.crc32": f"{meta.crc32:010d}",
                            # what torch-based loaders (transformers) look for; the
                            # data is plain little-endian either way
                            "format": "pt"}}
    if meta.key is not None:
        doc["__metadata__"]["llmos.key"] = meta.key
    if meta.members is None:
        doc[KEY] = {"dtype": DTYPES[meta.dtype][0], "shape": list(meta.shape),
                    "data_offsets": [0, meta.nbytes]}
    else:
        doc["__metadata__"]["llmos.group"] = "1"
        for m in meta.members:
            doc[m.name] = {"dtype": DTYPES[m.dtype][0], "shape": list(m.shape),
                           "data_offsets": [m.offset, m.offset + m.nbytes]}
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % align)
    return struct.pack("<Q", len(body)) + body


def read_meta(fd: int) -> TensorMeta:
    """Parse the header of the open file fd; FormatError if it is not ours."""
    try:
        head = os.pread(fd, 8, 0)
        if len(head) != 8:
            raise FormatError("shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise FormatError(f"a header of {format_size(n)}, over "
                              f"{format_size(MAX_HEADER)}")
        doc = json.loads(os.pread(fd, n, 8))
        md = doc.pop("__metadata__")
        owner, mode = int(md["llmos.owner"]), int(md["llmos.mode"], 8)
        times, crc = (float(md["llmos.ctime"]), float(md["llmos.mtime"])), int(md["llmos.crc32"])
        key = md.get("llmos.key")
        if key is not None and not isinstance(key, str):
            raise FormatError("llmos.key is not a string")
        if md.get("llmos.group") == "1":
            members = read_members(doc)
            meta = group_meta(members, owner, mode, *times)
            meta.crc32, meta.data_offset, meta.key = crc, 8 + n, key
            return meta
        t = doc[KEY]
        meta = TensorMeta(BY_ST_NAME[t["dtype"]], [int(x) for x in t["shape"]],
                          owner, mode, *times, crc, 8 + n, key=key)
        if list(t["data_offsets"]) != [0, meta.nbytes]:
            raise FormatError("data offsets do not match dtype and shape")
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise FormatError(f"not an llmos tensor file: {e}") from None
    return meta


def read_members(doc: dict) -> list[Member]:
    """A group's members from its header, in data order; they must cover the data
    back to back, each its dtype and shape's size."""
    members = []
    for name, t in doc.items():
        shape = [int(x) for x in t["shape"]]
        start, stop = (int(x) for x in t["data_offsets"])
        m = Member(name, BY_ST_NAME[t["dtype"]], shape, start)
        if stop - start != m.nbytes:
            raise FormatError(f"member {name!r}: data offsets do not match dtype and shape")
        members.append(m)
    members.sort(key=lambda m: m.offset)
    end = 0
    for m in members:
        if m.offset != end:
            raise FormatError(f"member {m.name!r}: a gap or an overlap in the data")
        end += m.nbytes
    return members


def view(buf, dtype: str, shape: list[int]) -> np.ndarray:
    """buf's bytes as an array of dtype's width and shape (no copy)."""
    return np.frombuffer(buf, dtype=DTYPES[dtype][2], count=math.prod(shape)).reshape(shape)
