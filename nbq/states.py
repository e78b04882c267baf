"""Celery's ``celery.states``, at the same path: ``from nbq import states``; ``states.SUCCESS``.

The state names of nbq.Future, the worker's notices and the broker's answers (nbq never
reports Celery's RECEIVED, REJECTED or IGNORED), defined here, below all of them; the sets
group them as Celery's do.
"""
PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
RETRY = "RETRY"

READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, STARTED, RETRY})
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
ALL_STATES = READY_STATES | UNREADY_STATES

__all__ = ["PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "READY_STATES",
           "UNREADY_STATES", "EXCEPTION_STATES", "PROPAGATE_STATES", "ALL_STATES"]
