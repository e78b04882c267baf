"""Celery's ``celery.exceptions`` names, at the same path: ``from nbq.exceptions import ...``.

Re-exports, not copies, so Celery's ``except`` clauses catch what nbq raises:
``WorkerLostError`` is ``nbq.WorkerLost``, ``TaskRevokedError`` the
``concurrent.futures.CancelledError`` a revoked task's ``get()`` raises, and ``TimeoutError`` the
one ``get(timeout=...)`` raises (concurrent.futures', the built-in one since Python 3.11).
"""
from concurrent.futures import CancelledError as TaskRevokedError, TimeoutError

from .errors import WorkerLost as WorkerLostError
from .tasks.exceptions import (ChordError, ContentDisallowed, MaxRetriesExceededError, NotRegistered,
                               Retry, SoftTimeLimitExceeded, TimeLimitExceeded)

__all__ = ["SoftTimeLimitExceeded", "TimeLimitExceeded", "Retry", "MaxRetriesExceededError",
           "NotRegistered", "ContentDisallowed", "ChordError", "WorkerLostError", "TaskRevokedError",
           "TimeoutError"]
