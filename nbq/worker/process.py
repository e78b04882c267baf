"""A worker process: fetch a batch, run it, report results, repeat."""
from __future__ import annotations

import heapq
import itertools
import time

from ..future import RETRY, STARTED
from ..transport.base import WorkerConnection
from . import execute
from .execute import Functions, run
from . import marker as markers
from .marker import Marker

#: Results of a long batch are sent at least this often, so a slow task late in
#: a batch never holds back the results of the quick ones before it.
FLUSH_SECONDS = 0.005


def serve(conn: WorkerConnection, marker: Marker, failed: BaseException | None = None) -> None:
    """Serve tasks until the process is stopped; re-runs mark their items in marker.

    ``failed``: the exception of this process's initializer, which every task then fails with.

    A task about to wait for others' results (a chord's last header task) calls
    ``execute.flush()`` first: the results this process holds are sent then, not with
    its batch's, so that no two processes wait for each other's.

    A task with an ``eta`` in the future (a countdown, or a retry's delay) waits
    here, fetched and unacknowledged, while this process serves other tasks:
    if the process dies, the broker re-runs it as any other task it held.  A retry's
    clients are told (``conn.notice``) that it is RETRY, and STARTED when it runs again.
    """
    markers.mine = marker
    functions = Functions(conn.function, failed)
    later: list = []  # heap of (eta, seq, item, frames)
    seq = itertools.count()
    out: list = []  # results run and not yet reported
    flushed = time.monotonic()

    def flush() -> None:
        nonlocal out, flushed
        if out:
            conn.report(out, ready=False)
            out = []
            flushed = time.monotonic()

    execute.flush = flush
    while True:
        batch = conn.fetch(max(0.0, later[0][0] - time.time()) if later else None)
        fetched = bool(batch)
        moved = False  # whether what waits for its ETA changed: inspect scheduled shows it
        while later and later[0][0] <= time.time():
            _, _, item, frames = heapq.heappop(later)
            batch.append((item, frames))
            moved = True
            if item.get("rt"):  # a retry due now: its clients see it STARTED again
                conn.notice([item["id"]], STARTED)
        out = []
        flushed = time.monotonic()
        last = len(batch) - 1
        for i, (item, frames) in enumerate(batch):
            eta = item.get("eta")
            if eta is not None and eta > time.time():  # no clock read for a task without one
                heapq.heappush(later, (eta, next(seq), item, frames))
                moved = True
                continue
            if item["h"] not in functions:  # loading it may kill this process: blame this task
                marker.begin(item["id"], b"")
            fn, name = functions.get(item["h"])
            marker.begin(item["id"], name)
            if item.get("st") or item.get("a"):
                again = run(item, frames, fn,
                            lambda r, p: conn.report([(r, p)], ready=False), marker.mark)
                marker.clear()
            else:
                again = run(item, frames, fn, lambda r, p: out.append((r, p)))
            if again is not None:  # a retry: held until its eta, RETRY for its clients
                heapq.heappush(later, (again[0]["eta"], next(seq), *again))
                moved = True
                conn.notice([item["id"]], RETRY)
            if out and i < last and time.monotonic() - flushed > FLUSH_SECONDS:
                flush()
        marker.idle()
        if moved:
            # a generator: schedule() stops when its page is full, so no name is made for nothing
            marker.schedule((item["id"], functions.get(item["h"])[1].decode(errors="replace"), eta)
                            for eta, _, item, _ in sorted(later))
        if out or fetched:
            conn.report(out, ready=fetched)
