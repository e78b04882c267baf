"""Events on Redis (nbq/events.py): each party writes those it sees, a batch per stream entry.

Keys (keys.py's schema)::

  nbq:ev    Stream of events: each entry one signed message {"k": "ev", "p": a batch in
            events.pack's form} (field m, packed): a client's task-sent and map-sent, a worker process's
            received, started, retried and results, a supervisor's online and offline,
            revokes.  Capped: XADD MAXLEN ~ events_max entries (an entry holds a batch, so
            at least that many events are kept), and entries older than events_keep
            seconds trimmed (XTRIM MINID ~) by each writer at most every TRIM_EVERY s.
  nbq:evh   Stream of worker heartbeat events, one per entry, MAXLEN ~ BEATS_KEPT: read
            back as each worker's last (history), and live.
  nbq:wc:{sid}  Hash processed, failed: items a supervisor's processes finished (its
            heartbeat events' counts), HINCRBY with their results.

Writers add their events to a command pipeline they send anyway (a client's tasks, a
worker's results and "started" notices, a supervisor's heartbeat): no round trip of their
own.  So a worker process's received and started events go with its next message (its
results; for a submitted task still running, its STARTED notice, within STARTED_DELAY):
a process killed before that loses them (its task's rerun has its own).  Readers
(a client's events()) verify each entry's signature before using it.  ``?events=0``
in the URL turns events off for that party (a cancel's task-revoked names only the task:
the canceller knows no more of it); ``?events_keep=SECONDS``,
``?events_max=N`` bound the store (policy.EVENTS_KEEP, EVENTS_MAX by default).
"""
from __future__ import annotations

import threading
import time

from ... import events
from .frames import pack
from .keys import P

STREAM = P + "ev"
BEATS = P + "evh"
BEATS_KEPT = 1000   # heartbeat entries kept (each worker's last is read back)
TRIM_EVERY = 10.0   # seconds between a writer's trims by age
TAKEN = "taken"     # a task a worker took and started at once, stored as one event (decode)


def counts_key(sid: str) -> str:
    return P + "wc:" + sid


class EventWriter:
    """Events one party has seen and not yet written; thread-safe (a worker's notices thread
    writes too)."""

    def __init__(self, store) -> None:
        self.store = store
        conf = store.settings
        self.on = bool(conf.events)
        self._keep, self._most = conf.events_keep, conf.events_max
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        # function hash -> name, for events added before their function was fetched (they
        # carry the hash as "_h" until written)
        self.names: dict[str, str] = {}
        self._trimmed = 0.0

    def add(self, new: list[dict]) -> None:
        if self.on and new:
            with self._lock:
                self._pending.extend(new)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def commands(self, pipe) -> None:
        """Add the pending events' XADD (and a trim by age, now and then) to pipe."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        for event in pending:
            if "_h" in event:
                h = event.pop("_h")
                event["name"] = event["name"] or self.names.get(h)
        for batch in events.batches(pending):
            blob = pack(self.store.signer.encode({"k": "ev", "p": events.pack(batch)}))
            pipe.execute_command("XADD", STREAM, "MAXLEN", "~", self._most, "*", "m", blob)
        now = time.time()
        if now - self._trimmed > TRIM_EVERY:
            self._trimmed = now
            pipe.xtrim(STREAM, minid=int((now - self._keep) * 1000), approximate=True)

    def flush(self) -> None:
        """Write the pending events now (a pipeline of their own)."""
        if not self._pending:
            return
        st = self.store

        def write():
            pipe = st.r.pipeline(transaction=False)
            self.commands(pipe)
            pipe.execute()
        st.retry("writing events", write)


def write(store, new: list[dict]) -> None:
    """Write events at once, in a round trip of their own (rare ones: revokes)."""
    writer = EventWriter(store)
    writer.add(new)
    writer.flush()


def heartbeat(pipe, store, event: dict) -> None:
    """Add a worker-heartbeat event's XADD to pipe."""
    blob = pack(store.signer.encode({"k": "ev", "ev": [event]}))
    pipe.xadd(BEATS, {"m": blob}, maxlen=BEATS_KEPT, approximate=True)


