"""The broker's queues: the tasks it holds, each queue's lanes by priority, and tasks
parked until their function arrives.

A task is never unpickled here: the broker keeps its header item and payload
frames.  Each queue (header ``q``, absent: "default") serves its most urgent
priority first (header ``pr``, 0-9, absent: 0), in order within one; a task
queued again (after a death, or a send that failed) goes first among its priority.

A broker that restarts starts empty: clients send again what they have not seen
finish (a task id already held is not queued twice), and a task whose function
has not arrived yet waits for it (``parked``) instead of failing on its worker.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Iterator

from .. import protocol

SMALL_FRAME = 512  # payload frames this small are kept as bytes (a zmq.Frame costs ~180 B more)
NAMES_KEPT = 10_000  # interned function hashes, client ids and queue names, forgotten beyond
ORIGINALS_KEPT = 10_000  # a lone task's message is kept, to forward as is, while fewer are held
#                          (or when it is large: signing it again would cost more than keeping it)


_OWN = {"id": lambda t: t.id, "h": lambda t: t.h, "c": lambda t: t.c,
        "f": lambda t: t.f or None, "nf": lambda t: len(t.frames)}
_STARTED, _RETRYING = 1, 2  # QueuedTask._flags: report STARTED (header f), held for a retry


class QueuedTask:
    """A task as the broker sees it: its header item and payload, never unpickled.

    Kept compact, as a million of them may wait: the fields every task has are slots (their
    strings shared, its flags in one), the rest of its header item a dict only when there
    is any, its per-item delivery marks made at its first result; ``item`` rebuilds the
    header item.  One slot holds its frames: the message it came in (a list) when that is
    kept, else its payload frames (a tuple), or the one frame itself when it has one.
    Its arguments' repr (``ar``) is not kept: only its task-sent event shows it, and that
    event's record holds it (Queues.receive returns it).
    """

    __slots__ = ("id", "h", "c", "rest", "_msg", "where", "_flags", "_delivered")

    def __init__(self, item: dict, frames: list | tuple, original: list | None = None,
                 delivered: bytearray | None = None) -> None:
        item = dict(item)
        self.id: str = item.pop("id")
        self.h: str = item.pop("h")
        self.c: str = item.pop("c")
        self._flags = _STARTED if item.pop("f", 0) else 0
        item.pop("ar", None)  # its arguments' repr: its task-sent event's, not kept here
        item.pop("nf", None)  # len(frames)
        self.rest: dict | None = item or None  # any other header fields (ITEM_FIELDS)
        if original is not None:
            self._msg = original
        else:
            self._msg = tuple(frames) if len(frames) != 1 else frames[0]
        self.where = "queued"  # or "parked", "cancelled", "done", or its worker process's id
        self._delivered = delivered  # per item: has a result reached its client

    @property
    def f(self) -> int:
        """1 when its client wants it reported STARTED (header ``f``), else 0."""
        return self._flags & _STARTED

    @property
    def retrying(self) -> bool:
        """Held by its worker until a retry's eta (a RETRY notice)."""
        return bool(self._flags & _RETRYING)

    @retrying.setter
    def retrying(self, on: bool) -> None:
        self._flags = self._flags | _RETRYING if on else self._flags & ~_RETRYING

    @property
    def original(self) -> list | None:
        """The message it came in, to forward as is, when it is kept."""
        return self._msg if type(self._msg) is list else None

    @property
    def frames(self) -> tuple | list:
        """Its payload frames."""
        m = self._msg
        return m if type(m) is tuple else m[2:] if type(m) is list else (m,)

    @frames.setter
    def frames(self, frames: list | tuple) -> None:
        """New payload frames (shared memory held open, say): the message it came in is
        not forwarded as is any more."""
        self._msg = tuple(frames) if len(frames) != 1 else frames[0]

    @property
    def item(self) -> dict:
        """The task's header item, as its client sent it (the broker's ``c`` added)."""
        item = {"id": self.id, "h": self.h, "c": self.c, "nf": len(self.frames)}
        if self.f:
            item["f"] = self.f
        if self.rest:
            item.update(self.rest)
        return item

    def get(self, field: str, default=None):
        """A field of its header item, as ``item.get`` (events read a task this way: the
        task, not a copy of its item, is what they keep)."""
        rest = self.rest
        if rest is not None and field in rest:
            return rest[field]
        own = _OWN.get(field)
        value = own(self) if own is not None else None
        return default if value is None else value

    def __getitem__(self, field: str):
        value = self.get(field)
        if value is None:
            raise KeyError(field)
        return value

    def __contains__(self, field: str) -> bool:
        return self.get(field) is not None

    def release(self) -> None:
        """It is done: its payload is dropped (events may keep the task a while)."""
        self._msg = ()

    @property
    def n(self) -> int:
        """How many items it holds (a map's chunk: several)."""
        return 1 if self.rest is None else self.rest.get("n", 1)

    @property
    def delivered(self) -> bytearray:
        """Per item: has a result reached its client (made at the first result)."""
        if self._delivered is None:
            self._delivered = bytearray(self.n)
        return self._delivered

    def undelivered(self) -> list[int]:
        if self._delivered is None:
            return list(range(self.n))
        return [i for i, d in enumerate(self._delivered) if not d]


