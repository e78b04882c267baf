"""When periodic tasks fire: Celery's ``crontab`` and ``schedule`` (an interval).

Both answer one question, ``next_after(dt)``: the first fire time strictly
after ``dt``, an aware datetime in dt's timezone.  Beat passes the current
time in the app's timezone, so crontab fields are read on that zone's wall
clock; ``is_due`` (Celery's ``(is_due, next)`` pair) is built on it.

crontab follows Celery: fields accept ``*``, ``*/15``, ``1,2,3``, ``1-5``,
``1-30/2``, a range that wraps (``fri-mon``), an int or an iterable of ints;
day_of_week runs 0-6 with Sunday 0 and takes names (``mon-fri``, ``sunday``),
month_of_year takes names (``jan``, ``jan-mar``).  A day fires only when
day_of_week, day_of_month and month_of_year all match (Celery's AND, not
cron's OR).  On a daylight-saving change a wall time that does not exist is
skipped and one that happens twice fires once (the first time).

An interval's ticks are multiples of ``run_every`` since the Unix epoch, not
counted from when a beat started: so every beat, and a restarted one, agrees
on which tick is which (what lets beats on one broker fire each tick once).
"""
from __future__ import annotations

import calendar
import numbers
import re
from abc import ABC, abstractmethod
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Iterable, NamedTuple

WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
SEARCH_YEARS = 29  # every (month, day, weekday) that exists recurs within 28 years

_PART = re.compile(r"^(?:(\*)|(\w+)(?:-(\w+))?)(?:/(\d+))?$")


class schedstate(NamedTuple):
    """Celery's answer to is_due: due now or not, and seconds until the next check."""
    is_due: bool
    next: float


class BaseSchedule(ABC):
    """What beat needs of a schedule: next_after; is_due derives from it."""

    @abstractmethod
    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after `after` (aware), in after's timezone."""

    def is_due(self, last_run_at: datetime, now: datetime | None = None) -> schedstate:
        """Due when a fire time lies in (last_run_at, now]; next: seconds until the one after.

        `now` defaults to the current time in last_run_at's timezone."""
        now = datetime.now(_aware(last_run_at).tzinfo) if now is None else now
        due = self.next_after(last_run_at) <= now
        upcoming = self.next_after(now if due else last_run_at)
        return schedstate(due, max((upcoming - now).total_seconds(), 0.0))


def _aware(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"a schedule needs an aware datetime (with a timezone), got {dt!r}")
    return dt


