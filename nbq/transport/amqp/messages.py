"""Messages as RabbitMQ carries them: one signed message of protocol.py per AMQP message body,
packed as redis/frames.py packs them (8-byte lengths), verified before anything is unpickled.

With a result backend, a frame of redis/frames.py's BIG (1 MiB) or more is stored apart in
the backend's Redis as the Redis transport stores it (its own key nbq:b:..., expiring with
result_expires) and the body carries its reference: pika frames a body in Python, far slower
than Redis takes a SET.  The signature covers the frame's bytes, checked once they are read."""
from __future__ import annotations

import logging
import time

import pika

from ... import protocol
from ..redis.frames import Frames, Spilled, pack, unpack

log = logging.getLogger("nbq.transport.amqp")

PERSISTENT = 2
DROP_LOG_EVERY = 1.0


class Codec:
    """Signing and verifying under one key; counts and logs what it drops."""

    def __init__(self, key: bytes) -> None:
        self.signer = protocol.Signer(key)
        self.dropped = 0
        self._log_at = 0.0
        self.frames: Frames | None = None  # the result backend's: large frames stored apart

    def spiller(self, frames):
        """The spill function for encode: large frames stored apart (None: no backend)."""
        return None if self.frames is None else self.frames.spiller(frames)

    def encode(self, header: dict, frames=(), spill=None) -> bytes:
        """A packed signed message; with spill (spiller's), its large frames stored apart."""
        return pack(self.signer.encode(header, frames), spill)

    def decode(self, body: bytes, where: str, apart: list | None = None) -> tuple[dict, list] | None:
        """The verified (header, payload) of a body, or None (dropped, counted, logged); the
        keys of its frames stored apart are added to apart."""
        try:
            frames = unpack(bytearray(body))  # writable: arrays rebuilt on it are too
            if self.frames is not None:
                if apart is not None:
                    apart += [f.key for f in frames if isinstance(f, Spilled)]
                frames = self.frames.resolve(frames)
            return self.signer.decode(frames)
        except Exception as e:  # any bytes at all: a failure is the message's, never ours
            self.dropped += 1
            now = time.monotonic()
            if now >= self._log_at:
                self._log_at = now + DROP_LOG_EVERY
                log.warning("dropped %s: %s: %s (%d dropped here so far)", where,
                            type(e).__name__, e, self.dropped)
            return None


def props(priority: int = 0, expires_ms: int | None = None) -> pika.BasicProperties:
    """Persistent message properties (a task's priority)."""
    return pika.BasicProperties(delivery_mode=PERSISTENT, priority=priority or None,
                                expiration=None if expires_ms is None else str(expires_ms))