def decode(store, fields: dict, where: str) -> list[dict]:
    """The events of a stream entry, [] unless its signature verifies."""
    decoded = store.decode(fields.get(b"m", b""), where) if fields else None
    if decoded is None or decoded[0].get("k") != "ev":
        return []
    try:
        got = events.unpack(decoded[0]["p"]) if "p" in decoded[0] else decoded[0]["ev"]
    except (KeyError, TypeError, ValueError):  # signed, but not what a writer makes
        return []
    out = []
    for event in got:
        if event.get("type") == TAKEN:  # stored as one: received, then started
            out += [dict(event, type=events.TASK_RECEIVED), dict(event, type=events.TASK_STARTED)]
        else:
            out.append(event)
    return sorted(out, key=lambda e: e.get("ts", 0))


def history(store, since: float) -> tuple[list[dict], str, str]:
    """The events kept from since on (heartbeats: each worker's last), in time order, and the
    last entry ids of the two streams (where live reading goes on)."""
    r = store.r
    start = max(0, int(since * 1000) - 60_000)  # entries are stamped when written: a margin
    out: list[dict] = []
    last = "0-0"
    cursor = f"{start}-0"
    while True:
        entries = r.xrange(STREAM, min=cursor, max="+", count=1000)
        for eid, fields in entries:
            out += [e for e in decode(store, fields, f"event entry {eid!r}") if e.get("ts", 0) >= since]
        if len(entries) < 1000:
            if entries:
                last = entries[-1][0].decode()
            elif last == "0-0":  # none from since: live reading starts after the newest
                newest = r.xrevrange(STREAM, count=1)
                last = newest[0][0].decode() if newest else "0-0"
            break
        last = entries[-1][0].decode()
        cursor = "(" + last
    beats: dict[str, dict] = {}
    recent = r.xrevrange(BEATS, count=BEATS_KEPT)
    for eid, fields in reversed(recent):
        for e in decode(store, fields, f"heartbeat entry {eid!r}"):
            if e.get("ts", 0) >= since and isinstance(e.get("worker"), str):
                beats[e["worker"]] = e
    out += beats.values()
    out.sort(key=lambda e: e.get("ts", 0))
    return out, last, recent[0][0].decode() if recent else "0-0"


def after(eid: str, seen: str) -> bool:
    """Whether stream entry id eid comes after seen."""
    a, _, b = eid.partition("-")
    c, _, d = seen.partition("-")
    return (int(a), int(b or 0)) > (int(c), int(d or 0))


class SentEvents:
    """A client's task-sent and map-sent events (map-sent once per map, when its total is
    known: with its first chunk for a sized input, at its end for a generator)."""

    def __init__(self, writer: EventWriter) -> None:
        self.writer = writer
        self.names: dict[str, str] = {}  # function hash -> name (from the client's fn messages)
        self._maps: dict[str, dict | None] = {}  # map id -> its first chunk (None: map-sent sent)

    def task(self, now: float, item: dict) -> None:
        """A task (or a map's chunk) sent."""
        if not self.writer.on:
            return
        self.writer.add([events.task_event(events.TASK_SENT, now, item, self.names.get(item.get("h")))])
        mp = item.get("mp")
        if mp is not None and mp not in self._maps:
            self.map_sent(mp, item, item.get("tot"))

    def map_sent(self, mp: str, first: dict | None, total: int | None) -> None:
        """A map's first chunk (first given) or its end (first None, total known; it may come
        before a sized map's first chunk, which then carries the total)."""
        if first is None:
            first = self._maps.get(mp)  # None: sent already, or no chunk seen yet
            if first is None:
                return
        elif total is None:
            self._maps[mp] = first
            return
        self._maps[mp] = None
        if first is not None and total is not None and self.writer.on:
            self.writer.add([events.map_event(time.time(), first,
                                              self.names.get(first.get("h")), total)])


