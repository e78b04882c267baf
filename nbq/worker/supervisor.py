"""The supervisor behind ``nbq worker``: keeps N worker processes alive and the broker informed.

Worker processes are forked from the supervisor (a fresh, single-threaded
interpreter), die with it (PR_SET_PDEATHSIG), and are replaced when they die;
the broker is told at once, with what the process was running, so that task's
death counts against it (deaths.py).  Each leads a process group, killed with
it, so what its tasks started goes too (groups.py).
The supervisor itself exits when its broker never answers its first heartbeats,
when the broker says stop, or when its lifeline (a pipe from an embedding client)
closes, so no process outlives the client that started it, even a SIGKILLed one.
A broker that stops answering later is waited for (``broker_grace``, then the worker
exits, so a worker whose broker is gone for good does not live on), processes and all: when it
comes back at the same address (restarted by hand, by ``nbq multi`` or by
systemd) the heartbeats register this worker again (and each process says
hello again, transport/zmq.py).

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

import ctypes
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
from . import control, groups, process, ratelimit
from .initializer import Initializer
from .marker import Marker

log = logging.getLogger("nbq.worker")

BROKER_TIMEOUT = 5.0    # no answer to heartbeats for this long: the broker is gone (waited for)
BROKER_GRACE = 300.0    # how long a gone broker is waited for before this worker exits
MEMORY_EVERY = 0.1      # seconds between looks at the processes' memory (--max-memory-per-child)
#: --autoscale shrinks the pool once it has wanted fewer processes for this long
#: (Celery's AUTOSCALE_KEEPALIVE; the environment variable NBQ_AUTOSCALE_KEEPALIVE sets it)
AUTOSCALE_KEEPALIVE = 30.0
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
        self.children: dict[int, tuple[str, Marker]] = {}
        self._ending: dict[int, dict] = {}  # pid -> why this supervisor killed it (deaths.py's end)
        self._retiring: set[int] = set()    # pids retired (shrink, warm shutdown): not replaced
        self._count = 0
        self._stopping = False  # cold: stop now
        self._warm = False      # warm: retire every process, stop when none is left
        self.max_tasks = max_tasks    # per process, then it is replaced (0: no limit)
        self.max_memory = max_memory  # bytes; a process past it after a task is replaced,
        # one past twice it while running a task is killed and that task fails (WorkerLost)
        self._memory: dict[int, int] = {}  # pid -> resident bytes at the last look
        self.autoscale = autoscale    # (max, min) processes, or None
        self._calm_since: float | None = None  # since when autoscale wants fewer processes
        self._controls = ReplayWindow(max_age)  # a control command replayed is not obeyed again
        self._undertaker: groups.Undertaker | None = None

    @property
    def info(self) -> dict:
        info = {"sup": self.sid, "name": self.name, "host": self.host, "spid": self.pid,
                "conc": self.concurrency, "queues": self.queues,
                "mem": sum(process.resident(p) for p in [self.pid, *self.children])}
        if self.autoscale:  # the broker answers with the queued tasks ("queued"), up to this many
            info["autoscale"] = self.autoscale[0]
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
        self._undertaker = groups.Undertaker()
        goodbye = True
        try:
            conn.heartbeat(self.info)
            for _ in range(self.concurrency):
                self._spawn()
            answered = None
            silent = False
            started = next_beat = next_memory = time.monotonic()
            fds = [wake_r] + ([self.lifeline] if self.lifeline is not None else [])
            while not self._stopping:
                wait = min(next_beat - time.monotonic(), self._next_deadline() - time.time(),
                           next_memory - time.monotonic() if self.max_memory else HEARTBEAT)
                messages, ready = conn.poll(max(0.0, wait), fds)
                self._enforce_deadlines(time.time())
                now = time.monotonic()
                if self.max_memory and now >= next_memory:
                    next_memory = now + MEMORY_EVERY
                    self._check_memory()
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
                self._reap(conn)
                if self._warm:
                    for pid in [p for p in self.children if p not in self._retiring]:
                        self._retire(pid)
                    if not self.children:
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
            self._stop_children()
            self._undertaker.close()
            conn.close(goodbye)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {process.RETIRE})
            os.close(wake_r)
            os.close(wake_w)

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
            self._spawn()

    def shrink(self, n: int) -> None:
        """Retire n worker processes, idle ones first (a busy one finishes its task first)."""
        if not 1 <= n < self.concurrency:
            raise ValueError(f"pool_shrink {n}: this worker runs {self.concurrency} processes "
                             "and keeps at least one; use shutdown to stop it")
        self.concurrency -= n
        live = [pid for pid in self.children if pid not in self._retiring]
        for pid in sorted(live, key=lambda p: self.children[p][1].current() is not None)[:n]:
            self._retire(pid)

    def _retire(self, pid: int) -> None:
        """Have a process leave after its batch, not replaced (what it held is re-queued)."""
        self._retiring.add(pid)
        _kill(pid, process.RETIRE)

    def _scale(self, queued: int, now: float) -> None:
        """--autoscale: as many processes as tasks running and queued, within (max, min);
        grown at once, shrunk (idle processes only) once fewer were wanted for
        AUTOSCALE_KEEPALIVE seconds.  Through grow and shrink, as pool_grow/pool_shrink."""
        high, low = self.autoscale
        idle, busy = [], 0
        for pid, (_, marker) in self.children.items():
            if pid not in self._retiring:
                if marker.current() is None:
                    idle.append(pid)
                else:
                    busy += 1
        want = min(high, max(low, busy + queued))
        if want > self.concurrency:
            self.grow(want - self.concurrency)
        if want >= self.concurrency:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= float(os.environ.get("NBQ_AUTOSCALE_KEEPALIVE",
                                                            AUTOSCALE_KEEPALIVE)):
            n = min(self.concurrency - want, len(idle))
            if n:
                log.info("autoscale: %d idle processes stop (%d queued)", n, queued)
                self.shrink(n)
            self._calm_since = None

    def _check_memory(self) -> None:
        """--max-memory-per-child: kill a process whose resident memory passed twice the
        limit while it runs a task (that task fails with WorkerLost saying so, deaths.py);
        one merely past the limit retires itself after its task (process.serve)."""
        for pid, (_, marker) in self.children.items():
            rss = self._memory[pid] = process.resident(pid)
            running = marker.current()
            if rss <= 2 * self.max_memory or running is None or pid in self._ending:
                continue
            tid, name = running[:2]
            self._ending[pid] = {"id": tid, "how": "memory", "text": (
                f"task {name} ({tid}) was stopped: its worker process {pid} used {_size(rss)} "
                f"of memory, past twice --max-memory-per-child ({_size(self.max_memory)}); "
                "the process was killed and replaced")}
            _kill(pid, signal.SIGKILL)

    def _next_deadline(self) -> float:
        """The nearest hard time limit of a running task (epoch seconds; inf when none)."""
        return min((d for d, _ in (m.deadline() for _, m in self.children.values()) if d),
                   default=float("inf"))

    def _enforce_deadlines(self, now: float) -> None:
        """Kill each process whose task passed its hard time limit; _reap replaces it."""
        for pid, (wid, marker) in self.children.items():
            running = marker.current()  # read before the deadline: see deaths.py's end
            deadline, limit = marker.deadline()
            if not deadline or deadline > now or pid in self._ending:
                continue
            tid, name = running[:2] if running else (None, "?")
            self._ending[pid] = {"id": tid, "how": "time_limit", "text": (
                f"task {name} ({tid}) ran past its time limit of {limit:g} s: its worker "
                f"process {pid} was killed and replaced")}
            _kill(pid, signal.SIGKILL)

    def terminate(self, task_id: str, sig: int) -> bool:
        """Send sig to the process running task_id (its task ends REVOKED); False if none here."""
        for pid, (_, marker) in self.children.items():
            running = marker.current()
            if running is not None and running[0] == task_id and pid not in self._ending:
                self._ending[pid] = {"id": task_id, "how": "revoked",
                                     "text": f"revoked with terminate by {self.name}"}
                _kill(pid, sig)
                return True
        return False

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop()

    def _on_cold_signal(self, signum, frame) -> None:
        self._warm = self._stopping = True

    def _spawn(self) -> None:
        wid = f"{self.sid}/{self._count}"
        self._count += 1
        marker = Marker()
        pid = os.fork()
        if pid == 0:  # the worker process
            code = 0
            try:
                _become_child(self.pid, self._undertaker.fd)
                failed = self.initializer.run() if self.initializer is not None else None
                process.serve(self._connect_worker(wid, dict(self.info, pid=os.getpid())), marker,
                              self.rates, failed, self.max_tasks, self.max_memory)
            except BaseException:
                log.exception("worker process %s failed", wid)
                code = 1
            finally:
                os._exit(code)
        groups.placed(pid)
        self._undertaker.watch(pid)
        self.children[pid] = (wid, marker)

    def _reap(self, conn: SupervisorConnection) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            wid, marker = child
            self._bury(pid)
            how = _describe_exit(status)
            end = self._ending.pop(pid, None)
            memory = self._memory.pop(pid, None)
            if memory and end is None and os.WIFSIGNALED(status) and \
                    os.WTERMSIG(status) == signal.SIGKILL:
                how += (f" with {_size(memory)} of memory at the last look (the kernel's "
                        "out-of-memory killer sends SIGKILL)")
            retired = pid in self._retiring
            self._retiring.discard(pid)
            replace = not (retired or self._warm or self._stopping)
            if status == 0:  # it left on purpose, running nothing: what it held runs again
                how = "retired" + ("" if retired else
                                   " (--max-tasks-per-child or --max-memory-per-child)")
                log.info("worker process %s (pid %d) %s%s", wid, pid, how,
                         "; starting a new one" if replace else "")
            else:
                log.warning("worker process %s (pid %d) %s%s%s", wid, pid, how,
                            f" ({end['text']})" if end else "",
                            "; starting a new one" if replace else "")
            conn.lost(wid, how, marker.running(), end, leaving=self._warm)
            marker.close()
            if replace:
                self._spawn()

    def _bury(self, pid: int) -> None:
        """Kill what is left of a reaped worker process's group (its tasks' subprocesses)."""
        groups.kill_group(pid)
        self._undertaker.forget(pid)

    def _stop_children(self) -> None:
        pids = list(self.children)
        for pid in pids:
            groups.kill_group(pid, signal.SIGTERM)  # the process and its tasks' subprocesses
        deadline = time.monotonic() + 2.0
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.children.pop(pid, None)
            else:
                time.sleep(0.01)
        for pid in self.children:
            _kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.children.clear()
        for pid in pids:
            self._bury(pid)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _size(n: int) -> str:
    """Bytes as a person reads them: 612.4 MB."""
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by signal {sig} ({signal.Signals(sig).name})"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _become_child(parent: int, undertaker: int) -> None:
    """Setup of a forked worker process: its own process group, signals; it dies when the
    supervisor dies.  It closes its copy of the undertaker's pipe (only the supervisor's
    death may close that)."""
    groups.lead_group()
    os.close(undertaker)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor still kills its children when it stops
    if os.getppid() != parent:
        os._exit(0)
