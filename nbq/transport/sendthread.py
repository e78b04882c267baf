"""A client's sender thread, for the transports with no broker process (Redis, RabbitMQ): the
client's calls put messages; one thread takes them in batches and does the broker's part
(stores tasks, answers requests), so a caller never waits on the server."""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from ..errors import NbqError

log = logging.getLogger("nbq.transport")


class SendThread:
    """Messages put by any thread, handled in batches of at most limit by handle(batch), on a
    thread of its own named name; where names the server in the log of an unexpected error."""

    def __init__(self, name: str, handle: Callable[[list], None], limit: int, where: str) -> None:
        self._handle, self._limit, self._where = handle, limit, where
        self._outbox: deque = deque()
        self._cv = threading.Condition()
        self.closing = False  # close() was called: retries should give up
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, header: dict, frames: list) -> None:
        with self._cv:
            self._outbox.append((header, list(frames)))
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Send what was put, then stop (waiting at most timeout seconds)."""
        with self._cv:
            self.closing = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._outbox and not self.closing:
                    self._cv.wait()
                if not self._outbox:
                    return
                batch = []
                while self._outbox and len(batch) < self._limit:
                    batch.append(self._outbox.popleft())
            try:
                self._handle(batch)
            except NbqError as e:
                log.error("%s", e)
            except Exception:
                log.exception("error sending to %s", self._where)
