"""Client.events(): the broker's task and worker events (events.py), stored then live.

Each call subscribes anew (a subscription id of its own, so several iterators of one
client each see every event); the receiver thread hands each ``ev`` message to its
subscription's queue, and the iterator yields from it until the client closes, the
iterator is closed, or ``timeout`` passes with no event.
"""
from __future__ import annotations

import queue
import time
import uuid
from typing import Iterator

_END = None  # put in a subscription's queue when its client closes


class Subscriptions:
    """One client's event subscriptions: subscription id -> the queue its events go to."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.queues: dict[str, queue.SimpleQueue] = {}

    def deliver(self, header: dict) -> None:
        """An ``ev`` message (receiver thread)."""
        q = self.queues.get(header.get("sub"))
        if q is not None:
            q.put(header.get("ev") or [])

    def resend(self) -> None:
        """Subscribe again to a broker that restarted (it has no past to send)."""
        for sub in list(self.queues):
            self._conn.events(sub, None, True)

    def end_all(self) -> None:
        """The client closed: every iterator stops."""
        queues, self.queues = self.queues, {}
        for q in queues.values():
            q.put(_END)

    def open(self, since: float | None, timeout: float | None) -> Iterator[dict]:
        """Subscribe now; the events from since (None: from now), then live ones."""
        sub = uuid.uuid4().hex[:12]
        q = self.queues[sub] = queue.SimpleQueue()
        self._conn.events(sub, time.time() if since is None else since, True)
        return self._iterate(sub, q, timeout)

    def _iterate(self, sub: str, q: queue.SimpleQueue, timeout: float | None) -> Iterator[dict]:
        try:
            while True:
                try:
                    batch = q.get(timeout=timeout)
                except queue.Empty:
                    return
                if batch is _END:
                    return
                yield from batch
        finally:
            if self.queues.pop(sub, None) is not None:
                try:
                    self._conn.events(sub, None, False)
                except Exception:  # the client closed meanwhile: nothing to end at the broker
                    pass
