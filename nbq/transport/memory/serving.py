"""The in-process broker's worker side: pools (supervisors) and their worker threads taking
tasks, reporting results, notices and output, and going away (a mixin of MemoryBroker, under
its lock, as eventing.py is)."""
from __future__ import annotations

import heapq
import time

from ... import events
from ...errors import NbqError
from .mailbox import Mailbox
from .records import HeldTask, PoolRecord, ThreadRecord


class Serving:
    """MemoryBroker's worker part: ``_lock``, ``_work``, ``queues``, ``tasks``, ``functions``,
    ``supervisors``, ``procs``, ``events``, ``_send``, ``_queue``, ``_deliver``, ``_front``
    are MemoryBroker's."""

    # -- worker pools (supervisors) ---------------------------------------------------

    def heartbeat(self, info: dict) -> Mailbox:
        """Register a pool, or update it (its queues: its threads follow); its inbox."""
        with self._lock:
            sup = self.supervisors.get(info["sup"])
            new = sup is None
            if new:
                sup = self.supervisors[info["sup"]] = PoolRecord(dict(info), Mailbox())
            sup.info = dict(info)
            self._pool_events(sup, new)
            for wid in sup.procs:
                self.procs[wid].queues = tuple(info["queues"])
            self._work.notify_all()
            return sup.inbox

    def answer(self, request: dict, name: str, reply) -> None:
        with self._lock:
            self._send(request["c"], {"k": "ctlr", "ci": request["ci"], "name": name, "r": reply})

    def leave(self, sid: str) -> None:
        """A pool stopped: what its threads held is queued again."""
        with self._lock:
            sup = self.supervisors.pop(sid, None)
            for wid in sup.procs if sup is not None else ():
                self.gone(wid)
            if sup is not None:
                self.events.event(events.worker_event(events.WORKER_OFFLINE, time.time(), sid, {
                    "host": sup.info["host"], "pid": sup.info["spid"]}))
                self._publish()

    # -- worker threads -----------------------------------------------------------

    def attach(self, wid: str, sid: str | None, queues: tuple = ()) -> None:
        """A worker thread of pool sid (its queues), or an inline run of queues (sid None)."""
        with self._lock:
            sup = self.supervisors.get(sid) if sid is not None else None
            if sup is not None:
                sup.procs.add(wid)
                queues = tuple(sup.info["queues"])
            self.procs[wid] = ThreadRecord(wid, sid, queues)

    def take(self, wid: str, timeout: float | None, stopped) -> HeldTask | None:
        """The next task for worker wid, waiting up to timeout seconds (None: until one
        comes or stopped() is true); its client hears it STARTED."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not stopped():
                proc = self.procs.get(wid)
                task = self._next(proc.queues) if proc is not None else None
                if task is not None:
                    task.where = wid
                    proc.running.add(task.id)
                    if task.item.get("f"):
                        self._send(task.item["c"], {"k": "started", "ids": [task.id]})
                    self._received(task, wid)
                    return task
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                self._work.wait(wait)
            return None

    def _next(self, queues: tuple) -> HeldTask | None:
        best = None
        for q in queues:  # the most urgent head among the queues, the first queue on a tie
            heap = self.queues.get(q)
            while heap and heap[0][2].where != "queued":
                heapq.heappop(heap)
            if heap and (best is None or heap[0][0] < best[0][0]):
                best = heap
        return heapq.heappop(best)[2] if best is not None else None

    def wake(self) -> None:
        """Wake every waiting worker thread (to see that it is stopped)."""
        with self._lock:
            self._work.notify_all()

    def function(self, h: str) -> list:
        with self._lock:
            frames = self.functions.get(h)
        if frames is None:
            raise NbqError(f"function {h} was never shipped to {self.address}")
        return frames

    def report(self, wid: str, results: list[tuple[dict, list]], ready: bool) -> None:
        """Result parts from worker wid: stored, sent to each task's client and watchers."""
        with self._lock:
            for item, payload in results:
                task = self.tasks.get(item["id"])
                if task is not None and task.where == wid:
                    if task.later:  # held for its eta: started when it ran
                        task.later = False
                        if not item.get("rv"):
                            self.events.task(time.time() - item.get("d", 0.0),
                                             events.TASK_STARTED, task.item, wid)
                    self._deliver(task, item, payload)
            self._publish()
            proc = self.procs.get(wid)
            if proc is not None and ready:  # what it still holds (due later) stays its own
                proc.running = {tid for tid in proc.running
                                if tid in self.tasks and self.tasks[tid].where == wid}

    def notice(self, wid: str, ids: list[str], state: str) -> None:
        """A retry's RETRY (held by its worker) or STARTED (running again), for its clients."""
        with self._lock:
            for tid in ids:
                task = self.tasks.get(tid)
                if task is not None and task.where == wid:
                    task.retrying = state == "RETRY"
                    self.events.task(time.time(), events.TASK_RETRIED if task.retrying
                                     else events.TASK_STARTED, task.item, wid)
                    for cid in {task.item["c"]} | self.watchers.get(tid, set()):
                        self._send(cid, {"k": "state", "ids": [tid], "state": state})
            self._publish()

    def output(self, wid: str, tid: str, frames: list) -> None:
        with self._lock:
            task = self.tasks.get(tid)
            if task is not None and task.where == wid:
                self._send(task.item["c"], {"k": "out", "id": tid}, frames)

    def gone(self, wid: str) -> None:
        """A worker thread stopped: the tasks it held are queued again, first."""
        with self._lock:
            proc = self.procs.pop(wid, None)
            if proc is None:
                return
            sup = self.supervisors.get(proc.sid) if proc.sid is not None else None
            if sup is not None:
                sup.procs.discard(wid)
            for tid in proc.running:
                task = self.tasks.get(tid)
                if task is not None and task.where == wid:
                    task.where, task.retrying = "queued", False
                    self._queue(task, proc.queues[0] if len(proc.queues) == 1
                                else task.item.get("q", "default"), next(self._front))
            self._work.notify_all()
