"""What the in-process broker (state.py) holds: tasks, pools of worker threads, worker threads."""
from __future__ import annotations

from dataclasses import dataclass, field

from .mailbox import Mailbox


@dataclass(eq=False, slots=True)
class HeldTask:
    """A task as the broker holds it: its header item and payload frames, never unpickled."""
    item: dict
    frames: list
    where: str = "queued"  # "queued", "cancelled", "done", or the worker id running it
    delivered: bytearray = field(default_factory=bytearray)
    ndelivered: int = 0
    retrying: bool = False  # held by its worker until a retry's eta (a RETRY notice)
    later: bool = False     # taken before its eta: its task-started event comes with its result

    @property
    def id(self) -> str:
        return self.item["id"]


@dataclass(eq=False)
class PoolRecord:
    """A pool of worker threads, as its heartbeat describes it."""
    info: dict
    inbox: Mailbox
    procs: set = field(default_factory=set)
    processed: int = 0  # items its threads finished, for its heartbeat events
    failed: int = 0     # of which failed


@dataclass(eq=False)
class ThreadRecord:
    """One worker thread (or an inline run): the queues it takes from and what it runs."""
    wid: str
    sid: str | None
    queues: tuple
    running: set = field(default_factory=set)
