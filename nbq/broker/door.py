"""The embedded broker's door for clients of its own process: messages as objects, no socket.

A client in the broker's own process (``nbq.Client()``, the embedded default) is inside the
broker's trust boundary: what it hands over needs no signature, no schema check and no
replay window, and what the broker sends it needs no check on arrival (the broker sends
only messages it signed itself or verified when they came).  So such a client puts
(peer, header, frames) here and rings; the broker's thread takes them on its next turn and
handles them as it handles a verified message from its socket.  Messages from worker
processes still come through the socket, signed, and are verified before anything is
loaded.  This saves, per message, the client's signing and the broker's receiving,
verifying and parsing, and a turn of the broker's loop per result (client/embedded.py is
the client's side).
"""
from __future__ import annotations

import collections
import os
import threading


class Door:
    """Messages from clients of this process for the broker's thread, and a pipe that wakes it.

    ``fd`` is the pipe's end the broker polls.  A ring writes one byte, once until the
    broker takes what waits (``take``), so a burst of puts costs one wake-up.
    """

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._inbox: collections.deque = collections.deque()
        self._rung = False
        self._lock = threading.Lock()  # a ring and close: never a write to a closed fd

    def put(self, peer: bytes, header: dict, frames: list) -> None:
        """Hand a message to the broker (any thread); its thread handles it next turn."""
        self._inbox.append((peer, header, frames))
        if not self._rung:
            self.ring()

    def ring(self) -> None:
        """Wake the broker's thread (any thread): it takes what waits, then serves its guests."""
        with self._lock:
            if self._rung or self._w < 0:
                return
            self._rung = True
            try:
                os.write(self._w, b"\0")
            except BlockingIOError:  # full: it is awake already
                pass

    def take(self) -> list:
        """What was put since the last take (the broker's thread); the next put rings again."""
        if self._rung:
            try:  # the byte first, then the flag: a ring between the two leaves a byte (a
                os.read(self.fd, 4096)  # spare turn), never a flag set with no byte
            except BlockingIOError:
                pass
            self._rung = False  # before emptying: a put from now on rings again
        inbox, out = self._inbox, []
        while inbox:
            out.append(inbox.popleft())
        return out

    def close(self) -> None:
        """The broker stopped: what is put from now on stays unread."""
        with self._lock:
            os.close(self._w)
            os.close(self.fd)
            self._w = -1
