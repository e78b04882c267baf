"""Beat: sends the entries of ``app.conf.beat_schedule`` when they are due (Celery's beat).

An entry is Celery's::

    {"add-every-10s": {"task": "tasks.add", "schedule": 10.0,   # or a timedelta, crontab(...)
                       "args": (1, 2), "kwargs": {}, "options": {"queue": "lopri"}}}

and is sent with ``app.send_task(task, args=..., kwargs=..., **options)``.
Crontab fields are read in ``app.conf.timezone`` (default UTC; the machine's
local zone when ``enable_utc`` is False and no timezone is set).

What beat remembers is, per entry, when it last sent it (a "mark", ms since
the Unix epoch).  A tick T of an entry is sent only if the mark is before T,
and sending it sets the mark to now (>= T), in one step: a claim.

- Redis broker: the mark is ``nbq:beat:last:{entry}`` in the broker's
  database, claimed by one Lua script (compare and set), so any number of
  beats on one Redis send each tick once: the first to claim it sends it.
- ZeroMQ broker (no shared store): the marks are a JSON file (``--schedule``,
  like Celery's celerybeat-schedule), rewritten atomically on each send.
  Two beats on ZeroMQ are not coordinated: run one.

Missed ticks (beat down, or late by more than an interval) are not replayed:
on start, an entry whose next tick after its mark has passed is sent once at
once, as Celery does, and then its schedule goes on from now.  An entry never
sent before waits for its first tick after the start.  A tick is claimed
before it is sent, so a beat that dies between the two loses that tick rather
than sending it twice (at most once per tick).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import BrokerUnavailable
from ..transport import REDIS_SCHEMES
from ..transport.redis import P, check, connect, parse_address, retrying
from .crontab import BaseSchedule, maybe_schedule

log = logging.getLogger("nbq.beat")

DEFAULT_SCHEDULE = "nbq-beat-schedule"  # the marks file when the broker is not Redis
MAX_LOOP_INTERVAL = 300.0  # Celery's beat_max_loop_interval: re-read the clock at least this often
ENTRY_KEYS = {"task", "schedule", "args", "kwargs", "options"}
LAST_KEY = P + "beat:last:"  # + entry name: its mark (see transport/redis/keys.py's key schema)

MARK_SKEW = 5.0  # seconds a mark may lie ahead of a beat's clock (another host's): more is bad

# KEYS: the entry's mark; ARGV: tick (ms), now (ms), skew (ms) -> 1 (claimed: send it) or 0.
# Marks are unsigned: one that is not a number or lies ahead of now by more than the skew
# counts as none (claimed over), so a garbage mark can hold back no tick for long.
CLAIM = """
local last = tonumber(redis.call('GET', KEYS[1]))
if last and last >= tonumber(ARGV[1]) and last <= tonumber(ARGV[2]) + tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


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


class RedisMarks:
    """Marks in the broker's Redis: shared by every beat there, claimed atomically."""

    def __init__(self, address: str, stopping: Callable[[], bool]) -> None:
        url, self.safe, _ = parse_address(address)
        self.r = connect(url, self.safe)
        check(self.r, self.safe)
        self._claim = self.r.register_script(CLAIM)
        self._stopping = stopping
        self.where = f"Redis at {self.safe}"

    def _retry(self, what: str, fn):
        """fn() through Redis outages; None once stopping (nothing is claimed while stopping)."""
        try:
            return retrying(what, self.safe, fn, give_up=self._stopping)
        except BrokerUnavailable:
            return None

    def last(self, name: str, now: float) -> float | None:
        mark = self._retry("reading beat marks", lambda: self.r.get(LAST_KEY + name))
        return None if mark is None else _valid_mark(mark, name, now, self.where)

    def claim(self, name: str, tick: float, now: float) -> bool:
        return bool(self._retry("claiming a beat tick", lambda: self._claim(
            keys=[LAST_KEY + name], args=[_ms(tick), _ms(now), _ms(MARK_SKEW)])))


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
    """Marks in a local JSON file, for one beat (a broker with no shared store)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.where = f"file {self.path}"
        try:
            self.marks: dict[str, int] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.marks = {}
        except ValueError as e:
            raise ValueError(f"beat schedule file {self.path} is not nbq's JSON: {e}") from None

    def last(self, name: str, now: float) -> float | None:
        mark = self.marks.get(name)
        return None if mark is None else _valid_mark(mark, name, now, self.where)

    def claim(self, name: str, tick: float, now: float) -> bool:
        last = self.last(name, now) if name in self.marks else None
        if last is not None and _ms(last) >= _ms(tick):
            return False
        self.marks[name] = _ms(now)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.marks))
        os.replace(tmp, self.path)
        return True


class Beat:
    """Sends an app's beat_schedule entries when due; run() until stop()."""

    def __init__(self, app, schedule_path: str | os.PathLike | None = None) -> None:
        conf = app.conf
        self.app = app
        self.tz = app_timezone(conf)
        self.entries = read_entries(conf.get("beat_schedule") or {})
        self.max_interval = float(conf.get("beat_max_loop_interval") or MAX_LOOP_INTERVAL)
        self._stop = threading.Event()
        broker = conf.get("broker_url") or ""
        self.marks = (RedisMarks(broker, self._stop.is_set) if broker.startswith(REDIS_SCHEMES)
                      else FileMarks(schedule_path or DEFAULT_SCHEDULE))
        self.due: dict[str, float] = {}  # entry name -> its next tick (seconds since the epoch)

    def _next(self, entry: Entry, after: float) -> float:
        return entry.schedule.next_after(datetime.fromtimestamp(after, self.tz)).timestamp()

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
                if self.marks.claim(e.name, due, now):
                    self._send(e, due)
                self.due[e.name] = self._next(e, now)
        soonest = min(self.due.values(), default=now + self.max_interval)
        return min(max(soonest - now, 0.0), self.max_interval)

    def _send(self, e: Entry, due: float) -> None:
        """Send one tick of an entry, logged before it goes (with its task id) as Celery does."""
        task_id = str(uuid.uuid4())
        log.info("beat: sending %s (%s) for tick %s: task %s", e.name, e.task,
                 datetime.fromtimestamp(due, self.tz).isoformat(), task_id)
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
        """Make run() return (at once, unless a send is under way); thread-safe."""
        self._stop.set()
