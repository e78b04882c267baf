"""What a task message runs on a worker: the task found by name, or the function that travelled.

``Runner`` is the engine-level function of every Celery-style task: it is
shipped once per task (by content hash) and called with the encoded
arguments and the call's request (chain, chord, links).  On the worker it
decodes, applies the task's retry and time-limit rules, runs the task and
then sends what follows it (the next step of a chain, a chord's body, link
callbacks) through a client of the worker's own broker.
"""
from __future__ import annotations

import inspect
import os
import signal
import socket
import traceback
from contextlib import contextmanager
from typing import Any, Iterable

import cloudpickle

from .. import protocol
from ..errors import NbqError
from ..worker.context import TaskContext, current
from . import serializers
from .exceptions import ChordError, ContentDisallowed, NotRegistered, Retry, SoftTimeLimitExceeded
from .task import Request, Task, _requests

#: Tasks registered in this process by name (every App's), as ``-A module`` imports them.
registry: dict[str, Task] = {}
#: The content types this worker accepts (accept_only), None: any.
accept: set[str] | None = None


def accept_only(content_types: Iterable[str]) -> None:
    """Refuse, in this process, tasks sent with a serializer not among content_types (the
    ``accept_content`` of the app a worker loads with ``-A``)."""
    global accept
    accept = set(content_types)


class Runner:
    """A task as it travels: its name and options, and its function unless sent by name only."""

    def __init__(self, name: str, options: dict, fn=None, blob: bytes | None = None) -> None:
        self.name = name
        self.options = options
        self.fn = fn
        self._blob = blob
        self._task: Task | None = None

    @classmethod
    def of(cls, task: Task) -> "Runner":
        runner = task.__dict__.get("_runner")
        if runner is None:
            runner = task.__dict__["_runner"] = cls(task.name, task.options, task.run)
        return runner

    def __reduce__(self):
        blob = self._blob
        if blob is None and self.fn is not None:
            blob = protocol.dumps_named(self.fn, f"the function of task {self.name}")
            blob = b"".join(bytes(memoryview(f)) for f in blob)
        return (Runner, (self.name, self.options, None, blob))

    def packed(self) -> "Runner":
        """This runner as it travels, its function pickled once, now: for one sent in many messages."""
        return Runner(*self.__reduce__()[1])

    def __nbq_fingerprint__(self) -> tuple | None:
        from ..client import fingerprint
        inner = fingerprint(self.fn) if self.fn is not None else ()
        return None if inner is None else (self, inner)

    def task(self) -> Task:
        """The task to run: the one registered here under this name, else the one that travelled."""
        found = registry.get(self.name)
        if found is not None:
            return found
        if self._task is None:
            if self._blob is None and self.fn is None:
                raise NotRegistered(f"task {self.name!r} is not registered on worker "
                                    f"{socket.gethostname()}: start the worker with -A and the "
                                    "module that defines it")
            if self.fn is None:
                try:
                    self.fn = cloudpickle.loads(self._blob)
                except Exception as e:
                    raise NotRegistered(f"task {self.name!r} is not registered on worker "
                                        f"{socket.gethostname()} and its function could not be "
                                        f"loaded there ({type(e).__name__}: {e}): start the "
                                        "worker with -A and the module that defines it") from None
            self._task = Task(None, self.fn, self.name, self.options)
        return self._task

    def __call__(self, body: tuple, req: dict) -> Any:
        task = self.task()
        serializer, data = body
        if accept is not None and serializer not in accept:
            raise ContentDisallowed(f"this worker accepts {', '.join(sorted(accept))} only, and task "
                                    f"{self.name} was sent as {serializer}: add it to the worker "
                                    "app's accept_content, or send with another serializer")
        args, kwargs = serializers.decode(serializer, data)
        ctx = current()
        request = Request(id=ctx.id, retries=ctx.retries, args=tuple(args), kwargs=kwargs,
                          eta=ctx.eta, expires=ctx.expires, called_directly=False,
                          hostname=socket.gethostname())
        _requests.append(request)
        try:
            value = _invoke(ctx, task, request, req, args, kwargs)
        except Retry:
            raise
        except BaseException as exc:
            _after_failure(ctx, request, req, exc)
            raise
        finally:
            _requests.remove(request)  # (not pop: another thread's call may have come since)
        _after_success(ctx, request, req, value)
        ser = req.get("result_serializer", "pickle")
        return serializers.decode(ser, serializers.encode(ser, value, f"the result of {self.name}"))


def _invoke(ctx: TaskContext, task: Task, request: Request, req: dict, args, kwargs) -> Any:
    """Run the task under its rate limit and time limits (the call's, else the task's);
    exceptions of ``autoretry_for`` become retries."""
    fn, each = task.run, req.get("each")
    ctx.acquire_rate(task.name, task.rate_limit)
    try:
        with _limits(ctx, req.get("stl", task.soft_time_limit), req.get("tl", task.time_limit)):
            if each == "map":
                return [fn(x) for x in args[0]]
            if each == "star":
                return [fn(*x) for x in args[0]]
            return fn(task, *args, **kwargs) if task.bind else fn(*args, **kwargs)
    except tuple(task.autoretry_for or ()) as exc:
        task.retry(exc=exc, countdown=task.backoff(request.retries))


