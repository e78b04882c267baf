"""The in-process broker of memory:// addresses: queues, results, joins, claims, watches, control.

One MemoryBroker per address per process (registry.py): ``memory://`` is the
process's default one, ``memory://name`` another.  Every Client("memory://") of a
process shares it, so AsyncResult and MapResult.from_id work between them, as between
clients of one ZeroMQ broker; a forked child starts with empty ones.

It follows the ZeroMQ broker (nbq/broker/) operation by operation, minus what a
process boundary needs: nothing is signed (nothing crosses one), nothing has a size
limit, nobody goes silent (no heartbeats, no re-sending).  Payloads are still the
cloudpickled frames the client made, so pickling fails or succeeds as elsewhere.

Each queue serves its most urgent priority first (header ``pr``), in order within one;
a task given back by a worker thread that stopped goes first.  A worker takes one task
at a time.  Results are stored in a ResultStore (results.py: byte budget, oldest out
first) for result_expires seconds; expiry runs as operations come, so no thread is needed.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections import deque

from ... import events, policy
from ...results import ResultStore
from .eventing import Eventing
from .mailbox import Mailbox
from .records import HeldTask, PoolRecord, ThreadRecord
from .serving import Serving


class MemoryBroker(Eventing, Serving):
    """The state behind one memory:// address; every method is thread-safe."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.boot = uuid.uuid4().hex[:12]
        self.result_expires = policy.RESULT_EXPIRES
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)  # worker threads wait here for tasks
        self._seq = itertools.count()
        self._front = itertools.count(-1, -1)  # sequence numbers of tasks given back: first
        self.queues: dict[str, list] = {}       # name -> heap of (-priority, seq, HeldTask)
        self.tasks: dict[str, HeldTask] = {}
        self.functions: dict[str, list] = {}
        self.results = ResultStore(policy.RESULT_BUDGET)
        self.clients: dict[str, Mailbox] = {}
        self.watchers: dict[str, set] = {}
        self.maps: dict[str, dict] = {}
        self.joins: dict[str, dict] = {}
        self.claims: dict[str, float] = {}
        self.expiry: deque = deque()  # (time, kind, key) in time order
        self.supervisors: dict[str, PoolRecord] = {}
        self.procs: dict[str, ThreadRecord] = {}
        self.events = events.EventLog(policy.EVENTS_KEEP, policy.EVENTS_MAX)

    # -- clients ------------------------------------------------------------------

    def connect(self, cid: str) -> Mailbox:
        """The mailbox of client cid, where everything for it arrives."""
        with self._lock:
            box = self.clients.get(cid)
            if box is None:
                box = self.clients[cid] = Mailbox()
            return box

    def hello(self, cid: str, rq: int | None) -> None:
        with self._lock:
            self._send(cid, {"k": "welcome", "rq": rq, "b": self.boot})

    def bye(self, cid: str) -> None:
        with self._lock:
            self.clients.pop(cid, None)
            self.events.leave(cid)
            self.queues.pop(INLINE_LANE + cid, None)

    def ship(self, h: str, frames: list, name: str = "") -> None:
        with self._lock:
            self.functions[h] = frames
            if name:
                self.events.names[h] = name

    def submit(self, cid: str, tasks: list[dict], frames: list, lane: str | None = None) -> None:
        """Queue tasks (each naming its nf frames); lane, when given, is the queue for all."""
        with self._lock:
            self._expire()
            now = time.time()
            i = 0
            for item in tasks:
                n = item.get("nf", 0)
                payload, i = frames[i:i + n], i + n
                if item["id"] in self.tasks:  # a task id held already is not queued twice
                    continue
                item = dict(item, c=cid)
                task = HeldTask(item, payload, delivered=bytearray(item.get("n", 1)))
                self.tasks[task.id] = task
                self.events.task(now, events.TASK_SENT, item)
                mp = item.get("mp")
                if mp is not None:
                    meta = self.maps.get(mp)
                    if meta is None:
                        meta = self.maps[mp] = {"total": None, "chunks": [],
                                                "star": item.get("m") == "star", "first": item}
                        self._expire_later("map", mp)
                        if "tot" in item:
                            self._map_sent(meta, item["tot"])
                    meta["chunks"].append(task.id)
                self._queue(task, lane or item.get("q", "default"), next(self._seq))
            self._publish()
            self._work.notify_all()

    def _queue(self, task: HeldTask, name: str, seq: int) -> None:
        heapq.heappush(self.queues.setdefault(name, []), (-task.item.get("pr", 0), seq, task))

    def end_map(self, map_id: str, total: int) -> None:
        with self._lock:
            meta = self.maps.get(map_id)
            if meta is not None:
                meta["total"] = total
                self._map_sent(meta, total)
                self._publish()

    def cancel(self, cid: str, rq: int, ids: list[str]) -> None:
        """Revoke the tasks no worker has taken; reply {id: revoked?}."""
        with self._lock:
            answer = {}
            for tid in ids:
                task = self.tasks.get(tid)
                answer[tid] = task is not None and task.where == "queued"
                if not answer[tid]:
                    continue
                task.where = "cancelled"  # skipped when its queue reaches it
                del self.tasks[tid]
                self.events.task(time.time(), events.TASK_REVOKED, task.item, None,
                                 {"count": task.item.get("n", 1)} if "mp" in task.item else None)
                part = ({"id": tid, "rv": 1, "s": 0, "s0": task.item.get("s0", 0),
                         "n": task.item.get("n", 1), "nf": 0}, [])
                self._store(tid, part)
                # the asker learns it from the reply; its owner and watchers from this
                for other in {task.item["c"], *self.watchers.pop(tid, ())} - {cid}:
                    self._send(other, {"k": "res", "t": [part[0]]})
            self._reply(cid, rq, answer)
            self._publish()

    def watch(self, cid: str, rq: int | None, ids: list[str], maps: list[str]) -> None:
        """Reply what is known of these tasks and maps, then send their stored results."""
        with self._lock:
            self._expire()
            ids = list(ids)
            found = {}
            for mp in maps:
                meta = self.maps.get(mp)
                if meta is not None:
                    found[mp] = {"total": meta["total"], "star": meta["star"],
                                 "chunks": [(t, self._chunk_range(t)) for t in meta["chunks"]]}
                    ids.extend(meta["chunks"])
            known = {}
            for tid in ids:
                task = self.tasks.get(tid)
                if task is not None:
                    self.watchers.setdefault(tid, set()).add(cid)
                    known[tid] = ("PENDING" if task.where == "queued" else
                                  "RETRY" if task.retrying else "STARTED")
                elif self.results.get(tid) is not None:
                    known[tid] = "DONE"
                elif tid not in self.watchers:  # not submitted yet (a later step of a chain)
                    self.watchers[tid] = {cid}
                    self._expire_later("watch", tid)
                else:
                    self.watchers[tid].add(cid)
            self._reply(cid, rq, {"maps": found, "known": known})
            for tid in ids:
                for item, payload in self.results.get(tid, ()):
                    self._send(cid, {"k": "res", "t": [item]}, payload)

    def _chunk_range(self, tid: str) -> tuple:
        task = self.tasks.get(tid)
        item = task.item if task is not None else (self.results.get(tid) or [({}, None)])[0][0]
        return (item.get("s0", 0), item.get("n", 1))

    def info(self, cid: str, rq: int) -> None:
        with self._lock:
            workers = []
            for sid, sup in self.supervisors.items():
                i = sup.info
                workers.append({
                    "id": sid, "name": i.get("name", sid), "host": i["host"], "pid": i["spid"],
                    "concurrency": i["conc"], "queues": list(i["queues"]),
                    "active": sum(len(self.procs[w].running) for w in sup.procs if w in self.procs),
                    "processes": [i["spid"]] * len(sup.procs), "memory": i.get("mem")})
            queues = {q: sum(1 for _, _, t in heap if t.where == "queued")
                      for q, heap in self.queues.items() if not q.startswith(INLINE_LANE)}
            self._reply(cid, rq, {"workers": workers, "queues": queues, "tasks": len(self.tasks),
                                  "results": len(self.results), "dropped": {}})

    def join(self, cid: str, rq: int, key: str, member: str, total: int) -> None:
        with self._lock:
            join = self.joins.get(key)
            if join is None:
                join = self.joins[key] = {"m": set(), "fired": False}
                self._expire_later("join", key)
            join["m"].add(member)
            fire = not join["fired"] and len(join["m"]) >= total
            join["fired"] |= fire
            self._reply(cid, rq, {"fire": fire})

    def claim(self, cid: str, rq: int, key: str, ttl: float) -> None:
        with self._lock:
            now = time.time()
            if len(self.claims) > 1000:
                self.claims = {k: t for k, t in self.claims.items() if t > now}
            won = self.claims.get(key, 0.0) <= now
            if won:
                self.claims[key] = now + ttl
            self._reply(cid, rq, {"won": won})

    def control(self, cid: str, rq: int, request: dict) -> None:
        """Hand a control request (cmd, args, dest, ci) to the pools it names; reply {"n": how
        many}."""
        with self._lock:
            dest = request.get("dest")
            sups = [(sid, s) for sid, s in self.supervisors.items()
                    if dest is None or sid in dest or s.info.get("name") in dest]
            for _, sup in sups:
                sup.inbox.put(dict(request, k="ctl", c=cid))
            self._reply(cid, rq, {"n": len(sups)})

    def _reply(self, cid: str, rq: int | None, answer) -> None:
        if rq is not None:
            self._send(cid, {"k": "reply", "rq": rq, "r": answer})

    def _send(self, cid: str, header: dict, frames: list = ()) -> None:
        """A message for a client; one that has left gets nothing (it never comes back)."""
        box = self.clients.get(cid)
        if box is not None:
            box.put(header, list(frames))

    # -- results ---------------------------------------------------------------

    def _deliver(self, task: HeldTask, item: dict, payload: list) -> None:
        part = (dict(item, s0=task.item.get("s0", 0)), payload)
        self._store(task.id, part)
        for cid in {task.item["c"]} | self.watchers.get(task.id, set()):
            self._send(cid, {"k": "res", "t": [part[0]]}, payload)
        start, n = item.get("s", 0), item.get("n", 1)
        fresh = n - task.delivered.count(1, start, start + n)
        task.ndelivered += fresh
        task.delivered[start:start + n] = b"\x01" * n
        if fresh:
            worker = task.where if task.where in self.procs else None
            self.events.task(time.time(), events.EventLog.RESULT, task.item, worker, (item, fresh))
            sup = self.supervisors.get(self.procs[worker].sid) if worker is not None else None
            if sup is not None:
                sup.processed += fresh
                sup.failed += (fresh * (not item["ok"]) if "ok" in item
                               else min(fresh, item.get("nx", 0)))
        if task.ndelivered >= len(task.delivered):
            task.where = "done"
            self.tasks.pop(task.id, None)
            self.watchers.pop(task.id, None)

    def _store(self, tid: str, part: tuple) -> None:
        self.results.add(tid, part)
        self._expire_later("res", tid)

    def _expire_later(self, kind: str, key: str) -> None:
        self.expiry.append((time.time() + self.result_expires, kind, key))

    def _expire(self) -> None:
        """Drop results, map records, joins and watches older than result_expires."""
        now = time.time()
        tables = {"res": self.results, "map": self.maps, "join": self.joins, "watch": self.watchers}
        while self.expiry and self.expiry[0][0] <= now:
            _, kind, key = self.expiry.popleft()
            if kind != "watch" or key not in self.tasks:
                tables[kind].pop(key, None)


#: Queue names of inline clients' tasks (one per client): taken by that client's runs only.
INLINE_LANE = "\x00inline:"
