"""nbq.Client: a concurrent.futures.Executor whose work runs on nbq workers.

The user's threads pickle and send; the receiver thread (receiver.py) completes the
work.  The Client owns its collaborators (see nbq/client/__init__.py) and the tables of
its unfinished work (``_futures``, ``_chunks``), and holds the public API; its shutdown
sequence is shutdown.py's.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import threading
import time
import types
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .. import protocol
from ..events import args_repr
from ..deaths import MAX_DEATHS
from ..errors import (BrokerTimeout, BrokerUnavailable, KeyMismatch, MessageTooLarge, NbqError,
                      SerializationError)
from ..policy import CONNECT_TIMEOUT
from . import registry
from .control import Controls, terminate
from .events import Subscriptions
from .feeding import Chunker, Feeder, ProcessCount, chunk_count, default_chunksize
from .future import Future
from .link import BROKER_GRACE, BrokerLink
from .mapresult import MapResult
from .receiver import Receiver
from .requests import Requests
from .sending import Sender, check_queue, client_task_header, task_options
from .shipping import FunctionCache, function_name, ship_modules
from .shutdown import ClientShutdown
from .watching import Watches

if TYPE_CHECKING:
    from ..clusters.base import Cluster


class Client(ClientShutdown, concurrent.futures.Executor):
    """Submit work to nbq workers.

    ``Client()`` starts a private broker and ``os.cpu_count()`` worker processes;
    ``Client(address)`` connects to a running broker (and starts ``workers``
    local worker processes on it when given).  NBQ_BROKER supplies the
    address when none is given.  ``initializer(*initargs)`` runs once in each
    local worker process before its first task (and in a process replacing
    one); ``ship`` lists modules sent by value (see ``nbq.ship``).

    ``max_task_deaths``: a task (or a map item) whose own process dies while
    running it this many times, its worker alive, fails with WorkerLost; 1 fails
    it at the first (a map chunk's unfinished items with it: which one killed the
    process is known only once the chunk re-runs item by item).  It travels in each task's signed header (absent for the
    default), so the ZeroMQ broker or the Redis workers apply it with no setting
    of their own (deaths.py).

    ``Client("memory://")`` runs tasks in ``workers`` threads of this process (default
    os.cpu_count()), ``Client("memory://", inline=True)`` in the thread that submits
    them, during submit/map (clusters/memory.py says what a process-less worker refuses).

    ``broker_grace``: seconds a silent broker is waited for before waits raise
    BrokerUnavailable (the work is kept, and sent again if the broker comes back
    at the same address).

    ``wait_at_exit`` (an attribute, True): whether the interpreter's exit waits for
    this client's unfinished work, as ``shutdown(wait=True)``.
    """

    def __init__(self, address: "str | Cluster | None" = None, workers: int | None = None, *,
                 key_file: str | None = None, result_expires: float | None = None,
                 timeout: float = CONNECT_TIMEOUT, max_task_deaths: int = MAX_DEATHS,
                 ship: Iterable[types.ModuleType | str] = (),
                 initializer: Callable | None = None, initargs: tuple = (),
                 broker_grace: float = BROKER_GRACE, inline: bool = False) -> None:
        if not broker_grace > 0:
            raise ValueError(f"broker_grace must be a positive number of seconds, not {broker_grace!r}")
        self._task_header = client_task_header(max_task_deaths)
        ship_modules(*ship)
        from ..cluster import client_cluster
        # Client(cluster): the user's cluster, not this client's to close
        self._cluster, self._owns_cluster = client_cluster(
            address, workers, key_file=key_file, result_expires=result_expires,
            initializer=initializer, initargs=initargs, inline=inline,
            max_task_deaths=max_task_deaths)
        self.key = self._cluster.key
        self.id = uuid.uuid4().hex[:16]
        if not self._owns_cluster:
            self._cluster._clients.add(self)
        self.address = self._cluster.address
        self._pid = os.getpid()
        self.wait_at_exit = True  # what the interpreter's exit does: shutdown(wait=this)
        self._seq = itertools.count()  # task, map and request numbers
        self._futures: dict[str, Future] = {}  # tasks not seen finish, by id
        self._chunks: dict[str, tuple[MapResult, int, int]] = {}  # map chunks in flight, by id
        try:
            self._conn = self._cluster.client_connection(self.id)
        except Exception:
            self._close_cluster()
            raise
        self._sender = Sender(self._conn)
        self._functions = FunctionCache(self._conn, self._sender.lock)
        self._ship = self._functions.ship  # fn -> its hash, shipped once
        self._link = BrokerLink(self._conn, self.address, broker_grace,
                                resend_after_silence=not self._conn.durable
                                and self._cluster.broker is None)
        self._requests = Requests(self._seq, self._sender, self._link)
        self._feeder = Feeder(self._conn, self._sender, self._chunks)
        self._processes = ProcessCount(self._cluster, self._requests, self._conn)
        self._controls = Controls(self._conn)
        self._watches = Watches(self._conn, self._futures, self._chunks)
        self._subscriptions = Subscriptions(self._conn)
        self._inbox = Receiver(self._conn, self._sender, self._functions, self._feeder,
                               self._requests, self._controls.replies, self._link,
                               self._futures, self._chunks, self._subscriptions)
        self._inbox.start(f"nbq-receiver-{self.id}", self._cluster.host())
        welcome = self._requests.new(None)
        self._conn.hello(welcome[0])
        try:
            welcome[1].result(timeout)
        except concurrent.futures.TimeoutError:
            self._shutdown_now()
            raise BrokerUnavailable(f"no nbq broker answered at {self.address} within "
                                    f"{timeout:g} s: start one with `nbq broker`, or check the "
                                    "address and that both sides use the same key") from None
        except KeyMismatch:
            self._shutdown_now()
            raise
        self._link.connected()
        registry.opened(self)

    # -- submitting -----------------------------------------------------------

    def submit(self, fn: Callable, /, *args, queue: str = "default", **kwargs) -> Future:
        """Run fn(*args, **kwargs) on a worker; ``queue`` routes it (default "default")."""
        return self._submit(fn, args, kwargs, queue=queue)

    def apply(self, fn: Callable, args: Iterable = (), kwargs: dict | None = None, *,
              task_id: str | None = None, queue: str = "default", eta: float | None = None,
              expires: float | None = None, priority: int | None = None,
              max_task_deaths: int | None = None, argsrepr: str | None = None,
              parent_id: str | None = None, root_id: str | None = None) -> Future:
        """Run fn(*args, **kwargs) on a worker, with the options of Celery's apply_async that
        submit() has no room for.

        ``task_id``: the task's id (default: a new one), known before it is sent, so that a
        chain or chord can name tasks not sent yet.  ``eta``: epoch seconds before which it
        does not start.  ``expires``: epoch seconds after which it is revoked, not run.
        ``priority``: 0 to 9, 9 most urgent (0 and None: the default).  ``max_task_deaths``:
        this task's, instead of the client's.  ``argsrepr``: what its task-sent event shows
        as its arguments (default: a short repr of args and kwargs); ``parent_id``,
        ``root_id``: the tasks it follows in a chain or chord, for its events.
        """
        options = task_options(eta, expires, priority, max_task_deaths, argsrepr, parent_id,
                               root_id)
        return self._submit(fn, tuple(args), kwargs or {}, queue=queue, tid=task_id,
                            options=options)

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, *, queue: str = "default",
                tid: str | None = None, options: dict | None = None) -> Future:
        """submit() with a chosen task id and header options (``eta``, ``x`` expiry: epoch seconds)."""
        self._check_open()
        check_queue(queue)
        h = self._ship(fn)
        payload = protocol.dumps_call(function_name(fn), args, kwargs)
        tid = tid or f"{self.id}-{next(self._seq)}"
        fut = Future(tid, self)
        self._futures[tid] = fut
        item = {"id": tid, "h": h, "q": queue, "f": 1, "nf": len(payload),
                "ar": args_repr(args, kwargs)}
        if self._task_header:
            item.update(self._task_header)
        if options:
            item.update(options)
        try:
            self._sender.send(item, payload)
        except BaseException:  # refused before it left (too large): nothing waits for it
            self._futures.pop(tid, None)
            raise
        return fut

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int | None = None, queue: str = "default") -> MapResult:
        """fn over the items of the iterables (zipped), in chunks; see MapResult."""
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if len(iterables) == 1:
            return self._map(fn, iterables[0], False, timeout, chunksize, queue)
        sized = all(hasattr(it, "__len__") for it in iterables)
        source = list(zip(*iterables)) if sized else zip(*iterables)
        return self._map(fn, source, True, timeout, chunksize, queue)

    def starmap(self, fn: Callable, iterable: Iterable, chunksize: int | None = None,
                timeout: float | None = None, queue: str = "default") -> MapResult:
        """fn(*args) for each tuple of args in iterable; see MapResult."""
        return self._map(fn, iterable, True, timeout, chunksize, queue)

    def _map(self, fn, source, star: bool, timeout, chunksize, queue) -> MapResult:
        self._check_open()
        check_queue(queue)
        total = len(source) if hasattr(source, "__len__") and hasattr(source, "__getitem__") else None
        if chunksize is None:
            chunksize = default_chunksize(total, self._processes)
        else:
            chunksize = chunk_count(chunksize)
        h = self._ship(fn)
        map_id = f"{self.id}-m{next(self._seq)}"
        keep = None if total is not None else []
        res = MapResult(self, map_id, star=star, total=total,
                        deadline=None if timeout is None else time.monotonic() + timeout,
                        args=source if total is not None else keep)
        # inline, the caller's thread runs every chunk (never the receiver thread)
        window = math.inf if self._conn.inline else max(16, 4 * self._processes())
        task = {"h": h, "q": queue, "m": "star" if star else "map", "mp": map_id, **self._task_header}
        if total is not None:  # for its map-sent event, with its first chunk
            task["tot"] = total
        try:
            self._feeder.start(res, Chunker(source, chunksize, keep), task, function_name(fn), window)
        except (SerializationError, MessageTooLarge):
            self._feeder.abandon(res, self._cancel_tasks)
            raise
        return res

    # -- results --------------------------------------------------------------

    def gather(self, futures: Iterable[Future] | MapResult, timeout: float | None = None) -> list:
        """Results in input order, raising the first failure."""
        if isinstance(futures, MapResult):
            return futures.result(timeout)
        futures = list(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                for f in futures]

    def events(self, since: float | None = None, timeout: float | None = None) -> Iterator[dict]:
        """The broker's task and worker events (dicts; nbq/events.py says their fields):
        those it keeps from ``since`` (epoch seconds; None: from now, live only; 0: all it
        keeps), then each as it happens, until this client shuts down, the iterator is
        closed, or ``timeout`` seconds pass with no event.  A broker with events off
        (``nbq broker --no-events``, ``?events=0``) sends none."""
        self._check_open()
        return self._subscriptions.open(since, timeout)

    def workers(self) -> list[dict]:
        """Connected workers: id, host, pid, concurrency, active, queues, processes, memory
        (resident bytes of the worker and its processes, where known)."""
        return self._request("info", self._conn.info)["workers"]

    def status(self) -> dict:
        """Workers, queue lengths and counts of tasks and stored results at the broker."""
        return self._request("info", self._conn.info)

    def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> None:
        """Block until worker processes with at least n slots in all are connected."""
        deadline = time.monotonic() + timeout
        while sum(len(w["processes"]) for w in self.workers()) < n:
            if time.monotonic() > deadline:
                raise BrokerTimeout(f"fewer than {n} worker processes joined the broker at "
                                    f"{self.address} within {timeout:g} s: start workers with "
                                    f"`nbq worker --broker {self.address}`, or wait longer (timeout=)")
            time.sleep(0.05)

    def control(self, command: str, arguments: dict | None = None,
                destination: list[str] | None = None, timeout: float = 1.0) -> dict[str, Any]:
        """Send a control command to every worker (or those named in destination) and
        return their replies by worker name, as Celery's broadcast with reply=True.

        Returns once every worker the command reached has answered, or after timeout
        seconds with the replies received by then.
        """
        return self._controls.broadcast(self._request, command, arguments, destination, timeout)

    def _terminate(self, fut: Future, sig: str, timeout: float = 5.0) -> bool:
        """Have the worker running fut's task kill its process with sig; True once one did."""
        return terminate(self.control, fut, sig, timeout)

    def _cancel_tasks(self, ids: list[str]) -> dict[str, bool]:
        if threading.current_thread() is self._inbox.thread:
            return {}
        return self._request("cancel", lambda rq: self._conn.cancel(rq, ids))

    def _cancel_map(self, res: MapResult) -> int:
        """Cancel the items of a map no worker has started; returns how many.

        Items of a list input not sent yet fail as cancelled at once; a generator
        input is read no further (the map ends with the items read so far).
        """
        return self._feeder.stop(res) + sum(
            self._revoke(tid) for tid, ok in self._cancel_tasks(list(res._chunks)).items() if ok)

    def _revoke(self, tid: str) -> int:
        """Mark a task the broker revoked (a future, or a map chunk) here; returns its item count."""
        return self._inbox.revoke(tid)

    def watch(self, tids: Iterable[str]) -> list[Future]:
        """A Future for each task id on this broker, wherever the task was submitted (AsyncResult,
        a chord's header), filled from stored and later results; one request for the ids this
        client has no Future of."""
        return self._watches.tasks(self, self._request, tids)

    def join(self, key: str, member: str, total: int) -> bool:
        """Add member to the join named key on the broker; True for the one call that completes it
        (the member that makes total).  A chord's header tasks count themselves so.

        Members are a set, so a task that ran twice counts once.
        """
        answer = self._request("join", lambda rq: self._conn.join(rq, key, member, total))
        if "fire" not in answer:
            raise NbqError(f"the broker at {self.address} failed to record join {key!r}: "
                           f"{answer.get('error')}")
        return answer["fire"]

    def claim(self, key: str, ttl: float) -> bool:
        """Claim-once on the broker: True for the first claim of key by any of its clients
        within ttl seconds, False for the others (one of several beats sends a tick)."""
        return self._request("claim", lambda rq: self._conn.claim(rq, key, ttl))["won"]

    def _find_map(self, map_id: str) -> MapResult:
        return self._watches.find_map(self, self._request, map_id)

    def _request(self, kind: str, send: Callable[[int], None], timeout: float = CONNECT_TIMEOUT,
                 on_reply: Callable | None = None, again: bool = True) -> Any:
        """send(rq) a request to the broker and wait for its reply (requests.Requests.ask)."""
        if self._closed:
            raise RuntimeError("this nbq client has been shut down")
        return self._requests.ask(kind, send, timeout, on_reply, again)

    def _check_broker(self) -> None:
        """Raise BrokerUnavailable once the broker has been silent for broker_grace seconds
        (Future and MapResult waits, woken when the client gives up)."""
        if self._link.unavailable:
            raise self._link.unavailable_error()

    @property
    def broker_grace(self) -> float:
        """Seconds a silent broker is waited for before waits raise BrokerUnavailable."""
        return self._link.grace

    @broker_grace.setter
    def broker_grace(self, seconds: float) -> None:
        self._link.grace = seconds

    # -- lifecycle ----------------------------------------------------------------

    @property
    def private_broker(self) -> bool:
        """Whether this client's broker runs inside this process (a private one, as Client()
        with no address starts): its tasks end with the process, so exit should wait for them
        (``wait_at_exit``)."""
        return self._cluster.broker is not None

    def __repr__(self) -> str:
        return f"<nbq.Client {self.address} {'closed' if self._closed else 'open'}>"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """In a notebook: the broker, its workers and queue lengths as a table."""
        if self._closed:
            return {"text/plain": repr(self)}
        from .status import status_bundle
        try:
            return status_bundle(self.address, self._request("info", self._conn.info, timeout=2.0))
        except (TimeoutError, BrokerUnavailable):
            return {"text/plain": f"{self!r} (the broker did not answer)"}



