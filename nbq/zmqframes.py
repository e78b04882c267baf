"""Sending and receiving multipart ZeroMQ messages at a per-message cost a round trip can afford.

pyzmq's send_multipart and recv_multipart combine their flags as Python enums, a few µs per
message; these take the same frames with plain integer flags.  Frames go without copying
(pyzmq still copies those under its copy threshold, cheaper for small ones) and arrive as
zmq.Frame (large ones are never copied out of the socket).
"""
from __future__ import annotations

from typing import Sequence

import zmq

_SNDMORE = int(zmq.SNDMORE)


def send(sock: zmq.Socket, frames: Sequence, flags: int = 0) -> None:
    """send_multipart(frames, flags, copy=False)."""
    put = sock.send
    more = _SNDMORE | int(flags)
    for frame in frames[:-1]:
        put(frame, more, copy=False)
    put(frames[-1], int(flags), copy=False)


def receive(sock: zmq.Socket, flags: int = 0) -> list:
    """recv_multipart(flags, copy=False)."""
    take = sock.recv
    part = take(int(flags), copy=False)
    parts = [part]
    while part.more:  # (a frame says whether more follow: no socket option read per frame)
        part = take(0, copy=False)
        parts.append(part)
    return parts
