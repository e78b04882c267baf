"""Signatures and their compositions: group, chain (``|``), chord, chunks (Celery's canvas).

A composition is applied by giving every task its id up front and sending
only the first ones: each task's request says what follows it (the rest of
its chain, its chord), and the worker that finishes it sends that, so a
chain or chord goes on when the caller has gone.
"""
from __future__ import annotations

import os
import time
import uuid
from datetime import datetime
from typing import Any, Iterable

from .. import protocol
from ..errors import SerializationError
from ..events import args_repr
from .asyncresult import AsyncResult
from . import serializers
from .runner import Runner, header_id, worker_client

#: Options that travel in the task's header or request rather than as settings.
_SEND_OPTIONS = ("task_id", "queue", "serializer", "result_serializer", "countdown", "eta",
                 "expires", "priority", "link", "link_error", "retry", "retry_policy",
                 "immutable", "each", "time_limit", "soft_time_limit", "exchange", "routing_key",
                 "reject_on_worker_lost", "parent_id", "root_id")  # the last two: Celery's, for events


_ids: list[str] = []  # task ids made ahead, as one os.urandom call makes 256 of them
os.register_at_fork(after_in_child=_ids.clear)  # a forked process never reuses its parent's


def new_id() -> str:
    """A random task id, as Celery's: ``str(uuid.uuid4())``, made 256 at a time."""
    try:
        return _ids.pop()
    except IndexError:
        raw = os.urandom(16 * 256)
        _ids.extend(str(uuid.UUID(bytes=raw[i:i + 16], version=4)) for i in range(0, len(raw), 16))
        return _ids.pop()


class Signature:
    """One task call, not made yet: a name, arguments and options; ``sig.delay()`` sends it."""

    def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None,
                 options: dict | None = None, *, task=None, app=None, immutable: bool = False) -> None:
        options = dict(options or {})
        unknown = set(options) - set(_SEND_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) for {name}: {', '.join(sorted(unknown))}")
        self.name = name
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.immutable = options.pop("immutable", immutable)
        self.options = options
        self.task = task
        self.app = app if app is not None else getattr(task, "app", None)

    @property
    def id(self) -> str | None:
        return self.options.get("task_id")

    @property
    def runner(self) -> Runner:
        """What the worker runs: the task's runner, or one that finds the task by name there."""
        runner = self.__dict__.get("_runner")
        if runner is None:
            runner = Runner.of(self.task) if self.task is not None else Runner(self.name, {})
        return runner

    def __reduce__(self):  # travels without its app: routing was resolved by freeze()
        return (_rebuilt_signature, (self.name, self.args, self.kwargs, self.options,
                                     self.immutable, self.runner))

    def clone(self, args: tuple = (), kwargs: dict | None = None, **options) -> "Signature":
        """A copy with args put before its own (a chain's previous result goes first)."""
        new = Signature(self.name, tuple(args) + self.args, dict(self.kwargs, **(kwargs or {})),
                        dict(self.options, **options), task=self.task, app=self.app,
                        immutable=self.immutable)
        new.__dict__["_runner"] = self.__dict__.get("_runner")
        return new

    def set(self, **options) -> "Signature":
        self.options.update(options)
        return self

    def freeze(self) -> None:
        """Give the call its id and resolve its queue, serializers and priority now (as the
        caller's app says): a priority other than 0-9 is a ValueError here, in the caller."""
        opts = self.options
        if opts.get("task_id") is None:
            opts["task_id"] = new_id()
        task = self.task
        app = self.app
        if opts.get("queue") is None:
            opts["queue"] = (getattr(task, "queue", None)
                             or (app.route(self.name, self.args, self.kwargs, opts) if app else None)
                             or (app.conf.task_default_queue if app else "default"))
        opts.setdefault("serializer", getattr(task, "serializer", None)
                        or (app.conf.task_serializer if app else "pickle"))
        opts.setdefault("result_serializer", app.conf.result_serializer if app else "pickle")
        if task is not None and task.expires is not None:
            opts.setdefault("expires", task.expires)
        if opts.get("reject_on_worker_lost") is None:
            own = task.reject_on_worker_lost if task is not None else None
            opts["reject_on_worker_lost"] = own if own is not None else (
                app.conf.task_reject_on_worker_lost if app else None)
        if opts.get("priority") is None:
            own = task.priority if task is not None else None
            opts["priority"] = own if own is not None else (
                app.conf.task_default_priority if app else None)
        pr = opts["priority"]
        if pr is not None and (not isinstance(pr, int) or isinstance(pr, bool) or not 0 <= pr <= 9):
            raise ValueError(f"priority of {self.name} must be an integer from 0 to 9 "
                             f"(9 most urgent), not {pr!r}")

    # -- calling ---------------------------------------------------------------------

    def __call__(self, *args, **kwargs) -> Any:
        """Run the task here, as Celery's ``sig()`` does."""
        if self.task is None:
            raise TypeError(f"signature of {self.name} has no task here to call: use .delay()")
        args = self.args if self.immutable else tuple(args) + self.args
        return self.task(*args, **dict(self.kwargs, **kwargs))

    def delay(self, *args, **kwargs) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, *, client=None,
                    chain: list | None = None, chord: dict | None = None, **options) -> AsyncResult:
        """Send the call; args are put before the signature's own (unless immutable)."""
        sig = self.clone(() if self.immutable else tuple(args), kwargs, **options)
        return sig._send(client, chain, chord)

    def _send(self, client=None, chain: list | None = None, chord: dict | None = None) -> AsyncResult:
        """Freeze and send this signature itself (apply_async sends a copy)."""
        self.freeze()
        client = client or _client_of(self.app)
        for key in ("link", "link_error"):
            links = self.options.get(key)
            if links is not None:
                links = [links] if isinstance(links, Signature) else list(links)
                for link in links:
                    link.freeze()
                self.options[key] = links
        send(client, self, chain=chain, chord=chord)
        result = AsyncResult(self.id, client=client)
        conf = self.app.conf if self.app is not None else None
        if conf is not None and conf.task_always_eager and conf.task_eager_propagates:
            result.get()  # it has run: Celery's task_eager_propagates raises its error here
        return result

    def __or__(self, other) -> "chain":
        return chain(self, other)

    def __invert__(self) -> Any:
        return self.apply_async().get()

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{'%' if self.immutable else ''}{self.name}({', '.join(parts)})"


