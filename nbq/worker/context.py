"""The task running now in a worker process: its call and the services it may use.

A worker process makes one TaskContext per call it runs and makes it current
for the length of the call (``running``, used by execute.run only); code
running inside the call (the tasks layer, a user's function) reads it with
``current()``.  It is process-wide, not per thread, so threads a task starts
see it too.  Outside a call, or outside a worker, ``current()`` is None.
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .marker import Marker
from .ratelimit import RateLimits


@dataclass(slots=True)
class TaskContext:
    """One call on a worker: its header item, and what its process offers it.

    ``flush()`` sends the results this process has run and not yet reported: a
    task about to wait for other tasks' results calls it first, so that no two
    processes wait for each other's held results.  ``marker`` is the process's
    shared page, where ``limit_time`` asks its supervisor for a kill deadline.
    ``rates`` is the worker's rate-limit table, shared by its processes.
    ``output(frames)`` streams output of the call (encoded events, a remote
    cell's prints) to the client that submitted it while it runs, through the
    worker's transport (WorkerConnection.output): best effort, thread-safe.
    """

    item: dict
    flush: Callable[[], None]
    marker: Marker
    rates: RateLimits
    output: Callable[[list], None]

    @property
    def id(self) -> str:
        return self.item["id"]

    @property
    def retries(self) -> int:
        """How many times the call has been retried before this run."""
        return self.item.get("rt", 0)

    @property
    def eta(self) -> float | None:
        """Epoch seconds before which the call was not to start, if it had one."""
        return self.item.get("eta")

    @property
    def expires(self) -> float | None:
        """Epoch seconds after which the call is revoked unrun, if it has an expiry."""
        return self.item.get("x")

    def limit_time(self, seconds: float) -> None:
        """Have the supervisor kill this process ``seconds`` from now, wherever the call is
        stuck (a hard time limit); 0 takes the limit away."""
        if seconds:
            self.marker.set_deadline(time.time() + seconds, seconds)
            os.kill(os.getppid(), signal.SIGUSR1)  # the supervisor's wait now ends by the deadline
        else:
            self.marker.set_deadline(0.0, 0.0)


_current: TaskContext | None = None


def current() -> TaskContext | None:
    """The call this worker process runs now; None outside a call or outside a worker."""
    return _current


@contextmanager
def running(context: TaskContext) -> Iterator[None]:
    """Make context current for the length of the call (the worker's own execute loop)."""
    global _current
    previous, _current = _current, context
    try:
        yield
    finally:
        _current = previous
