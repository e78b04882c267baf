"""nbq.AsyncResult: a task found by its id, from any client on the same broker (Celery's API)."""
from __future__ import annotations

from concurrent.futures import CancelledError
from typing import Any

from ..errors import NbqError
from ..states import FAILURE, SUCCESS


class AsyncResult:
    """The state and result of the task with this id, wherever it was submitted.

    Results are kept for ``result_expires``; an id the broker does not know
    (never submitted, or expired) stays PENDING, as in Celery.
    """

    parent = None  # the result of the call before this one in a chain

    def __init__(self, task_id: str, client=None) -> None:
        self.id = task_id
        self.client = client or _default_client()  # the nbq client it is watched through
        self._future = self.client.watch([task_id])[0]

    @property
    def state(self) -> str:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        return self._future.state

    status = state

    def ready(self) -> bool:
        """True once the task has a result, failed, or was revoked."""
        return self._future.done()

    def successful(self) -> bool:
        return self.state == SUCCESS

    def failed(self) -> bool:
        return self.state == FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the result; the task's failure is raised, or returned when propagate is
        False.  What interrupts the wait itself (a timeout, Ctrl-C, a signal handler's
        exception) is always raised."""
        if propagate:
            return self._future.result(timeout)
        try:
            error = self._future.exception(timeout)
        except CancelledError as e:  # revoked: its error is its outcome, as Celery's
            return e
        return error if error is not None else self._future.result()

    @property
    def result(self) -> Any:
        """The value, the exception of a failed task, or None while not ready."""
        if not self._future.done() or self._future.cancelled():
            return None
        return self._future.exception() or self._future.result()

    info = result  # Celery's other name for it

    @property
    def task_id(self) -> str:
        """The task's id (Celery's other name for ``id``)."""
        return self.id

    @property
    def traceback(self) -> str | None:
        """The worker's traceback text of a failed task."""
        if self.state != FAILURE:
            return None
        return getattr(self._future.exception(), "remote_traceback", None)

    def revoke(self, terminate: bool = False, signal: str = "SIGTERM") -> bool:
        """Cancel the task if no worker has started it (True: it never runs); with terminate,
        a running one's process is killed with signal and replaced, and the task ends REVOKED."""
        if self._future.cancel():
            return True
        return terminate and self.client._terminate(self._future, signal)

    def __repr__(self) -> str:
        return f"<nbq.AsyncResult {self.id} {self.state}>"


def _default_client():
    """The current client; where none is open but an nbq.App was made (a Celery project's web
    process or task asking by id), that app's client, as Celery's AsyncResult uses its app's."""
    from ..client import current_client
    from .app import _current
    try:
        return current_client()
    except NbqError:
        if not _current:
            raise
        return _current[0].client
