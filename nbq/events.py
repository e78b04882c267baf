"""Events: what happened to tasks and workers, as plain dicts, and the bounded store of them.

An event is a dict with ``type`` (str) and ``ts`` (epoch seconds, when it happened), and:

* task events, ``task-sent``, ``task-received``, ``task-started``, ``task-succeeded``
  (+ ``runtime`` seconds), ``task-failed`` (+ ``exception``, the type's name, and
  ``traceback``, its text, truncated to TRACEBACK_MAX characters), ``task-retried``,
  ``task-revoked``, ``task-rejected`` (a worker refused the task's message: its signature
  failed; the task then fails, ``task-failed``, SignatureError), each with ``id`` (task
  id), ``name`` (the task's or function's name, None where unknown), ``worker`` (the
  worker process id, ``"<worker id>/<n>"``; None before one has it), ``queue`` and
  ``map`` (the map id, or None).  ``task-sent`` adds ``args`` (a short
  repr, made by the sender from the arguments it had: nothing is unpickled for it) and,
  for steps of chains and chords, ``parent`` and ``root``: in a chain, the step before
  and the first step's task ids; in a chord, the chord's group id as the header tasks'
  root and as the body's parent and root.
* worker events, ``worker-online``, ``worker-heartbeat`` (+ ``processed``, ``failed``:
  items finished and failed so far; ``active``: tasks running; ``load``: the host's
  one-minute load average; ``memory``: resident bytes of the worker and its processes;
  ``processes``: their pids; ``host``, ``pid``, ``queues``), ``worker-offline``, each with
  ``worker``, the worker (supervisor) id.

Maps, per chunk: a map of a million items sends no million events.  Each chunk is a task
(id ``<map id>:<first item>``) whose events carry ``map`` and ``count``, the items they
are about: ``task-sent``, ``-received`` and ``-started`` the chunk's items;
``task-succeeded`` the items of one result part that succeeded, ``task-failed`` those
that failed (with the first one's exception and traceback), ``task-revoked`` those
cancelled.  ``map-sent`` (``map``, ``name``, ``queue``, ``total``) comes once per map,
when its item count is known: with its first chunk for a sized input, at its end for a
generator.  So a map's progress is: done = the sum of its ``task-succeeded`` counts,
failed = the sum of its ``task-failed`` and ``task-revoked`` counts, total = its
``map-sent`` total.  A call (not a map) has no ``count``.

Events happen where the work is seen, at no cost to it: the ZeroMQ broker and the
in-process broker make them from the messages they handle anyway (a worker adds the
exception's name and traceback to a failed result's header, only on failure; a
supervisor its load average to its heartbeat); on Redis each party writes those it sees
(client: sent; worker process: received, started, and the results it stores, in the same
round trip as the results; supervisor: its own), a batch per stream entry; on amqp:// the
same, into its result backend's Redis (without one, there are no events).

The store (EventLog here; a capped stream on Redis) keeps the events of the last
``keep`` seconds, at most ``most`` records of them (a record is one event, but a task's
received and started share one; on Redis a stream entry holds a batch): policy.EVENTS_KEEP
and EVENTS_MAX, else the ZeroMQ broker's ``--events-keep`` / ``--events-max``, a Redis
URL's ``?events_keep=`` / ``?events_max=`` (memory:// keeps the defaults).  Heartbeats are
not counted there: of those it keeps each worker's last.  Events off (``nbq broker
--no-events``, ``?events=0`` on Redis, NBQ_EVENTS=0 for the embedded broker): nothing is
kept or sent, and ``Client.events()`` yields nothing.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

TASK_SENT = "task-sent"
TASK_RECEIVED = "task-received"
TASK_STARTED = "task-started"
TASK_SUCCEEDED = "task-succeeded"
TASK_FAILED = "task-failed"
TASK_RETRIED = "task-retried"
TASK_REVOKED = "task-revoked"
TASK_REJECTED = "task-rejected"
MAP_SENT = "map-sent"
WORKER_ONLINE = "worker-online"
WORKER_HEARTBEAT = "worker-heartbeat"
WORKER_OFFLINE = "worker-offline"

TRACEBACK_MAX = 2000  # characters of a traceback an event keeps (its end: where it raised)
ARGS_MAX = 100        # characters of a task-sent's args
BATCH = 2000          # events per message that carries them

_PLAIN = (int, float, bool, type(None))


def args_repr(args: tuple, kwargs: dict | None = None) -> str:
    """A short repr of a call's arguments (for task-sent): cheap for the common small ones,
    bounded (reprlib) for any other, never longer than ARGS_MAX."""
    if not kwargs and len(args) == 1 and type(args[0]) in _PLAIN:  # the most common: at once
        return f"({args[0]!r},)"
    if not kwargs and len(args) < 8 and all(type(a) in _PLAIN for a in args):
        text = repr(args)
    else:
        text = _bounded().repr(args)
        if kwargs:
            text += " " + _bounded().repr(kwargs)
    return text if len(text) <= ARGS_MAX else text[:ARGS_MAX - 3] + "..."


_short = None  # the _Short instance, made at first use (reprlib is not imported before)


def _bounded():
    global _short
    if _short is None:
        import reprlib

        class _Short(reprlib.Repr):
            def repr_instance(self, x, level):
                """Other objects by type and size, never by their own repr: that can cost what
                the object is big (a 100,000-row DataFrame's 1.6 ms; a bytes' copies it whole),
                on every submit."""
                shape = getattr(x, "shape", None)
                if isinstance(shape, tuple):
                    return f"<{type(x).__name__} shape={shape}>"
                try:
                    return f"<{type(x).__name__} len={len(x)}>"
                except Exception:
                    return f"<{type(x).__name__}>"

        _short = _Short()
        _short.maxstring = _short.maxother = 40
        _short.maxlist = _short.maxtuple = _short.maxset = _short.maxdict = 6
        _short.maxlevel = 2
    return _short


def failure_fields(record: tuple) -> dict:
    """The header fields of a failed result part that its task-failed event shows, from the
    error record (protocol.error_record): ``xn`` the exception's type, ``tb`` its traceback."""
    return {"xn": record[0], "tb": record[2][-TRACEBACK_MAX:]}


