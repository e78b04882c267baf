"""nbq.Client: a concurrent.futures.Executor whose work runs on nbq workers.

The user's threads pickle and send; one background receiver thread completes
futures, fills map results and reads the next chunks of lazy maps.  Nothing
in the caller's thread polls.

The receiver thread also says hello to the broker every HEARTBEAT seconds.  A
broker silent for BROKER_SILENCE seconds is logged; after ``broker_grace``
seconds waits (Future.result, MapResult, requests) raise BrokerUnavailable,
and the work is kept: the client holds every task it has not seen finish
(``_sent``) and sends it again, with its function, map ends, watches and
open requests, to a broker that answers with a new boot id (restarted) or
after a silence.  The broker skips what it holds or has done; a result
already seen here is dropped, so the user sees each once.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import importlib
import itertools
import logging
import math
import os
import threading
import time
import types
import uuid
import weakref
from collections import OrderedDict
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Callable, Iterable

import cloudpickle

from . import keys, protocol
from .deaths import MAX_DEATHS
from .errors import (BrokerTimeout, BrokerUnavailable, FunctionRefused, KeyMismatch,
                     MessageTooLarge, NbqError, SerializationError)
from .future import Future
from .mapresult import MapResult, _Chunker
from .schema import PRIORITY_MAX
from .transport import client_connection

if TYPE_CHECKING:
    from .clusters.base import Cluster

log = logging.getLogger("nbq.client")

CONNECT_TIMEOUT = 10.0
DIRECT_SEND = 64 * 1024  # tasks with payloads this large skip the outbox and go at once
BURST = 0.0002           # a submit sooner than this after the previous one joins a batch
MAX_CHUNKSIZE = 10_000
UNSIZED_CHUNKSIZE = 64
CHUNKS_PER_PROCESS = 4
FUNCTION_CACHE = 256
FUNCTION_KEEP = 64 << 20  # bytes of function pickles kept to re-send to a restarted broker
HEARTBEAT = 1.0          # seconds between the client's hellos to its broker
BROKER_SILENCE = 3.0     # a broker silent this long is logged, and gets everything again later
BROKER_GRACE = 30.0      # ... and after this long, waits raise BrokerUnavailable
RESEND_BATCH = 1 << 20   # bytes of tasks per message when re-sending

_current: "weakref.ref[Client] | None" = None


def current_client() -> "Client":
    """The most recently created client that is still open, in this process.

    A forked child (a worker process of ``nbq worker -B``, whose beat has a
    client) does not get its parent's: that client's threads stayed behind.
    """
    client = _current() if _current is not None else None
    if client is None or client._closed or client._pid != os.getpid():
        raise NbqError("no nbq client is open: create one with nbq.Client()")
    return client


class Client(concurrent.futures.Executor):
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
                 broker_grace: float = BROKER_GRACE) -> None:
        global _current
        if not broker_grace > 0:
            raise ValueError(f"broker_grace must be a positive number of seconds, not {broker_grace!r}")
        self.broker_grace = broker_grace
        from .cluster import LocalCluster
        from .clusters.base import Cluster
        if isinstance(address, Cluster):
            if workers is not None or initializer is not None:
                raise ValueError("a cluster's workers are its own: size it with cluster.scale(n) "
                                 "or cluster.adapt(), not Client(cluster, workers=...)")
        from .worker import initializer as worker_init
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive number of processes (or None), "
                             f"not {workers!r}")
        if not isinstance(max_task_deaths, int) or isinstance(max_task_deaths, bool):
            raise TypeError(f"max_task_deaths must be an integer, not {max_task_deaths!r}")
        if max_task_deaths < 1:
            raise ValueError(f"max_task_deaths must be at least 1 (1: a task fails at the first "
                             f"death of its process), not {max_task_deaths}")
        # header fields of every task this client sends: none for the defaults
        self._task_header = {} if max_task_deaths == MAX_DEATHS else {"md": max_task_deaths}
        ship_modules(*ship)
        address = address or os.environ.get("NBQ_BROKER") or None
        if initializer is not None:
            if not callable(initializer):
                raise TypeError(f"initializer must be callable, not {initializer!r}")
            if address is not None and workers is None:
                raise ValueError("an initializer runs in the worker processes this client starts: "
                                 "give workers=N, or start workers with `nbq worker --init "
                                 "MODULE:FUNC`")
        self.id = uuid.uuid4().hex[:16]
        self._owns_cluster = not isinstance(address, Cluster)  # Client(cluster): the user's to close
        if self._owns_cluster:
            self.key = keys.load_key(key_file)
            init = None if initializer is None else worker_init.encode(self.key, initializer,
                                                                       initargs)
            self._cluster = LocalCluster(self.key, address, workers,
                                         result_expires=result_expires, initializer=init)
        else:
            self.key, self._cluster = address.key, address
            address._clients.add(self)
        self.address = self._cluster.address
        self._pid = os.getpid()
        self._closed = False      # no new work accepted
        self._stopped = False     # the receiver thread should return; nothing is waited for
        self._conn_closed = False
        self._down = False        # every step of _shutdown_now has been done
        self.wait_at_exit = True  # what the interpreter's exit does: shutdown(wait=this)
        self._lock = threading.Lock()
        self._feed_lock = threading.RLock()
        self._outbox: list[tuple[dict, list]] = []  # tasks the receiver thread sends, batched
        self._last_send = 0.0
        self._seq = itertools.count()
        self._futures: dict[str, Future] = {}
        self._chunks: dict[str, tuple[MapResult, int, int]] = {}
        self._feeders: dict[str, tuple[MapResult, _Chunker, dict]] = {}
        self._requests: dict[int, tuple[concurrent.futures.Future, Callable | None]] = {}
        self._controls: dict[str, _Replies] = {}  # control id -> the workers' replies so far
        self._fn_cache: OrderedDict = OrderedDict()
        self._fn_sent: set[str] = set()
        self._fn_kept: OrderedDict = OrderedDict()  # hash -> pickle, oldest first (FUNCTION_KEEP)
        self._fn_kept_bytes = 0
        self._sent: dict[str, tuple[dict, list]] = {}  # tasks sent, not seen finish: re-sent
        self._asked: dict[int, Callable[[int], None]] = {}  # open requests' senders: re-sent
        self._boot: str | None = None  # the broker's boot id (ZeroMQ): a new one means a restart
        self._heard = time.monotonic()  # when the broker last said anything
        self._next_beat = 0.0
        self._connected = False    # welcomed once: from then on, heartbeats and silence count
        self._silent = False       # the broker has been silent for BROKER_SILENCE
        self._resend_due = False   # ... and gets everything again at its next welcome
        self._unavailable = False  # ... and for broker_grace: waits raise BrokerUnavailable
        self._lost: concurrent.futures.Future = concurrent.futures.Future()  # failed then (waiting.py)
        self._fn_refused: set[str] = set()  # shipped, then refused by a worker: shipped again
        self._nprocs: tuple[float, int] = (0.0, 0)
        try:
            self._conn = client_connection(self._cluster.connect_address, self.key, self.id,
                                           self._cluster.context)
        except Exception:
            self._close_cluster()
            raise
        self._receiver = threading.Thread(target=_receive_loop, args=(weakref.ref(self), self._conn),
                                          name=f"nbq-receiver-{self.id}", daemon=True)
        self._receiver.start()
        welcome = self._new_request(None)
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
        self._heard = time.monotonic()
        self._connected = True
        _current = weakref.ref(self)
        _at_exit(self)

    # -- submitting -----------------------------------------------------------

    def submit(self, fn: Callable, /, *args, queue: str = "default", **kwargs) -> Future:
        """Run fn(*args, **kwargs) on a worker; ``queue`` routes it (default "default")."""
        return self._submit(fn, args, kwargs, queue=queue)

    def apply(self, fn: Callable, args: Iterable = (), kwargs: dict | None = None, *,
              task_id: str | None = None, queue: str = "default", eta: float | None = None,
              expires: float | None = None, priority: int | None = None,
              max_task_deaths: int | None = None) -> Future:
        """Run fn(*args, **kwargs) on a worker, with the options of Celery's apply_async that
        submit() has no room for.

        ``task_id``: the task's id (default: a new one), known before it is sent, so that a
        chain or chord can name tasks not sent yet.  ``eta``: epoch seconds before which it
        does not start.  ``expires``: epoch seconds after which it is revoked, not run.
        ``priority``: 0 to 9, 9 most urgent (0 and None: the default).  ``max_task_deaths``:
        this task's, instead of the client's.
        """
        if priority is not None and (type(priority) is not int or not 0 <= priority <= PRIORITY_MAX):
            raise ValueError(f"priority must be an integer from 0 to {PRIORITY_MAX}, not {priority!r}")
        if max_task_deaths is not None and (type(max_task_deaths) is not int or max_task_deaths < 1):
            raise ValueError(f"max_task_deaths must be an integer of at least 1, not "
                             f"{max_task_deaths!r}")
        header: dict = {}
        if eta is not None:
            header["eta"] = float(eta)
        if expires is not None:
            header["x"] = float(expires)
        if priority:
            header["pr"] = priority
        if max_task_deaths is not None:
            header["md"] = max_task_deaths
        return self._submit(fn, tuple(args), kwargs or {}, queue=queue, tid=task_id,
                            options=header)

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, *, queue: str = "default",
                tid: str | None = None, options: dict | None = None) -> Future:
        """submit() with a chosen task id and header options (``eta``, ``x`` expiry: epoch seconds)."""
        self._check_open()
        h = self._ship(fn)
        payload = protocol.dumps_call(_name(fn), args, kwargs)
        tid = tid or f"{self.id}-{next(self._seq)}"
        fut = Future(tid, self)
        self._futures[tid] = fut
        item = {"id": tid, "h": h, "q": queue, "f": 1, "nf": len(payload)}
        if self._task_header:
            item.update(self._task_header)
        if options:
            item.update(options)
        try:
            self._send_task(item, payload)
        except BaseException:  # refused before it left (too large): nothing waits for it
            self._futures.pop(tid, None)
            raise
        return fut

    def _send_task(self, item: dict, payload: list) -> None:
        """Send a task, or queue it for the receiver thread to send with others as one message.

        A lone submit goes at once (lowest latency); submits in quick succession
        are queued and leave as a few large messages (highest throughput).
        Large payloads always go at once, alone, so they are never copied.
        """
        now = time.perf_counter()
        with self._lock:
            self._sent[item["id"]] = (item, payload)
            burst = now - self._last_send < BURST
            self._last_send = now
            if not self._outbox and (not burst or protocol.frame_size(payload) >= DIRECT_SEND):
                self._conn.submit([item], payload)
                return
            first = not self._outbox
            self._outbox.append((item, payload))
        if first:
            self._conn.wake()

    def _flush_outbox(self) -> None:
        with self._lock:
            if not self._outbox:
                return
            out, self._outbox = self._outbox, []
            items, frames = [], []
            for item, payload in out:
                items.append(item)
                frames.extend(payload)
            # sent under the lock, so batches leave in the order they were queued
            self._conn.submit(items, frames)

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
        total = len(source) if hasattr(source, "__len__") and hasattr(source, "__getitem__") else None
        if chunksize is None:
            chunksize = self._default_chunksize(total)
        elif chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        h = self._ship(fn)
        map_id = f"{self.id}-m{next(self._seq)}"
        keep = None if total is not None else []
        res = MapResult(self, map_id, star=star, total=total,
                        deadline=None if timeout is None else time.monotonic() + timeout,
                        args=source if total is not None else keep)
        chunker = _Chunker(source, chunksize, keep)
        window = max(16, 4 * self._processes())
        task = {"h": h, "q": queue, "m": "star" if star else "map", "mp": map_id, **self._task_header}
        self._feeders[map_id] = (res, chunker, {"window": window, "task": task, "name": _name(fn)})
        self._feed(map_id, in_caller=True)
        return res

    def _feed(self, map_id: str, in_caller: bool = False) -> None:
        """Send chunks of a map until its window is full or its input is exhausted.

        The caller's thread fills the first window; the receiver thread refills it.
        """
        entry = self._feeders.get(map_id)
        try:
            with self._feed_lock:
                self._feed_locked(map_id, in_caller)
        except (SerializationError, MessageTooLarge):
            # cancel what was sent outside the lock: the receiver thread, which must
            # deliver the cancel's reply, may be waiting for the lock to refill this map
            if in_caller and entry is not None:
                self._abandon_map(entry[0])
            raise

    def _feed_locked(self, map_id: str, in_caller: bool) -> None:
        entry = self._feeders.get(map_id)
        if entry is None:
            return
        res, chunker, opts = entry
        while len(res._chunks) < opts["window"] and not chunker.exhausted:
            start, items, error = chunker.next()
            if error is not None:  # the item that could not be read fails in its place
                if res._total is None:
                    res._grow(len(items) + 1)
                res._fail(chunker.position, 1, error)
                chunker.position += 1
            elif res._total is None:
                res._grow(len(items))
            if not items:
                continue
            try:
                payload = protocol.dumps_named(items, f"an item among {start}..{start + len(items) - 1} "
                                                      f"of the input of map({opts['name']})")
            except SerializationError as e:
                if in_caller:
                    self._feeders.pop(map_id, None)  # _feed cancels the chunks already sent
                    raise
                res._fail(start, len(items), e)
                continue
            tid = f"{map_id}:{start}"
            res._chunks[tid] = (start, len(items))
            self._chunks[tid] = (res, start, len(items))
            self._send_task(dict(opts["task"], id=tid, s0=start, n=len(items), nf=len(payload)),
                            payload)
        if chunker.exhausted:
            del self._feeders[map_id]
            if res._total is None:
                res._set_total(chunker.position)
            self._conn.end_map(map_id, chunker.position)

    def _abandon_map(self, res: MapResult) -> None:
        self._feeders.pop(res.id, None)
        if res._chunks:
            self._cancel_tasks(list(res._chunks))
        for tid in list(res._chunks):
            self._chunks.pop(tid, None)

    def _default_chunksize(self, total: int | None) -> int:
        if total is None:
            return UNSIZED_CHUNKSIZE
        per = CHUNKS_PER_PROCESS * max(1, self._processes())
        return max(1, min(MAX_CHUNKSIZE, math.ceil(total / per)))

    def _processes(self) -> int:
        """Worker processes serving this broker (asked at most every 5 s)."""
        if self._cluster.processes:
            return self._cluster.processes
        checked, n = self._nprocs
        if time.monotonic() - checked > 5.0:
            try:
                n = sum(w["concurrency"] for w in self.workers())
            except (TimeoutError, BrokerUnavailable):
                n = 0
            self._nprocs = (time.monotonic(), n)
        return n

    def _ship(self, fn: Callable) -> str:
        """Send fn's pickle to the broker once; returns its content hash.

        Plain functions are re-pickled only when their code, defaults, closure
        or the globals they name are rebound, so a notebook edit is always seen.
        """
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        key = fingerprint(fn)
        h = self._fn_cache.get(key) if key is not None else None
        if h is not None and h not in self._fn_sent and h not in self._fn_kept:
            h = None  # a restarted broker lacks it, and its pickle is no longer kept: make it again
        if h is None or h in self._fn_refused:
            payload = protocol.dumps_named(fn, f"the function {_name(fn)}")
            h = protocol.function_hash(b"".join(bytes(memoryview(f)) for f in payload))
            with self._lock:
                self._keep_function(h, payload)
                if h in self._fn_refused:  # shipped again below, replacing what is stored
                    self._fn_sent.discard(h)
                    self._fn_refused.discard(h)
            if key is not None:
                self._fn_cache[key] = h
                if len(self._fn_cache) > FUNCTION_CACHE:
                    self._fn_cache.popitem(last=False)
        else:
            self._fn_cache.move_to_end(key)
        if h not in self._fn_sent:
            with self._lock:
                if h not in self._fn_sent and h in self._fn_kept:
                    self._conn.ship(h, self._fn_kept[h])
                    self._fn_sent.add(h)
        return h

    def _keep_function(self, h: str, payload: list) -> None:
        """Keep a function's pickle to send again to a restarted broker (under _lock): the
        newest FUNCTION_CACHE, within FUNCTION_KEEP bytes."""
        if h in self._fn_kept:
            self._fn_kept.move_to_end(h)
            return
        self._fn_kept[h] = payload
        self._fn_kept_bytes += protocol.frame_size(payload)
        while len(self._fn_kept) > 1 and (len(self._fn_kept) > FUNCTION_CACHE
                                          or self._fn_kept_bytes > FUNCTION_KEEP):
            self._fn_kept_bytes -= protocol.frame_size(self._fn_kept.popitem(last=False)[1])

    # -- results --------------------------------------------------------------

    def gather(self, futures: Iterable[Future] | MapResult, timeout: float | None = None) -> list:
        """Results in input order, raising the first failure."""
        if isinstance(futures, MapResult):
            return futures.result(timeout)
        futures = list(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                for f in futures]

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
        ci = uuid.uuid4().hex
        replies = self._controls[ci] = _Replies()
        try:
            dest = None if destination is None else list(destination)
            n = self._request(  # a command is never sent twice
                "control", lambda rq: self._conn.control(rq, command, arguments or {}, dest, ci),
                again=False)["n"]
            return replies.wait(n, timeout)
        finally:
            self._controls.pop(ci, None)

    def _terminate(self, fut: Future, sig: str, timeout: float = 5.0) -> bool:
        """Have the worker running fut's task kill its process with sig; True once one did.

        Asked again until timeout: a task just handed to a process may not show as running yet.
        """
        tid = fut.id
        deadline = time.monotonic() + timeout
        while True:
            if fut.done():
                return False
            replies = self.control("revoke", {"task_id": tid, "terminate": True, "signal": sig},
                                   timeout=1.0)
            for name, reply in replies.items():
                if "error" in reply:
                    raise NbqError(f"worker {name} could not terminate task {tid}: {reply['error']}")
            if any(tid in r.get("terminated", ()) for r in replies.values()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _cancel_tasks(self, ids: list[str]) -> dict[str, bool]:
        if threading.current_thread() is self._receiver:
            return {}
        return self._request("cancel", lambda rq: self._conn.cancel(rq, ids))

    def _cancel_map(self, res: MapResult) -> int:
        """Cancel the items of a map no worker has started; returns how many.

        Items of a list input not sent yet fail as cancelled at once; a generator
        input is read no further (the map ends with the items read so far).
        """
        return self._stop_feeding(res) + sum(
            self._revoke(tid) for tid, ok in self._cancel_tasks(list(res._chunks)).items() if ok)

    def _stop_feeding(self, res: MapResult) -> int:
        """Send no more chunks of res; the items of its input not sent yet fail as
        cancelled.  Returns how many."""
        with self._feed_lock:
            feeder = self._feeders.pop(res.id, None)
            if feeder is None:
                return 0
            sent = feeder[1].position
            self._conn.end_map(res.id, sent)
            if res._total is None:
                res._set_total(sent)
                return 0
            unsent = res._total - sent
            if unsent:
                res._fail(sent, unsent, _cancelled(res))
            return unsent

    def _revoke(self, tid: str) -> int:
        """Mark a task the broker revoked (a future, or a map chunk) here; returns its item count."""
        self._sent.pop(tid, None)
        fut = self._futures.pop(tid, None)
        if fut is not None:
            fut._revoked()
            return 1
        entry = self._chunks.pop(tid, None)
        if entry is None:
            return 0
        res, start, n = entry
        res._chunks.pop(tid, None)
        res._fail(start, n, _cancelled(res))
        return n

    def watch(self, tids: Iterable[str]) -> list[Future]:
        """A Future for each task id on this broker, wherever the task was submitted (AsyncResult,
        a chord's header), filled from stored and later results; one request for the ids this
        client has no Future of."""
        futs, new = [], []
        for tid in tids:
            fut = self._futures.get(tid)
            if fut is None:
                fut = Future(tid, self)
                fut._foreign = True  # not this client's work: shutdown does not wait for it
                self._futures[tid] = fut
                new.append(fut)
            futs.append(fut)

        finished = []

        def known(reply: dict) -> None:  # receiver thread, before any resent result
            for fut in new:
                state = reply["known"].get(fut.id)
                if state == "DONE":
                    finished.append(fut)
                elif state == "STARTED" and fut._state == "PENDING":
                    fut.set_running_or_notify_cancel()
                elif state == "RETRY":
                    fut._notice(state)

        if new:
            ids = [fut.id for fut in new]
            self._request("watch", lambda rq: self._conn.watch(rq, ids=ids), on_reply=known)
            # a stored result travels just behind the reply: wait for it, so that a task the
            # broker holds as done never reads PENDING here
            concurrent.futures.wait(finished, CONNECT_TIMEOUT)
        return futs

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
        holder: dict = {}

        def register(reply: dict) -> None:  # runs on the receiver thread, before the results
            meta = reply["maps"].get(map_id)
            if meta is None:
                return
            chunks = meta["chunks"]
            total = meta["total"]
            if total is None:
                total = max((s + n for _, (s, n) in chunks), default=0)
            res = MapResult(self, map_id, star=meta["star"], total=total)
            for tid, (start, n) in chunks:
                res._chunks[tid] = (start, n)
                self._chunks[tid] = (res, start, n)
            holder["res"] = res

        self._request("watch", lambda rq: self._conn.watch(rq, maps=[map_id]), on_reply=register)
        if "res" not in holder:
            raise NbqError(f"no map with id {map_id!r} is known to the broker at {self.address} "
                           "(its results may have expired)")
        return holder["res"]

    # -- requests ---------------------------------------------------------------

    def _new_request(self, on_reply: Callable | None):
        rq = next(self._seq)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._requests[rq] = (fut, on_reply)
        return rq, fut

    def _request(self, kind: str, send: Callable[[int], None], timeout: float = CONNECT_TIMEOUT,
                 on_reply: Callable | None = None, again: bool = True) -> Any:
        """send(rq) a request to the broker and wait for its reply; with again, it is sent
        again after the broker restarts or comes back."""
        if self._closed:
            raise RuntimeError("this nbq client has been shut down")
        self._check_broker()
        rq, fut = self._new_request(on_reply)
        self._flush_outbox()  # a request (a cancel, say) must follow the tasks it names
        if again:
            self._asked[rq] = send
        send(rq)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            self._requests.pop(rq, None)
            if self._silent:
                raise self._unavailable_error() from None
            raise BrokerTimeout(f"the broker at {self.address} did not answer {kind!r} within "
                                f"{timeout:g} s: check that it runs there (`nbq broker`) and "
                                "that this machine reaches it, then try again") from None
        finally:
            self._asked.pop(rq, None)

    # -- a silent broker (receiver thread, but _check_broker) ----------------------

    def _check_broker(self) -> None:
        """Raise BrokerUnavailable once the broker has been silent for broker_grace seconds."""
        if self._unavailable:
            raise self._unavailable_error()

    def _unavailable_error(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"the broker at {self.address} has not answered for "
            f"{time.monotonic() - self._heard:.0f} s (broker_grace={self.broker_grace:g} s): "
            "is it running? This client keeps its unfinished work and sends it again when a "
            "broker answers at that address; wait again, or shut the client down")

    def _keep_alive(self, heard: bool) -> None:
        """Say hello every HEARTBEAT seconds; notice a broker gone silent, and one back."""
        if not self._connected:  # Client() waits for the first welcome, with its own timeout
            return
        now = time.monotonic()
        if heard:
            self._heard = now
            if self._silent:
                if self._unavailable:
                    self._lost = concurrent.futures.Future()
                self._silent = self._unavailable = False
                log.warning("the broker at %s answers again", self.address)
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT
            self._conn.hello(None)
        quiet = now - self._heard
        if quiet > min(BROKER_SILENCE, self.broker_grace) and not self._silent:
            self._silent = self._resend_due = True
            log.warning("the broker at %s has not answered for %.0f s; waiting for it "
                        "(broker_grace=%g s)", self.address, quiet, self.broker_grace)
        if quiet > self.broker_grace and not self._unavailable:
            self._give_up()

    def _give_up(self) -> None:
        """broker_grace has passed: open requests fail, and every wait wakes to raise."""
        self._unavailable = True
        error = self._unavailable_error()
        log.error("%s", error)
        self._lost.set_exception(error)
        for rq in list(self._requests):
            entry = self._requests.pop(rq, None)
            if entry is not None:
                entry[0].set_exception(error)
        for fut in list(self._futures.values()):
            with fut._condition:
                fut._condition.notify_all()
        for res in {entry[0] for entry in list(self._chunks.values())}:
            with res._cond:
                res._cond.notify_all()

    def _on_welcome(self, boot: str | None) -> None:
        """A broker's welcome: a new boot id (a restarted broker), or the first after a
        silence, gets what this client has not seen finish."""
        if boot is None:  # a transport without boot ids, or a hello Redis failed to answer
            boot = self._boot
        restarted = self._boot is not None and boot != self._boot
        self._boot = boot
        if restarted:
            log.warning("the broker at %s restarted: sending it this client's unfinished work",
                        self.address)
        # after a silence, messages lost with a dropped link are sent again (the broker skips
        # what it has); not to a broker that keeps its queues, or one in this process
        if restarted or (self._resend_due and not self._conn.durable
                         and self._cluster.broker is None):
            self._resend()
        self._resend_due = False

    def _resend(self) -> None:
        """Send the broker again: functions, unfinished tasks, map ends, watches, requests."""
        self._flush_outbox()
        for tid in [t for t in list(self._sent) if t not in self._futures and t not in self._chunks]:
            self._sent.pop(tid, None)  # finished (or cancelled) meanwhile
        resend = self._conn.lost(list(self._sent))
        lost = []
        with self._lock:
            self._fn_sent = set()
            tasks = []
            for tid in resend:
                entry = self._sent.get(tid)
                if entry is None:
                    continue
                item, payload = entry
                h = item["h"]
                if h not in self._fn_sent:
                    if h not in self._fn_kept:
                        lost.append(item["id"])
                        continue
                    self._conn.ship(h, self._fn_kept[h])
                    self._fn_sent.add(h)
                tasks.append((item, payload))
            batch, frames, size = [], [], 0
            for item, payload in tasks:
                batch.append(item)
                frames.extend(payload)
                size += protocol.frame_size(payload)
                if size >= RESEND_BATCH:
                    self._conn.submit(batch, frames)
                    batch, frames, size = [], [], 0
            if batch:
                self._conn.submit(batch, frames)
            maps = {self._chunks[item["id"]][0] for item, _ in tasks if item["id"] in self._chunks}
        for res in maps:
            if res.id not in self._feeders and res._total is not None:
                self._conn.end_map(res.id, res._total)
        watched = [tid for tid, f in list(self._futures.items())
                   if getattr(f, "_foreign", False) and not f.done()]
        watched += [tid for tid in list(self._chunks) if tid not in self._sent]
        if watched:
            self._conn.watch(None, ids=watched)
        for rq, send in list(self._asked.items()):
            if rq in self._requests:
                send(rq)
        for tid in lost:
            self._fail_task(tid, BrokerUnavailable(
                f"the broker at {self.address} restarted and this client no longer keeps the "
                f"pickle of task {tid}'s function (only the newest {FUNCTION_CACHE} are kept): "
                "submit it again"))
        log.warning("sent %d unfinished tasks again to the broker at %s", len(tasks), self.address)

    def _fail_task(self, tid: str, error: BaseException) -> None:
        """End one of this client's tasks here with error (its map's window moves on)."""
        self._sent.pop(tid, None)
        fut = self._futures.pop(tid, None)
        if fut is not None and not fut.done():
            if fut._state == "PENDING":
                fut.set_running_or_notify_cancel()
            fut.set_exception(error)
        entry = self._chunks.pop(tid, None)
        if entry is not None:
            res, start, n = entry
            res._chunks.pop(tid, None)
            res._fail(start, n, error)
            self._feed(res.id)

    # -- receiving (receiver thread) --------------------------------------------

    def _on_message(self, header: dict, frames: list) -> None:
        kind = header.get("k")
        if kind == "res":
            for item, payload in protocol.split(header["t"], frames):
                self._on_result(item, payload)
        elif kind == "started":
            for tid in header["ids"]:
                fut = self._futures.get(tid)
                if fut is not None and fut._state == "PENDING":
                    fut.set_running_or_notify_cancel()
        elif kind == "state":  # a worker's notice: RETRY (waiting for a retry), STARTED again
            for tid in header["ids"]:
                fut = self._futures.get(tid)
                if fut is not None:
                    fut._notice(header["s"])
        elif kind == "out":  # output a running task streams
            fut = self._futures.get(header["id"])
            if fut is not None:
                fut._output(frames)
        elif kind == "ctlr":
            replies = self._controls.get(header.get("ci"))
            if replies is not None:
                replies.add(header["n"], header.get("r"))
        elif kind in ("reply", "welcome"):
            if kind == "welcome":
                self._on_welcome(header.get("b"))
            entry = self._requests.pop(header.get("rq"), None)
            if entry is not None:
                fut, on_reply = entry
                if header.get("refused"):  # a welcome: this client's key is not the cluster's
                    fut.set_exception(KeyMismatch(header["refused"]))
                    return
                result = header.get("r")
                try:
                    if on_reply is not None:
                        on_reply(result)
                except Exception as e:
                    fut.set_exception(e)
                else:
                    fut.set_result(result)

    def _on_result(self, item: dict, payload: list) -> None:
        tid = item["id"]
        if item.get("rv"):
            chunk = self._chunks.get(tid)
            self._revoke(tid)
            if chunk is not None:
                self._feed(chunk[0].id)  # the window has room again
            return
        fut = self._futures.pop(tid, None)
        if fut is not None:
            self._sent.pop(tid, None)
            try:
                value = protocol.loads(payload)
            except Exception as e:
                fut.set_exception(SerializationError(
                    f"the result of task {tid} could not be unpickled here: {type(e).__name__}: {e}"))
                return
            if fut._state == "PENDING":
                fut.set_running_or_notify_cancel()
            if item.get("ok"):
                fut.set_result(value)
            else:
                fut.set_exception(self._remote_error(value))
            return
        entry = self._chunks.get(tid)
        if entry is None:
            return  # a repeat of a result already seen, or not ours
        res, chunk_start, chunk_n = entry
        start = chunk_start + item.get("s", 0)
        n = item.get("n", 1)
        try:
            values, errors = protocol.loads(payload)
            errors = {i: self._remote_error(r) for i, r in errors.items()}
        except Exception as e:
            values, errors = [None] * n, dict.fromkeys(range(n), SerializationError(
                f"results of map {res.id} items {start}..{start + n - 1} could not be "
                f"unpickled here: {type(e).__name__}: {e}"))
        res._deliver(start, values, errors)
        if res._done.find(0, chunk_start, chunk_start + chunk_n) == -1:
            del self._chunks[tid]
            self._sent.pop(tid, None)
            res._chunks.pop(tid, None)
            self._feed(res.id)

    def _remote_error(self, record: tuple) -> BaseException:
        """A task's error; a function a worker refused (FunctionRefused) is shipped again
        with the next call, replacing what is stored."""
        exc = protocol.rebuild_error(record)
        if isinstance(exc, FunctionRefused):
            self._fn_refused.add(exc.hash)
        return exc

    # -- lifecycle ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("cannot submit to an nbq client after shutdown")

    @property
    def closed(self) -> bool:
        """True once shut down, and in a process forked from the one that made it (its threads
        stayed behind): such a client sends nothing, make a new one."""
        return self._closed or self._pid != os.getpid()

    @property
    def private_broker(self) -> bool:
        """Whether this client's broker runs inside this process (a private one, as Client()
        with no address starts): its tasks end with the process, so exit should wait for them
        (``wait_at_exit``)."""
        return self._cluster.broker is not None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; wait for what was submitted; stop local workers and broker.

        A map's ``timeout`` bounds waits on that map only, never this wait.  Whatever
        interrupts the wait (Ctrl-C, an error), the client's threads and local
        processes are stopped before it propagates; a second call finishes a stop
        that was itself interrupted.
        """
        if self._stopped:
            self._shutdown_now()
            return
        self._closed = True
        try:
            if cancel_futures:
                for res, *_ in list(self._feeders.values()):
                    self._stop_feeding(res)
                pending = [tid for tid, f in list(self._futures.items()) if f._state == "PENDING"]
                pending += list(self._chunks)
                if pending:
                    answer = self._request_unchecked(
                        "cancel", lambda rq: self._conn.cancel(rq, pending))
                    for tid, ok in answer.items():
                        if ok:
                            self._revoke(tid)
            if wait:
                self._wait_for_work()
        finally:
            self._shutdown_now()

    def _wait_for_work(self) -> None:
        """Until every task and map item this client submitted has finished; BrokerUnavailable
        once the client has given up on its broker."""
        for fut in list(self._futures.values()):
            if not getattr(fut, "_foreign", False):
                fut._await(None)
        for res, *_ in list(self._chunks.values()):
            with res._cond:  # not res._wait: that obeys the map's own timeout
                while not res.done():
                    self._check_broker()  # woken when the client gives up on its broker
                    res._cond.wait()

    def _request_unchecked(self, kind: str, send: Callable[[int], None]):
        closed, self._closed = self._closed, False
        try:
            return self._request(kind, send)
        finally:
            self._closed = closed

    def _shutdown_now(self) -> None:
        """Stop the receiver thread, the connection and the local cluster, each step run even
        when one before it fails or is interrupted; a repeated call does what is left."""
        if self._down:
            return
        self._closed = self._stopped = True
        with contextlib.ExitStack() as steps:  # callbacks run last-registered first
            steps.callback(self._close_cluster)
            steps.callback(self._fail_unfinished)
            steps.callback(self._close_connection)
            steps.callback(self._stop_receiver)
            if not self._conn_closed:
                steps.callback(self._conn.wake)
                self._flush_outbox()
        self._down = True
        _open_clients.discard(self)

    def _close_cluster(self) -> None:
        if self._owns_cluster:
            self._cluster.close()

    def _stop_receiver(self) -> None:
        if threading.current_thread() is not self._receiver:  # not from a done-callback
            self._receiver.join(5.0)

    def _close_connection(self) -> None:
        if not self._conn_closed:
            self._conn_closed = True
            self._conn.close()

    def _fail_unfinished(self) -> None:
        """Fail what can no longer get a result here, so nothing waits on it for ever."""
        for tid, fut in list(self._futures.items()):
            try:
                fut.set_exception(NbqError(f"task {tid} had not finished when its client "
                                           "shut down"))
            except concurrent.futures.InvalidStateError:
                pass  # finished, or cancelled
        self._futures.clear()
        for res, chunker, _ in list(self._feeders.values()):
            sent = chunker.position
            if res._total is None:
                res._set_total(sent)
            elif res._total > sent:
                res._fail(sent, res._total - sent, NbqError(
                    f"items {sent}..{res._total - 1} of map {res.id} were not sent when its "
                    "client shut down"))
        self._feeders.clear()
        for tid, (res, start, n) in list(self._chunks.items()):
            res._fail(start, n, NbqError(f"items {start}..{start + n - 1} of map {res.id} had "
                                         "not finished when its client shut down"))
        self._chunks.clear()

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