def _rebuilt_signature(name, args, kwargs, options, immutable, runner) -> Signature:
    sig = Signature(name, args, kwargs, options, immutable=immutable)
    sig.__dict__["_runner"] = runner
    return sig


def _client_of(app):
    return app.client if app is not None else worker_client()


def send(client, sig: Signature, chain: list | None = None, chord: dict | None = None) -> None:
    """Send a frozen signature through client: its header (eta, expiry) and request."""
    opts = sig.options
    eta, expires = opts.get("eta"), opts.get("expires")
    if eta is not None:
        eta = eta.timestamp() if isinstance(eta, datetime) else float(eta)
    elif opts.get("countdown"):
        eta = time.time() + float(opts["countdown"])
    if expires is not None:
        expires = expires.timestamp() if isinstance(expires, datetime) else time.time() + expires
    req: dict = {"result_serializer": opts["result_serializer"]}
    for key, value in (("chain", chain), ("chord", chord), ("each", opts.get("each")),
                       ("tl", opts.get("time_limit")), ("stl", opts.get("soft_time_limit")),
                       ("link", opts.get("link")), ("link_error", opts.get("link_error"))):
        if value:
            req[key] = value
    ser = opts["serializer"]
    body = (ser, serializers.encode(ser, (sig.args, sig.kwargs) if ser == "pickle"
                                    else [list(sig.args), sig.kwargs], f"the arguments of {sig.name}"))
    # reject_on_worker_lost=False is Celery's "the first death of its process fails it"
    try:
        client.apply(sig.runner, (body, req), task_id=sig.id, queue=opts["queue"], eta=eta,
                     expires=expires, priority=opts.get("priority"),
                     max_task_deaths=1 if opts.get("reject_on_worker_lost") is False else None,
                     argsrepr=args_repr(sig.args, sig.kwargs), parent_id=opts.get("parent_id"),
                     root_id=opts.get("root_id"))
    except SerializationError:  # named as the task's own argument, not the runner's tuple
        if ser == "pickle":
            protocol.dumps_call(sig.name, sig.args, sig.kwargs)
        raise


