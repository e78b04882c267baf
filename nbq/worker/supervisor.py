"""The supervisor behind ``nbq worker``: keeps N worker processes alive and the broker informed.

Its worker processes are a Pool (pool.py: forked, replaced when they die, the broker
told at once with what each was running, so that task's death counts against it).
The supervisor itself exits when its broker never answers its first heartbeats,
when the broker says stop, or when its lifeline (a pipe from an embedding client)
closes, so no process outlives the client that started it, even a SIGKILLed one.
A broker that stops answering later is waited for (``broker_grace``, then the worker
exits, so a worker whose broker is gone for good does not live on), processes and all: when it
comes back at the same address (restarted by hand, by ``nbq multi`` or by
systemd) the heartbeats register this worker again (and each process says
hello again, transport/zmq.py).  Between heartbeats it enforces its processes' limits
(limits.py), sizes the pool (autoscale.py) and answers control commands (control.py).

SIGTERM (or SIGINT, or ``control shutdown``) is a warm shutdown: each process is
retired (process.RETIRE: it finishes the batch it runs and leaves, and what it held
goes back to the queue at once), and the supervisor leaves when none is left.  A
second SIGTERM, or SIGQUIT, is cold: the processes are killed now, and the broker,
told goodbye, re-queues their tasks without counting a death (deaths.py).  Shrinking
the pool (pool_shrink, --autoscale) retires processes the same way, idle ones first,
so a busy one is never killed; --max-tasks-per-child and --max-memory-per-child make
a process retire itself after a batch, and it is replaced.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
import uuid
from typing import Callable, Iterable

from ..policy import CONNECT_TIMEOUT, HEARTBEAT
from ..replay import DEFAULT_MAX_AGE, ReplayWindow
from ..transport.base import SupervisorConnection, WorkerConnection
from . import control, limits, process, ratelimit
from .autoscale import Autoscale
from .initializer import Initializer
from .marker import Marker
from .pool import Pool

log = logging.getLogger("nbq.worker")

BROKER_TIMEOUT = 5.0    # no answer to heartbeats for this long: the broker is gone (waited for)
BROKER_GRACE = 300.0    # how long a gone broker is waited for before this worker exits
DEFAULT_NAME = "nbq@%h"  # a worker's name in control replies, as Celery's celery@%h


def worker_name(template: str, host: str) -> str:
    """A worker name from ``-n``: %h is the host name, %n its first label, %d the rest, %% a %."""
    short, _, domain = host.partition(".")
    table = {"h": host, "n": short, "d": domain, "%": "%"}
    return re.sub(r"%([hnd%])", lambda m: table[m.group(1)], template)


class Supervisor:
    """Forks and watches worker processes; run() returns when it is time to stop."""

    def __init__(self, connect: Callable[[str], SupervisorConnection],
                 connect_worker: Callable[[str, dict], WorkerConnection],
                 concurrency: int, queues: list[str], lifeline: int | None = None,
                 name: str = DEFAULT_NAME, initializer: Initializer | None = None,
                 max_tasks: int = 0, max_memory: int = 0,
                 autoscale: tuple[int, int] | None = None,
                 max_age: float = DEFAULT_MAX_AGE, broker_grace: float = BROKER_GRACE,
                 registered: Callable[[], Iterable[str]] | None = None) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.sid = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:6]}"
        self.name = worker_name(name, self.host)
        self.started = time.time()
        self.rates = ratelimit.RateLimits()
        self.concurrency = concurrency
        self.queues = list(queues)
        self.lifeline = lifeline
        self.broker_grace = broker_grace  # a broker silent this long is not coming back: exit
        self.initializer = initializer  # run in each worker process, a replacement's too
        self.registered = registered  # names of the tasks it knows (``inspect registered``)
        self._connect = connect
        self._connect_worker = connect_worker
        self.pool = Pool(self.sid, self.pid, self._serve)
        self._stopping = False  # cold: stop now
        self._warm = False      # warm: retire every process, stop when none is left
        self.max_tasks = max_tasks    # per process, then it is replaced (0: no limit)
        self.max_memory = max_memory  # bytes; a process past it after a task is replaced,
        # one past twice it while running a task is killed and that task fails (WorkerLost)
        self.autoscale = Autoscale(*autoscale) if autoscale else None
        self._controls = ReplayWindow(max_age)  # a control command replayed is not obeyed again

    @property
    def info(self) -> dict:
        """What each heartbeat tells the broker about this worker."""
        info = {"sup": self.sid, "name": self.name, "host": self.host, "spid": self.pid,
                "conc": self.concurrency, "queues": self.queues,
                "mem": sum(process.resident(p) for p in [self.pid, *self.pool.children]),
                "ld": round(os.getloadavg()[0], 2),
                "act": sum(1 for _, marker in self.pool.children.values() if marker.current())}
        if self.autoscale:  # the broker answers with the queued tasks ("queued"), up to this many
            info["autoscale"] = self.autoscale.high
        return info

    def run(self) -> str:
        """Serve until told to stop; returns why it stopped."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGUSR1, lambda *_: None)  # a process set a deadline: look again
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGQUIT, self._on_cold_signal)
        signal.pthread_sigmask(signal.SIG_BLOCK, {process.RETIRE})  # see process.RETIRE
        conn = self._connect(self.sid)
        self.pool.open()
        goodbye = True
        try:
            conn.heartbeat(self.info)
            for _ in range(self.concurrency):
                self.pool.spawn()
            answered = None
            silent = False
            started = next_beat = next_memory = time.monotonic()
            fds = [wake_r] + ([self.lifeline] if self.lifeline is not None else [])
            while not self._stopping:
                wait = min(next_beat - time.monotonic(),
                           limits.next_deadline(self.pool) - time.time(),
                           next_memory - time.monotonic() if self.max_memory else HEARTBEAT)
                messages, ready = conn.poll(max(0.0, wait), fds)
                limits.enforce_deadlines(self.pool, time.time())
                now = time.monotonic()
                if self.max_memory and now >= next_memory:
                    next_memory = now + limits.MEMORY_EVERY
                    limits.check_memory(self.pool, self.max_memory)
                for header in messages:
                    if header["k"] == "hb":
                        answered = now
                        if silent:
                            silent = False
                            log.warning("the broker answers again; serving it")
                        if self.autoscale and not self._warm:
                            self._scale(header.get("queued", 0), now)
                    elif header["k"] == "stop":
                        return "the broker is shutting down"
                    elif header["k"] == "ctl":
                        self._on_control(conn, header)
                if wake_r in ready:
                    os.read(wake_r, 4096)
                self.pool.reap(conn, replace=not (self._warm or self._stopping),
                               leaving=self._warm)
                if self._warm:
                    for pid in self.pool.live():
                        self.pool.retire(pid)
                    if not self.pool.children:
                        return "asked to stop"
                if self.lifeline in ready:
                    return "the client that started this worker is gone"
                if now >= next_beat:
                    next_beat = now + HEARTBEAT
                    conn.heartbeat(self.info)
                if answered is None and now - started > CONNECT_TIMEOUT:
                    goodbye = False
                    return "the broker never answered"
                if answered is not None and now - answered > self.broker_grace:
                    goodbye = False
                    return f"the broker did not answer for {self.broker_grace:g} s"
                if answered is not None and now - answered > BROKER_TIMEOUT and not silent:
                    silent = True
                    log.warning("the broker stopped answering heartbeats; waiting for it to "
                                "come back at the same address")
            return "asked to stop"
        finally:
            self.pool.close()
            conn.close(goodbye)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {process.RETIRE})
            os.close(wake_r)
            os.close(wake_w)

    def _serve(self, wid: str, marker: Marker, was: dict | None) -> None:
        """What a forked worker process runs: the initializer, then tasks until it leaves.
        was: the death this process replaces, named in its hello (transport/base.py)."""
        failed = self.initializer.run() if self.initializer is not None else None
        conn = process.connect(lambda: self._connect_worker(wid, dict(self.info, pid=os.getpid(),
                                                                      was=was)))
        if conn is not None:
            process.serve(conn, marker, self.rates, failed, self.max_tasks, self.max_memory)

    def _on_control(self, conn: SupervisorConnection, request: dict) -> None:
        """Answer a control command addressed to this worker (by name or id, or to all)."""
        dest = request.get("dest")
        if dest is not None and self.name not in dest and self.sid not in dest:
            return
        now = time.time()
        why = self._controls.refuse(request, now)
        if why is not None:
            log.warning("refused control command %r: %s", str(request.get("cmd"))[:40], why)
            return
        self._controls.forget(now)
        conn.answer(request, self.name, control.handle(self, request["cmd"], request.get("args") or {}))
        conn.heartbeat(self.info)  # the broker learns a changed pool or queue list at once

    def stop(self) -> None:
        """Stop serving, as SIGTERM does: warm the first time (running tasks finish, held
        ones go back to the queue, then the supervisor leaves), cold the second."""
        if self._warm:
            self._stopping = True
        self._warm = True

    def grow(self, n: int) -> None:
        """Start n more worker processes."""
        if n < 1:
            raise ValueError(f"pool_grow needs a positive number of processes, not {n}")
        self.concurrency += n
        for _ in range(n):
            self.pool.spawn()

    def shrink(self, n: int) -> None:
        """Retire n worker processes, idle ones first (a busy one finishes its task first)."""
        if not 1 <= n < self.concurrency:
            raise ValueError(f"pool_shrink {n}: this worker runs {self.concurrency} processes "
                             "and keeps at least one; use shutdown to stop it")
        self.concurrency -= n
        self.pool.retire_idle_first(n)

    def _scale(self, queued: int, now: float) -> None:
        """--autoscale: grow or shrink as autoscale.py says, through grow and shrink."""
        idle, busy = 0, 0
        for pid in self.pool.live():
            if self.pool.children[pid][1].current() is None:
                idle += 1
            else:
                busy += 1
        n = self.autoscale.change(self.concurrency, busy, idle, queued, now)
        if n > 0:
            self.grow(n)
        elif n < 0:
            log.info("autoscale: %d idle processes stop (%d queued)", -n, queued)
            self.shrink(-n)

    def terminate(self, task_id: str, sig: int) -> bool:
        """Send sig to the process running task_id (its task ends REVOKED); False if none here."""
        for pid, (_, marker) in self.pool.children.items():
            running = marker.current()
            if running is not None and running[0] == task_id and pid not in self.pool.ending:
                self.pool.end(pid, {"id": task_id, "how": "revoked",
                                    "text": f"revoked with terminate by {self.name}"}, sig)
                return True
        return False

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop()

    def _on_cold_signal(self, signum, frame) -> None:
        self._warm = self._stopping = True