class schedule(BaseSchedule):
    """Every `run_every` (seconds or a timedelta), on multiples of it since the Unix epoch."""

    def __init__(self, run_every: float | timedelta) -> None:
        seconds = run_every.total_seconds() if isinstance(run_every, timedelta) else float(run_every)
        if not seconds > 0:
            raise ValueError(f"run_every must be positive, got {run_every!r}")
        self.run_every = timedelta(seconds=seconds)
        self.seconds = seconds

    def next_after(self, after: datetime) -> datetime:
        n = int(_aware(after).timestamp() // self.seconds) + 1
        return datetime.fromtimestamp(n * self.seconds, after.tzinfo)

    def __repr__(self) -> str:
        return f"<freq: {self.seconds:g} s>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, schedule) and other.seconds == self.seconds


def _number(token: str, lo: int, hi: int, names: tuple[str, ...]) -> int:
    low = token.lower()
    if low.isdigit():
        value = int(low)
    else:
        matches = [i for i, name in enumerate(names) if len(low) >= 3 and name == low[:3]]
        if not matches:
            raise ValueError(f"{token!r} is not a number from {lo} to {hi}"
                             + (f" or a name ({', '.join(names)})" if names else ""))
        value = matches[0] + lo
    if not lo <= value <= hi:
        raise ValueError(f"{value} is out of range {lo}-{hi}")
    return value


def parse_field(spec: int | str | Iterable[int], lo: int, hi: int,
                names: tuple[str, ...] = ()) -> frozenset[int]:
    """The values a crontab field names, within lo..hi (names count from lo)."""
    if isinstance(spec, numbers.Integral):
        values = {int(spec)}
    elif isinstance(spec, str):
        values = set()
        for part in spec.replace(" ", "").split(","):
            m = _PART.match(part)
            if not m:
                raise ValueError(f"bad crontab field {spec!r}: cannot read {part!r}")
            star, first, last, step = m.groups()
            if star:
                span = list(range(lo, hi + 1))
            else:
                a = _number(first, lo, hi, names)
                b = _number(last, lo, hi, names) if last else a
                span = list(range(a, b + 1)) if a <= b else [*range(a, hi + 1), *range(lo, b + 1)]
            if step is not None and int(step) < 1:
                raise ValueError(f"bad crontab field {spec!r}: step must be at least 1")
            values.update(span[::int(step or 1)])
    else:
        values = set(spec)
    if not values:
        raise ValueError(f"crontab field {spec!r} names no value")
    bad = [v for v in values if not (isinstance(v, numbers.Integral) and lo <= v <= hi)]
    if bad:
        raise ValueError(f"crontab field {spec!r}: {bad} out of range {lo}-{hi}")
    return frozenset(values)


class crontab(BaseSchedule):
    """Fires at the minutes that match every field, on the wall clock of the given timezone."""

    def __init__(self, minute: int | str | Iterable[int] = "*", hour: int | str | Iterable[int] = "*",
                 day_of_week: int | str | Iterable[int] = "*",
                 day_of_month: int | str | Iterable[int] = "*",
                 month_of_year: int | str | Iterable[int] = "*") -> None:
        self._spec = (minute, hour, day_of_month, month_of_year, day_of_week)
        self.minute = sorted(parse_field(minute, 0, 59))
        self.hour = sorted(parse_field(hour, 0, 23))
        self.day_of_week = parse_field(day_of_week, 0, 6, WEEKDAYS)
        self.day_of_month = sorted(parse_field(day_of_month, 1, 31))
        self.month_of_year = sorted(parse_field(month_of_year, 1, 12, MONTHS))
        if not any(d <= calendar.monthrange(2000, m)[1]  # 2000: a leap year, so Feb 29 counts
                   for m in self.month_of_year for d in self.day_of_month):
            raise ValueError(f"{self!r} never fires: no month of month_of_year has those days")

    def next_after(self, after: datetime) -> datetime:
        tz = _aware(after).tzinfo
        t = after.timestamp()
        for year in range(after.year, after.year + SEARCH_YEARS + 1):
            for month in self.month_of_year:
                if (year, month) < (after.year, after.month):
                    continue
                for day in self.day_of_month:
                    if day > calendar.monthrange(year, month)[1]:
                        break
                    date = (year, month, day)
                    if date < (after.year, after.month, after.day) or \
                            (calendar.weekday(*date) + 1) % 7 not in self.day_of_week:
                        continue
                    found = self._first_in_day(date, after, t, tz)
                    if found is not None:
                        return found
        raise ValueError(f"{self!r} does not fire within {SEARCH_YEARS} years of {after}")

    def _first_in_day(self, date: tuple[int, int, int], after: datetime, t: float,
                      tz: tzinfo) -> datetime | None:
        same_day = date == (after.year, after.month, after.day)
        for hour in self.hour:
            if same_day and hour < after.hour:
                continue
            for minute in self.minute:
                at = datetime(*date, hour, minute, tzinfo=tz)
                if at.timestamp() > t and _exists(at):
                    return at
        return None

    def __repr__(self) -> str:
        return "<crontab: {} {} {} {} {} (m/h/dM/MY/d)>".format(*self._spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, crontab) and (
            (other.minute, other.hour, other.day_of_week, other.day_of_month, other.month_of_year)
            == (self.minute, self.hour, self.day_of_week, self.day_of_month, self.month_of_year))


def _exists(at: datetime) -> bool:
    """Whether a wall time happens at all (not inside a daylight-saving gap)."""
    return at.astimezone(timezone.utc).astimezone(at.tzinfo).replace(tzinfo=None) == \
        at.replace(tzinfo=None)


def maybe_schedule(value: float | timedelta | BaseSchedule) -> BaseSchedule:
    """A beat_schedule entry's "schedule" as a schedule: numbers and timedeltas become intervals."""
    if isinstance(value, BaseSchedule):
        return value
    if isinstance(value, (numbers.Real, timedelta)) and not isinstance(value, bool):
        return schedule(value)
    raise TypeError(f"a schedule is seconds, a timedelta, crontab(...) or schedule(...), "
                    f"not {type(value).__name__}")
