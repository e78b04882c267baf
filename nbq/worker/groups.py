"""Process groups of worker processes: what a task starts ends with the process that ran it.

Each worker process leads a process group of its own, which the subprocesses
its tasks start join.  The supervisor kills a process's group when it reaps the
process (however it died) and when it stops.  A supervisor killed outright
(SIGKILL) cannot: its worker processes die with it (PR_SET_PDEATHSIG), and the
Undertaker, a small process forked from it at start, sees its pipe close and
kills the groups it was told of.
"""
from __future__ import annotations

import os
import signal
import struct

_GROUP = struct.Struct("q")  # a group to watch (positive) or to forget (negative)


def lead_group() -> None:
    """Make the calling (just forked) process the leader of a new process group."""
    os.setpgid(0, 0)


def placed(pid: int) -> None:
    """The parent's half of lead_group: whichever runs first, the child leads its group."""
    try:
        os.setpgid(pid, pid)
    except OSError:  # already done by the child, or the child is gone
        pass


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send sig to a process group; nothing if none is left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Undertaker:
    """A process that kills the watched process groups once its supervisor is gone."""

    def __init__(self) -> None:
        r, self._w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                os.close(self._w)
                _watch(r)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(r)

    @property
    def fd(self) -> int:
        """The write end of its pipe: each forked worker process closes its copy, so that
        only the supervisor's end keeps the pipe open."""
        return self._w

    def watch(self, pgid: int) -> None:
        os.write(self._w, _GROUP.pack(pgid))

    def forget(self, pgid: int) -> None:
        os.write(self._w, _GROUP.pack(-pgid))

    def close(self) -> None:
        """Let it go (it kills any group still watched) and reap it."""
        os.close(self._w)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped already by a waitpid(-1)
            pass


def _watch(r: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends when the supervisor does
    groups: set[int] = set()
    buf = b""
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        buf += data
        whole = len(buf) - len(buf) % _GROUP.size
        for (g,) in _GROUP.iter_unpack(buf[:whole]):
            if g > 0:
                groups.add(g)
            else:
                groups.discard(-g)
        buf = buf[whole:]
    for g in groups:
        kill_group(g)
