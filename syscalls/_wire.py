"""The wire encoding: one msgpack header frame, then raw frames for bulk bytes;
the messages' names and constructors; and the one function that sends frames.

Bytes are never packed into msgpack: encode() moves every bytes value it finds
(in args, results, nested lists and maps) into its own frame and leaves an
ExtType(FRAME_EXT, index) in its place; decode() puts them back. The kernel
decodes with refs=True, so it sees FrameRef(index, size) and forwards the frames
to a driver untouched.

Every header is a msgpack map with one-letter keys (KIND, SEQ, ... below), built
only by the constructors here, so that a key is spelt in one place:

  userland -> kernel   request(seq, number, args)       {v, s, n, a}
                       heartbeat(token[, bye])           {t: hb, k}  (its own connection)
                       cancel(seq)                       {t: cancel, c}
  kernel -> userland   reply(seq, result[, partial])     {s, r[, p: 1]}
                       error(seq, errno, message)        {s, e, m}
                       p: 1 marks a partial reply (more follow), as RFC 18's PARTIAL
  driver -> kernel     ready(services, token, os_pid)    {t: ready, ...}
                       driver_heartbeat(info)            {t: hb[, info]}
                       driver_reply(id, result|errno+message[, partial, res])
                                                         {t: rep, i, r|e+m[, p][, res]}
  kernel -> driver     driver_request(id, number, args, pid, uid)  {t: req, i, n, a, c}
                       driver_heartbeat(), welcome(live), exit_notice(pid),
                       driver_cancel(id), stop()
  node agent <-> kernel node(kind, **fields): join, nhb, spawned, exited, bye; orders
                       joined, refused, ack, spawn, kill, rejoin, removed (_nodes.py)
"""
from __future__ import annotations

from typing import Any, Sequence

import msgpack
import zmq

from ._schema import FrameRef
from ._table import ABI_VERSION

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


# -- the header's keys ------------------------------------------------------------

KIND = "t"        # what a message is, when it is not a request or reply: KINDS
VERSION = "v"     # the ABI version a request speaks
SEQ = "s"         # a request's sequence number, echoed by its replies
NUMBER = "n"      # the syscall's number
ARGS = "a"        # the arguments, a map
RESULT = "r"      # a reply's result
ERRNO = "e"       # an error reply's errno (an int)
MESSAGE = "m"     # an error reply's message
PARTIAL = "p"     # 1 on a partial reply: more follow
TOKEN = "k"       # a heartbeat's token (from attach)
BYE = "bye"       # a heartbeat's last: the process detached and will not send more
CANCELS = "c"     # a cancel's sequence number
ID = "i"          # the kernel's id of a request routed to a driver
CREDS = "c"       # a routed request's caller: {pid, uid}
RESOURCES = "res"  # a driver's reply: resources the caller now holds or released
INFO = "info"     # a driver's heartbeat: its status summary

HEARTBEAT, CANCEL, READY, REPLY, REQUEST = "hb", "cancel", "ready", "rep", "req"
WELCOME, EXIT, STOP = "welcome", "exit", "stop"
# node agent <-> kernel, over the TCP endpoint only (kernel/_nodes.py)
NODE_KINDS = ("join", "nhb", "spawned", "exited", "bye")   # agent -> kernel
NODE_ORDERS = ("joined", "refused", "ack", "spawn", "kill", "rejoin",  # kernel -> agent
               "removed")


def request(seq: int, number: int, args: dict) -> dict:
    return {VERSION: ABI_VERSION, SEQ: seq, NUMBER: number, ARGS: args}


def reply(seq: int, result: Any, partial: bool = False) -> dict:
    head: dict[str, Any] = {SEQ: seq, RESULT: result}
    if partial:
        head[PARTIAL] = 1
    return head


def error(seq: Any, errno: int, message: str) -> dict:
    return {SEQ: seq, ERRNO: int(errno), MESSAGE: message}


def heartbeat(token: str, bye: bool = False) -> dict:
    return {KIND: HEARTBEAT, TOKEN: token, **({BYE: True} if bye else {})}


def cancel(seq: int) -> dict:
    return {KIND: CANCEL, CANCELS: seq}


def ready(services: list[str], token: str, os_pid: int) -> dict:
    return {KIND: READY, "services": services, "token": token, "os_pid": os_pid}


def driver_heartbeat(info: dict | None = None) -> dict:
    return {KIND: HEARTBEAT} if info is None else {KIND: HEARTBEAT, INFO: info}


def driver_request(rid: int, number: int, args: dict, pid: int, uid: int) -> dict:
    return {KIND: REQUEST, ID: rid, NUMBER: number, ARGS: args,
            CREDS: {"pid": pid, "uid": uid}}


def driver_reply(rid: Any, result: Any = None, errno: int | None = None,
                 message: str = "", partial: bool = False,
                 resources: list | None = None) -> dict:
    head: dict[str, Any] = {KIND: REPLY, ID: rid}
    if errno is None:
        head[RESULT] = result
    else:
        head[ERRNO], head[MESSAGE] = int(errno), message
    if partial:
        head[PARTIAL] = 1
    if resources:
        head[RESOURCES] = resources
    return head


def welcome(live: list[int]) -> dict:
    return {KIND: WELCOME, "live": live}


def exit_notice(pid: int) -> dict:
    return {KIND: EXIT, "pid": pid}


def driver_cancel(rid: int) -> dict:
    return {KIND: CANCEL, ID: rid}


def stop() -> dict:
    return {KIND: STOP}


def node(kind: str, **fields: Any) -> dict:
    """A node agent's message or a kernel's order to one: {t: kind, ...fields}."""
    assert kind in NODE_KINDS or kind in NODE_ORDERS, kind
    return {KIND: kind, **fields}


# -- sending ---------------------------------------------------------------------------

_MORE = int(zmq.SNDMORE)  # ints: pyzmq's enum arithmetic per frame costs more than
_NOBLOCK = int(zmq.NOBLOCK)  # the send itself
COPY_BELOW = 65536  # frames under about 64 kB are cheaper copied than sent zero-copy


def send_frames(sock: zmq.Socket, frames: Sequence[Any], ident: bytes | None = None,
                block: bool = False) -> None:
    """send_multipart([ident, *frames]) without its per-frame overhead; NOBLOCK unless
    block. libzmq checks routability and the high-water mark on the first frame, so
    a failure (zmq.Again, EHOSTUNREACH) leaves nothing half sent."""
    flags = 0 if block else _NOBLOCK
    if ident is not None:
        sock.send(ident, flags | _MORE)
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, flags if i == last else flags | _MORE,
                  copy=len(frame) < COPY_BELOW)
