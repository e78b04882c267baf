"""nbq.App: Celery's application object over nbq's client, with the same names and settings.

``from nbq import Celery`` (nbq.App) is the migration: tasks, calling, canvas,
routing, configuration and results keep Celery's meanings (see README).
"""
from __future__ import annotations

import fnmatch
import importlib
import logging
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator

from .asyncresult import AsyncResult
from ..worker.context import current as current_call
from . import runner
from .canvas import GroupResult, Signature
from .conf import Settings, settings_of
from .control import Control
from .task import Task

log = logging.getLogger("nbq.app")

_apps: "weakref.WeakSet[App]" = weakref.WeakSet()  # every App alive: each has the shared tasks
_shared: dict[str, Task] = {}  # the @shared_task tasks, by name
_current: list["App"] = []  # the current app (Celery's current_app): the one made or set last


class App:
    """A set of named tasks and the settings for sending and running them.

    ``broker`` is a Redis URL or an nbq ZeroMQ broker address (None: $NBQ_BROKER,
    else a private broker with local workers, as ``nbq.Client()``).  Results are
    kept by the broker, so ``backend`` is accepted for compatibility and ignored.
    """

    def __init__(self, main: str | None = None, broker: str | None = None,
                 backend: str | None = None, include: Iterable[str] | None = None, *,
                 config_source: Any = None, **settings: Any) -> None:
        self.main = main
        self.conf = Settings()
        if config_source is not None:
            self.config_from_object(config_source)
        self.conf.update(settings)
        if broker is not None:
            self.conf.broker_url = broker
        if backend is not None:
            self.conf.result_backend = backend
        if include is not None:
            self.conf.include = tuple(include)
        self.tasks: dict[str, Task] = dict(_shared)
        self._client = None
        self._eager = None  # task_always_eager's client
        self._lock = threading.Lock()
        self.control = Control(self)
        _apps.add(self)
        self.set_current()

    def set_current(self) -> None:
        """Make this the app that ``@shared_task`` tasks are sent through (a new App is)."""
        _current[:] = [self]

    # -- tasks -------------------------------------------------------------------------

    def task(self, *args, **options) -> Task | Callable[[Callable], Task]:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True, ...)``."""
        if len(args) == 1 and callable(args[0]) and not options:
            return self._register(args[0], {})
        if args:
            raise TypeError("use @app.task or @app.task(option=value, ...)")
        return lambda fn: self._register(fn, options)

    def _register(self, fn: Callable, options: dict) -> Task:
        options = dict(options)
        name = options.pop("name", None) or self.gen_task_name(fn.__name__, fn.__module__)
        task = Task(self, fn, name, options)
        self.tasks[name] = task
        runner.registry[name] = task
        return task

    def gen_task_name(self, name: str, module: str) -> str:
        """``module.function``; a task defined in ``__main__`` is named after the app, as Celery does."""
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{name}"

    def annotate(self) -> None:
        """Apply ``task_annotations`` (by name, glob or ``*``) to the registered tasks."""
        annotations = self.conf.task_annotations or {}
        for entry in annotations if isinstance(annotations, (list, tuple)) else [annotations]:
            for task in self.tasks.values():
                attrs = entry(task) if callable(entry) else _lookup(entry, task.name)
                for attr, value in (attrs or {}).items():
                    setattr(task, attr, value)
                    task.options[attr] = value

    def route(self, name: str, args: tuple, kwargs: dict, options: dict) -> str | None:
        """The queue ``task_routes`` gives the task: names, globs, or router functions, in order."""
        routes = self.conf.task_routes
        if not routes:
            return None
        for router in routes if isinstance(routes, (list, tuple)) else [routes]:
            found = (router(name, args, kwargs, options, task=self.tasks.get(name))
                     if callable(router) else _lookup(router, name))
            if isinstance(found, str):
                return found
            if found and found.get("queue"):
                return found["queue"]
        return None

    # -- sending -----------------------------------------------------------------------

    def signature(self, name: str, args: Iterable = (), kwargs: dict | None = None,
                  **options) -> Signature:
        """A call of the task registered as name, which only the worker needs to know."""
        task = self.tasks.get(name)
        return Signature(name, tuple(args), kwargs, options, task=task, app=self)

    def send_task(self, name: str, args: Iterable | None = None, kwargs: dict | None = None,
                  **options) -> AsyncResult:
        """Send a task by name; a worker that has not registered it fails it with NotRegistered."""
        return self.signature(name, args or (), kwargs, **options).apply_async()

    def AsyncResult(self, task_id: str) -> AsyncResult:
        """The result of any task by its id."""
        return AsyncResult(task_id, client=self.client)

    def GroupResult(self, group_id: str, task_ids: Iterable[str]) -> GroupResult:
        return GroupResult(group_id, [self.AsyncResult(t) for t in task_ids])

    def events(self, since: float | None = None, timeout: float | None = None) -> Iterator[dict]:
        """Task and worker events of this app's broker, as Client.events: those kept from
        since (epoch seconds; None: live only; 0: all kept), then each as it happens."""
        return self.client.events(since=since, timeout=timeout)

    @property
    def client(self):
        """The nbq client this app sends through, connected on first use.

        Inside a task on a worker it is the worker's own client of its broker.  With
        ``task_always_eager`` (Celery's; CELERY_ALWAYS_EAGER) it is an inline memory://
        client instead: each task runs in the calling thread as it is sent (eager).
        """
        if current_call() is not None:
            return runner.worker_client()
        if self.conf.task_always_eager:
            return self._eager_client()
        with self._lock:
            if self._client is None or self._client.closed:  # (closed too in a forked process)
                from ..client import Client
                if self.conf.result_backend and self.conf.result_backend != self.conf.broker_url:
                    log.info("nbq keeps results in the broker: result_backend %s is not used",
                             self.conf.result_backend)
                self.annotate()
                self._client = Client(self.conf.broker_url,
                                      result_expires=float(self.conf.result_expires))
                # as Celery's: a sent task outlives this process on a broker of its own, so
                # exit waits only for what a private broker (ending with it) holds
                self._client.wait_at_exit = self._client.private_broker
            return self._client

    def _eager_client(self):
        """The inline memory:// client of task_always_eager, made on first use."""
        with self._lock:
            if self._eager is None or self._eager.closed:
                from ..client import Client
                self._eager = Client("memory://", inline=True)
            return self._eager

    def close(self) -> None:
        """Shut down this app's clients (and the private broker it started, if any), not
        waiting for results nobody asked for."""
        with self._lock:
            for client in (self._client, self._eager):
                if client is not None:
                    client.shutdown(wait=False)
            self._client = self._eager = None

    # -- configuration -------------------------------------------------------------------

    def config_from_object(self, obj: Any) -> None:
        """Read settings from a module (object or dotted name), a dict, or any object."""
        self.conf.update(settings_of(obj))

    def autodiscover_tasks(self, packages: Iterable[str]) -> None:
        """Import ``package.tasks`` of each package, registering the tasks found there."""
        for package in packages:
            try:
                importlib.import_module(f"{package}.tasks")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.tasks":
                    raise

    def __repr__(self) -> str:
        return f"<nbq.App {self.main or '__main__'} broker={self.conf.broker_url}>"


def _lookup(table: dict, name: str):
    """A name's entry in a table keyed by names and glob patterns: exact first, then globs in order."""
    if name in table:
        return table[name]
    for pattern, value in table.items():
        if isinstance(pattern, str) and fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def current_app() -> App:
    """The app made or set last; if none was, a default ``App()`` (its broker: $NBQ_BROKER, else
    a private one), as Celery's default app."""
    if not _current:
        App()
    return _current[0]


class SharedTask(Task):
    """A task of no app in particular (``@shared_task``): sent through the current app."""

    app = property(lambda self: current_app(),
                   lambda self, app: None)  # Task.__init__ sets it: a shared task keeps none


def shared_task(*args, **options) -> Task | Callable[[Callable], Task]:
    """Celery's ``@shared_task``: a task of every App (those alive and those made later), for
    modules that import no app; ``@shared_task`` or ``@shared_task(option=value, ...)``."""
    def register(fn: Callable) -> Task:
        opts = dict(options)
        name = opts.pop("name", None) or f"{fn.__module__}.{fn.__name__}"
        task = _shared[name] = runner.registry[name] = SharedTask(None, fn, name, opts)
        for app in _apps:
            app.tasks[name] = task
        return task

    if len(args) == 1 and callable(args[0]) and not options:
        return register(args[0])
    if args:
        raise TypeError("use @shared_task or @shared_task(option=value, ...)")
    return register


def load_app(spec: str) -> App:
    """The app ``-A spec`` names, found as Celery finds it, with its tasks imported; this
    process accepts tasks in its ``accept_content`` only (a worker's app).

    ``module:attribute``; else the module's ``app`` or ``celery``, or any App
    in it; else the same in ``module.celery``.
    """
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attr, None) if attr else _app_in(module)
    if app is None and not attr:
        try:
            app = _app_in(importlib.import_module(f"{module_name}.celery"))
        except ModuleNotFoundError:
            app = None
    if not isinstance(app, App):
        raise ValueError(f"no nbq.App found by -A {spec}: define `app = nbq.App(...)` in "
                         f"module {module_name}, or name it as -A module:attribute")
    for name in (*app.conf.imports, *app.conf.include):
        importlib.import_module(name)
    app.annotate()
    runner.accept_only(app.conf.accept_content)
    return app


def _app_in(module) -> App | None:
    for name in ("app", "celery"):
        if isinstance(getattr(module, name, None), App):
            return getattr(module, name)
    return next((v for v in vars(module).values() if isinstance(v, App)), None)
