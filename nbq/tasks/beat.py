"""Beat: sends the entries of ``app.conf.beat_schedule`` when they are due (Celery's beat).

An entry is Celery's::

    {"add-every-10s": {"task": "tasks.add", "schedule": 10.0,   # or a timedelta, crontab(...)
                       "args": (1, 2), "kwargs": {}, "options": {"queue": "lopri"}}}

and is sent with ``app.send_task(task, args=..., kwargs=..., **options)``.
Crontab fields are read in ``app.conf.timezone`` (default UTC; the machine's
local zone when ``enable_utc`` is False and no timezone is set).

Coordination, on every transport: each due tick is claimed on the broker
through the app's client (``Client.claim``, the transport contract's
claim-once) under a key naming the entry and the tick, ``beat:{entry}:{tick
ms}``; only the beat that wins the claim sends it.  Every beat agrees on which
tick is which (ticks lie on the schedule, not on when a beat started), so any
number of beats on one broker, ZeroMQ or Redis, send each tick once.  A beat
late by more than an interval claims the latest tick passed, the same one any
beat awake then claims, never an older one.

A claim lives max(60 s, 2 x the entry's interval) (the interval: from the tick
to the entry's next tick), at most CLAIM_TTL_MAX (a year).  A beat tries a tick
only until the entry's next one, so twice the interval lets every beat that
tries it (a clock behind by up to an interval, a beat restarting soon after)
see the claim, and the 60 s floor covers clock skew for short intervals; yet an
entry has at most 1 + max(2, 60 s / interval) claims alive: none piles up.  The
cap keeps the ttl within what the broker accepts; only an entry rarer than
yearly (a February 29th crontab) can have a tick sent again, by a beat that
missed it and starts more than a year after it.  The ZeroMQ broker keeps claims
in memory: a restarted one has forgotten them.

What a beat remembers across its own restarts is, per entry, when it last
claimed a tick of it (won or lost: the tick was sent, by it or by another): a
"mark", ms since the Unix epoch, in a local JSON file (``--schedule``, default
nbq-beat-schedule, like Celery's celerybeat-schedule), rewritten atomically on
each claim.  A mark that is not a time up to now (MARK_SKEW ahead at most)
counts as none.

Missed ticks (beat down, or late by more than an interval) are not replayed:
on start, an entry whose next tick after its mark has passed is sent once at
once (its latest tick, claimed as above), as Celery does, and then its schedule
goes on from now.  An entry never sent before waits for its first tick after
the start.  A tick is claimed before it is sent, so a beat that dies between the
two loses that tick rather than sending it twice (at most once per tick).  When
the broker cannot be reached (the claim raises an NbqError) the tick is skipped
and logged: it could not have been sent anyway, and beat goes on.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any, Mapping, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import NbqError
from .crontab import BaseSchedule, maybe_schedule

log = logging.getLogger("nbq.beat")

DEFAULT_SCHEDULE = "nbq-beat-schedule"  # the marks file
MAX_LOOP_INTERVAL = 300.0  # Celery's beat_max_loop_interval: re-read the clock at least this often
ENTRY_KEYS = {"task", "schedule", "args", "kwargs", "options"}
MARK_SKEW = 5.0  # seconds a mark may lie ahead of the clock (stepped back a little): more is bad
CLAIM_TTL_MIN = 60.0  # seconds a tick's claim lives at least: clock skew, a quick restart
CLAIM_TTL_MAX = 366 * 86400.0  # ... and at most (the broker takes ttls under 1e9 s)


def claim_key(entry: str, tick: float) -> str:
    """The claim-once key of one tick of an entry, the same for every beat."""
    return f"beat:{entry}:{_ms(tick)}"


def claim_ttl(interval: float) -> float:
    """Seconds a tick's claim lives, for an entry whose next tick is `interval` later."""
    return min(max(CLAIM_TTL_MIN, 2 * interval), CLAIM_TTL_MAX)


class Entry(NamedTuple):
    """One beat_schedule entry, checked."""
    name: str
    task: str
    schedule: BaseSchedule
    args: tuple
    kwargs: dict
    options: dict


def read_entries(beat_schedule: Mapping[str, Mapping[str, Any]]) -> list[Entry]:
    """The entries of a Celery beat_schedule; an unknown or missing key is an error here, not later."""
    entries = []
    for name, spec in beat_schedule.items():
        unknown = set(spec) - ENTRY_KEYS
        if unknown:
            raise ValueError(f"beat_schedule entry {name!r}: unknown keys {sorted(unknown)} "
                             f"(known: {', '.join(sorted(ENTRY_KEYS))})")
        missing = {"task", "schedule"} - set(spec)
        if missing:
            raise ValueError(f"beat_schedule entry {name!r} needs {' and '.join(sorted(missing))}")
        entries.append(Entry(name, spec["task"], maybe_schedule(spec["schedule"]),
                             tuple(spec.get("args") or ()), dict(spec.get("kwargs") or {}),
                             dict(spec.get("options") or {})))
    return entries


def app_timezone(conf: Mapping[str, Any]) -> tzinfo:
    """Celery's app timezone: conf.timezone, else UTC, else (enable_utc False) the local zone."""
    name = conf.get("timezone")
    if isinstance(name, tzinfo):
        return name
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {name!r} in the app's configuration") from None
    if conf.get("enable_utc", True):
        return timezone.utc
    from dateutil.tz import tzlocal  # python-dateutil comes with pandas
    return tzlocal()


