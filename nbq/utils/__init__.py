"""Celery's ``celery.utils`` path, for what Celery projects import from it (``log``)."""
