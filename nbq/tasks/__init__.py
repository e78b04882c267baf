"""Celery-style tasks on nbq: App, named tasks, calling, canvas, routing, retries, results."""
from .app import App, load_app
from .canvas import GroupResult, Signature, chain, chord, chunks, group, signature
from .exceptions import (ChordError, ContentDisallowed, MaxRetriesExceededError, NotRegistered,
                         Retry, SoftTimeLimitExceeded, TimeLimitExceeded)
from .task import Task

__all__ = ["App", "load_app", "Task", "Signature", "signature", "group", "chain", "chord",
           "chunks", "GroupResult", "Retry", "MaxRetriesExceededError", "NotRegistered",
           "ContentDisallowed", "ChordError", "SoftTimeLimitExceeded", "TimeLimitExceeded"]
