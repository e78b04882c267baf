"""Feeding a map: its input read lazily, in chunks, at most a window of them in flight.

The caller's thread sends the first window; the receiver thread sends the next chunk
each time one completes, so a generator of ten million items never has ten million
items in memory at once.
"""
from __future__ import annotations

import itertools
import math
import operator
import threading
import time
from concurrent.futures import CancelledError
from typing import Callable, Iterable

from .. import protocol
from ..errors import BrokerUnavailable, InputError, NbqError, SerializationError
from .mapresult import MapResult

MAX_CHUNKSIZE = 10_000
UNSIZED_CHUNKSIZE = 64
CHUNKS_PER_PROCESS = 4
PROCESSES_EVERY = 5.0  # seconds between asks of how many worker processes serve the broker


class Chunker:
    """Reads a map's input chunk by chunk (only the Feeder calls it)."""

    def __init__(self, source: Iterable, chunksize: int, keep: list | None) -> None:
        self._it = iter(source)
        self.chunksize = chunksize
        self.position = 0
        self.exhausted = False
        self._keep = keep

    def next(self) -> tuple[int, list, InputError | None]:
        """The next chunk: (start position, items, the error that ended the input or None)."""
        start = self.position
        items: list = []
        error = None
        try:
            for x in itertools.islice(self._it, self.chunksize):
                items.append(x)
        except Exception as e:
            error = InputError(f"the map's input raised {type(e).__name__} after "
                               f"{start + len(items)} items: {e}")
            error.__cause__ = e
        if error is not None or len(items) < self.chunksize:
            self.exhausted = True
        self.position += len(items)
        if self._keep is not None:
            self._keep.extend(items)
        return start, items, error


class Feeder:
    """Sends the chunks of one client's maps, each map's window kept full until its input ends.

    ``chunks`` is the client's table of chunks in flight (task id -> (map, start, n)).
    """

    def __init__(self, conn, sender, chunks: dict) -> None:
        self._conn = conn
        self._sender = sender
        self._chunks = chunks
        self._lock = threading.RLock()
        self._maps: dict[str, tuple[MapResult, Chunker, dict]] = {}  # the maps still read

    def __contains__(self, map_id: str) -> bool:
        """Whether map_id's input is still being read."""
        return map_id in self._maps

    def start(self, res: MapResult, chunker: Chunker, task: dict, label: str, window: int) -> None:
        """Feed res from chunker, at most window chunks in flight; each chunk's header is
        task's, ``label`` names the function.  The first window is sent now, from the
        caller's thread; when it cannot be (SerializationError, MessageTooLarge), the
        caller abandons the map."""
        self._maps[res.id] = (res, chunker, {"window": window, "task": task, "name": label})
        with self._lock:
            self._feed_locked(res.id, in_caller=True)

    def feed(self, map_id: str) -> None:
        """Send chunks of a map until its window is full or its input is exhausted (the
        receiver thread, as chunks complete)."""
        with self._lock:
            self._feed_locked(map_id, in_caller=False)

    def _feed_locked(self, map_id: str, in_caller: bool) -> None:
        entry = self._maps.get(map_id)
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
                    self._maps.pop(map_id, None)  # the caller cancels the chunks already sent
                    raise
                res._fail(start, len(items), e)
                continue
            tid = f"{map_id}:{start}"
            res._chunks[tid] = (start, len(items))
            self._chunks[tid] = (res, start, len(items))
            self._sender.send(dict(opts["task"], id=tid, s0=start, n=len(items), nf=len(payload)),
                              payload)
        if chunker.exhausted:
            del self._maps[map_id]
            if res._total is None:
                res._set_total(chunker.position)
            self._conn.end_map(map_id, chunker.position)

    def abandon(self, res: MapResult, cancel: Callable[[list[str]], dict]) -> None:
        """Feed res no more and cancel(ids) its chunks sent (a first window that could not
        be sent whole).  Called outside the lock: the receiver thread, which must deliver
        the cancel's reply, may be waiting for the lock to refill this map."""
        self._maps.pop(res.id, None)
        if res._chunks:
            cancel(list(res._chunks))
        for tid in list(res._chunks):
            self._chunks.pop(tid, None)

    def stop(self, res: MapResult) -> int:
        """Send no more chunks of res; the items of its input not sent yet fail as
        cancelled.  Returns how many."""
        with self._lock:
            feeder = self._maps.pop(res.id, None)
            if feeder is None:
                return 0
            sent = feeder[1].position
            self._conn.end_map(res.id, sent)
            if res._total is None:
                res._set_total(sent)
                return 0
            unsent = res._total - sent
            if unsent:
                res._fail(sent, unsent, cancelled(res))
            return unsent

    def stop_all(self) -> None:
        """stop() every map still fed (shutdown with cancel_futures)."""
        for res, *_ in list(self._maps.values()):
            self.stop(res)

    def fail_unsent(self) -> None:
        """At shutdown: the items of every map's input not sent yet fail (a generator's map
        ends with the items read)."""
        for res, chunker, _ in list(self._maps.values()):
            sent = chunker.position
            if res._total is None:
                res._set_total(sent)
            elif res._total > sent:
                res._fail(sent, res._total - sent, NbqError(
                    f"items {sent}..{res._total - 1} of map {res.id} were not sent when its "
                    "client shut down"))
        self._maps.clear()

class ProcessCount:
    """How many worker processes serve a client's broker, for chunk sizes and windows: the
    cluster's own count, else the broker's (an info request), asked at most every
    PROCESSES_EVERY seconds."""

    def __init__(self, cluster, requests, conn) -> None:
        self._cluster = cluster
        self._requests = requests
        self._conn = conn
        self._asked: tuple[float, int] = (0.0, 0)

    def __call__(self) -> int:
        if self._cluster.processes:
            return self._cluster.processes
        checked, n = self._asked
        if time.monotonic() - checked > PROCESSES_EVERY:
            try:
                workers = self._requests.ask("info", self._conn.info)["workers"]
                n = sum(w["concurrency"] for w in workers)
            except (TimeoutError, BrokerUnavailable):
                n = 0
            self._asked = (time.monotonic(), n)
        return n


def chunk_count(chunksize: object) -> int:
    """A map's chunksize as an int of at least 1 (numpy's integers too), else TypeError or
    ValueError in the caller: a float or a str would fail the map's first chunk and leave
    the map waiting for items never sent."""
    try:
        chunksize = operator.index(chunksize)
    except TypeError:
        raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}") from None
    if chunksize < 1:
        raise ValueError("chunksize must be at least 1")
    return chunksize


def default_chunksize(total: int | None, processes: Callable[[], int]) -> int:
    """A chunk size giving each worker process (processes(): how many) about
    CHUNKS_PER_PROCESS chunks of a sized input."""
    if total is None:
        return UNSIZED_CHUNKSIZE
    per = CHUNKS_PER_PROCESS * max(1, processes())
    return max(1, min(MAX_CHUNKSIZE, math.ceil(total / per)))


def cancelled(res: MapResult) -> CancelledError:
    """The error of a cancelled item of res."""
    return CancelledError(f"item of map {res.id} was cancelled")
