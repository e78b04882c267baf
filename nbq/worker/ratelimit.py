"""Rate limits per worker, as Celery's ``rate_limit``: one table a supervisor shares with its processes.

A task limited to N per period starts at most once every period/N seconds on
this worker, whichever of its processes runs it (Celery's token bucket of
capacity 1).  The table is a file-backed shared page made before fork,
holding each task's interval and last start.  A process takes a start under a
POSIX record lock (released by the kernel if its holder dies) when the
interval has passed since the last one; else it sleeps until then, at most
RECHECK seconds, and asks again.  Nothing is booked ahead, so a rate changed
at run time applies from the next start, also to a task already waiting.
Slots are never removed, so a process caches where a name lives.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import time

from .context import Rate, interval

SLOTS = 256
NAME_MAX = 200
_COUNT = struct.Struct("Q")
_SLOT = struct.Struct(f"ddH{NAME_MAX}s")  # interval (s, 0: none), last start (epoch s), name length
RECHECK = 0.5  # seconds a waiting task sleeps at most before it reads its rate again


class RateLimits:
    """Task name -> (interval, last start), shared by a supervisor and the processes it forks."""

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="nbq-rates-")
        os.unlink(path)
        os.ftruncate(fd, _COUNT.size + SLOTS * _SLOT.size)
        self._fd = fd
        self._mem = mmap.mmap(fd, 0)
        self._where: dict[str, int] = {}  # this process's cache: name -> slot

    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _find(self, name: str, raw: bytes) -> int | None:
        """The slot of name (lock held, or a slot cached before), None if it has none."""
        slot = self._where.get(name)
        if slot is not None:
            return slot
        (count,) = _COUNT.unpack_from(self._mem, 0)
        for i in range(count):
            _, _, n, stored = _SLOT.unpack_from(self._mem, _COUNT.size + i * _SLOT.size)
            if stored[:n] == raw:
                self._where[name] = i
                return i
        return None

    def _slot(self, name: str, raw: bytes, every: float) -> int:
        """The slot of name, made with interval every if it has none (lock held)."""
        slot = self._find(name, raw)
        if slot is None:
            (slot,) = _COUNT.unpack_from(self._mem, 0)
            if slot >= SLOTS:
                raise ValueError(f"more than {SLOTS} tasks have rate limits on this worker")
            _SLOT.pack_into(self._mem, _COUNT.size + slot * _SLOT.size, every, 0.0, len(raw), raw)
            _COUNT.pack_into(self._mem, 0, slot + 1)
            self._where[name] = slot
        return slot

    def set(self, name: str, rate: Rate) -> None:
        """Limit task name to rate from its next start on (None or 0: no limit), whatever its
        own option says."""
        every, raw = interval(rate), _name(name)
        self._lock()
        try:
            at = _COUNT.size + self._slot(name, raw, every) * _SLOT.size
            _, last, n, stored = _SLOT.unpack_from(self._mem, at)
            _SLOT.pack_into(self._mem, at, every, last, n, stored)
        finally:
            self._unlock()

    def acquire(self, name: str, own: Rate) -> None:
        """Wait until task name may start here (own: its rate_limit option, used until one is
        set), then count it as started."""
        while (wait := self._take(name, own)) > 0:
            time.sleep(min(wait, RECHECK))

    def _take(self, name: str, own: Rate) -> float:
        """Start task name now if its interval has passed since its last start (0.0), else the
        seconds until it will have."""
        if own is None and not _COUNT.unpack_from(self._mem, 0)[0]:
            return 0.0  # no limit anywhere: no lock taken
        raw = _name(name)
        self._lock()
        try:
            slot = self._find(name, raw) if own is None else self._slot(name, raw, interval(own))
            if slot is None:
                return 0.0
            at = _COUNT.size + slot * _SLOT.size
            every, last, n, stored = _SLOT.unpack_from(self._mem, at)
            if not every:
                return 0.0
            now = time.time()
            if now < last + every:
                return last + every - now
            _SLOT.pack_into(self._mem, at, every, now, n, stored)
            return 0.0
        finally:
            self._unlock()


def _name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > NAME_MAX:
        raise ValueError(f"task name {name[:40]}... is longer than {NAME_MAX} bytes: rate limits "
                         "need a shorter name")
    return raw
