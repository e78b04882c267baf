"""Periodic tasks: crontab parsing and next fire times, and beat's ticks (time passed in, no sleeps).

Beat is driven here with explicit times (Beat.start(now), Beat.tick(now)) over the marks
it keeps in a file and the claims it makes on a real broker (an embedded ZeroMQ one, or
the session's private Redis, never 6379); then as processes,
`nbq beat` and `nbq worker -A beatproj -B` on a 1-second schedule, read through their logs
(each send, with its task id), the task ids their runs note, and results fetched by id.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from unittest.mock import ANY
from zoneinfo import ZoneInfo

import pytest

import nbq
from nbq.client import current_client
from nbq.errors import NbqError
from nbq.tasks.beat import Beat, app_timezone, claim_key, claim_ttl, read_entries
from nbq.tasks.crontab import crontab, maybe_schedule, parse_field, schedule
from conftest import CONFORMANCE, TRANSPORTS, redis_url, start_broker, wait_until

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


# -- beat over explicit time ---------------------------------------------------

class RecordingApp:
    """What beat uses of nbq.App (conf, client, send_task), keeping what was sent; its client
    is a real one, of a real broker, on which beat claims each tick."""

    def __init__(self, client, **conf) -> None:
        self.conf = conf
        self.client = client
        self.sent: list[tuple] = []

    def send_task(self, name, args=(), kwargs=None, **options):
        self.sent.append((name, args, kwargs, options))


T0 = at(2024, 5, 1, 12, 0).timestamp()

EVERY_SECOND = {"tick": {"task": "tasks.add", "schedule": 1.0, "args": (1, 2),
                         "options": {"queue": "lopri"}}}


@contextmanager
def fresh_broker(transport: str):
    """A broker of its own with no workers (no claims yet): an embedded ZeroMQ broker on a
    thread of the test, or a fresh database of the session's private Redis."""
    if transport == "redis":
        yield redis_url()
        return
    if transport == "memory":  # a broker of its own in this process; its clients share it
        yield f"memory://beat-{time.time_ns()}"
        return
    cluster = nbq.Cluster()
    try:
        yield cluster.address
    finally:
        cluster.close()


@pytest.fixture(params=CONFORMANCE)  # claim-once is the contract's: memory:// too
def broker(request):
    with fresh_broker(request.param) as address:
        yield address


@pytest.fixture
def zmq_broker():
    with fresh_broker("zmq") as address:
        yield address


@pytest.fixture
def beat_app(tmp_path):
    """beat_app(address, schedule, marks=name, **conf) -> (app, make): a RecordingApp with a
    client of its own, and make() -> a new Beat of it on the marks file tmp_path/name (a beat
    (re)started on one host); the clients are shut down after the test."""
    clients = []

    def make_app(address, schedule=EVERY_SECOND, marks="marks", **conf):
        client = nbq.Client(address)
        clients.append(client)
        app = RecordingApp(client, broker_url=address, beat_schedule=schedule, **conf)
        return app, lambda: Beat(app, tmp_path / marks)

    yield make_app
    for client in clients:
        client.shutdown(wait=False)


def test_entries_are_sent_by_name_with_args_and_options_once_per_tick(zmq_broker, beat_app):
    app, make = beat_app(zmq_broker)
    beat = make()
    beat.start(T0 + 0.2)
    assert beat.tick(T0 + 0.5) == pytest.approx(0.5)      # nothing due yet: wait for T0+1
    assert app.sent == []
    assert beat.tick(T0 + 1.0) == pytest.approx(1.0)
    assert app.sent == [("tasks.add", (1, 2), {}, {"queue": "lopri", "task_id": ANY})]
    beat.tick(T0 + 1.5)
    beat.tick(T0 + 2.01)
    assert len(app.sent) == 2


