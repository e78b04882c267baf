"""Celery's ``celery.result`` names, at the same path: ``from nbq.result import AsyncResult``."""
from .tasks.asyncresult import AsyncResult
from .tasks.canvas import GroupResult

__all__ = ["AsyncResult", "GroupResult"]
