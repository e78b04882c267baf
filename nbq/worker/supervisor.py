"""The supervisor behind ``nbq worker``: keeps N worker processes alive and the broker informed.

Worker processes are forked from the supervisor (a fresh, single-threaded
interpreter), die with it (PR_SET_PDEATHSIG), and are replaced when they die;
the broker is told at once, with what the process was running, so that task's
death counts against it (deaths.py).  Each leads a process group, killed with
it, so what its tasks started goes too (groups.py).
The supervisor itself exits when its broker stops answering heartbeats, when
the broker says stop, or when its lifeline (a pipe from an embedding client)
closes, so no process outlives the client that started it, even a SIGKILLed one.
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
from typing import Callable

from ..transport.base import SupervisorConnection, WorkerConnection
from . import control, groups, process, ratelimit
from .initializer import Initializer
from .marker import Marker

log = logging.getLogger("nbq.worker")

HEARTBEAT = 1.0
BROKER_TIMEOUT = 5.0    # no answer to heartbeats for this long: the broker is gone
CONNECT_TIMEOUT = 10.0  # no first answer for this long: cannot reach the broker
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
                 name: str = DEFAULT_NAME, initializer: Initializer | None = None) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.sid = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:6]}"
        self.name = worker_name(name, self.host)
        self.started = time.time()
        self.rates = ratelimit.RateLimits()
        self.concurrency = concurrency
        self.queues = list(queues)
        self.lifeline = lifeline
        self.initializer = initializer  # run in each worker process, a replacement's too
        self._connect = connect
        self._connect_worker = connect_worker
        self.children: dict[int, tuple[str, Marker]] = {}
        self._ending: dict[int, dict] = {}  # pid -> why this supervisor killed it (deaths.py's end)
        self._retiring: set[int] = set()    # pids stopped by pool_shrink: not replaced
        self._count = 0
        self._stopping = False
        self._undertaker: groups.Undertaker | None = None

    @property
    def info(self) -> dict:
        return {"s": self.sid, "n": self.name, "host": self.host, "spid": self.pid,
                "conc": self.concurrency, "q": self.queues,
                "mem": _memory([self.pid, *self.children])}

    def run(self) -> str:
        """Serve until told to stop; returns why it stopped."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGUSR1, lambda *_: None)  # a process set a deadline: look again
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        conn = self._connect(self.sid)
        self._undertaker = groups.Undertaker()
        goodbye = True
        try:
            conn.heartbeat(self.info)
            for _ in range(self.concurrency):
                self._spawn()
            answered = None
            started = next_beat = time.monotonic()
            fds = [wake_r] + ([self.lifeline] if self.lifeline is not None else [])
            while not self._stopping:
                wait = min(next_beat - time.monotonic(), self._next_deadline() - time.time())
                messages, ready = conn.poll(max(0.0, wait), fds)
                self._enforce_deadlines(time.time())
                now = time.monotonic()
                for header in messages:
                    if header["k"] == "hb":
                        answered = now
                    elif header["k"] == "stop":
                        return "the broker is shutting down"
                    elif header["k"] == "ctl":
                        self._on_control(conn, header)
                if wake_r in ready:
                    os.read(wake_r, 4096)
                self._reap(conn)
                if self.lifeline in ready:
                    return "the client that started this worker is gone"
                if now >= next_beat:
                    next_beat = now + HEARTBEAT
                    conn.heartbeat(self.info)
                if answered is None and now - started > CONNECT_TIMEOUT:
                    goodbye = False
                    return "the broker never answered"
                if answered is not None and now - answered > BROKER_TIMEOUT:
                    goodbye = False
                    return "the broker stopped answering"
            return "asked to stop"
        finally:
            self._stop_children()
            self._undertaker.close()
            conn.close(goodbye)
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)

    def _on_control(self, conn: SupervisorConnection, request: dict) -> None:
        """Answer a control command addressed to this worker (by name or id, or to all)."""
        dest = request.get("d")
        if dest is not None and self.name not in dest and self.sid not in dest:
            return
        conn.answer(request, self.name, control.handle(self, request["cmd"], request.get("a") or {}))
        conn.heartbeat(self.info)  # the broker learns a changed pool or queue list at once

    def stop(self) -> None:
        """Stop serving, as SIGTERM does: the loop ends and the processes are stopped."""
        self._stopping = True

    def grow(self, n: int) -> None:
        """Start n more worker processes."""
        if n < 1:
            raise ValueError(f"pool_grow needs a positive number of processes, not {n}")
        self.concurrency += n
        for _ in range(n):
            self._spawn()

    def shrink(self, n: int) -> None:
        """Stop n worker processes, idle ones first (a busy one's task runs again elsewhere)."""
        if not 1 <= n < self.concurrency:
            raise ValueError(f"pool_shrink {n}: this worker runs {self.concurrency} processes "
                             "and keeps at least one; use shutdown to stop it")
        self.concurrency -= n
        live = [pid for pid in self.children if pid not in self._retiring]
        for pid in sorted(live, key=lambda p: self.children[p][1].current() is not None)[:n]:
            self._retiring.add(pid)
            _kill(pid, signal.SIGTERM)

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

    def _spawn(self) -> None:
        wid = f"{self.sid}/{self._count}"
        self._count += 1
        marker = Marker()
        pid = os.fork()
        if pid == 0:  # the worker process
            code = 0
            try:
                _become_child(self.pid, self._undertaker.fd)
                ratelimit.limits = self.rates
                failed = self.initializer.run() if self.initializer is not None else None
                process.serve(self._connect_worker(wid, dict(self.info, pid=os.getpid())), marker,
                              failed)
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
            if pid in self._retiring:
                self._retiring.discard(pid)
                log.info("worker process %s (pid %d) stopped: the pool shrank", wid, pid)
                conn.lost(wid, "was stopped by pool_shrink", None)  # not its task's fault
                marker.close()
                continue
            log.warning("worker process %s (pid %d) %s%s; starting a new one", wid, pid, how,
                        f" ({end['text']})" if end else "")
            conn.lost(wid, how, marker.running(), end)
            marker.close()
            if not self._stopping:
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


def _memory(pids: list[int]) -> int | None:
    """Resident memory of these processes in bytes (None without Linux's /proc)."""
    if not os.path.isdir("/proc"):
        return None
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except OSError:  # it exited meanwhile
            pass
    return total


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


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