def test_a_late_beat_sends_once_not_once_per_missed_tick(zmq_broker, beat_app):
    app, make = beat_app(zmq_broker)
    beat = make()
    beat.start(T0)
    beat.tick(T0 + 5.5)                 # ticks T0+1 .. T0+5 were missed: one send
    assert len(app.sent) == 1
    beat.tick(T0 + 5.9)
    assert len(app.sent) == 1
    beat.tick(T0 + 6.0)
    assert len(app.sent) == 2
    # what it claimed for the late send: the latest tick passed, the one any beat awake claims
    assert not app.client.claim(claim_key("tick", T0 + 5), 60)
    assert app.client.claim(claim_key("tick", T0 + 1), 60)


def test_restart_sends_a_missed_tick_once_and_never_a_tick_twice(broker, beat_app):
    app, make = beat_app(broker)
    first = make()
    first.start(T0)
    first.tick(T0 + 1.0)
    first.tick(T0 + 2.0)
    assert len(app.sent) == 2

    again = make()                        # restarted within the same second: nothing to resend
    again.start(T0 + 2.5)
    again.tick(T0 + 2.5)
    assert len(app.sent) == 2
    again.tick(T0 + 3.0)
    assert len(app.sent) == 3

    late = make()                         # down for ten ticks: one catch-up send, at start
    late.start(T0 + 13.2)
    late.tick(T0 + 13.2)
    assert len(app.sent) == 4
    late.tick(T0 + 13.9)
    assert len(app.sent) == 4
    late.tick(T0 + 14.0)
    assert len(app.sent) == 5


def test_a_new_entry_waits_for_its_first_tick(zmq_broker, beat_app):
    app, make = beat_app(zmq_broker, {"daily": {"task": "t", "schedule": crontab(minute=0, hour=0)}})
    beat = make()
    beat.start(T0)
    assert beat.tick(T0) == 300.0           # capped by beat_max_loop_interval's default
    assert app.sent == []


def test_two_beats_on_one_broker_send_each_tick_once(broker, beat_app):
    apps_and_beats = [beat_app(broker, marks=f"marks{i}") for i in range(2)]
    beats = [make() for _, make in apps_and_beats]
    for b in beats:
        b.start(T0)
    for k in range(1, 21):                 # both wake for every tick, in either order
        order = beats if k % 2 else beats[::-1]
        for b in order:
            b.tick(T0 + k + 0.001 * beats.index(b))
    sent = [s for app, _ in apps_and_beats for s in app.sent]
    assert len(sent) == 20
    assert {len(app.sent) for app, _ in apps_and_beats} == {10}
    assert not apps_and_beats[0][0].client.claim(claim_key("tick", T0 + 20), 60)


def test_crontab_entries_follow_the_app_timezone(zmq_broker, beat_app):
    schedule = {"nine": {"task": "t", "schedule": crontab(minute=0, hour=9)}}
    app, make = beat_app(zmq_broker, schedule, timezone="Asia/Tokyo")
    beat = make()
    nine_tokyo = at(2024, 5, 2, 0, 0).timestamp()      # 09:00 in Tokyo is 00:00 UTC
    beat.start(nine_tokyo - 60)
    beat.tick(nine_tokyo - 0.1)
    assert app.sent == []
    beat.tick(nine_tokyo)
    assert len(app.sent) == 1


def test_app_timezone_follows_celery():
    assert app_timezone({}) == UTC
    assert app_timezone({"timezone": "Europe/Paris"}) == ZoneInfo("Europe/Paris")
    assert app_timezone({"enable_utc": False}).utcoffset(datetime(2024, 1, 1)) is not None
    with pytest.raises(ValueError, match="timezone"):
        app_timezone({"timezone": "Mars/Olympus"})


def test_bad_entries_fail_when_beat_reads_them():
    with pytest.raises(ValueError, match="unknown keys"):
        read_entries({"x": {"task": "t", "schedule": 1, "relative": True}})
    with pytest.raises(ValueError, match="needs schedule"):
        read_entries({"x": {"task": "t"}})
    with pytest.raises(TypeError):
        read_entries({"x": {"task": "t", "schedule": "hourly"}})


