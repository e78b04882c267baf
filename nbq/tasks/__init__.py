"""Celery-style tasks on nbq: App, named tasks, calling, canvas, routing, retries, results,
periodic schedules (crontab.py) and beat (beat.py)."""
from .app import App, load_app, shared_task
from .canvas import GroupResult, Signature, chain, chord, chunks, group, signature
from .crontab import crontab, schedule
from .exceptions import (ChordError, ContentDisallowed, MaxRetriesExceededError, NotRegistered,
                         Retry, SoftTimeLimitExceeded, TimeLimitExceeded)
from .task import Task

__all__ = ["App", "load_app", "shared_task", "Task", "Signature", "signature", "group", "chain",
           "chord", "chunks", "GroupResult", "crontab", "schedule", "Retry",
           "MaxRetriesExceededError", "NotRegistered", "ContentDisallowed", "ChordError",
           "SoftTimeLimitExceeded", "TimeLimitExceeded"]