def name_of(fn) -> str:
    """A task's registered name, or a function's module and qualified name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str):
        return name
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def task_event(kind: str, ts: float, item: dict, name: str | None, worker: str | None = None,
               extra: dict | None = None) -> dict:
    """The event of a task (its header item as sent) of this kind."""
    event = {"type": kind, "ts": ts, "id": item["id"], "name": name, "worker": worker,
             "queue": item.get("q", "default"), "map": item.get("mp")}
    if "mp" in item:
        event["count"] = item.get("n", 1)
    if kind == TASK_SENT:
        event["args"] = item.get("ar")
        if event["args"] is None and "mp" in item:  # a chunk: which items of its map
            s0 = item.get("s0", 0)
            event["args"] = f"items {s0}..{s0 + item.get('n', 1) - 1}"
        if "pa" in item or "ro" in item:
            event["parent"], event["root"] = item.get("pa"), item.get("ro")
    if extra:
        event.update(extra)
    return event


def result_events(ts: float, item: dict, part: dict, name: str | None,
                  worker: str | None, fresh: int | None = None) -> list[dict]:
    """The events of a result part (part: the result item a worker, or the broker for a dead
    process's task, sends) of the task whose header item is item: succeeded, failed or
    revoked, with the counts of a map chunk's part.  fresh: how many of its items are new
    (a part already delivered makes no event)."""
    n = part.get("n", 1) if fresh is None else fresh
    if n <= 0:
        return []
    if part.get("rv"):
        return [task_event(TASK_REVOKED, ts, item, name, worker, {"count": n} if "mp" in item else None)]
    runtime = part.get("d")
    failure = {"exception": part.get("xn"), "traceback": part.get("tb")}
    if "mp" not in item:
        if part.get("ok"):
            return [task_event(TASK_SUCCEEDED, ts, item, name, worker, {"runtime": runtime})]
        return [task_event(TASK_FAILED, ts, item, name, worker, dict(failure, runtime=runtime))]
    failed = min(n, part.get("nx", 0) if "ok" not in part else n * (not part["ok"]))
    out = []
    if n - failed:
        out.append(task_event(TASK_SUCCEEDED, ts, item, name, worker,
                              {"runtime": runtime, "count": n - failed}))
    if failed:
        out.append(task_event(TASK_FAILED, ts, item, name, worker,
                              dict(failure, runtime=runtime, count=failed)))
    return out


def map_event(ts: float, item: dict, name: str | None, total: int) -> dict:
    """The map-sent event of the map a chunk (item) belongs to."""
    return {"type": MAP_SENT, "ts": ts, "map": item["mp"], "name": name,
            "queue": item.get("q", "default"), "total": total}


def worker_event(kind: str, ts: float, worker: str, fields: dict | None = None) -> dict:
    """A worker (supervisor) event."""
    event = {"type": kind, "ts": ts, "worker": worker}
    if fields:
        event.update(fields)
    return event


def batches(events: list[dict], size: int = BATCH) -> Iterable[list[dict]]:
    """events in lists of at most size, for messages that must stay small."""
    for i in range(0, len(events), size):
        yield events[i:i + size]


def pack(batch: list[dict]) -> list:
    """A batch of events in fewer bytes (for storing): grouped by their keys, each group
    [constant fields, varying keys, rows of the varying values]; ``unpack`` inverts it,
    but for the order of events of different groups (readers sort by ts)."""
    if len(batch) == 1:  # a client's task-sent, alone in its flush: every field constant
        return [[dict(batch[0]), [], [[]]]]
    groups: dict[tuple, list[dict]] = {}
    for event in batch:
        groups.setdefault(tuple(event), []).append(event)
    out = []
    for keys, events in groups.items():
        first = events[0]
        same = {k: first[k] for k in keys if all(e[k] == first[k] for e in events)}
        varying = [k for k in keys if k not in same]
        out.append([same, varying, [[e[k] for k in varying] for e in events]])
    return out


def unpack(packed: list) -> list[dict]:
    """The events of pack's form."""
    out = []
    for same, varying, rows in packed:
        for row in rows:
            event = dict(same)
            event.update(zip(varying, row))
            out.append(event)
    return out


class EventLog:
    """A broker's bounded store of recent events and the subscribers that follow them live.

    Events are added as records (ts, kind, item, worker, extra) that name the task's
    header item (and a result's part) instead of copying them, and become dicts only when
    read (``since``, ``take_new``): a broker pays almost nothing for events nobody reads.
    kind RESULT: extra is (result part, fresh items), read as result_events; TAKEN: received
    and started, one record; TASK_SENT: extra may be the arguments' repr (a str); item None:
    extra is a ready event dict.  Kept: the last ``most`` records, none older than
    ``keep`` seconds (``prune``), and each worker's last heartbeat apart (they would
    crowd out the rest).
    """

    RESULT = "result"
    TAKEN = "taken"  # a task a worker took and started at once: received, then started

    def __init__(self, keep: float, most: int, on: bool = True) -> None:
        self.names: dict[str, str] = {}  # function hash -> its name (from its client's fn)
        self.keep = keep
        self.on = on
        self.records: deque = deque(maxlen=max(1, most))
        self.beats: dict[str, dict] = {}   # worker id -> its last heartbeat event
        self.subscribers: set[tuple[str, str]] = set()  # (client id, subscription id)
        self._new: list = []  # records added since take_new, while anyone follows

    def task(self, ts: float, kind: str, item: dict, worker: str | None = None,
             extra=None) -> None:
        """Add a task event (kind RESULT: extra is (part, fresh), see result_events)."""
        if self.on:
            rec = (ts, kind, item, worker, extra)
            self.records.append(rec)
            if self.subscribers:
                self._new.append(rec)

    def event(self, event: dict) -> None:
        """Add a ready event (worker and map events)."""
        if not self.on:
            return
        rec = (event["ts"], event["type"], None, None, event)
        if event["type"] == WORKER_HEARTBEAT:
            self.beats[event["worker"]] = event
        else:
            self.records.append(rec)
            if event["type"] == WORKER_OFFLINE:
                self.beats.pop(event["worker"], None)
        if self.subscribers:
            self._new.append(rec)

    def leave(self, cid: str) -> None:
        """A client left: its subscriptions end."""
        self.subscribers = {s for s in self.subscribers if s[0] != cid}

    def _expand(self, records: Iterable[tuple]) -> list[dict]:
        out: list[dict] = []
        names = self.names
        for ts, kind, item, worker, extra in records:
            if item is None:
                out.append(extra)
            elif kind == self.RESULT:
                out += result_events(ts, item, extra[0], names.get(item.get("h")), worker, extra[1])
            elif kind == self.TAKEN:
                name = names.get(item.get("h"))
                out += [task_event(TASK_RECEIVED, ts, item, name, worker),
                        task_event(TASK_STARTED, ts, item, name, worker)]
            else:
                if kind == TASK_SENT and type(extra) is str:  # its arguments' repr, kept here
                    extra = {"args": extra}                   # rather than by the broker's task
                out.append(task_event(kind, ts, item, names.get(item.get("h")), worker, extra))
        return out

    def since(self, ts: float) -> list[dict]:
        """The events kept from ts on (heartbeats: each worker's last), in time order."""
        out = self._expand(r for r in self.records if r[0] >= ts)
        beats = [b for b in self.beats.values() if b["ts"] >= ts]
        if beats:
            out = sorted(out + beats, key=lambda e: e["ts"])
        return out

    def take_new(self) -> list[dict]:
        """The events added since the last call (for the live subscribers)."""
        new, self._new = self._new, []
        return self._expand(new)

    def prune(self, now: float) -> None:
        """Drop the events older than keep seconds."""
        horizon = now - self.keep
        records = self.records
        while records and records[0][0] < horizon:
            records.popleft()
        for worker in [w for w, b in self.beats.items() if b["ts"] < horizon]:
            del self.beats[worker]
