"""Dispatch by credit: queued tasks go to idle worker processes, results make them idle again.

A worker process holds at most one message of tasks at a time, so a task handed
to a worker is started.  Tasks of a function measured at under a millisecond
each may share a message, lasting ~BATCH_SECONDS (~2 ms) in all (policy.Costs,
from the durations results report), and never more than a fair share of what is
queued, so that one process does not take what others could run.  A task still
running STARTED_DELAY after dispatch is reported STARTED to its client.

Idle processes are found through an index (ready.py), never by a scan over all
processes: a dispatch costs O(1) per batch handed out, plus one look at each group
of processes serving the same queues.  The process idle last is served first, so a
light load keeps to the processes already running rather than waking every one.
"""
from __future__ import annotations

import logging
import time

from .. import protocol, shm
from ..events import TASK_RECEIVED, TASK_STARTED, EventLog
from ..policy import HEARTBEAT, STARTED_DELAY, Costs
from .members import Members, ProcessRecord
from .outbox import Outbox
from .queues import QueuedTask, Queues
from .results import Results

log = logging.getLogger("nbq.broker")


class Dispatcher:
    """Hands tasks to idle processes, takes their results, reports tasks STARTED."""

    def __init__(self, queues: Queues, members: Members, results: Results,
                 outbox: Outbox) -> None:
        self.queues = queues
        self.members = members
        self.results = results
        self.outbox = outbox
        self.costs = Costs()  # seconds per task of each function, from results
        self._started: list[tuple[float, QueuedTask]] = []  # dispatched, not reported STARTED
        self._later: set[str] = set()  # ids of tasks dispatched before their eta (events)

    @property
    def starting(self) -> bool:
        """Whether tasks wait to be reported STARTED (the loop then wakes within STARTED_DELAY)."""
        return bool(self._started)

    def dispatch(self) -> None:
        """Hand queued tasks to idle worker processes, batching short ones."""
        if not self.queues.tasks:  # none held, so none queued (a turn after the last result)
            return
        now = time.monotonic()
        ready = self.members.ready
        ready.wake(now)
        for _, idle in ready.groups():
            while idle:
                proc = idle[next(reversed(idle))]
                batch = self._take(proc)
                if not batch:  # its group's queues are empty for all of them
                    break
                self._hand(proc, batch, now)

    def _hand(self, proc: ProcessRecord, batch: list, now: float) -> None:
        """Send batch to proc (its functions first): busy until its results say it is ready."""
        peer = b"w" + proc.wid.encode()
        for h in {t.h for t in batch} - proc.functions:
            fn = self.queues.functions.get(h)
            if fn is None:  # sent again to a restarted broker ahead of its function
                batch = self.queues.park(batch, h)  # Queues.add_function queues them again
            elif self.outbox.send(peer, {"k": "fn", "h": h}, fn):
                proc.functions.add(h)
        if not batch:
            return
        self.members.ready.discard(proc)
        proc.running.extend(batch)
        log_event = self.results.events.task
        wall = time.time()
        for t in batch:
            t.where = proc.wid
            if t.f:
                self._started.append((now, t))
            eta = t.get("eta")
            if eta is None or eta <= wall:  # received and started
                log_event(wall, EventLog.TAKEN, t, proc.wid)
                if self._later:
                    self._later.discard(t.id)
            else:  # held by its worker until its eta: started when its result comes
                log_event(wall, TASK_RECEIVED, t, proc.wid)
                self._later.add(t.id)
        if len(batch) == 1 and batch[0].original is not None and (
                proc.sharing or not shm.has_held(batch[0].frames)):
            sent = self.outbox.send_raw(peer, batch[0].original)
        else:  # shared memory goes by name to a process of this host, else as bytes
            items, frames = [], []
            for t in batch:
                items.append(t.item)
                frames.extend(shm.wire(t.frames, proc.sharing))
            sent = self.outbox.send(peer, {"k": "tasks", "t": items}, frames)
        if not sent:
            self._put_back(proc, batch, now)

    def _take(self, proc: ProcessRecord) -> list:
        """The next batch for proc from the first of its queues with a task waiting."""
        for q in proc.queues:
            lanes = self.queues.lanes.get(q)
            dq = lanes.head() if lanes is not None else None
            if dq is None:
                continue
            first = dq.popleft()
            if not dq:
                return [first]
            limit = self.costs.batch(first.h,
                                     len(dq) // max(1, len(self.members.procs)))
            batch = [first]
            while dq and len(batch) < limit:
                t = dq.popleft()
                if t.where == "queued":
                    batch.append(t)
            return batch
        return []

    def _put_back(self, proc: ProcessRecord, batch: list, now: float) -> None:
        """Queue again, first, a batch that could not reach its process: one gone without a
        word (its worker killed, not yet missed by heartbeats), or away for a moment (it
        stays idle, and is tried again after a while: it gets work once it is back)."""
        proc.running = [t for t in proc.running if t.where != proc.wid or t not in batch]
        proc.away_until = now + HEARTBEAT / 2
        self.members.ready.add(proc)
        for t in reversed(batch):
            self.queues.requeue(t)

    def on_res(self, peer, header, frames, body):
        """Results from a worker process: to their clients; with ``rdy`` it takes more work,
        handed to it first (its process waits for it; the clients' results can wait)."""
        proc = self.members.procs.get(header.get("w", ""))
        ready = proc is not None and header.get("rdy")
        if ready:
            self._next(proc)
        held = shm.hold(frames)  # results in shared memory: held open while stored
        shared, frames = held is not frames, held
        parts = []
        for item, payload in protocol.split(header["t"], frames):
            task = self.queues.tasks.get(item["id"])
            # a late answer from a process since declared dead still counts: items are deduplicated
            if (task is not None and (proc is None or task.where == proc.wid)
                    and item.get("s", 0) + item.get("n", 1) <= task.n):
                parts.append((task, item, payload))
        owners = {task.c for task, _, _ in parts}
        whole = len(owners) == 1 and len(parts) == len(header["t"])
        if shared and whole:  # by name to a client of this host (it unlinks them), else bytes
            whole = self.outbox.sharing(next(iter(owners)))
        sup = self.members.supervisors.get(proc.sid) if proc is not None else None
        for task, item, payload in parts:
            self.costs.add(task.h, item.get("d"))
            if sup is not None:
                n = item.get("n", 1)
                sup.processed += n
                sup.failed += n * (not item["ok"]) if "ok" in item else item.get("nx", 0)
            if self._later and task.id in self._later:
                self._later.discard(task.id)
                if not item.get("rv"):  # it ran (not expired first)
                    self.results.events.task(time.time() - item.get("d", 0.0), TASK_STARTED,
                                             task, task.where)
            self.results.deliver(task, item, payload, forward=not whole,
                                 raw=body if len(header["t"]) == 1 and not shared else None)
        if whole:
            self.outbox.to_client(owners.pop(), body)
        elif shared:  # sent as bytes (or not at all): no client will unlink the names
            for f in frames:
                if isinstance(f, shm.Held):
                    f.forget()
        if ready:  # what it still holds (tasks due later, the batch just handed) stays its own
            proc.running = [t for t in proc.running
                            if t.where == proc.wid and t.id in self.queues.tasks]

    def _next(self, proc: ProcessRecord) -> None:
        """A process is ready: its next batch now, when its queues hold one (else it waits,
        idle, for dispatch)."""
        self.members.ready.add(proc)
        if proc.away_until:
            return
        try:
            batch = self._take(proc)
            if batch:
                self._hand(proc, batch, time.monotonic())
        except Exception:  # dispatch() tries again; these results must still be delivered
            log.exception("error dispatching tasks")

    def flush_started(self, now: float) -> None:
        """Report STARTED for tasks still running STARTED_DELAY after dispatch.

        A quick task's result is its only message; a long one is seen STARTED
        within ~10 ms.
        """
        due: dict[str, list] = {}
        keep = []
        for t0, task in self._started:
            if self.queues.tasks.get(task.id) is not task or task.where == "queued":
                continue
            if now - t0 >= STARTED_DELAY:
                due.setdefault(task.c, []).append(task.id)
            else:
                keep.append((t0, task))
        self._started = keep
        for cid, ids in due.items():
            self.outbox.to_client(cid, self.outbox.signer.encode({"k": "started", "ids": ids}))