class Lanes:
    """A queue's tasks in lanes by priority (header ``pr``, 0-9, absent: 0): the most
    urgent lane is served first, each lane in order (FIFO; a re-queued task goes first)."""

    __slots__ = ("_lanes", "_order")

    def __init__(self) -> None:
        self._lanes: dict[int, deque] = {}
        self._order: list[deque] = []  # the lanes, most urgent first

    def _lane(self, task: QueuedTask) -> deque:
        pr = task.get("pr", 0)
        lane = self._lanes.get(pr)
        if lane is None:
            lane = self._lanes[pr] = deque()
            self._order = [self._lanes[p] for p in sorted(self._lanes, reverse=True)]
        return lane

    def append(self, task: QueuedTask) -> None:
        self._lane(task).append(task)

    def appendleft(self, task: QueuedTask) -> None:
        self._lane(task).appendleft(task)

    def head(self) -> deque | None:
        """The most urgent lane with a queued task first (cancelled and taken ones dropped)."""
        for lane in self._order:
            while lane and lane[0].where != "queued":
                lane.popleft()
            if lane:
                return lane
        return None

    def __iter__(self) -> Iterator[QueuedTask]:
        return itertools.chain.from_iterable(self._order)


class Queues:
    """The tasks the broker holds (by id), its queues' lanes, the functions tasks name
    (pickled, by content hash) and the tasks parked until theirs arrives."""

    def __init__(self) -> None:
        self.tasks: dict[str, QueuedTask] = {}
        self.lanes: dict[str, Lanes] = {}            # queue name -> its lanes
        self.functions: dict[str, list] = {}         # function hash -> its payload frames
        self.parked: dict[str, list] = {}            # function hash -> tasks waiting for it
        self._names: dict[str, str] = {}             # one copy of each function hash and queue name

    def receive(self, header: dict, frames: list,
                body: list | None) -> list[tuple[QueuedTask, str | None]]:
        """Queue the tasks of a client's ``tasks`` message (body: as it came, None from a client
        of this process); the new ones, each with its arguments' repr (header ``ar``, for its
        task-sent event: not kept)."""
        items = header["t"]
        alone = len(items) == 1 and "a" not in items[0]
        names = self._names
        if len(names) > NAMES_KEPT:
            names.clear()
        new = []
        keep = alone and (len(self.tasks) < ORIGINALS_KEPT
                          or protocol.frame_size(frames) >= protocol.OUT_OF_BAND_MIN)
        for item, payload in protocol.split(items, frames):
            if item["id"] in self.tasks:  # sent again (after a restart, a silence): queued once
                continue
            item["c"] = names.setdefault(header["c"], header["c"])
            item["h"] = names.setdefault(item["h"], item["h"])
            q = item.pop("q", "default")
            if q != "default":
                item["q"] = names.setdefault(q, q)
            if not keep:  # a zmq.Frame costs ~180 bytes of memory beside its data
                payload = [f.bytes if type(f) is not bytes and len(f) < SMALL_FRAME else f
                           for f in payload]
            task = QueuedTask(item, payload, body if keep else None)
            self.tasks[task.id] = task
            self.lanes_of(task).append(task)
            new.append((task, item.get("ar")))
        return new

    def lanes_of(self, task: QueuedTask) -> Lanes:
        """The lanes of a task's queue, made on first use."""
        q = task.get("q", "default")
        lanes = self.lanes.get(q)
        if lanes is None:
            lanes = self.lanes[q] = Lanes()
        return lanes

    def requeue(self, task: QueuedTask) -> None:
        """Queue a task again, first among its priority."""
        task.where = "queued"
        self.lanes_of(task).appendleft(task)

    def add_function(self, h: str, frames: list) -> None:
        """Store a function; the tasks parked for it are queued again, first, in order."""
        self.functions[h] = frames
        for task in reversed(self.parked.pop(h, ())):
            if task.where == "parked":
                self.requeue(task)

    def park(self, batch: list, h: str) -> list:
        """Set aside the tasks of batch whose function (hash h) has not arrived; the rest."""
        parked = self.parked.setdefault(h, [])
        for t in batch:
            if t.h == h:
                t.where = "parked"
                parked.append(t)
        return [t for t in batch if t.h != h]

    def queued(self, queues: tuple, most: int) -> int:
        """How many tasks wait in these queues, counted up to most."""
        n = 0
        for q in queues:
            for task in self.lanes.get(q, ()):
                n += task.where == "queued"
                if n >= most:
                    return n
        return n

    def counts(self) -> dict[str, int]:
        """How many tasks wait in each queue."""
        return {q: sum(1 for t in d if t.where == "queued") for q, d in self.lanes.items()}
