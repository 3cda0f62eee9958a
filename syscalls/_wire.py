"""The wire encoding: one msgpack header frame, then raw frames for bulk bytes.

Bytes are never packed into msgpack: encode() moves every bytes value it finds
(in args, results, nested lists and maps) into its own frame and leaves an
ExtType(FRAME_EXT, index) in its place; decode() puts them back. The kernel
decodes with refs=True, so it sees FrameRef(index, size) and forwards the frames
to a driver untouched.

Messages (every header is a msgpack map):
  userland -> kernel   request  {v: ABI, s: seq, n: number, a: {args}}
                       heartbeat {t: "hb", k: hb_token}  (on its own connection)
  kernel -> userland   reply    {s: seq, r: result} or {s: seq, e: errno, m: msg};
                       p: 1 marks a partial reply (more follow), as RFC 18's PARTIAL
  driver -> kernel     {t: "ready", services, epoch, token}, {t: "hb"},
                       {t: "rep", i: id, r|e+m, p?}
  kernel -> driver     {t: "req", i: id, n, a, c: {pid, uid}}, {t: "hb"},
                       {t: "exit", pid}, {t: "stop"}
"""
from __future__ import annotations

from typing import Any, Sequence

import msgpack

from ._schema import FrameRef

FRAME_EXT = 1
MAX_HEADER = 1 << 20  # bytes; a larger header is dropped and counted


class WireError(ValueError):
    """A frame that is not a well-formed llmos header."""


_SCALARS = frozenset((int, float, str, bool, type(None)))


def _extract(obj: Any, frames: list) -> Any:
    """obj with every bytes value moved to frames; obj itself when it holds none
    (the common case, kept cheap: no copy)."""
    t = type(obj)
    if t is dict:
        out = None
        for k, v in obj.items():
            if type(v) in _SCALARS:
                continue
            nv = _extract(v, frames)
            if nv is not v:
                if out is None:
                    out = dict(obj)
                out[k] = nv
        return obj if out is None else out
    if t is list or t is tuple:
        items = [_extract(v, frames) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) and t is list else items
    if t is bytes or t is bytearray or t is memoryview:
        frames.append(obj)
        return msgpack.ExtType(FRAME_EXT, (len(frames) - 1).to_bytes(4, "little"))
    return obj


def _default(obj: Any) -> Any:
    if isinstance(obj, FrameRef):
        return msgpack.ExtType(FRAME_EXT, obj.index.to_bytes(4, "little"))
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(header: dict, bulk: Sequence[Any] = ()) -> list:
    """Encode header, moving any bytes in it to frames. `bulk` are frames the
    header already refers to (FrameRefs being forwarded)."""
    frames: list = list(bulk)
    packed = msgpack.packb(_extract(header, frames), default=_default)
    return [packed, *frames]


def _no_frames(code: int, data: bytes) -> Any:
    raise WireError(f"ext type {code} in a message without bulk frames")


def decode(frames: Sequence[bytes], refs: bool = False) -> dict:
    """Decode [header, *bulk]. With refs, bytes values come back as FrameRef."""
    if not frames:
        raise WireError("empty message")
    head = frames[0]
    if len(head) > MAX_HEADER:
        raise WireError(f"header of {len(head)} bytes is over {MAX_HEADER}")
    nbulk = len(frames) - 1

    def ext_hook(code: int, data: bytes) -> Any:
        if code != FRAME_EXT or len(data) != 4:
            raise WireError(f"unknown ext type {code}")
        i = int.from_bytes(data, "little")
        if i >= nbulk:
            raise WireError(f"frame reference {i} but only {nbulk} frames")
        return FrameRef(i, len(frames[i + 1])) if refs else frames[i + 1]

    try:
        # no bulk frames (the common case): a module-level hook, no closure to call
        obj = msgpack.unpackb(head, ext_hook=ext_hook if nbulk else _no_frames, raw=False,
                              strict_map_key=True)
    except WireError:
        raise
    except Exception as e:  # msgpack raises many kinds for garbage
        raise WireError(f"undecodable header: {type(e).__name__}") from None
    if type(obj) is not dict:
        raise WireError(f"header must be a map, not {type(obj).__name__}")
    return obj