class GroupResult:
    """The results of a group, in the group's order."""

    def __init__(self, id: str, results: list) -> None:
        self.id = id
        self.results = results

    children = property(lambda self: self.results)

    def get(self, timeout: float | None = None, propagate: bool = True) -> list:
        """Every result in order; the first failure is raised unless propagate is False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [r.get(None if deadline is None else max(0.0, deadline - time.monotonic()),
                      propagate=propagate) for r in self.results]

    join = get

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        return not self.ready()

    def completed_count(self) -> int:
        return sum(r.successful() for r in self.results)

    def revoke(self, terminate: bool = False) -> None:
        for r in self.results:
            r.revoke(terminate=terminate)

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"


class group:
    """Calls run in parallel: ``group(add.s(i, i) for i in range(10))().get()``."""

    def __init__(self, *tasks) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])
        self.tasks = list(tasks)

    def __call__(self, *args, **kwargs) -> GroupResult:
        return self.apply_async(args, kwargs)

    delay = __call__

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, **options) -> GroupResult:
        results = [sig.apply_async(args, kwargs, **options) for sig in self.tasks]
        return GroupResult(new_id(), results)

    def __or__(self, other) -> "chord":
        return chord(self.tasks, other)

    def __invert__(self) -> list:
        return self.apply_async().get()

    def __len__(self) -> int:
        return len(self.tasks)


class chain:
    """Calls one after another, each given the previous result: ``chain(add.s(4, 4) | mul.s(8))``."""

    def __init__(self, *tasks) -> None:
        steps: list = []
        for t in tasks:
            steps.extend(t.tasks if isinstance(t, chain) else [t])
        for t in steps:
            if not isinstance(t, Signature):
                raise TypeError(f"a chain holds task signatures; {t!r} is not one (a group in a "
                                "chain is not supported: use chord(group, body))")
        self.tasks = steps

    def __or__(self, other) -> "chain":
        return chain(self, other)

    def __call__(self, *args, **kwargs) -> AsyncResult:
        return self.apply_async(args, kwargs)

    delay = __call__

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, **options) -> AsyncResult:
        """Send the first call; returns the last call's result, ``.parent`` leading back."""
        if not self.tasks:
            raise ValueError("an empty chain has nothing to run")
        rest = [sig.clone() for sig in self.tasks[1:]]
        root = options["task_id"] = options.get("task_id") or self.tasks[0].id or new_id()
        parent = root
        for sig in rest:  # for their events: the step before, and the first
            sig.freeze()
            sig.options.update(parent_id=parent, root_id=root)
            parent = sig.id
        first = self.tasks[0].apply_async(args, kwargs, chain=rest, **options)
        result, client = first, first.client
        client.watch([sig.id for sig in rest])  # one request for all the later steps
        for sig in rest:
            nxt = AsyncResult(sig.id, client=client)
            nxt.parent = result
            result = nxt
        return result

    def __invert__(self) -> Any:
        return self.apply_async().get()


class chord:
    """A group whose results, in order, go to one callback: ``chord(header)(body)``.

    The body runs once, after every header task has finished, even if one ran
    twice (a retry, or a worker that died): header tasks are counted by id.
    A header task that fails makes the body fail with ChordError.
    """

    def __init__(self, header, body: Signature | None = None) -> None:
        self.header = list(header.tasks if isinstance(header, group) else header)
        self.body = body

    def __call__(self, body: Signature | None = None, **options) -> AsyncResult:
        return self.apply_async(body=body, **options)

    def apply_async(self, args: Iterable = (), kwargs: dict | None = None, *,
                    body: Signature | None = None, **options) -> AsyncResult:
        body = (body or self.body)
        if body is None:
            raise TypeError("a chord needs a body: chord(header)(body) or chord(header, body)")
        body = body.clone()
        body.freeze()
        meta = {"id": new_id(), "n": len(self.header), "body": body}
        body.options.update(parent_id=meta["id"], root_id=meta["id"])  # for events
        header = [sig.clone() for sig in self.header]
        for i, sig in enumerate(header):
            sig.options.setdefault("task_id", header_id(meta, i))
            sig.options["root_id"] = meta["id"]
            sig.freeze()
        client = _client_of(body.app or next((s.app for s in header if s.app), None))
        if not header:
            return body.apply_async(([],), client=client)
        body.__dict__["_runner"] = body.runner.packed()  # it goes in every header task's message
        # Every header task carries meta, so its size must not grow with the header: the ids are
        # derived from the chord's, and only ids given by the caller are listed.
        own = {i: s.id for i, s in enumerate(header) if s.id != header_id(meta, i)}
        if own:
            meta["ids"] = own
        results = [sig.apply_async(args, kwargs, client=client, chord=meta, **options)
                   for sig in header]
        res = AsyncResult(body.id, client=client)
        res.parent = GroupResult(meta["id"], results)
        return res


class chunks:
    """n calls per task: ``add.chunks(zip(a, b), 10)()`` → a GroupResult of lists."""

    def __init__(self, task, it: Iterable, n: int) -> None:
        if n < 1:
            raise ValueError("chunks need n >= 1")
        self.task = task
        self.items = [tuple(x) for x in it]
        self.n = n

    def group(self) -> group:
        return group(self.task.starmap(self.items[i:i + self.n])
                     for i in range(0, len(self.items), self.n))

    def __call__(self, **options) -> GroupResult:
        return self.apply_async(**options)

    def apply_async(self, **options) -> GroupResult:
        return self.group().apply_async(**options)

    def __invert__(self) -> list:
        return self.apply_async().get()


def signature(name: str | Signature, args: Iterable = (), kwargs: dict | None = None,
              app=None, **options) -> Signature:
    """A signature by task name (no code needed here), or a copy of one."""
    if isinstance(name, Signature):
        return name.clone()
    return Signature(name, tuple(args), kwargs, options, app=app)
