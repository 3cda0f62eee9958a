"""Sending on the kernel's ROUTER without blocking and without pyzmq's per-frame cost."""
from __future__ import annotations

import zmq

_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)  # ints: pyzmq's enum arithmetic per frame
_LAST = int(zmq.NOBLOCK)                 # costs more than the send itself


def send_frames(sock: zmq.Socket, ident: bytes, frames: list) -> None:
    """send_multipart([ident, *frames], NOBLOCK), without its per-frame overhead.
    libzmq checks routability and the high-water mark on the first frame, so a
    failure (Again, EHOSTUNREACH) leaves nothing half sent."""
    sock.send(ident, _MORE)
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _LAST if i == last else _MORE, copy=len(frame) < 65536)
