"""``app.control``: Celery's remote control of workers, over nbq's control channel.

Commands reach every worker supervisor (or the ``destination`` names) and each
answers once; replies are keyed by worker name (``nbq worker -n``, default
``nbq@<host>``), as Celery's are.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ..worker.context import interval

if TYPE_CHECKING:
    from .app import App

DEFAULT_TIMEOUT = 1.0

#: The ``nbq inspect`` commands: each returns {worker name: reply}.
INSPECT_COMMANDS = ("ping", "stats", "registered", "active", "reserved", "scheduled")


class Control:
    """Broadcast commands to workers and collect their replies (Celery's ``app.control``)."""

    def __init__(self, app: "App") -> None:
        self.app = app

    def broadcast(self, command: str, arguments: dict | None = None,
                  destination: Iterable[str] | None = None, reply: bool = False,
                  timeout: float = DEFAULT_TIMEOUT) -> list[dict] | None:
        """Send command to the workers; with reply, a list of {worker name: reply}, as Celery's."""
        got = self.app.client.control(command, arguments,
                                      None if destination is None else list(destination), timeout)
        return [{name: r} for name, r in got.items()] if reply else None

    def ping(self, destination: Iterable[str] | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
        """[{worker name: {"ok": "pong"}}] for each worker that answered within timeout."""
        return self.broadcast("ping", destination=destination, reply=True, timeout=timeout)

    def inspect(self, destination: Iterable[str] | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> "Inspect":
        return Inspect(self, destination, timeout)

    def rate_limit(self, task_name: str, rate_limit: str | float | None,
                   destination: Iterable[str] | None = None, reply: bool = False,
                   timeout: float = DEFAULT_TIMEOUT) -> list[dict] | None:
        """Limit task_name to rate_limit ("10/s", "10/m", "10/h"; None: no limit) on each worker."""
        interval(rate_limit)  # a bad rate fails here, not on every worker
        return self.broadcast("rate_limit", {"task_name": task_name, "rate_limit": rate_limit},
                              destination, reply, timeout)

    def shutdown(self, destination: Iterable[str] | None = None, reply: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> list[dict] | None:
        """Stop the workers in good order (their running tasks are re-queued)."""
        return self.broadcast("shutdown", None, destination, reply, timeout)

    def pool_grow(self, n: int = 1, destination: Iterable[str] | None = None, reply: bool = False,
                  timeout: float = DEFAULT_TIMEOUT) -> list[dict] | None:
        """Start n more worker processes on each worker."""
        return self.broadcast("pool_grow", {"n": n}, destination, reply, timeout)

    def pool_shrink(self, n: int = 1, destination: Iterable[str] | None = None,
                    reply: bool = False, timeout: float = DEFAULT_TIMEOUT) -> list[dict] | None:
        """Stop n worker processes on each worker, idle ones first; one always stays."""
        return self.broadcast("pool_shrink", {"n": n}, destination, reply, timeout)

    def add_consumer(self, queue: str, destination: Iterable[str] | None = None,
                     reply: bool = False, timeout: float = DEFAULT_TIMEOUT) -> list[dict] | None:
        """Have the workers consume queue too."""
        return self.broadcast("add_consumer", {"queue": queue}, destination, reply, timeout)

    def cancel_consumer(self, queue: str, destination: Iterable[str] | None = None,
                        reply: bool = False, timeout: float = DEFAULT_TIMEOUT) -> list[dict] | None:
        """Have the workers stop consuming queue (tasks they hold still run)."""
        return self.broadcast("cancel_consumer", {"queue": queue}, destination, reply, timeout)

    def revoke(self, task_id: str, terminate: bool = False, signal: str = "SIGTERM") -> bool:
        """Revoke a task no worker has started (True: it will never run); with terminate,
        kill the process running it with signal (it ends REVOKED)."""
        return self.app.AsyncResult(task_id).revoke(terminate=terminate, signal=signal)


class Inspect:
    """Questions to workers; each returns {worker name: reply}, or None when none answered."""

    def __init__(self, control: Control, destination: Iterable[str] | None,
                 timeout: float) -> None:
        self.control = control
        self.destination = None if destination is None else list(destination)
        self.timeout = timeout

    def _ask(self, command: str) -> dict[str, Any] | None:
        got = self.control.app.client.control(command, None, self.destination, self.timeout)
        return got or None

    def ping(self) -> dict[str, Any] | None:
        return self._ask("ping")

    def stats(self) -> dict[str, Any] | None:
        """Each worker's pid, uptime, pool (processes, max-concurrency) and queues."""
        return self._ask("stats")

    def registered(self) -> dict[str, Any] | None:
        """The task names each worker's ``-A`` app registered."""
        return self._ask("registered")

    def active(self) -> dict[str, Any] | None:
        """The tasks running now: id, name, time_start, worker_pid, per worker."""
        return self._ask("active")

    def reserved(self) -> dict[str, Any] | None:
        """Tasks fetched and not started: always empty lists on nbq (dispatch is by credit)."""
        return self._ask("reserved")

    def scheduled(self) -> dict[str, Any] | None:
        """Tasks held until their ETA (countdown, retry): eta and request (id, name, worker_pid)."""
        return self._ask("scheduled")
