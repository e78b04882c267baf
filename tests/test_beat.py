"""Periodic tasks: crontab parsing and next fire times."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from nbq.tasks.crontab import crontab, maybe_schedule, parse_field, schedule

UTC = timezone.utc
NY = ZoneInfo("America/New_York")


def at(*fields, tz=UTC) -> datetime:
    return datetime(*fields, tzinfo=tz)


# -- crontab fields ------------------------------------------------------------

@pytest.mark.parametrize("spec, lo, hi, expected", [
    ("*", 0, 6, set(range(7))),
    ("*/15", 0, 59, {0, 15, 30, 45}),
    ("*/3", 1, 31, set(range(1, 32, 3))),           # 1-based fields step from 1
    ("1,2,3", 0, 59, {1, 2, 3}),
    ("1-5", 0, 23, {1, 2, 3, 4, 5}),
    ("0,8-17/2", 0, 23, {0, 8, 10, 12, 14, 16}),
    ("22-2", 0, 23, {22, 23, 0, 1, 2}),              # a range wraps around
    (7, 0, 59, {7}),
    ([1, 13], 0, 59, {1, 13}),
])
def test_field_syntax(spec, lo, hi, expected):
    assert parse_field(spec, lo, hi) == expected


def test_weekday_and_month_names():
    assert crontab(day_of_week="mon-fri").day_of_week == {1, 2, 3, 4, 5}
    assert crontab(day_of_week="fri-mon").day_of_week == {5, 6, 0, 1}
    assert crontab(day_of_week="sunday,Sat").day_of_week == {0, 6}
    assert crontab(month_of_year="jan").month_of_year == [1]
    assert crontab(month_of_year="oct-feb").month_of_year == [1, 2, 10, 11, 12]
    assert crontab(month_of_year="*/3").month_of_year == [1, 4, 7, 10]


@pytest.mark.parametrize("kwargs", [
    {"minute": "60"}, {"hour": "24"}, {"minute": "*/0"}, {"minute": "5-"}, {"minute": ""},
    {"minute": "1,,2"}, {"minute": "ten"}, {"day_of_week": "7"}, {"day_of_week": "jan"},
    {"month_of_year": "mon"}, {"day_of_month": 0}, {"month_of_year": [13]}, {"minute": []},
    {"day_of_month": "30,31", "month_of_year": "feb"},   # never fires
])
def test_bad_fields_fail_where_declared(kwargs):
    with pytest.raises(ValueError):
        crontab(**kwargs)


# -- crontab next fire times ---------------------------------------------------

@pytest.mark.parametrize("cron, after, expected", [
    (crontab(), at(2024, 5, 1, 10, 0), at(2024, 5, 1, 10, 1)),          # strictly after
    (crontab(), at(2024, 5, 1, 10, 0, 30), at(2024, 5, 1, 10, 1)),
    (crontab(minute="*/15"), at(2024, 5, 1, 10, 15), at(2024, 5, 1, 10, 30)),
    (crontab(minute="*/15"), at(2024, 5, 1, 23, 50), at(2024, 5, 2, 0, 0)),
    (crontab(minute=0, hour=0), at(2024, 1, 31, 12), at(2024, 2, 1)),   # month end
    (crontab(minute=0, hour=0), at(2024, 2, 28, 12), at(2024, 2, 29)),  # leap day
    (crontab(minute=0, hour=0), at(2023, 2, 28, 12), at(2023, 3, 1)),
    (crontab(minute=59, hour=23), at(2024, 12, 31, 23, 59), at(2025, 1, 1, 23, 59)),  # year end
    (crontab(minute=0, hour=0, day_of_month=31), at(2024, 4, 1), at(2024, 5, 31)),  # skips April
    (crontab(minute=0, hour=9, day_of_week="mon-fri"), at(2024, 5, 3, 9, 0), at(2024, 5, 6, 9)),
    (crontab(minute=0, hour=9, day_of_week="sat"), at(2024, 5, 1), at(2024, 5, 4, 9)),
    (crontab(minute=0, hour=9, day_of_week=0), at(2024, 5, 1), at(2024, 5, 5, 9)),   # 0 = Sunday
    # first Monday of the month: day_of_month AND day_of_week (Celery's rule, not cron's OR)
    (crontab(minute=0, hour=0, day_of_week="mon", day_of_month="1-7"), at(2024, 5, 7),
     at(2024, 6, 3)),
    (crontab(minute=0, hour=0, day_of_month=1, month_of_year="jan"), at(2024, 6, 1),
     at(2025, 1, 1)),
    (crontab(minute=0, hour=0, day_of_month=29, month_of_year="feb", day_of_week="mon"),
     at(2024, 3, 1), at(2044, 2, 29)),
])
def test_next_after(cron, after, expected):
    assert cron.next_after(after) == expected


def test_next_after_keeps_the_timezone_and_reads_its_wall_clock():
    got = crontab(minute=0, hour=9).next_after(at(2024, 5, 1, 12, tz=ZoneInfo("Europe/Paris")))
    assert got == at(2024, 5, 2, 9, tz=ZoneInfo("Europe/Paris"))
    assert got.utcoffset() == timedelta(hours=2)


def test_daylight_saving_gap_is_skipped_and_repeated_hour_fires_once():
    # 2024-03-10 02:30 does not exist in New York; 2024-11-03 01:30 happens twice
    assert crontab(minute=30, hour=2).next_after(at(2024, 3, 10, tz=NY)) == at(2024, 3, 11, 2, 30, tz=NY)
    first = crontab(minute=30, hour=1).next_after(at(2024, 11, 3, tz=NY))
    assert first.astimezone(UTC) == at(2024, 11, 3, 5, 30)
    again = crontab(minute=30, hour=1).next_after(first.astimezone(UTC).astimezone(NY))
    assert again.astimezone(UTC) == at(2024, 11, 4, 6, 30)


def test_naive_datetime_is_refused():
    with pytest.raises(ValueError, match="aware"):
        crontab().next_after(datetime(2024, 1, 1))


def test_is_due_is_celerys_pair():
    cron = crontab(minute=5)
    assert cron.is_due(at(2024, 1, 1, 0, 0), at(2024, 1, 1, 0, 6)) == (True, 59 * 60)
    assert cron.is_due(at(2024, 1, 1, 0, 0), at(2024, 1, 1, 0, 4)) == (False, 60)


# -- intervals -----------------------------------------------------------------

def test_interval_ticks_lie_on_a_grid_from_the_epoch():
    assert schedule(10).next_after(at(2024, 1, 1, 0, 0, 3)) == at(2024, 1, 1, 0, 0, 10)
    assert schedule(10).next_after(at(2024, 1, 1, 0, 0, 10)) == at(2024, 1, 1, 0, 0, 20)
    assert schedule(timedelta(hours=1)).next_after(at(2024, 1, 1, 5, 59)) == at(2024, 1, 1, 6)
    assert maybe_schedule(2.5) == schedule(timedelta(seconds=2.5))
    assert maybe_schedule(timedelta(minutes=1)).seconds == 60
    with pytest.raises(ValueError):
        schedule(0)
    with pytest.raises(TypeError):
        maybe_schedule("every minute")
