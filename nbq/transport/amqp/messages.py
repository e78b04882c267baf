"""Messages as RabbitMQ carries them: one signed message of protocol.py per AMQP message body,
packed as redis/frames.py packs them (8-byte lengths), verified before anything is unpickled."""
from __future__ import annotations

import logging
import time

import pika

from ... import protocol
from ..redis.frames import pack, unpack

log = logging.getLogger("nbq.transport.amqp")

PERSISTENT = 2
DROP_LOG_EVERY = 1.0


class Codec:
    """Signing and verifying under one key; counts and logs what it drops."""

    def __init__(self, key: bytes) -> None:
        self.signer = protocol.Signer(key)
        self.dropped = 0
        self._log_at = 0.0

    def encode(self, header: dict, frames=()) -> bytes:
        return pack(self.signer.encode(header, frames))

    def decode(self, body: bytes, where: str) -> tuple[dict, list] | None:
        """The verified (header, payload) of a body, or None (dropped, counted, logged)."""
        try:
            return self.signer.decode(unpack(bytearray(body)))  # writable: arrays rebuilt on it are too
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