def test_a_failing_send_is_logged_and_the_next_entry_still_goes(zmq_broker, tmp_path, caplog):
    class Failing(RecordingApp):
        def send_task(self, name, *a, **kw):
            if name == "bad":
                raise OSError("broker gone")
            return super().send_task(name, *a, **kw)

    with nbq.Client(zmq_broker) as client:
        app = Failing(client, broker_url=zmq_broker, beat_schedule={
            "a": {"task": "bad", "schedule": 1.0}, "b": {"task": "good", "schedule": 1.0}})
        beat = Beat(app, tmp_path / "marks")
        beat.start(T0)
        beat.tick(T0 + 1)
    assert [s[0] for s in app.sent] == ["good"]
    assert "sending a (bad)" in caplog.text and "broker gone" in caplog.text


def test_stop_ends_a_long_wait_at_once(zmq_broker, beat_app):
    app, make = beat_app(zmq_broker, {"hourly": {"task": "t", "schedule": 3600.0}})
    beat = make()
    thread = threading.Thread(target=beat.run)
    thread.start()
    wait_until(lambda: beat.due, what="beat to start")
    beat.stop()
    thread.join(2.0)
    assert not thread.is_alive()


# -- nbq beat and nbq worker as processes ----------------------------------------

PROJECT = '''
import os
import time

import nbq

app = nbq.App("beatproj")
app.conf.beat_schedule = {"stamp": {"task": "beatproj.stamp", "schedule": 1.0}}


@app.task(name="beatproj.stamp", bind=True)
def stamp(self):
    """Notes its task id (one line per run) and returns when it ran."""
    with open(os.environ["BEAT_NOTES"], "a") as f:
        f.write(self.request.id + "\\n")
    return time.time()
'''

SENT = re.compile(r"beat: sending stamp \(beatproj\.stamp\) for tick (\S+): task (\S+)")


class Output:
    """A process's output lines, read on a thread so a test can poll them with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def sends(self) -> list[tuple[float, str]]:
        """(tick, task id) of each send logged so far."""
        return [(datetime.fromisoformat(m[1]).timestamp(), m[2])
                for m in map(SENT.search, list(self.lines)) if m]

    def wait_sends(self, n: int, timeout: float = 10.0) -> list[tuple[float, str]]:
        return wait_until(lambda: len(self.sends()) >= n and self.sends(), timeout,
                          what=f"{n} sends in {''.join(self.lines)}")

    def stop(self) -> list[tuple[float, str]]:
        """Terminate the process (by its handle), read what is left; all its sends."""
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.sends()


def project_env(tmp_path) -> dict:
    """The environment of nbq commands that import the test project (-A beatproj); its tasks
    note their ids in tmp_path/notes (see ran)."""
    (tmp_path / "beatproj.py").write_text(PROJECT)
    here = os.path.dirname(os.path.abspath(__file__))
    return dict(os.environ, BEAT_NOTES=str(tmp_path / "notes"), PYTHONPATH=os.pathsep.join(
        p for p in (str(tmp_path), here, os.environ.get("PYTHONPATH")) if p))


def ran(env) -> list[str]:
    """The task ids of the project's task runs so far, one per run."""
    try:
        with open(env["BEAT_NOTES"]) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


COMMANDS = {"beat": ("beat",), "worker -B": ("worker", "-B", "-c", "1")}


def beat(procs, env, broker: str, *extra: str, command: str = "beat") -> Output:
    """`nbq beat` or `nbq worker -B` (which also runs what it sends) on the test project."""
    return Output(procs.nbq(*COMMANDS[command], "-A", "beatproj", "--broker", broker, "-l", "info",
                            *extra, env=env, cwd=procs.tmp))  # its default marks file: there