def _ms(t: float) -> int:
    return int(round(t * 1000))


def _valid_mark(mark, name: str, now: float, where: str) -> float | None:
    """A mark read (ms) as seconds, or None (logged) when it is not an integer, is before
    the epoch or lies ahead of now by more than MARK_SKEW: as if the entry had never been sent."""
    try:
        t = int(mark) / 1000
    except (TypeError, ValueError, OverflowError):
        t = None
    if t is None or not 0 <= t <= now + MARK_SKEW:
        log.warning("beat: ignored the mark of %s in %s (%.40r): not a time up to now",
                    name, where, mark)
        return None
    return t


class FileMarks:
    """A beat's marks in a local JSON file: what it remembers across its restarts."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.where = f"file {self.path}"
        try:
            self.marks: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.marks = {}
        except ValueError as e:
            raise ValueError(f"beat schedule file {self.path} is not nbq's JSON: {e}") from None
        if not isinstance(self.marks, dict):
            raise ValueError(f"beat schedule file {self.path} is not nbq's JSON: not an object")

    def last(self, name: str, now: float) -> float | None:
        """When the entry's last tick was claimed, or None (never, or a mark that is bad)."""
        mark = self.marks.get(name)
        return None if mark is None else _valid_mark(mark, name, now, self.where)

    def record(self, name: str, now: float) -> None:
        """Remember that a tick of the entry was claimed at now (written before it is sent)."""
        self.marks[name] = _ms(now)
        # a temporary file of its own: beats sharing a marks file never replace each other's
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.marks))
        os.replace(tmp, self.path)


class Beat:
    """Sends an app's beat_schedule entries when due, each tick claimed on the app's broker
    (``app.client.claim``); run() until stop()."""

    def __init__(self, app, schedule_path: str | os.PathLike | None = None) -> None:
        conf = app.conf
        self.app = app
        self.tz = app_timezone(conf)
        self.entries = read_entries(conf.get("beat_schedule") or {})
        self.max_interval = float(conf.get("beat_max_loop_interval") or MAX_LOOP_INTERVAL)
        self._stop = threading.Event()
        self.marks = FileMarks(schedule_path or DEFAULT_SCHEDULE)
        self.due: dict[str, float] = {}  # entry name -> its next tick (seconds since the epoch)

    def _next(self, entry: Entry, after: float) -> float:
        return entry.schedule.next_after(datetime.fromtimestamp(after, self.tz)).timestamp()

    def _latest(self, entry: Entry, due: float, now: float) -> float:
        """The entry's last tick at or before now, due (its first unsent one) or later: the
        tick every beat awake at now claims.  Looks back from now, twice as far each time."""
        tick, back = due, self._next(entry, due) - due
        while now - back > due:
            found = self._next(entry, now - back)
            if found <= now:
                tick = found
                break
            back *= 2
        while (after := self._next(entry, tick)) <= now:
            tick = after
        return tick

    def start(self, now: float) -> None:
        """Each entry's next tick: the first after its mark, or after now if never sent."""
        for e in self.entries:
            last = self.marks.last(e.name, now)
            self.due[e.name] = self._next(e, now if last is None else last)

    def tick(self, now: float) -> float:
        """Send what is due at `now` (each tick once); returns seconds until the next is due."""
        for e in self.entries:
            due = self.due[e.name]
            if due <= now:
                self._claim_and_send(e, self._latest(e, due, now), now)
                self.due[e.name] = self._next(e, now)
        soonest = min(self.due.values(), default=now + self.max_interval)
        return min(max(soonest - now, 0.0), self.max_interval)

    def _claim_and_send(self, e: Entry, tick: float, now: float) -> None:
        """Claim the tick on the broker, remember it, and send it if this beat won the claim."""
        key = claim_key(e.name, tick)
        try:
            won = self.app.client.claim(key, claim_ttl(self._next(e, tick) - tick))
        except NbqError as err:  # not sent: nobody could have been told it was
            log.warning("beat: skipped %s (%s) for tick %s: the broker could not be asked (%s)",
                        e.name, e.task, self._iso(tick), err)
            return
        self.marks.record(e.name, now)
        if won:
            self._send(e, tick)
        else:
            log.debug("beat: %s for tick %s was claimed by another beat", e.name, self._iso(tick))

    def _iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, self.tz).isoformat()

    def _send(self, e: Entry, due: float) -> None:
        """Send one tick of an entry, logged before it goes (with its task id) as Celery does."""
        task_id = str(uuid.uuid4())
        log.info("beat: sending %s (%s) for tick %s: task %s", e.name, e.task, self._iso(due),
                 task_id)
        try:
            self.app.send_task(e.task, args=e.args, kwargs=e.kwargs, **dict(e.options, task_id=task_id))
        except Exception:  # one entry failing to send must not stop the others
            log.exception("beat: sending %s (%s) failed", e.name, e.task)

    def run(self) -> None:
        """Send due entries until stop(); waits on an Event, so stop() ends a wait at once."""
        self.start(time.time())
        while not self._stop.is_set():
            self._stop.wait(self.tick(time.time()))

    def stop(self) -> None:
        """Make run() return (at once, unless a claim or send is under way); thread-safe."""
        self._stop.set()
