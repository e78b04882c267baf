"""Workers as threads of this process, for memory:// (nbq/transport/memory/).

A ThreadPool is what ``nbq worker`` is for the other transports, in threads: each
of its threads runs the worker processes' own loop (process.serve: fetch, run,
report; retries, countdowns) on a memory:// worker connection, and one more thread
answers control commands (``inspect``, ``control``) with worker/control.py's answers.
``run_inline`` runs that same loop in the calling thread, for the tasks a client has
just submitted (``Client("memory://", inline=True)``): breakpoint() in a task stops
in the user's own thread.

What only a process can do has no thread equivalent: a task cannot be killed
(``revoke(terminate=True)`` answers with an error saying so), a hard or soft time
limit cannot interrupt a thread (a task with one fails with NbqError, see
nbq/tasks/runner.py), and a task that crashes its worker crashes this process
(``max_task_deaths`` is refused by the cluster, nbq/clusters/memory.py).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from ..errors import NbqError
from ..policy import HEARTBEAT
from ..transport.memory import MemorySupervisor, MemoryWorker, Stopped, broker
from . import control, ratelimit
from .marker import Marker
from .process import serve

log = logging.getLogger("nbq.worker")
POLL = 0.5  # seconds the control thread waits for a request before looking at its state


class _ThreadRateLimits(ratelimit.RateLimits):
    """The rate-limit table, safe between threads too (a record lock binds processes only)."""

    def __init__(self) -> None:
        super().__init__()
        self._threads = threading.Lock()

    def _lock(self) -> None:
        self._threads.acquire()
        super()._lock()

    def _unlock(self) -> None:
        super()._unlock()
        self._threads.release()


_rates_lock = threading.Lock()
_rates_table: _ThreadRateLimits | None = None


def _rates() -> ratelimit.RateLimits:
    """This process's rate-limit table, which its memory:// workers share (made on first use)."""
    global _rates_table
    with _rates_lock:
        if _rates_table is None:
            _rates_table = _ThreadRateLimits()
        return _rates_table


def run_inline(conn: MemoryWorker) -> None:
    """Run what conn hands out, in this thread, until nothing is left (a countdown is waited for)."""
    try:
        serve(conn, Marker(), _rates(), retire_signal=False)
    except Stopped:
        pass
    finally:
        conn.close()


class ThreadPool:
    """n worker threads serving the memory:// broker at address, with a control thread.

    Its attributes are those worker/control.py reads of a supervisor (name, sid, pid,
    started, concurrency, queues, rates, registered, pool.children), so it answers the same
    commands.
    """

    def __init__(self, address: str, name: str, n: int, queues: list[str] = ("default",)) -> None:
        self.address = address
        self.name = name
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.sid = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self.concurrency = n
        self.queues = list(queues)
        self.rates = _rates()
        self.children: dict[int, tuple[str, Marker]] = {}  # thread id -> (worker id, marker)
        self.pool = self        # (a supervisor's pool holds its children; this one holds its own)
        self.registered = None  # task names registered by -A: none here (control.registered)
        self._workers: dict[str, tuple[threading.Thread, MemoryWorker]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conn = MemorySupervisor(address, self.sid)
        self._conn.heartbeat(self.info)
        for _ in range(n):
            self._spawn()
        self._control = threading.Thread(target=self._serve_control, daemon=True,
                                         name=f"nbq-control-{name}")
        self._control.start()

    @property
    def info(self) -> dict:
        return {"sup": self.sid, "name": self.name, "host": self.host, "spid": self.pid,
                "conc": self.concurrency, "queues": list(self.queues)}

    def _spawn(self) -> None:
        conn = MemoryWorker(broker(self.address), sid=self.sid)
        thread = threading.Thread(target=self._work, args=(conn,), daemon=True,
                                  name=f"nbq-worker-{self.name}-{conn.wid}")
        with self._lock:
            self._workers[conn.wid] = (thread, conn)
        thread.start()

    def _work(self, conn: MemoryWorker) -> None:
        marker = Marker()
        tid = threading.get_native_id()
        with self._lock:
            self.children[tid] = (conn.wid, marker)
        try:
            serve(conn, marker, self.rates, retire_signal=False)
        except Stopped:
            pass
        except BaseException:
            log.exception("memory:// worker thread %s stopped", conn.wid)
        finally:
            conn.close()
            with self._lock:
                self.children.pop(tid, None)
                self._workers.pop(conn.wid, None)

    def _serve_control(self) -> None:
        beat = time.monotonic() + HEARTBEAT
        while not self._stopping.is_set():
            requests, _ = self._conn.poll(POLL, [])
            if time.monotonic() >= beat:  # for its worker-heartbeat events (nothing goes silent)
                beat = time.monotonic() + HEARTBEAT
                self._conn.heartbeat(self.info)
            for request in requests:
                if request.get("k") == "ctl":
                    reply = control.handle(self, request["cmd"], request.get("args") or {})
                    self._conn.answer(request, self.name, reply)
                    self._conn.heartbeat(self.info)  # a changed pool or queue list, at once

    # -- what control commands do (worker/control.py) --------------------------------

    def terminate(self, task_id: str, sig: int) -> bool:
        raise NbqError(f"memory:// runs task {task_id} in a thread of the client's process, "
                       "which cannot be killed: a running task there cannot be terminated")

    def grow(self, n: int) -> None:
        for _ in range(n):
            self._spawn()
        self.concurrency += n

    def shrink(self, n: int) -> None:
        """Stop n worker threads: each finishes the task it runs; what it holds is queued again."""
        with self._lock:
            stopping = list(self._workers.values())[:n]
        for _, conn in stopping:
            conn.stop()
        self.concurrency -= len(stopping)

    def stop(self) -> None:
        """Stop every thread (each finishes its task), without waiting."""
        self._stopping.set()
        self._conn.wake()
        with self._lock:
            workers = list(self._workers.values())
        for _, conn in workers:
            conn.stop()

    def close(self, wait: float = 5.0) -> None:
        """Stop, wait up to wait seconds for the threads to end, and leave the broker."""
        self.stop()
        deadline = time.monotonic() + wait
        with self._lock:
            threads = [t for t, _ in self._workers.values()]
        for thread in threads + [self._control]:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._conn.close(goodbye=True)