def every_second(out: Output, timeout: float = 30.0) -> list[tuple[float, str]]:
    """The sends logged until two came for neighbouring ticks 1 s apart (bounded).

    Beat sends the tick due when it wakes, once: on a loaded machine it may wake a tick late
    and skip one, so the spacing of any two sends may be 2 s or more; but every tick lies on
    the schedule's 1 s grid, each is sent once, and some two are neighbours."""
    def spacings():
        sends = out.sends()
        return sends if 1.0 in [b - a for (a, _), (b, _) in zip(sends, sends[1:])] else None
    sends = wait_until(spacings, timeout, what=f"two ticks 1 s apart in {''.join(out.lines)}")
    ticks = [tick for tick, _ in sends]
    assert all(t == int(t) for t in ticks), ticks  # on the 1 s grid from the epoch
    assert all(b - a >= 1.0 for a, b in zip(ticks, ticks[1:])), ticks  # each tick once, in order
    return sends


def queued(broker: str) -> int:
    """Tasks waiting in the broker's default queue (no worker runs them)."""
    with nbq.Client(broker, timeout=5.0) as client:
        return client.status()["queues"].get("default", 0)


def test_beat_sends_every_second_each_tick_after_it_starts(procs, tmp_path):
    url = redis_url()
    env = project_env(tmp_path)
    started = time.time()
    out = beat(procs, env, url)
    ticks = [tick for tick, _ in every_second(out)]
    assert started < ticks[0] < started + 10
    sends = out.stop()
    assert len(sends) - 1 <= queued(url) <= len(sends)  # a killed beat may log a send it never made


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_beat_processes_on_one_broker_send_each_tick_once(procs, tmp_path, transport):
    url = redis_url() if transport == "redis" else start_broker(procs)
    env = project_env(tmp_path)
    beats = [beat(procs, env, url, "-s", str(tmp_path / f"marks{i}")) for i in range(2)]
    for b in beats:
        wait_until(lambda: any("nbq beat:" in line for line in b.lines), what="beat to start")
    started = time.time()
    wait_until(lambda: len([t for b in beats for t, _ in b.sends() if t > started]) >= 4,
               timeout=10, what="four sends with both beats running")
    ticks = [tick for b in beats for tick, _ in b.stop()]
    assert len(ticks) == len(set(ticks)) >= 4
    assert len(ticks) - 2 <= queued(url) <= len(ticks)  # a killed beat may log a send it never made


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("transport", ["redis", "zmq"])
def test_a_restarted_beat_sends_no_tick_twice(procs, tmp_path, transport, command):
    broker = redis_url() if transport == "redis" else start_broker(procs)
    env = project_env(tmp_path)
    marks = str(tmp_path / "marks")
    first = beat(procs, env, broker, "-s", marks, command=command)
    first.wait_sends(2)
    before = first.stop()
    second = beat(procs, env, broker, "-s", marks, command=command)
    second.wait_sends(2)
    if command == "worker -B":  # what the second sent, the second runs
        wait_until(lambda: {i for _, i in second.sends()} <= set(ran(env)), what="its runs")
    after = second.stop()
    ticks = [tick for tick, _ in before + after]
    assert len(ticks) == len(set(ticks))
    assert min(t for t, _ in after) > max(t for t, _ in before)
    if command == "beat":  # a killed beat may log a send it never made
        assert len(ticks) - 2 <= queued(broker) <= len(ticks)
    else:  # what ran was sent by a beat, logged; each tick had one id (ran by id: a task
        # its stopped worker had not acknowledged may run again, on the next worker)
        assert set(ran(env)) <= {i for _, i in before + after}


@pytest.mark.parametrize("transport", ["redis", "zmq"])
def test_worker_B_runs_each_tick_its_beat_sends_and_results_are_found_by_id(procs, tmp_path,
                                                                              transport):
    broker = redis_url() if transport == "redis" else start_broker(procs)
    env = project_env(tmp_path)
    out = beat(procs, env, broker, "-s", str(tmp_path / "marks"), command="worker -B")
    sends = every_second(out)[:3]
    app = nbq.App("reader", broker=broker)
    try:
        for tick, task_id in sends:  # by the id beat chose and logged, from another client
            assert tick <= app.AsyncResult(task_id).get(timeout=10) < tick + 10
    finally:
        app.close()
    out.stop()
    assert not [line for line in out.lines if "Traceback" in line], "".join(out.lines)