class ProcessEvents:
    """A worker process's task events and its items' counts (for its supervisor's heartbeat
    events): added as it takes tasks and reports results, written with its next message."""

    def __init__(self, writer: EventWriter, wid: str, sid: str) -> None:
        self.writer = writer
        self.wid, self.sid = wid, sid
        self.names = writer.names  # function hash -> name (signed in its fn message)
        self._later: set[str] = set()  # tasks taken before their eta: started when they ran
        self._processed = self._failed = 0  # items finished (failed) since last written

    def __bool__(self) -> bool:
        return bool(self.writer) or bool(self._processed)

    def received(self, items: list[dict]) -> None:
        """Tasks this process takes: received, and started unless due later."""
        if not self.writer.on or not items:
            return
        now, out = time.time(), []
        for item in items:
            name = self.names.get(item.get("h"))
            named = None if name is not None else {"_h": item.get("h")}  # named when written
            eta = item.get("eta")
            if eta is None or eta <= now:  # received and started: stored as one
                out.append(events.task_event(TAKEN, now, item, name, self.wid, named))
            else:
                out.append(events.task_event(events.TASK_RECEIVED, now, item, name, self.wid, named))
                self._later.add(item["id"])
        self.writer.add(out)

    def results(self, parts: list) -> None:
        """Result parts [(task item, result item, payload)]: their events, and counted."""
        if not self.writer.on or not parts:
            return
        now, out = time.time(), []
        for task, item, _ in parts:
            name = self.names.get(task.get("h"))
            if self._later and task["id"] in self._later:
                self._later.discard(task["id"])
                if not item.get("rv"):
                    out.append(events.task_event(events.TASK_STARTED, now - item.get("d", 0.0),
                                                 task, name, self.wid))
            out += events.result_events(now, task, item, name, self.wid)
            n = item.get("n", 1)
            self._processed += n
            self._failed += n * (not item["ok"]) if "ok" in item else item.get("nx", 0)
        self.writer.add(out)

    def notice(self, tasks: list[dict], state: str) -> None:
        """Tasks retried (state RETRY) or started late (STARTED)."""
        if self.writer.on and tasks:
            now = time.time()
            self.writer.add([events.task_event(
                events.TASK_RETRIED if state == "RETRY" else events.TASK_STARTED, now,
                task, self.names.get(task.get("h")), self.wid) for task in tasks])

    def commands(self, pipe, ttl_s: int) -> None:
        """Add the pending events and counts to pipe."""
        self.writer.commands(pipe)
        if self._processed:
            key = counts_key(self.sid)
            pipe.hincrby(key, "processed", self._processed)
            if self._failed:
                pipe.hincrby(key, "failed", self._failed)
            pipe.expire(key, ttl_s)
            self._processed = self._failed = 0


class SupervisorEvents:
    """A supervisor's worker-online (once, with the first heartbeat that reached Redis),
    worker-heartbeat (with its processes' counts as they last wrote them) and offline."""

    def __init__(self, writer: EventWriter, sid: str) -> None:
        self.writer = writer
        self.sid = sid
        self._online = False
        self._counts: dict[str, int] = {}

    def heartbeat(self, pipe, info: dict, pids: list[int]) -> int | None:
        """Add this heartbeat's events to pipe, then a read of the processes' counts (the next
        heartbeat's); returns that read's place in the pipeline's replies (None: events off)."""
        if not self.writer.on:
            return None
        now = time.time()
        fields = {"host": info["host"], "pid": info["spid"], "name": info.get("name"),
                  "queues": list(info.get("queues", ()))}
        if not self._online:
            self.writer.add([events.worker_event(events.WORKER_ONLINE, now, self.sid, fields)])
            self.writer.commands(pipe)
        heartbeat(pipe, self.writer.store, events.worker_event(
            events.WORKER_HEARTBEAT, now, self.sid, dict(
                fields, processed=self._counts.get("processed", 0),
                failed=self._counts.get("failed", 0), active=info.get("act", 0),
                load=info.get("ld"), memory=info.get("mem"), concurrency=info.get("conc"),
                processes=sorted(pids))))
        pipe.hgetall(counts_key(self.sid))
        return len(pipe) - 1

    def written(self, replies: list, at: int | None) -> None:
        """The heartbeat's pipeline went through (replies; at: heartbeat's return)."""
        if at is not None:
            self._online = True
            self._counts = {k.decode(): int(v) for k, v in (replies[at] or {}).items()}

    def offline(self, how: str) -> None:
        """The supervisor leaves: worker-offline, written now."""
        self.writer.add([events.worker_event(events.WORKER_OFFLINE, time.time(), self.sid,
                                             {"how": how})])
        self.writer.flush()


def revoked(store, ids: list[str]) -> None:
    """task-revoked events of tasks a cancel revoked (written at once: rare)."""
    now = time.time()
    write(store, [events.task_event(events.TASK_REVOKED, now, {"id": tid, "q": None}, None)
                  for tid in ids])
