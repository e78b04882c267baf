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
            pipe.xadd(STREAM, {"m": blob}, maxlen=self._most, approximate=True)
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