def test_two_workers_with_beat_on_one_redis_run_each_tick_once(procs, tmp_path):
    url = redis_url()
    env = project_env(tmp_path)
    workers = [beat(procs, env, url, command="worker -B") for _ in range(2)]
    for w in workers:
        wait_until(lambda: any("nbq beat:" in line for line in w.lines), what="beat to start")
    started = time.time()
    sent = lambda: [s for w in workers for s in w.sends()]  # noqa: E731
    wait_until(lambda: len([t for t, _ in sent() if t > started]) >= 4, timeout=10,
               what="four sends with both running")
    ids = {i for _, i in sent()}
    wait_until(lambda: ids <= set(ran(env)), what="every task sent to run")
    for w in workers:
        w.stop()
    ticks = [t for t, _ in sent()]
    assert len(ticks) == len(set(ticks)) >= 4            # each tick sent once, by one of them
    assert ids <= set(ran(env)) <= {i for _, i in sent()}  # each send ran; nothing else did


def test_worker_B_needs_an_app(procs):
    p = procs.nbq("worker", "-B", "--broker", redis_url(), "-c", "1")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 1 and "-B needs -A" in out, out


def test_a_forked_process_does_not_take_its_parents_client():
    """worker -B forks worker processes from a process whose beat has a client."""
    with nbq.Client(redis_url()):
        pid = os.fork()
        if pid == 0:  # the child: exit at once, saying whether it was refused the client
            try:
                current_client()
            except NbqError:
                os._exit(0)
            os._exit(1)
        assert os.waitpid(pid, 0)[1] == 0


# -- beats coordinated through the broker's claim-once, over explicit time ----------------

@pytest.mark.parametrize("mark", ["garbage", "", "1e400", -99999999999999999999, 10 ** 18, None,
                                  [1]])
def test_a_garbage_mark_in_the_file_neither_crashes_beat_nor_holds_back_ticks(zmq_broker, beat_app,
                                                                              tmp_path, mark):
    """A mark that is not an integer, lies before the epoch or in the far future counts as
    none: the entry waits for its first tick, and its marks are rewritten."""
    (tmp_path / "marks").write_text(json.dumps({"tick": mark}))
    app, make = beat_app(zmq_broker)
    beat = make()
    beat.start(T0)
    beat.tick(T0 + 1.0)
    beat.tick(T0 + 2.0)
    assert len(app.sent) == 2
    assert json.loads((tmp_path / "marks").read_text()) == {"tick": (T0 + 2.0) * 1000}


def test_a_marks_file_that_is_not_nbqs_is_refused_not_overwritten(zmq_broker, beat_app, tmp_path):
    app, make = beat_app(zmq_broker)
    for text in ("not json", "[1, 2]"):
        (tmp_path / "marks").write_text(text)
        with pytest.raises(ValueError, match="not nbq's JSON"):
            make()
        assert (tmp_path / "marks").read_text() == text


def test_a_mark_ahead_of_the_clock_within_the_skew_is_kept(zmq_broker, beat_app, tmp_path):
    """A mark a few seconds ahead (a clock stepped back a little) still counts: no tick up to
    it is sent again; one further ahead than MARK_SKEW would be garbage (above)."""
    (tmp_path / "marks").write_text(json.dumps({"tick": (T0 + 3.0) * 1000}))
    app, make = beat_app(zmq_broker)
    beat = make()
    beat.start(T0)
    for k in (1, 2, 3):
        beat.tick(T0 + k)
    assert app.sent == []
    beat.tick(T0 + 4)
    assert len(app.sent) == 1


@pytest.mark.parametrize("ahead", [0.4, 30.0])
def test_beats_whose_clocks_disagree_send_each_tick_once(broker, beat_app, ahead):
    """One beat's clock is ahead of the other's (by less than the claim's ttl): each reaches a
    tick at another moment, and the later one finds it claimed."""
    (on_time, a), (fast, b) = [beat_app(broker, marks=f"marks{i}") for i in range(2)]
    beats = a(), b()
    beats[0].start(T0)
    beats[1].start(T0 + ahead)
    for second in range(1, 41):  # real time: the fast beat wakes at its own clock's ticks
        beats[1].tick(T0 + second + ahead)
        beats[0].tick(T0 + second)
    # ticks 1 .. 40 + ahead, each once: the fast beat reaches ticks 1 .. 40 first
    assert len(fast.sent) == 40 and len(on_time.sent) == int(ahead)


