"""The dashboard's picture of a broker: events (Client.events) folded into workers, queues,
tasks, maps and time series, bounded, and the changes since the last look (``take_delta``)
so live pages get deltas, never the whole table.

Workers and queue lengths also come from the broker's ``info`` (``apply_status``), which is
the truth about who is connected now; events add counts, load and the history.
One lock guards everything: the feed thread folds, the server's thread reads.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Iterable

from ..client.progress import format_counts
from .series import Series

MAX_TASKS = 20_000   # tasks kept (oldest forgotten first)
MAX_MAPS = 500
MAX_OFFLINE = 50     # workers gone that the page still lists
TABLE_ROWS = 200     # task rows a page shows and a delta carries at most
#: the state a task event puts its task in, and the time field it stamps
TASK_STATES = {"task-sent": ("PENDING", "sent"), "task-received": ("RECEIVED", "received"),
               "task-started": ("STARTED", "started"),
               "task-succeeded": ("SUCCESS", "finished"), "task-failed": ("FAILURE", "finished"),
               "task-retried": ("RETRY", "retried"), "task-revoked": ("REVOKED", "finished"),
               "task-rejected": ("REJECTED", "finished")}
ROW_FIELDS = ("id", "name", "state", "args", "worker", "queue", "map", "sent", "received",
              "started", "runtime", "ts")


class State:
    """Everything a page shows, and what changed since the last ``take_delta``."""

    def __init__(self, max_tasks: int = MAX_TASKS) -> None:
        self.lock = threading.Lock()
        self.max_tasks = max_tasks
        self.tasks: OrderedDict[str, dict] = OrderedDict()   # oldest first
        self.maps: OrderedDict[str, dict] = OrderedDict()
        self.workers: dict[str, dict] = {}                   # by worker (supervisor) id
        self.queues: dict[str, dict] = {}                    # name -> length, by_priority
        self.states: dict[str, int] = {}                     # tasks kept, by state
        self.series = Series()
        self.events = 0
        self._dirty_tasks: set[str] = set()
        self._dirty_workers: set[str] = set()
        self._dirty_maps: set[str] = set()

    # -- folding ----------------------------------------------------------------

    def fold(self, events: Iterable[dict]) -> None:
        """Apply events (in order) to the picture."""
        with self.lock:
            for ev in events:
                self.events += 1
                kind = ev.get("type", "")
                if kind == "map-sent":
                    self._map(ev, kind)
                elif kind in TASK_STATES:
                    self._task(ev, kind)
                elif kind.startswith("worker-"):
                    self._worker_event(ev, kind)

    def _task(self, ev: dict, kind: str) -> None:
        ts = ev.get("ts") or time.time()
        self.series.count(kind, ts, ev.get("queue"), ev.get("runtime"), ev.get("count", 1))
        if ev.get("map"):
            self._map(ev, kind)
        tid = ev.get("id")
        if not tid:
            return
        t = self.tasks.get(tid)
        if t is None:
            t = self.tasks[tid] = {"id": tid, "state": None, "retries": 0, "children": []}
            self._forget_oldest()
            parent = ev.get("parent")
            if parent in self.tasks:
                self.tasks[parent]["children"].append(tid)
                self._dirty_tasks.add(parent)
        state, stamp = TASK_STATES[kind]
        if kind == "task-retried":
            t["retries"] += 1
        for key in ("name", "args", "queue", "map", "parent", "root", "runtime", "exception",
                    "traceback"):
            if ev.get(key) is not None:
                t[key] = ev[key]
        if ev.get("worker"):   # a worker process: "<worker id>/<n>"
            t["process"] = ev["worker"]
            t["worker"] = ev["worker"].split("/")[0]
        t[stamp] = ts
        if t["state"] is None or _later(t["state"], state):
            self._count_state(t["state"], -1)
            t["state"] = state
            self._count_state(state, 1)
        t["ts"] = ts
        self._dirty_tasks.add(tid)
        w = t.get("worker")
        if w and kind in ("task-succeeded", "task-failed"):
            rec = self._worker(w)
            rec["_seen_" + ("failed" if kind == "task-failed" else "processed")] += \
                ev.get("count", 1)
            self._dirty_workers.add(w)

    def _count_state(self, state: str | None, n: int) -> None:
        if state is not None:
            self.states[state] = self.states.get(state, 0) + n

    def _forget_oldest(self) -> None:
        while len(self.tasks) > self.max_tasks:
            _, old = self.tasks.popitem(last=False)
            self._count_state(old["state"], -1)
            self._dirty_tasks.discard(old["id"])

    def _map(self, ev: dict, kind: str) -> None:
        """A map's progress as its MapResult counts it: done = items succeeded, failed or
        revoked; failed = items failed or revoked; total from its map-sent."""
        mid, ts = ev["map"], ev.get("ts") or time.time()
        m = self.maps.get(mid)
        if m is None:
            m = self.maps[mid] = {"id": mid, "name": ev.get("name"), "queue": ev.get("queue"),
                                  "start": ts, "end": None, "done": 0, "failed": 0,
                                  "total": None}
            while len(self.maps) > MAX_MAPS:
                self.maps.popitem(last=False)
        m["start"] = min(m["start"], ts)
        m["name"] = m["name"] or ev.get("name")
        if kind == "map-sent":
            m["total"] = ev.get("total")
        elif kind in ("task-succeeded", "task-failed", "task-revoked"):
            n = ev.get("count", 1)
            m["done"] += n
            if kind != "task-succeeded":
                m["failed"] += n
        if m["total"] is not None and m["done"] >= m["total"] and m["end"] is None:
            m["end"] = ts
        self._dirty_maps.add(mid)

    def _worker_event(self, ev: dict, kind: str) -> None:
        wid = ev.get("worker", "?")
        w = self._worker(wid)
        w["online"] = kind != "worker-offline"
        w["last_heartbeat"] = ev.get("ts") or time.time()
        for key in ("name", "processed", "failed", "active", "load", "memory", "processes",
                    "host", "pid", "queues", "concurrency"):
            if ev.get(key) is not None:
                w[key] = ev[key]
        self._dirty_workers.add(wid)

    def _worker(self, wid: str) -> dict:
        w = self.workers.get(wid)
        if w is None:
            w = self.workers[wid] = {"id": wid, "name": wid, "online": True,
                                     "_seen_processed": 0, "_seen_failed": 0}
        return w

    def apply_status(self, st: dict) -> None:
        """The broker's info reply (Client.status()): who is connected, and queue lengths."""
        now = time.time()
        with self.lock:
            here = set()
            for info in st.get("workers", []):
                wid = info["id"]
                here.add(wid)
                w = self._worker(wid)
                w.update(online=True, name=info.get("name") or wid, host=info.get("host"),
                         pid=info.get("pid"),
                         concurrency=info.get("concurrency"), active=info.get("active"),
                         processes=info.get("processes"), queues=info.get("queues"),
                         seen=now)
                if info.get("memory") is not None:
                    w["memory"] = info["memory"]
                self._dirty_workers.add(wid)
            for wid, w in self.workers.items():
                if wid not in here and w.get("online") and "seen" in w:
                    w["online"] = False
                    self._dirty_workers.add(wid)
            gone = sorted((w.get("seen") or 0, wid) for wid, w in self.workers.items()
                          if not w.get("online"))
            for _, wid in gone[:max(0, len(gone) - MAX_OFFLINE)]:   # the longest gone
                del self.workers[wid]
            lengths = st.get("queues", {})
            for q, n in lengths.items():
                by = n if isinstance(n, dict) else None
                self.queues[q] = {"name": q, "length": sum(by.values()) if by else n,
                                  "by_priority": by}
            self.series.sample_queues({q: v["length"] for q, v in self.queues.items()}, now)

    # -- reading ------------------------------------------------------------------

    def snapshot(self, filters: dict | None = None) -> dict:
        """Everything a page needs at load: the newest TABLE_ROWS tasks matching filters."""
        with self.lock:
            return {"now": time.time(), "workers": self._workers(self.workers),
                    "queues": self._queues(),
                    "maps": [self._map_row(m) for m in self.maps.values()],
                    "tasks": self._find(filters or {}, TABLE_ROWS), "states": dict(self.states),
                    "kept": len(self.tasks), "events": self.events,
                    "series": self.series.rows()}

    def take_delta(self) -> dict:
        """What changed since the last call, with the small parts always (queues, counts by
        state, new seconds of the series) and unfinished maps (their rate and ETA move with
        time)."""
        with self.lock:
            for m in self.maps.values():
                if m["end"] is None:
                    self._dirty_maps.add(m["id"])
            changed = [self.tasks[t] for t in self._dirty_tasks if t in self.tasks]
            changed.sort(key=lambda t: t.get("ts") or 0)
            delta = {"now": time.time(),
                     "tasks": [self._row(t) for t in changed[-TABLE_ROWS:]],
                     "workers": self._workers({w: self.workers[w] for w in self._dirty_workers}),
                     "maps": [self._map_row(self.maps[m]) for m in self._dirty_maps
                              if m in self.maps],
                     "queues": self._queues(), "states": dict(self.states),
                     "kept": len(self.tasks), "events": self.events,
                     "series": self.series.rows(since=self.series.sent_upto)}
            self.series.sent_upto = self.series.closed_upto()
            self._dirty_tasks.clear()
            self._dirty_workers.clear()
            self._dirty_maps.clear()
            return delta

    def find(self, filters: dict, limit: int = TABLE_ROWS) -> list[dict]:
        with self.lock:
            return self._find(filters, limit)

    def task(self, tid: str) -> dict | None:
        """A task's whole record, its children's rows with it."""
        with self.lock:
            t = self.tasks.get(tid)
            if t is None:
                return None
            return {**t, "worker": self._row(t)["worker"],
                    "children": [self._row(self.tasks[c]) for c in t["children"]
                                 if c in self.tasks]}

    def _find(self, filters: dict, limit: int) -> list[dict]:
        state, name, worker = filters.get("state"), filters.get("name"), filters.get("worker")
        search = filters.get("q")
        rows = []
        for t in reversed(self.tasks.values()):
            if ((state and t["state"] != state) or (name and name not in (t.get("name") or ""))
                    or (worker and worker != t.get("worker")
                        and worker != self.workers.get(t.get("worker"), {}).get("name"))
                    or (search and search not in t["id"])):
                continue
            rows.append(self._row(t))
            if len(rows) >= limit:
                break
        return rows

    def _row(self, t: dict) -> dict:
        """A task's row in the table, its worker by name."""
        row = {k: t.get(k) for k in ROW_FIELDS}
        if row["worker"] in self.workers:
            row["worker"] = self.workers[row["worker"]]["name"]
        return row

    def _workers(self, workers: dict[str, dict]) -> list[dict]:
        out = []
        for name, w in workers.items():
            row = {k: v for k, v in w.items() if not k.startswith("_")}
            row.setdefault("processed", w["_seen_processed"])
            row.setdefault("failed", w["_seen_failed"])
            row.setdefault("last_heartbeat", w.get("seen"))
            out.append(row)
        return out

    def _queues(self) -> list[dict]:
        rates = self.series.queue_rates()
        names = set(self.queues) | set(rates)
        return [{**self.queues.get(q, {"name": q, "length": None, "by_priority": None}),
                 "rate_in": rates.get(q, (0.0, 0.0))[0], "rate_out": rates.get(q, (0.0, 0.0))[1]}
                for q in sorted(names)]

    @staticmethod
    def _map_row(m: dict) -> dict:
        """A map as the notebook widget shows it: the same counts, the same words."""
        elapsed = max(0.0, (m["end"] or time.time()) - m["start"])
        c = {"done": m["done"], "failed": m["failed"], "total": m["total"], "elapsed": elapsed,
             "rate": m["done"] / elapsed if elapsed > 0 else 0.0}
        eta = ((c["total"] - c["done"]) / c["rate"] if c["total"] is not None
               and c["done"] < c["total"] and c["rate"] > 0 else None)
        return {**m, **c, "eta": eta, "text": format_counts(c)}

    def metrics(self) -> dict[str, Any]:
        """The numbers /metrics exposes (metrics.py formats them)."""
        with self.lock:
            return {"workers": self._workers(self.workers), "queues": self._queues(),
                    "states": dict(self.states), "events": self.events,
                    "totals": dict(self.series.totals), "latency": self.series.percentiles()}


ORDER = ("PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED", "REJECTED")


def _later(old: str, new: str) -> bool:
    """Whether new follows old (events of one task may arrive out of order); a retry starts
    the task again."""
    if old == "RETRY" and new in ("RECEIVED", "STARTED"):
        return True
    return ORDER.index(new) >= ORDER.index(old)


