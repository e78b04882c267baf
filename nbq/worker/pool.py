"""A supervisor's worker processes: forked, retired, killed for a reason, reaped and replaced.

Each process is forked from the supervisor (a fresh, single-threaded interpreter),
dies with it (PR_SET_PDEATHSIG), and leads a process group, killed with it, so what
its tasks started goes too (groups.py).  When one dies the broker is told at once,
with what it was running, so that task's death counts against it (deaths.py), and a
new one is started unless the process was retired or the supervisor is stopping.  The new
one is given that death too, to name in its hello (``was``, transport/base.py): a broker
that hears the two on different connections acts on the death first, so the replacement
never takes the tasks queued behind the dead one's before those run again.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from typing import Callable

from ..transport.base import SupervisorConnection
from . import groups, process
from .marker import Marker

log = logging.getLogger("nbq.worker")


class Pool:
    """The worker processes of one supervisor, by pid, each with its id and its Marker.

    ``serve(wid, marker, was)`` is what a forked process runs (was: the death it replaces,
    or None); ``parent`` is the supervisor's pid.
    """

    def __init__(self, sid: str, parent: int,
                 serve: Callable[[str, Marker, dict | None], None]) -> None:
        self.sid = sid
        self.parent = parent
        self._serve = serve
        self.children: dict[int, tuple[str, Marker]] = {}
        self.ending: dict[int, dict] = {}  # pid -> why the supervisor killed it (deaths.py's end)
        self.retiring: set[int] = set()    # pids retired (shrink, warm shutdown): not replaced
        self.memory: dict[int, int] = {}   # pid -> resident bytes at the last look (limits.py)
        self._count = 0
        self._undertaker: groups.Undertaker | None = None

    def open(self) -> None:
        """Start the undertaker (groups.py), before the first process is forked."""
        self._undertaker = groups.Undertaker()

    def live(self) -> list[int]:
        """The processes not retiring."""
        return [pid for pid in self.children if pid not in self.retiring]

    def spawn(self, was: dict | None = None) -> None:
        """Fork one more worker process; was: the death it replaces, as the broker was told it
        ({"w", "how", "at", "end"}: SupervisorConnection.lost's arguments), for its hello."""
        wid = f"{self.sid}/{self._count}"
        self._count += 1
        marker = Marker()
        pid = os.fork()
        if pid == 0:  # the worker process
            code = 0
            try:
                _become_child(self.parent, self._undertaker.fd)
                self._serve(wid, marker, was)
            except BaseException:
                log.exception("worker process %s failed", wid)
                code = 1
            finally:
                os._exit(code)
        groups.placed(pid)
        self._undertaker.watch(pid)
        self.children[pid] = (wid, marker)

    def retire(self, pid: int) -> None:
        """Have a process leave after its batch, not replaced (what it held is re-queued)."""
        self.retiring.add(pid)
        kill(pid, process.RETIRE)

    def retire_idle_first(self, n: int) -> None:
        """Retire n processes, idle ones first (a busy one finishes its task first)."""
        live = self.live()
        for pid in sorted(live, key=lambda p: self.children[p][1].current() is not None)[:n]:
            self.retire(pid)

    def end(self, pid: int, end: dict, sig: int = signal.SIGKILL) -> None:
        """Kill a process for a reason its task's clients are told (deaths.py's ``end``)."""
        self.ending[pid] = end
        kill(pid, sig)

    def reap(self, conn: SupervisorConnection, replace: bool, leaving: bool) -> None:
        """Tell the broker of each process that ended; start another (``replace``) unless it
        was retired.  ``leaving``: the supervisor stops warm (no death is counted)."""
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
            end = self.ending.pop(pid, None)
            memory = self.memory.pop(pid, None)
            if memory and end is None and os.WIFSIGNALED(status) and \
                    os.WTERMSIG(status) == signal.SIGKILL:
                how += (f" with {megabytes(memory)} of memory at the last look (the kernel's "
                        "out-of-memory killer sends SIGKILL)")
            retired = pid in self.retiring
            self.retiring.discard(pid)
            again = replace and not retired
            if status == 0:  # it left on purpose, running nothing: what it held runs again
                how = "retired" + ("" if retired else
                                   " (--max-tasks-per-child or --max-memory-per-child)")
                log.info("worker process %s (pid %d) %s%s", wid, pid, how,
                         "; starting a new one" if again else "")
            else:
                log.warning("worker process %s (pid %d) %s%s%s", wid, pid, how,
                            f" ({end['text']})" if end else "",
                            "; starting a new one" if again else "")
            at = marker.running()
            conn.lost(wid, how, at, end, leaving=leaving)
            marker.close()
            if again:
                self.spawn({"w": wid, "how": how, "at": at, "end": end})

    def close(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after 2 s) and their groups, then the
        undertaker."""
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
            kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.children.clear()
        for pid in pids:
            self._bury(pid)
        self._undertaker.close()

    def _bury(self, pid: int) -> None:
        """Kill what is left of a reaped worker process's group (its tasks' subprocesses)."""
        groups.kill_group(pid)
        self._undertaker.forget(pid)


def kill(pid: int, sig: int) -> None:
    """Send sig to a process; nothing if it is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def megabytes(n: int) -> str:
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
