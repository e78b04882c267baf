"""A worker process: fetch a batch, run it, report results, repeat."""
from __future__ import annotations

import heapq
import itertools
import os
import resource
import signal
import time
from typing import Callable

from ..states import RETRY, STARTED
from ..transport.base import WorkerConnection
from .context import TaskContext
from .execute import Functions, run
from .marker import Marker
from .ratelimit import RateLimits

#: Results of a long batch are sent at least this often, so a slow task late in
#: a batch never holds back the results of the quick ones before it.
FLUSH_SECONDS = 0.005

#: The signal that retires a worker process (its supervisor's warm shutdown, a shrinking
#: pool): it finishes the batch it runs, reports it, and leaves; what it held (the rest of
#: its batch, tasks waiting for their ETA) goes back to the queue, no death counted, when its
#: supervisor reports it gone.  The supervisor blocks it, so a process forked from it gets a
#: signal sent before serve() began once serve() is ready for it.
RETIRE = signal.SIGUSR2
_retire = False   # set by RETIRE, or by this process's own limits: leave after this batch
_waiting = False  # serve() waits for tasks: RETIRE ends the wait at once


class _Retire(BaseException):
    """Raised by RETIRE in a process waiting for tasks (it holds nothing it must finish).
    Not an Exception: nothing on the way (logging's handler, a library's retry) may swallow it."""


def _on_retire(signum, frame) -> None:
    global _retire
    _retire = True
    if _waiting:
        raise _Retire


def connect(make: Callable[[], WorkerConnection]) -> WorkerConnection | None:
    """make()'s connection, or None when RETIRE came first: a process retired while it
    connects (its broker unreachable, retried for ever) holds nothing, so it leaves at once."""
    global _waiting
    signal.signal(RETIRE, _on_retire)
    _waiting = True
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {RETIRE})
        conn = make()
        signal.pthread_sigmask(signal.SIG_BLOCK, {RETIRE})  # pending until serve() is ready
        return conn
    except _Retire:
        return None
    finally:
        _waiting = False


def resident(pid: int | str = "self") -> int:
    """Resident memory of a process in bytes (0 when it is gone), from /proc."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _peak() -> int:
    """The most resident memory this process has had, in bytes (Linux gives KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(conn: WorkerConnection, marker: Marker, rates: RateLimits,
          failed: BaseException | None = None, max_tasks: int = 0, max_memory: int = 0,
          retire_signal: bool = True) -> None:
    """Serve tasks until the process is retired (RETIRE, or a limit); re-runs mark their
    items in marker.  Each call runs with its TaskContext current (context.py): ``flush``,
    its hard time limit (a deadline in marker), the worker's rate limits (rates), and its
    output stream.

    ``failed``: the exception of this process's initializer, which every task then fails with.
    ``max_tasks``: leave after this many tasks (the rest of the batch that reaches it goes
    back to the queue); ``max_memory``: leave after a batch that took the process's resident
    memory (its peak, as Celery's) above this many bytes.  Both are checked per batch, not
    per task; 0: no limit.  ``retire_signal`` False: a worker thread (threads.py), which
    installs no signal handler; it stops when its connection's fetch raises.

    A task about to wait for others' results (a chord's last header task) calls its
    context's ``flush()`` first: the results this process holds are sent then, not with
    its batch's, so that no two processes wait for each other's.

    A task with an ``eta`` in the future (a countdown, or a retry's delay) waits
    here, fetched and unacknowledged, while this process serves other tasks:
    if the process dies, the broker re-runs it as any other task it held.  A retry's
    clients are told (``conn.notice``) that it is RETRY, and STARTED when it runs again.
    """
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

    def limit_time(seconds: float) -> None:
        if seconds:
            marker.set_deadline(time.time() + seconds, seconds)
            os.kill(os.getppid(), signal.SIGUSR1)  # the supervisor's wait now ends by the deadline
        else:
            marker.set_deadline(0.0, 0.0)

    global _waiting, _retire
    if retire_signal:
        signal.signal(RETIRE, _on_retire)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {RETIRE})
    ran = 0  # tasks taken, counted only with max_tasks
    try:
        while True:
            _waiting = True
            if _retire:
                break
            batch = conn.fetch(max(0.0, later[0][0] - time.time()) if later else None)
            _waiting = False
            if max_tasks:
                del batch[max_tasks - ran:]  # the rest go back to the queue when this one leaves
                ran += len(batch)
                _retire = _retire or ran >= max_tasks
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
                context = TaskContext(item, flush, limit_time, rates.acquire,
                                      lambda frames, item=item: conn.output(item, frames))
                if item.get("st") or item.get("a"):
                    again = run(context, frames, fn,
                                lambda r, p: conn.report([(r, p)], ready=False), marker.mark,
                                conn.max_result)
                    marker.clear()
                else:
                    again = run(context, frames, fn, lambda r, p: out.append((r, p)),
                                max_result=conn.max_result)
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
            if max_memory and not _retire and _peak() > max_memory:
                _retire = True
            if out or fetched:  # a retiring process takes no more (ready: the broker would send some)
                conn.report(out, ready=fetched and not _retire)
    except _Retire:
        pass
    _waiting = False
    conn.close()  # sends what is still queued on its sockets
