"""Exceptions of the Celery-style layer, with Celery's names."""
from __future__ import annotations

from ..errors import NbqError, TimeLimitExceeded
from ..worker.context import Reschedule


class Retry(Reschedule):
    """Raised by ``task.retry()``: the task runs again after its countdown (state RETRY until then)."""


class MaxRetriesExceededError(NbqError):
    """A task asked to retry more often than its ``max_retries`` allows."""


class NotRegistered(NbqError, KeyError):
    """No task of this name is known where it was asked for (start the worker with ``-A``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task not registered"


class ContentDisallowed(NbqError):
    """A worker refused a task sent with a serializer its ``accept_content`` does not list."""


class ChordError(NbqError):
    """A chord's body did not run because a task of its header failed."""


class SoftTimeLimitExceeded(NbqError):
    """Raised inside a task when its ``soft_time_limit`` has passed: it may clean up and return."""


__all__ = ["Retry", "MaxRetriesExceededError", "NotRegistered", "ContentDisallowed", "ChordError",
           "SoftTimeLimitExceeded", "TimeLimitExceeded"]  # TimeLimitExceeded: from nbq.errors
