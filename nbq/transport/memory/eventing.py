"""The in-process broker's events (nbq/events.py): subscriptions, and the events it makes
from what it sees, as the ZeroMQ broker does (a mixin of MemoryBroker, under its lock)."""
from __future__ import annotations

import os
import time

from ... import events
from .records import HeldTask, PoolRecord


class Eventing:
    """MemoryBroker's events part: ``events`` (an EventLog), ``_send``, ``_lock``, ``procs``
    are MemoryBroker's."""

    def subscribe(self, cid: str, sub: str, since: float | None, live: bool) -> None:
        """Events for a client's subscription: those kept from since, then live (ev messages)."""
        with self._lock:
            key = (cid, sub)
            if not live:
                self.events.subscribers.discard(key)
                return
            self.events.prune(time.time())
            for batch in events.batches(self.events.since(since)) if since is not None else ():
                self._send(cid, {"k": "ev", "sub": sub, "ev": batch})
            self.events.subscribers.add(key)

    def _publish(self) -> None:
        """Send the events added since the last call to the subscribers (under the lock)."""
        if self.events.subscribers:
            new = self.events.take_new()
            for cid, sub in self.events.subscribers if new else ():
                self._send(cid, {"k": "ev", "sub": sub, "ev": new})

    def _map_sent(self, meta: dict, total: int) -> None:
        """The map-sent event of a map, once, when its total is known (under the lock)."""
        first = meta.pop("first", None)
        if first is not None:
            self.events.event(events.map_event(time.time(), first,
                                               self.events.names.get(first.get("h")), total))

    def _received(self, task: HeldTask, wid: str) -> None:
        """The events of a task a worker takes: received, and started unless held for its eta."""
        now = time.time()
        eta = task.item.get("eta")
        if eta is None or eta <= now:
            self.events.task(now, events.EventLog.TAKEN, task.item, wid)
        else:
            self.events.task(now, events.TASK_RECEIVED, task.item, wid)
            task.later = True
        self._publish()

    def _pool_events(self, sup: PoolRecord, new: bool) -> None:
        """A pool's heartbeat: worker-online first when it is new (under the lock)."""
        info, now = sup.info, time.time()
        fields = {"host": info["host"], "pid": info["spid"], "name": info.get("name"),
                  "queues": list(info["queues"])}
        if new:
            self.events.event(events.worker_event(events.WORKER_ONLINE, now, info["sup"], fields))
        self.events.event(events.worker_event(events.WORKER_HEARTBEAT, now, info["sup"], dict(
            fields, processed=sup.processed, failed=sup.failed,
            active=sum(len(self.procs[w].running) for w in sup.procs if w in self.procs),
            load=os.getloadavg()[0], memory=info.get("mem"), concurrency=info["conc"],
            processes=[info["spid"]] * len(sup.procs))))
        self._publish()
