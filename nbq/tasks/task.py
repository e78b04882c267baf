"""Task: a function registered under a name, called here, by message, or as a signature."""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NoReturn

from ..worker.context import current, interval
from .exceptions import MaxRetriesExceededError, Retry

#: Options @app.task accepts (Celery's names), with their defaults.
TASK_OPTIONS: dict[str, Any] = {
    "bind": False, "max_retries": 3, "default_retry_delay": 180, "autoretry_for": (),
    "retry_backoff": False, "retry_backoff_max": 600, "retry_jitter": True,
    "rate_limit": None, "time_limit": None, "soft_time_limit": None, "queue": None,
    "priority": None, "serializer": None, "acks_late": None, "ignore_result": False,
    "expires": None, "typing": True, "reject_on_worker_lost": None,
}


@dataclass
class Request:
    """What a running task knows of its call: Celery's ``self.request``."""
    id: str | None = None
    retries: int = 0
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    eta: float | None = None
    expires: float | None = None
    called_directly: bool = True
    hostname: str | None = None


_requests: list[Request] = []  # the calls running now in this process, innermost last


class Task:
    """A named task; ``task(...)`` runs it here, ``delay``/``apply_async`` send it to a worker."""

    def __init__(self, app, fn: Callable, name: str, options: dict) -> None:
        unknown = set(options) - set(TASK_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) for task {name}: {', '.join(sorted(unknown))}")
        self.app = app
        self.run = fn
        self.name = name
        self.options = dict(options)
        for opt, default in TASK_OPTIONS.items():
            setattr(self, opt, options.get(opt, default))
        interval(self.rate_limit)  # a bad rate fails where the task is declared
        functools.update_wrapper(self, fn)

    # -- calling here -------------------------------------------------------------

    def __call__(self, *args, **kwargs) -> Any:
        """Run the task in this process, as a plain call (no message, no retries)."""
        return self.run(self, *args, **kwargs) if self.bind else self.run(*args, **kwargs)

    @property
    def request(self) -> Request:
        """The call running now (``called_directly`` when none is): the worker's current call's
        (a memory:// worker runs several at once, in threads)."""
        ctx = current()
        for request in reversed(_requests):
            if ctx is None or request.id == ctx.id:
                return request
        return Request()

    def retry(self, args: tuple | None = None, kwargs: dict | None = None,
              exc: BaseException | None = None, countdown: float | None = None,
              eta: float | None = None, max_retries: int | None = None) -> NoReturn:
        """Run this task again later (``raise self.retry(exc=e)``), up to ``max_retries`` times.

        When retries are used up, exc (if given) is raised, else MaxRetriesExceededError.
        """
        req = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if req.called_directly:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(f"task {self.name} was called directly: it cannot retry")
        if limit is not None and req.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(f"task {self.name}[{req.id}] retried {req.retries} "
                                          f"times: max_retries is {limit}")
        if eta is None:
            eta = time.time() + (self.default_retry_delay if countdown is None else countdown)
        elif hasattr(eta, "timestamp"):
            eta = eta.timestamp()
        raise Retry(eta, args, kwargs) from exc

    def backoff(self, retries: int) -> float:
        """Seconds before retry number retries+1 of an autoretry, as Celery's retry_backoff."""
        if not self.retry_backoff:
            return self.default_retry_delay
        factor = 1 if self.retry_backoff is True else self.retry_backoff
        delay = min(self.retry_backoff_max, factor * 2 ** retries)
        return random.uniform(0, delay) if self.retry_jitter else delay

    # -- sending ---------------------------------------------------------------------

    def delay(self, *args, **kwargs):
        """Send the task to a worker: ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable | None = None, kwargs: dict | None = None, **options):
        """Send the task; options as Celery's: task_id, countdown, eta, expires, queue,
        priority, serializer, link, link_error (``retry`` and ``retry_policy`` are accepted:
        sending is retried by the transport anyway)."""
        return self.signature(args, kwargs, **options)._send()  # a new signature: no copy needed

    def signature(self, args: Iterable | None = None, kwargs: dict | None = None, **options):
        from .canvas import Signature
        return Signature(self.name, tuple(args or ()), dict(kwargs or {}), options, task=self,
                         app=self.app)

    def s(self, *args, **kwargs):
        """A signature (partial call) of this task; a chain passes it the previous result."""
        return self.signature(args, kwargs)

    def si(self, *args, **kwargs):
        """An immutable signature: a chain does not pass it the previous result."""
        return self.signature(args, kwargs, immutable=True)

    def map(self, it: Iterable):
        """A signature of one task calling this task on each item: ``~add.map(xs)``."""
        return self.signature((list(it),), {}, each="map")

    def starmap(self, it: Iterable):
        """A signature of one task calling this task with each tuple's items as arguments."""
        return self.signature((list(it),), {}, each="star")

    def chunks(self, it: Iterable, n: int):
        """Split the calls into tasks of n calls each: ``add.chunks(zip(a, b), 10)()``."""
        from .canvas import chunks
        return chunks(self, it, n)

    def AsyncResult(self, task_id: str):
        return self.app.AsyncResult(task_id)

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    def __reduce__(self):  # a task inside an argument or closure travels as its runner does
        from .runner import Runner
        return (_rebuilt_task, (Runner.of(self),))


def _rebuilt_task(runner) -> Task:
    return runner.task()
