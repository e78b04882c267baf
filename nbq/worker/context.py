"""The worker's API for tasks: the call running now and the services it may use.

A worker process makes one TaskContext per call it runs and makes it current
for the length of the call (``running``, used by execute.run only); code
running inside the call (the tasks layer, a user's function) reads it with
``current()``.  It is the calling thread's own call where that thread runs one,
else the latest a worker process runs: threads a task starts see it too.  A call
that a memory:// worker runs (header ``ip``: in a thread of a user's process, beside
the user's own threads and other calls) is its thread's only.  Outside a call, or outside
a worker, ``current()`` is None.

Besides: ``Reschedule``, which a call raises to run again later (a retry), and
``interval``, the rate-limit syntax the worker understands (so a bad rate fails
where it is declared).  This module imports nothing of the worker: the layers
above use it without reaching into the worker's parts.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import NbqError

#: A rate limit as Celery writes it: "10/s", "10/m", "10/h", a number per second, or None.
Rate = str | float | int | None
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(slots=True)
class TaskContext:
    """One call on a worker: its header item, and what its process offers it.

    ``flush()`` sends the results this process has run and not yet reported: a
    task about to wait for other tasks' results calls it first, so that no two
    processes wait for each other's held results.  ``limit_time(seconds)`` has
    the supervisor kill this process that long from now, wherever the call is
    stuck (a hard time limit; 0 takes it away).  ``acquire_rate(name, own)``
    waits until task name may start under the worker's rate limits (own: the
    task's rate, used until one is set by control).  ``output(frames)`` streams
    output of the call (encoded events, a remote cell's prints) to the client
    that submitted it while it runs: best effort, thread-safe.
    """

    item: dict
    flush: Callable[[], None]
    limit_time: Callable[[float], None]
    acquire_rate: Callable[[str, Rate], None]
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


_running: list[TaskContext] = []  # the calls this worker process runs now, latest last
_local = threading.local()         # .context: the call this thread runs


def current() -> TaskContext | None:
    """The call this thread runs now, else the latest call this process runs (for a thread a
    task started); None outside a call or outside a worker."""
    context = getattr(_local, "context", None)
    if context is None and _running:
        context = _running[-1]
    return context


class running:
    """Make context current for the length of the call (the worker's own execute loop): a
    class, not a generator, for its cost per call."""

    __slots__ = ("_context", "_mine", "_shared")

    def __init__(self, context: TaskContext) -> None:
        self._context = context

    def __enter__(self) -> None:
        context = self._context
        self._mine = getattr(_local, "context", None)
        _local.context = context
        self._shared = not context.item.get("ip")  # not a memory:// call: its threads see it
        if self._shared:
            _running.append(context)

    def __exit__(self, *exc) -> None:
        if self._shared:
            _running.remove(self._context)  # (not pop: another thread's call may have started)
        _local.context = self._mine


class Reschedule(NbqError):
    """Raised by a call to run again in this process at ``eta`` (epoch seconds): a retry.

    Its result is not reported until the last run, so the caller sees one outcome.
    """

    def __init__(self, eta: float, args: tuple | None = None, kwargs: dict | None = None) -> None:
        super().__init__(eta)
        self.eta, self.new_args, self.new_kwargs = eta, args, kwargs


def interval(rate: Rate) -> float:
    """Seconds between starts for a Celery rate ("10/s", "10/m", "10/h", or a number per
    second); 0 for no limit (None, 0, "0")."""
    if rate is None:
        return 0.0
    if isinstance(rate, str):
        count, _, period = rate.strip().partition("/")
        if period and period not in PERIODS:
            raise ValueError(f"bad rate limit {rate!r}: write N/s, N/m or N/h")
        try:
            n = float(count)
        except ValueError:
            raise ValueError(f"bad rate limit {rate!r}: write N/s, N/m or N/h") from None
        seconds = PERIODS[period or "s"]
    else:
        n, seconds = float(rate), 1.0
    return seconds / n if n > 0 else 0.0