class _Replies:
    """Replies to one control command by worker name, awaited by the caller of Client.control."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._got: dict[str, Any] = {}
        self._count = 0

    def add(self, name: str, reply: Any) -> None:
        with self._cv:
            if name in self._got:
                log.warning("two workers are named %s: give each its own with `nbq worker -n`", name)
                name = f"{name} ({self._count})"
            self._got[name] = reply
            self._count += 1
            self._cv.notify_all()

    def wait(self, n: int, timeout: float) -> dict[str, Any]:
        """The replies once n have come, or those that came within timeout seconds."""
        with self._cv:
            self._cv.wait_for(lambda: self._count >= n, timeout)
            return dict(self._got)


def _receive_loop(client_ref: "weakref.ref[Client]", conn) -> None:
    """The receiver thread: completes futures and maps until the client closes."""
    while True:
        messages = conn.receive(1.0)
        client = client_ref()
        if client is None:
            return
        client._flush_outbox()
        for header, frames in messages:
            try:
                client._on_message(header, frames)
            except Exception:
                log.exception("error handling a %r message", header.get("k"))
        if client._stopped:
            return
        try:
            client._keep_alive(bool(messages))
        except Exception:
            log.exception("error keeping the link to the broker")
        del client


def ship_modules(*modules: types.ModuleType | str) -> None:
    """Send the functions and classes of these modules (and their submodules) by value.

    cloudpickle sends what an importable module defines by reference: the worker
    imports the module.  A shipped module's code travels in the pickle instead, so a
    notebook's local helper module needs no install on the workers.  This holds for
    every client of this process (cloudpickle.register_pickle_by_value); ``nbq.ship``.
    """
    for module in modules:
        if isinstance(module, str):
            module = importlib.import_module(module)
        if not isinstance(module, types.ModuleType):
            raise TypeError(f"nbq.ship takes modules or module names, not {module!r}")
        cloudpickle.register_pickle_by_value(module)
    for client in list(_open_clients):  # functions pickled before by reference: pickle again
        client._fn_cache.clear()


_open_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()
_exit_lock = threading.Lock()
_exit_registered = False


def _at_exit(client: Client) -> None:
    """Have client shut down, waiting for its work, when the interpreter exits.

    As the stdlib executors do, the hook runs before the interpreter joins its
    threads (threading._register_atexit), so done-callbacks still run; it is
    registered once, with the first client, not at import.
    """
    global _exit_registered
    with _exit_lock:
        if not _exit_registered:
            try:
                threading._register_atexit(_shutdown_at_exit)
            except (AttributeError, RuntimeError):  # not CPython, or the interpreter is exiting
                atexit.register(_shutdown_at_exit)
            _exit_registered = True
        _open_clients.add(client)


def _shutdown_at_exit() -> None:
    with contextlib.ExitStack() as stops:  # each client is stopped, whatever another raises
        for client in list(_open_clients):
            if client._pid == os.getpid():  # a forked child's copy has no threads to stop
                stops.callback(client.shutdown, wait=client.wait_at_exit)


def _cancelled(res: MapResult) -> CancelledError:
    return CancelledError(f"item of map {res.id} was cancelled")


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def fingerprint(fn) -> tuple | None:
    """What decides whether a cached pickle of fn is still right; None: pickle every time.

    An object may say for itself, with a ``__nbq_fingerprint__()`` method.
    """
    custom = getattr(type(fn), "__nbq_fingerprint__", None)
    if custom is not None:
        return custom(fn)
    if not isinstance(fn, types.FunctionType):
        return None
    code = fn.__code__
    g = fn.__globals__
    names = _global_names(code)
    cells = tuple(id(c.cell_contents) if _filled(c) else None for c in fn.__closure__ or ())
    return (fn, code, id(fn.__defaults__), id(fn.__kwdefaults__), cells,
            tuple(id(g.get(n)) for n in names))


def _global_names(code) -> tuple:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return tuple(names)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False
