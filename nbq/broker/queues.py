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
from dataclasses import dataclass
from typing import Iterator

from .. import protocol

SMALL_FRAME = 512  # a batched task's payload frames this small are kept as bytes (less memory)
NAMES_KEPT = 10_000  # interned function hashes and queue names, forgotten all at once beyond


@dataclass(eq=False, slots=True)
class QueuedTask:
    """A task as the broker sees it: its header item and payload, never unpickled."""
    item: dict
    frames: list
    original: list | None  # the message it came in, when it was alone: forwarded as is
    where: str = "queued"  # or "parked", "cancelled", "done", or the id of its worker process
    delivered: bytearray | None = None  # per item: has a result reached its client
    ndelivered: int = 0
    retrying: bool = False  # held by its worker until a retry's eta (a RETRY notice)

    def __post_init__(self) -> None:
        if self.delivered is None:
            self.delivered = bytearray(self.item.get("n", 1))

    @property
    def id(self) -> str:
        return self.item["id"]

    def undelivered(self) -> list[int]:
        return [i for i, d in enumerate(self.delivered) if not d]


class Lanes:
    """A queue's tasks in lanes by priority (header ``pr``, 0-9, absent: 0): the most
    urgent lane is served first, each lane in order (FIFO; a re-queued task goes first)."""

    __slots__ = ("_lanes", "_order")

    def __init__(self) -> None:
        self._lanes: dict[int, deque] = {}
        self._order: list[deque] = []  # the lanes, most urgent first

    def _lane(self, task: QueuedTask) -> deque:
        pr = task.item.get("pr", 0)
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

    def receive(self, header: dict, frames: list, body: list) -> list[QueuedTask]:
        """Queue the tasks of a client's ``tasks`` message (body: as it came); the new ones."""
        items = header["t"]
        alone = len(items) == 1 and "a" not in items[0]
        names = self._names
        if len(names) > NAMES_KEPT:
            names.clear()
        new = []
        for item, payload in protocol.split(items, frames):
            item["c"] = header["c"]
            if item["id"] in self.tasks:  # sent again (after a restart, a silence): queued once
                continue
            item["h"] = names.setdefault(item["h"], item["h"])
            if "q" in item:
                item["q"] = names.setdefault(item["q"], item["q"])
            if not alone:  # a zmq.Frame costs ~180 bytes of memory beside its data
                payload = [f.bytes if len(f) < SMALL_FRAME else f for f in payload]
            task = QueuedTask(item, payload, body if alone else None)
            self.tasks[task.id] = task
            self.lanes_of(item).append(task)
            new.append(task)
        return new

    def lanes_of(self, item: dict) -> Lanes:
        """The lanes of a task's queue, made on first use."""
        q = item.get("q", "default")
        lanes = self.lanes.get(q)
        if lanes is None:
            lanes = self.lanes[q] = Lanes()
        return lanes

    def requeue(self, task: QueuedTask) -> None:
        """Queue a task again, first among its priority."""
        task.where = "queued"
        self.lanes_of(task.item).appendleft(task)

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
            if t.item["h"] == h:
                t.where = "parked"
                parked.append(t)
        return [t for t in batch if t.item["h"] != h]

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
