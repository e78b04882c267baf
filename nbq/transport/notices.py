"""A worker process's "started" notices, for the transports where tasks wait in a server
(Redis, RabbitMQ): a task a client submitted that is still running policy.STARTED_DELAY after it
started is announced to that client (Future.running() turns true), by a thread of its own."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from .. import policy


ACTIVE = 1.0  # seconds after its last task the notices' thread still looks every STARTED_DELAY


class StartedNotices:
    """Tasks running, and when each is due its notice; tell(due) sends the due ones, as
    {client: [task id, ...]}, from the notices' thread (started with the first task).

    While tasks come (within ACTIVE of the last), the thread looks every STARTED_DELAY
    instead of being woken for each: a wake per task, when the task is quicker than the
    delay, was a GIL hand-off in the middle of running it.  So a notice goes between one
    and two STARTED_DELAYs after its task started."""

    def __init__(self, tell: Callable[[dict[str, list[str]]], None]) -> None:
        self._tell = tell
        self._cv = threading.Condition()
        self._due: dict[str, tuple[float, str]] = {}  # task id -> (when, submitting client)
        self._thread: threading.Thread | None = None
        self._asleep = False  # the thread waits to be woken (nothing came within ACTIVE)
        self._last = 0.0      # when a task last started

    def running(self, items: list[dict]) -> None:
        """Tasks that start now (only those a client submitted get a notice)."""
        now = time.monotonic()
        when = now + policy.STARTED_DELAY
        with self._cv:
            self._last = now
            for item in items:
                if item.get("f") and item.get("c"):
                    self._due[item["id"]] = (when, item["c"])
            if self._due and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nbq-started", daemon=True)
                self._thread.start()
            if self._asleep and self._due:
                self._cv.notify()

    def done(self, ids: Iterable[str]) -> None:
        """Tasks that need no notice any more."""
        with self._cv:
            for tid in ids:
                self._due.pop(tid, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._due:
                    if time.monotonic() - self._last < ACTIVE:
                        self._cv.wait(policy.STARTED_DELAY)
                        continue
                    self._asleep = True
                    while not self._due:
                        self._cv.wait()
                    self._asleep = False
                wait = min(when for when, _ in self._due.values()) - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                now = time.monotonic()
                due: dict[str, list[str]] = {}
                for tid, (when, c) in list(self._due.items()):
                    if when <= now:
                        due.setdefault(c, []).append(tid)
                        del self._due[tid]
            self._tell(due)
