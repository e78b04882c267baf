"""Results, and what the broker keeps beside them: the result store, watchers, map
records, joins, claims, and their expiry (the store itself: nbq/results.py, which the
in-process transport shares).

A result reaches its client as it arrives; what is stored is the copy that
AsyncResult, MapResult.from_id and watchers fetch later.  When the stored
payloads pass the budget, the results stored first are dropped first (those
tasks' results can then no longer be fetched by id); ``result_expires`` drops
any of them earlier, with map records, joins and watches of unknown tasks.
"""
from __future__ import annotations

import time
from collections import deque

from .. import deaths, events, shm
from ..events import EventLog
from ..results import ResultStore
from .outbox import Outbox
from .queues import QueuedTask, Queues


class Results:
    """What the broker keeps of finished and watched tasks, and how results reach clients."""

    def __init__(self, queues: Queues, outbox: Outbox, budget: int, expires: float,
                 events: EventLog) -> None:
        self.queues = queues
        self.outbox = outbox
        self.events = events
        self.expires = expires                       # seconds (result_expires)
        self.store = ResultStore(budget)             # task id -> [(item, frames, raw)] parts
        self.watchers: dict[str, set] = {}           # task id -> client ids that asked for it
        self.maps: dict[str, dict] = {}              # map id -> {"total": n, "chunks": [ids]}
        self.joins: dict[str, dict] = {}             # join key -> {"m": member set, "fired": bool}
        self.claims: dict[str, float] = {}           # claim key -> when it may be claimed again
        self.expiry: deque = deque()                 # (time, kind, id) in time order

    # -- results ----------------------------------------------------------------

    def deliver(self, task: QueuedTask, item: dict, payload: list, forward: bool = True,
                raw: list | None = None) -> None:
        """Store a result part, forward it to its client and watchers, finish the task when complete.

        raw is the message it came in, when it holds this part alone: forwarded as it
        came (a large result is not signed again).
        """
        part = (dict(item, s0=task.get("s0", 0)), payload, raw)
        self.store.add(task.id, part)
        if forward:
            self.outbox.to_client(task.c, self.message(part))
        for cid in self.watchers.get(task.id, ()):
            if cid != task.c:
                self.outbox.to_client(cid, self.message(part))
        start, n = item.get("s", 0), item.get("n", 1)
        delivered = task.delivered
        fresh = n - delivered.count(1, start, start + n)
        delivered[start:start + n] = b"\x01" * n
        if fresh:  # a part delivered already (a late answer of a dead process) makes no event
            where = task.where
            self.events.task(time.time(), EventLog.RESULT, task,
                             where if "/" in where else None, (item, fresh))
        if 0 not in delivered:
            self.finish(task.id)

    def fail_items(self, task: QueuedTask, start: int, n: int, exc: Exception) -> None:
        """Deliver exc as the result of items start..start+n of task."""
        self.deliver(task, *deaths.failure(task.item, start, n, exc))

    def finish(self, tid: str) -> None:
        """A task is done: the broker forgets it; its result expires after result_expires."""
        task = self.queues.tasks.pop(tid, None)
        if task is not None:
            task.release()
            if task.where == "queued":  # a re-sent copy answered by a late result
                task.where = "done"
        self.watchers.pop(tid, None)
        self._expire_later("res", tid)

    def message(self, part: tuple) -> list:
        """The ``res`` message of a stored part (the one it came in, when there is one)."""
        item, payload, raw = part
        return raw if raw is not None else self.outbox.signer.encode(
            {"k": "res", "t": [item]}, shm.wire(payload, False))

    def tell_state(self, task: QueuedTask, state: str) -> None:
        """A state message (RETRY or STARTED) to a task's client and watchers."""
        task.retrying = state == "RETRY"
        msg = self.outbox.signer.encode({"k": "state", "ids": [task.id], "state": state})
        for cid in {task.c} | self.watchers.get(task.id, set()):
            self.outbox.to_client(cid, msg)

    def add_chunk(self, task: QueuedTask) -> None:
        """Note a new task in its map's record (``mp``), if it is a map's chunk."""
        mp = task.get("mp")
        if mp is None:
            return
        meta = self.maps.get(mp)
        if meta is None:
            meta = self.maps[mp] = {"total": None, "chunks": [], "c": task.c,
                                    "star": task.get("m") == "star", "first": task}
            self._expire_later("map", mp)
            if "tot" in task:
                self._map_sent(meta, task["tot"])
        meta["chunks"].append(task.id)

    def _map_sent(self, meta: dict, total: int) -> None:
        """The map-sent event of a map, once, when its item count is known."""
        first = meta.pop("first", None)
        if first is not None:
            self.events.event(events.map_event(time.time(), first,
                                               self.events.names.get(first.get("h")), total))

    # -- handlers (from clients) ---------------------------------------------------

    def on_cancel(self, peer, header, frames, body):
        """Revoke tasks still queued; reply {task id: revoked?}."""
        answer = {}
        for tid in header["ids"]:
            task = self.queues.tasks.get(tid)
            if task is not None and task.where == "queued":
                task.where = "cancelled"  # skipped when its queue reaches it
                del self.queues.tasks[tid]
                task.release()
                self.events.task(time.time(), events.TASK_REVOKED, task, None,
                                 {"count": task.n} if "mp" in task else None)
                part = ({"id": tid, "rv": 1, "s": 0, "s0": task.get("s0", 0),
                         "n": task.n, "nf": 0}, [], None)
                self.store.add(tid, part)
                self._expire_later("res", tid)
                # the owner learns it from the reply when it asked; otherwise from this
                for cid in {task.c, *self.watchers.pop(tid, ())} - {header["c"]}:
                    self.outbox.to_client(cid, self.message(part))
                answer[tid] = True
            else:
                answer[tid] = False
        self.outbox.reply(header, answer)

    def on_mapend(self, peer, header, frames, body):
        meta = self.maps.get(header["mp"])
        if meta is not None:
            meta["total"] = header["total"]
            self._map_sent(meta, header["total"])

    def on_watch(self, peer, header, frames, body):
        """Send a client what is stored for task ids and maps, and what comes later."""
        cid = header["c"]
        ids = list(header.get("ids", ()))
        maps = {}
        for mp in header.get("maps", ()):
            meta = self.maps.get(mp)
            if meta is not None:
                maps[mp] = {"total": meta["total"], "star": meta["star"],
                            "chunks": [(t, self._chunk_range(t)) for t in meta["chunks"]]}
                ids.extend(meta["chunks"])
        known = {}
        for tid in ids:
            parts = self.store.get(tid)
            task = self.queues.tasks.get(tid)
            if task is not None:
                self.watchers.setdefault(tid, set()).add(cid)
                known[tid] = ("PENDING" if task.where == "queued" else
                              "RETRY" if task.retrying else "STARTED")
            elif parts is not None:
                known[tid] = "DONE"
            elif tid not in self.watchers:  # not submitted yet (a later step of a chain, say)
                self.watchers[tid] = {cid}
                self._expire_later("watch", tid)
            else:
                self.watchers[tid].add(cid)
        self.outbox.reply(header, {"maps": maps, "known": known})
        for tid in ids:
            for part in self.store.get(tid, ()):
                self.outbox.to_client(cid, self.message(part))

    def _chunk_range(self, tid: str) -> tuple:
        task = self.queues.tasks.get(tid)
        if task is not None:
            return (task.get("s0", 0), task.n)
        parts = self.store.get(tid) or [({"s0": 0, "n": 1}, None, None)]
        return (parts[0][0].get("s0", 0), parts[0][0].get("n", 1))

    def on_join(self, peer, header, frames, body):
        """Add a member to a join; answer fire=True once, to the first to complete it."""
        join = self.joins.get(header["key"])
        if join is None:
            join = self.joins[header["key"]] = {"m": set(), "fired": False}
            self._expire_later("join", header["key"])
        join["m"].add(header["member"])
        fire = not join["fired"] and len(join["m"]) >= header["total"]
        join["fired"] |= fire
        self.outbox.reply(header, {"fire": fire})

    def on_claim(self, peer, header, frames, body):
        """Claim-once (beat ticks): won by the first claim of a key until its ttl passes."""
        now = time.time()
        if len(self.claims) > 1000:
            self.claims = {k: t for k, t in self.claims.items() if t > now}
        won = self.claims.get(header["key"], 0.0) <= now
        if won:
            self.claims[header["key"]] = now + header["ttl"]
        self.outbox.reply(header, {"won": won})

    def on_out(self, peer, header, frames, body):
        """A running task's output: to its client, as it came, if that worker process runs it."""
        task = self.queues.tasks.get(header["id"])
        if task is not None and task.where == header["w"] and peer[1:] == header["w"].encode():
            self.outbox.to_client(task.c, body)

    # -- expiry -------------------------------------------------------------------

    def _expire_later(self, kind: str, key: str) -> None:
        self.expiry.append((time.time() + self.expires, kind, key))

    def expire(self, now: float) -> None:
        """Drop results, map records, joins and watches of unknown tasks older than result_expires."""
        tables = {"res": self.store, "map": self.maps, "join": self.joins, "watch": self.watchers}
        while self.expiry and self.expiry[0][0] <= now:
            _, kind, key = self.expiry.popleft()
            if kind != "watch" or key not in self.queues.tasks:
                tables[kind].pop(key, None)
