"""A client's messages from the in-process broker: a queue its receiver thread waits on."""
from __future__ import annotations

import threading
from collections import deque


class Mailbox:
    """(header, frames) messages in order; get() waits for some, wake() ends a wait."""

    __slots__ = ("_cond", "_items", "_woken")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: deque = deque()
        self._woken = False

    def put(self, header: dict, frames: list = ()) -> None:
        with self._cond:
            self._items.append((header, list(frames)))
            self._cond.notify()

    def get(self, timeout: float | None) -> list[tuple[dict, list]]:
        """Every message waiting, after waiting up to timeout seconds for one (or a wake())."""
        with self._cond:
            if not self._items and not self._woken:
                self._cond.wait(timeout)
            self._woken = False
            out = list(self._items)
            self._items.clear()
            return out

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify()
