"""The on-disk format: one safetensors file per tensor, metadata in its header.

A tensor /a/b is LLMOS_HOME/tensors/a/b.safetensors: the 8-byte little-endian
header length, the JSON header, then the raw data, exactly as the safetensors
library writes it, so safetensors.safe_open reads it directly. The tensor is
stored under the key "tensor"; llmos's own metadata (owner, mode, times,
checksum) lives in the header's "__metadata__" map of strings, which the
safetensors library carries but ignores. Nothing here touches sockets.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

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
class TensorMeta:
    dtype: str
    shape: list[int]
    owner: int
    mode: int
    ctime: float
    mtime: float
    crc32: int
    data_offset: int = 0  # where the data starts in the file

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


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
                            "llmos.crc32": f"{meta.crc32:010d}", "format": "np"},
           KEY: {"dtype": DTYPES[meta.dtype][0], "shape": list(meta.shape),
                 "data_offsets": [0, meta.nbytes]}}
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
            raise FormatError(f"header of {n} bytes")
        doc = json.loads(os.pread(fd, n, 8))
        md, t = doc["__metadata__"], doc[KEY]
        meta = TensorMeta(BY_ST_NAME[t["dtype"]], [int(x) for x in t["shape"]],
                          int(md["llmos.owner"]), int(md["llmos.mode"], 8),
                          float(md["llmos.ctime"]), float(md["llmos.mtime"]),
                          int(md["llmos.crc32"]), 8 + n)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"not an llmos tensor file: {e}") from None
    if list(t["data_offsets"]) != [0, meta.nbytes]:
        raise FormatError("data offsets do not match dtype and shape")
    return meta


def view(buf, dtype: str, shape: list[int]) -> np.ndarray:
    """buf's bytes as an array of dtype's width and shape (no copy)."""
    return np.frombuffer(buf, dtype=DTYPES[dtype][2], count=math.prod(shape)).reshape(shape)
