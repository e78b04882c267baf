"""What a worker process is running, in memory its supervisor can read at any time, even after it dies.

Four records in one shared page, made before fork and written by the child:

* the item mark: a chunk re-run after a death reports item by item; if its
  process dies again, the supervisor reads which item it was running, so the
  death counts against that item alone (deaths.py).  Messages cannot tell this:
  the last results of a killed process may never leave it.
* the deadline of a hard time limit (epoch seconds, 0: none) and the limit:
  the supervisor kills the process when it passes (Celery's ``time_limit``).
* the current task (id, name, start time): what ``nbq inspect active``
  answers, and which task a death counts against (``running``).  Written for
  every task, so it is plain memory writes (no syscall).
* the tasks held until their ETA (countdowns, retries): ``inspect scheduled``.
  Written only when that set changes.

The last two are guarded by a sequence number the reader checks (odd: being written).
"""
from __future__ import annotations

import json
import mmap
import struct
import time
from typing import Iterable

from ..deaths import ID_MAX

_SIZE = 16384
_HEAD = struct.Struct("qH")  # item index, task id length
_MARK_END = 256
_LIMIT = struct.Struct("dd")  # deadline (epoch seconds, 0: none), the limit it came from
_LIMIT_AT = _MARK_END
_TASK = struct.Struct("QdHH")  # sequence number, start (epoch seconds), id length, name length
_TASK_AT = _LIMIT_AT + _LIMIT.size
_TEXT_AT = _TASK_AT + _TASK.size
_LIST = struct.Struct("QI")  # sequence number, length of the JSON list of scheduled tasks
_LIST_AT = 1024
_LIST_ROOM = _SIZE - _LIST_AT - _LIST.size
_SEQ = struct.Struct("Q")


class Marker:
    """A small shared (MAP_SHARED, anonymous) page: made before fork, written by the child."""

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, _SIZE)
        self._seq = 0  # even: the current task's record is whole
        self._list_seq = 0
        self.clear()
        self.schedule([])

    def mark(self, task_id: str, index: int) -> None:
        raw = task_id.encode()[:ID_MAX]
        self._mem[_HEAD.size:_HEAD.size + len(raw)] = raw
        _HEAD.pack_into(self._mem, 0, index, len(raw))

    def read(self) -> tuple[str, int] | None:
        index, n = _HEAD.unpack_from(self._mem, 0)
        if index < 0:
            return None
        return self._mem[_HEAD.size:_HEAD.size + n].decode(errors="replace"), index

    def clear(self) -> None:
        _HEAD.pack_into(self._mem, 0, -1, 0)

    def running(self) -> list | None:
        """[task id, item position or None] the process is running (what its death counts
        against, deaths.py), or None when it runs nothing.  Ids are clipped (clip_id)."""
        current = self.current()
        if current is None:
            return None
        mark = self.read()
        return [current[0], mark[1] if mark is not None and mark[0] == current[0] else None]

    def begin(self, task_id: str, name: bytes) -> None:
        """Record the task this process starts now (name encoded, at most NAME_MAX bytes)."""
        tid = task_id.encode()[:ID_MAX]
        text = tid + name
        mem = self._mem
        seq = self._seq = self._seq + 2
        _SEQ.pack_into(mem, _TASK_AT, seq - 1)
        mem[_TEXT_AT:_TEXT_AT + len(text)] = text
        _TASK.pack_into(mem, _TASK_AT, seq, time.time(), len(tid), len(name))

    def idle(self) -> None:
        """Record that this process runs nothing now."""
        self._seq += 2
        _TASK.pack_into(self._mem, _TASK_AT, self._seq, 0.0, 0, 0)

    def current(self) -> tuple[str, str, float] | None:
        """(task id, name, start time) of the task running now, or None when idle (or when
        the process died in the middle of a write)."""
        got = self._stable(_TASK_AT, _TASK, lambda f: f[2] + f[3])
        if got is None or not got[0][2]:
            return None
        (_, start, n_id, _), text = got
        return text[:n_id].decode(errors="replace"), text[n_id:].decode(errors="replace"), start

    def schedule(self, tasks: Iterable[tuple[str, str, float]]) -> None:
        """Record the (task id, name, eta) this process holds until their ETA; as many as fit."""
        parts, size = [], 2
        for task in tasks:
            part = json.dumps(task).encode()
            size += len(part) + 1
            if size > _LIST_ROOM:
                break
            parts.append(part)
        text = b"[" + b",".join(parts) + b"]"
        seq = self._list_seq = self._list_seq + 2
        _SEQ.pack_into(self._mem, _LIST_AT, seq - 1)
        self._mem[_LIST_AT + _LIST.size:_LIST_AT + _LIST.size + len(text)] = text
        _LIST.pack_into(self._mem, _LIST_AT, seq, len(text))

    def scheduled(self) -> list[tuple[str, str, float]]:
        """The (task id, name, eta) this process holds until their ETA."""
        got = self._stable(_LIST_AT, _LIST, lambda f: f[1])
        return [] if got is None else [tuple(t) for t in json.loads(got[1])]

    def _stable(self, at: int, head: struct.Struct, length) -> tuple[tuple, bytes] | None:
        """A record's header fields and the length(fields) bytes after it, read whole (its
        sequence number even and unchanged); None if it stayed torn (a writer died mid-write)."""
        for _ in range(1000):
            fields = head.unpack_from(self._mem, at)
            text = self._mem[at + head.size:at + head.size + length(fields)]
            if fields[0] % 2 == 0 and _SEQ.unpack_from(self._mem, at)[0] == fields[0]:
                return fields, text
        return None

    def set_deadline(self, deadline: float, limit: float) -> None:
        """Ask the supervisor to kill this process at deadline (0: no deadline)."""
        _LIMIT.pack_into(self._mem, _LIMIT_AT, deadline, limit)

    def deadline(self) -> tuple[float, float]:
        """(deadline, limit); deadline 0 when there is none."""
        return _LIMIT.unpack_from(self._mem, _LIMIT_AT)

    def close(self) -> None:
        self._mem.close()