@contextmanager
def _limits(ctx: TaskContext, soft: float | None, hard: float | None):
    """Raise SoftTimeLimitExceeded in the task after soft seconds (it may clean up); after hard
    seconds the supervisor kills this process, wherever it is stuck, and the task fails with
    TimeLimitExceeded without running again (Celery's meanings).  A call that a memory://
    worker runs, in a thread of the client's process, cannot be interrupted: NbqError."""
    if (soft or hard) and ctx.item.get("ip"):
        raise NbqError(f"a time limit (time_limit={hard}, soft_time_limit={soft}) needs a worker "
                       "process to interrupt or kill; memory:// runs this task in a thread of the "
                       "client's process: leave the limits out there, or use another broker")
    if hard:
        ctx.limit_time(hard)
    if soft:
        def alarm(signum, frame):
            raise SoftTimeLimitExceeded(f"the task ran longer than its soft time limit of {soft:g} s")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, soft)
    try:
        yield
    finally:
        if soft:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if hard:
            ctx.limit_time(0)


# -- what follows a task (runs on the worker) --------------------------------------------

_client = None


def worker_client():
    """A client of this worker's broker (NBQ_BROKER, set by ``nbq worker``), made on first use;
    for a call run by a memory:// worker (header ``ip``), one of that in-process broker."""
    global _client
    ctx = current()
    if ctx is not None and ctx.item.get("ip"):
        return _in_process_client(ctx.item["ip"], bool(ctx.item.get("il")))
    if _client is None or _client.closed:
        from ..client import Client
        if not os.environ.get("NBQ_BROKER"):
            raise RuntimeError("a task can start other tasks only on a worker started by "
                               "`nbq worker`, which sets NBQ_BROKER")
        _client = Client(os.environ["NBQ_BROKER"])
    return _client


_in_process: dict = {}


def _in_process_client(address: str, inline: bool):
    """A client of the memory:// broker at address, starting no threads; inline (``il``): the
    tasks it sends run at once in the sending thread, as the call that sends them did."""
    client = _in_process.get((address, inline))
    if client is None or client.closed:
        from ..client import Client
        from ..clusters.memory import MemoryCluster
        client = _in_process[address, inline] = Client(MemoryCluster(address, 0, inline=inline))
    return client


def _after_success(ctx: TaskContext, request: Request, req: dict, value: Any) -> None:
    for sig in req.get("link", ()):
        sig.apply_async((value,), client=worker_client())  # (an immutable one drops it)
    chain = req.get("chain")
    if chain:
        step, rest = chain[0], chain[1:]
        step.apply_async((value,), client=worker_client(), chain=rest)
    if req.get("chord"):
        _chord_part(ctx, request, req["chord"], value, None)


def _after_failure(ctx: TaskContext, request: Request, req: dict, exc: BaseException) -> None:
    """A failed task's chain fails with it, its error callbacks run, its chord learns of it."""
    client = None
    chain = list(req.get("chain") or ())
    if chain or req.get("link_error"):
        client = worker_client()
    for step in chain:  # every later step of the chain fails with this task's error
        fail(client, step, exc)
    for sig in req.get("link_error", ()):
        if sig.immutable:
            sig.apply_async(client=client)
        elif _takes_three(sig):
            tb = "".join(traceback.format_exception(exc))
            sig.apply_async((request, exc, tb), client=client)
        else:
            sig.apply_async((request.id,), client=client)
    if req.get("chord"):
        _chord_part(ctx, request, req["chord"], None, exc)


def _takes_three(sig) -> bool:
    """Whether an error callback has Celery's new form (request, exc, traceback)."""
    try:
        params = inspect.signature(sig.runner.task().run).parameters.values()
    except (TypeError, ValueError, NotRegistered):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _chord_part(ctx: TaskContext, request: Request, chord: dict, value: Any,
                exc: BaseException | None) -> None:
    """Count this header task (done or failed) in its chord; the one that completes the
    count sends the body, once, with the header's results in order."""
    client = worker_client()
    if not client.join(chord["id"], request.id, chord["n"]):
        return
    ctx.flush()  # results of header tasks this process ran before may still be held here
    ids = [header_id(chord, i) for i in range(chord["n"])]
    others = [tid for tid in ids if tid != request.id]
    futures = dict(zip(others, client.watch(others)))  # one "watch" request for them all
    results, failed = [], None if exc is None else (request.id, exc)
    for tid in ids:
        if failed is not None:
            break
        if tid == request.id:
            results.append(value)
            continue
        try:
            results.append(futures[tid].result())
        except BaseException as e:  # failed, or revoked (CancelledError)
            failed = (tid, e)
    body = chord["body"]
    if failed is not None:
        fail(client, body, ChordError(f"the chord's body did not run: header task {failed[0]} "
                                      f"failed: {failed[1]!r}"))
    else:
        body.apply_async((results,), client=client)


def header_id(chord: dict, i: int) -> str:
    """The id of header task i of the chord: the caller's, else derived from the chord's id."""
    return chord.get("ids", {}).get(i) or f"{chord['id']}-{i}"


def _raise(exc: BaseException):
    raise exc


def fail(client, sig, exc: BaseException) -> None:
    """Give the (frozen) signature's task exc as its result, without running it."""
    exc = protocol.rebuild_error(protocol.error_record(exc))  # picklable, whatever exc was
    exc.__cause__ = None
    client.apply(_raise, (exc,), task_id=sig.id, queue=sig.options["queue"])
