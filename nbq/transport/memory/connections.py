"""The client, pool and worker-thread connections of a memory:// broker (state.py).

Every operation is a method call under the broker's lock: nothing is signed or
copied through a socket, but payload frames stay the cloudpickled bytes the
sender made: a sender's buffers are copied when sent and each receiver gets its own
writable copy of a large buffer, as from a socket, so a worker thread never shares
an object with the code that submitted it.

A client made with ``inline`` runs the tasks it submits in the submitting thread,
before submit() returns: ``inline(worker)`` is the worker loop the cluster layer
gives (nbq/worker/threads.py), serving a worker connection that takes this
client's tasks only and stops when none is left.
"""
from __future__ import annotations

import itertools
import threading
import uuid
from typing import Callable

from ...errors import NbqError
from ..base import ClientConnection, SupervisorConnection, WorkerConnection
from .registry import broker
from .state import INLINE_LANE, MemoryBroker


class Stopped(NbqError):
    """fetch() on a worker connection that was stopped, or an inline run with nothing left."""


def _own(frames: list) -> list:
    """Frames as bytes, as the broker keeps them: a view of the sender's buffer (an
    out-of-band array) is copied, so what the sender does to it later changes nothing."""
    return [f if isinstance(f, bytes) else bytes(f) for f in frames]


def _handed(frames: list) -> list:
    """A receiver's own copy of a payload: its out-of-band buffers (the frames after the
    pickle stream) writable, as they arrive from a socket, and shared with no other receiver."""
    return frames[:1] + [bytearray(f) for f in frames[1:]]


class MemoryClient(ClientConnection):
    """A client's link to the in-process broker of its address."""

    def __init__(self, address: str, client_id: str,
                 inline: Callable[[WorkerConnection], None] | None = None) -> None:
        self.broker: MemoryBroker = broker(address)
        self.cid = client_id
        self.inline = inline is not None
        self._run = inline
        self._lane = INLINE_LANE + client_id if inline is not None else None
        self._runs = itertools.count()
        self._box = self.broker.connect(client_id)

    def hello(self, rq: int | None) -> None:
        self.broker.hello(self.cid, rq)

    def ship(self, h: str, frames: list, name: str = "") -> None:
        self.broker.ship(h, _own(frames), name)

    def events(self, sub: str, since: float | None, live: bool) -> None:
        self.broker.subscribe(self.cid, sub, since, live)

    def submit(self, tasks: list[dict], frames: list) -> None:
        """Queue tasks; an inline client then runs them here, in the calling thread."""
        self.broker.submit(self.cid, tasks, _own(frames), self._lane)
        if self._run is not None:
            worker = MemoryWorker(self.broker, f"{self.cid}-inline-{next(self._runs)}",
                                  queues=(self._lane,), inline=True)
            self._run(worker)

    def end_map(self, map_id: str, total: int) -> None:
        self.broker.end_map(map_id, total)

    def cancel(self, rq: int, ids: list[str]) -> None:
        self.broker.cancel(self.cid, rq, ids)

    def watch(self, rq: int | None, ids: list[str] = (), maps: list[str] = ()) -> None:
        self.broker.watch(self.cid, rq, list(ids), list(maps))

    def info(self, rq: int) -> None:
        self.broker.info(self.cid, rq)

    def join(self, rq: int, key: str, member: str, total: int) -> None:
        self.broker.join(self.cid, rq, key, member, total)

    def claim(self, rq: int, key: str, ttl: float) -> None:
        self.broker.claim(self.cid, rq, key, ttl)

    def control(self, rq: int, command: str, arguments: dict, destination: list[str] | None,
                ci: str) -> None:
        self.broker.control(self.cid, rq, {"cmd": command, "args": arguments,
                                           "dest": destination, "ci": ci})

    def receive(self, timeout: float | None) -> list[tuple[dict, list]]:
        return [(header, _handed(frames) if len(frames) > 1 else frames)
                for header, frames in self._box.get(timeout)]

    def wake(self) -> None:
        self._box.wake()

    def close(self) -> None:
        self.broker.bye(self.cid)


class MemorySupervisor(SupervisorConnection):
    """A pool of worker threads' link: registration (heartbeat), control requests, leaving."""

    def __init__(self, address: str, sid: str) -> None:
        self.broker = broker(address)
        self.sid = sid
        self._inbox = None

    def heartbeat(self, info: dict) -> None:
        self._inbox = self.broker.heartbeat(dict(info, sup=self.sid))

    def lost(self, wid: str, how: str, at: list | None, end: dict | None = None,
             leaving: bool = False) -> None:
        self.broker.gone(wid)

    def poll(self, timeout: float, fds: list[int]) -> tuple[list[dict], list[int]]:
        if fds:
            raise NbqError("a memory:// pool watches no file descriptors")
        if self._inbox is None:
            raise NbqError("a memory:// pool polls after its first heartbeat")
        return [header for header, _ in self._inbox.get(timeout)], []

    def answer(self, request: dict, name: str, reply) -> None:
        self.broker.answer(request, name, reply)

    def wake(self) -> None:
        """Make a pending poll() return now (the pool is stopping)."""
        if self._inbox is not None:
            self._inbox.wake()

    def close(self, goodbye: bool) -> None:
        self.broker.leave(self.sid)


class MemoryWorker(WorkerConnection):
    """A worker thread's link (or an inline run's): takes one task at a time.

    Each task it hands out says where it runs (header ``ip``: the broker's address;
    ``il`` 1: inline, in the submitting thread), for what a call may ask of its worker
    (tasks that start tasks, time limits: nbq/tasks/runner.py).  fetch() raises Stopped
    once stop() was called, and, inline, once nothing is left to run.
    """

    def __init__(self, broker: MemoryBroker, wid: str | None = None, sid: str | None = None,
                 queues: tuple = (), inline: bool = False) -> None:
        self.broker = broker
        # a pool's thread is "<pool id>/<n>", as a worker process is (events name it)
        self.wid = wid or (f"{sid}/{uuid.uuid4().hex[:6]}" if sid else uuid.uuid4().hex[:12])
        self._inline = inline
        self._tag = {"ip": broker.address, **({"il": 1} if inline else {})}
        self._stopped = threading.Event()
        broker.attach(self.wid, sid, queues)

    def fetch(self, timeout: float | None = None) -> list[tuple[dict, list]]:
        if self._inline and timeout is None:  # nothing waits for its eta: done when none is left
            task = self.broker.take(self.wid, 0.0, self._stopped.is_set)
            if task is None:
                raise Stopped("nothing left to run inline")
        else:
            task = self.broker.take(self.wid, timeout, self._stopped.is_set)
        if self._stopped.is_set():
            raise Stopped(f"worker {self.wid} was stopped")
        return [] if task is None else [(dict(task.item, **self._tag), _handed(task.frames))]

    def function(self, h: str) -> list:
        return self.broker.function(h)

    def report(self, results: list[tuple[dict, list]], ready: bool) -> None:
        self.broker.report(self.wid, [(item, _own(payload)) for item, payload in results], ready)

    def notice(self, ids: list[str], state: str) -> None:
        self.broker.notice(self.wid, ids, state)

    def output(self, task: dict, frames: list) -> None:
        self.broker.output(self.wid, task["id"], _own(frames))

    def stop(self) -> None:
        """Make fetch() raise Stopped, now if it waits (another thread may call this)."""
        self._stopped.set()
        self.broker.wake()

    def close(self) -> None:
        """Leave: a task held and not finished (waiting for its eta) is queued again."""
        self.broker.gone(self.wid)
