"""Celery's ``celery.schedules`` names, at the same path: ``from nbq.schedules import crontab``."""
from .tasks.crontab import crontab, schedule

__all__ = ["crontab", "schedule"]
