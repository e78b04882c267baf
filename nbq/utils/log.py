"""Celery's ``celery.utils.log``: ``from nbq.utils.log import get_task_logger``."""
from __future__ import annotations

import logging


def get_task_logger(name: str) -> logging.Logger:
    """The logger of a tasks module: ``logging.getLogger(name)``; ``nbq worker -l LEVEL`` shows
    its records."""
    return logging.getLogger(name)


__all__ = ["get_task_logger"]