def test_a_restarted_beat_does_not_send_again_what_another_sent(broker, beat_app, caplog):
    """B stops while A goes on; B back late claims the latest tick passed (not the first it
    missed), which A sent: no catch-up send."""
    (app_a, make_a), (app_b, make_b) = [beat_app(broker, marks=f"marks{i}") for i in range(2)]
    a, b = make_a(), make_b()
    a.start(T0)
    b.start(T0)
    for k in range(1, 4):
        a.tick(T0 + k)
        b.tick(T0 + k + 0.01)
    for k in range(4, 11):  # B is down
        a.tick(T0 + k)
    b = make_b()
    b.start(T0 + 10.5)
    with caplog.at_level("DEBUG", logger="nbq.beat"):
        b.tick(T0 + 10.5)
    assert app_b.sent == [] and len(app_a.sent) == 10
    assert f"tick for tick {datetime.fromtimestamp(T0 + 10, UTC).isoformat()} was claimed" \
        in caplog.text
    b.tick(T0 + 11.0)
    a.tick(T0 + 11.01)
    assert len(app_a.sent + app_b.sent) == 11


def test_claims_live_twice_the_interval_from_a_minute_up_to_a_year():
    assert claim_ttl(1.0) == 60.0
    assert claim_ttl(3600.0) == 7200.0
    assert claim_ttl(86400.0 * 7) == 86400.0 * 14
    assert claim_ttl(86400.0 * 365 * 4) == 86400.0 * 366
    assert claim_key("add-every-10s", T0 + 10) == f"beat:add-every-10s:{int(T0 * 1000) + 10_000}"


class DownBroker:
    """A broker that can be killed and started again at the same address: an `nbq broker`
    subprocess, or a private redis-server of the test's own (the session's stays up)."""

    def __init__(self, transport: str, procs, tmp_path) -> None:
        self.transport, self.procs = transport, procs
        if transport == "redis":
            from redis_server import RedisServer
            self.redis = RedisServer(tmp_path / "redis")
            self.address = self.redis.url(db=0)
        else:
            self.address = start_broker(procs)

    def kill(self) -> None:
        if self.transport == "redis":
            self.redis.kill()
        else:
            proc = self.procs.procs[-1]
            proc.kill()
            proc.wait()

    def start(self) -> None:
        if self.transport == "redis":
            self.redis.start()
        else:
            start_broker(self.procs, self.address)

    def close(self) -> None:
        if self.transport == "redis":
            self.redis.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_tick_due_while_the_broker_is_down_is_skipped_not_sent_twice(procs, tmp_path, caplog,
                                                                        transport):
    down = DownBroker(transport, procs, tmp_path)
    client = nbq.Client(down.address, broker_grace=1.0)
    try:
        app = RecordingApp(client, broker_url=down.address, beat_schedule=EVERY_SECOND)
        beat = Beat(app, tmp_path / "marks")
        beat.start(T0)
        beat.tick(T0 + 1)
        assert len(app.sent) == 1
        down.kill()
        with caplog.at_level("WARNING", logger="nbq.beat"):
            assert beat.tick(T0 + 2) == pytest.approx(1.0)  # raises nothing: beat goes on
        assert len(app.sent) == 1
        assert "beat: skipped tick (tasks.add) for tick" in caplog.text
        down.start()

        def answers() -> bool:
            try:
                client.status()
            except NbqError:
                return False
            return True

        wait_until(answers, 20, what="the broker back")
        beat.tick(T0 + 3)
        assert len(app.sent) == 2               # the next tick goes; the skipped one never does
        assert not client.claim(claim_key("tick", T0 + 3), 60)
    finally:
        client.shutdown(wait=False)
        down.close()
