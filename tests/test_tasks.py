"""The Celery examples nbq's users come with, ported as they are, against real `nbq worker -A tasks`
processes on a private Redis (and the ZeroMQ broker where said)."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import nbq
from nbq import chain, chord, group
from nbq.exceptions import ChordError, ContentDisallowed, TimeLimitExceeded
from conftest import Processes, redis_url, wait_until

PROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "celery_project")


class Project:
    """The tasks module imported here, its workers started in its directory, as `celery -A tasks worker`."""

    def __init__(self, procs: Processes, broker: str, notes) -> None:
        self.procs, self.broker, self.notes = procs, broker, notes
        if PROJECT not in sys.path:
            sys.path.insert(0, PROJECT)
        self.tasks = importlib.import_module("tasks")
        self.tasks.app.close()
        self.tasks.app.conf.broker_url = broker
        self.app = self.tasks.app
        self.app.set_current()  # what @shared_task tasks are sent through, as in the project itself

    def worker(self, name: str, queues: str = "default,lopri", concurrency: int = 2, *extra: str):
        env = dict(os.environ, PROJ_NOTES=str(self.notes), WORKER_NAME=name,
                   PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(PROJECT),
                                                          os.environ.get("PYTHONPATH")) if p))
        return self.procs.nbq("worker", "-A", "tasks", "--broker", self.broker, "-Q", queues,
                              "-c", str(concurrency), *extra, cwd=PROJECT, env=env)

    def lines(self, prefix: str) -> list[list[str]]:
        if not self.notes.exists():
            return []
        return [line.split() for line in self.notes.read_text().splitlines()
                if line.startswith(prefix + " ")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("procs"))
    proj = Project(procs, redis_url(), tmp_path_factory.mktemp("notes") / "notes.txt")
    proj.worker("main")
    proj.app.client.wait_for_workers(2)
    yield proj
    proj.app.close()
    procs.stop_all()


def test_delay_get_and_states(project):
    t = project.tasks
    res = t.add.delay(4, 4)
    assert res.get(timeout=10) == 8
    assert (res.state, res.ready(), res.successful(), res.result) == ("SUCCESS", True, True, 8)
    assert t.add(2, 2) == 4  # called directly: runs here
    bad = t.boom.delay(1)
    with pytest.raises(ValueError, match="boom 1"):
        bad.get(timeout=10)
    assert bad.state == "FAILURE" and bad.failed()
    assert isinstance(bad.get(propagate=False), ValueError)
    assert "boom 1" in bad.traceback
    again = project.app.AsyncResult(res.id)  # by id, as Celery's app.AsyncResult
    assert again.get(timeout=10) == 8


def test_a_celery_project_with_celery_replaced_by_nbq_in_its_imports(project, caplog, tmp_path):
    """reports.py and celeryconfig.py import from Celery's module paths under nbq: shared tasks,
    states, results, exceptions and schedules work as they do under Celery."""
    import reports
    from nbq import shared_task, states
    from nbq.exceptions import (MaxRetriesExceededError, Retry, SoftTimeLimitExceeded,
                                TaskRevokedError, TimeoutError, WorkerLostError)
    from nbq.result import AsyncResult, GroupResult
    from nbq.schedules import crontab, schedule
    from nbq.tasks.beat import Beat
    t = project.tasks
    assert (shared_task, crontab, schedule, WorkerLostError) == \
        (nbq.shared_task, nbq.tasks.crontab, nbq.tasks.schedule, nbq.WorkerLost)
    assert issubclass(Retry, Exception) and issubclass(MaxRetriesExceededError, nbq.NbqError)
    assert issubclass(SoftTimeLimitExceeded, nbq.NbqError) and nbq.Celery is nbq.App
    # a shared task is every app's, found by name on the worker that imported it (CELERY_IMPORTS)
    assert project.app.tasks["reports.gives_up"] is reports.gives_up
    assert reports.gives_up.delay().get(timeout=20) == "gave up after 1 retry"
    with caplog.at_level("WARNING", logger="reports"):
        assert reports.gives_up() == "gave up after 0 retry"  # called directly: no retry here
    assert [r.getMessage() for r in caplog.records if r.name == "reports"] == \
        ["giving up after 0 retry"]
    assert project.app.send_task("reports.gives_up").get(timeout=20) == "gave up after 1 retry"
    done = t.add.delay(1, 2)
    assert isinstance(done, AsyncResult) and done.get(timeout=10) == 3
    # AsyncResult(task_id) in a task on the worker, with no client of its own: the app's
    assert reports.state_of.delay(done.id).get(timeout=10) == (states.SUCCESS, True)
    assert AsyncResult(done.id).state == states.SUCCESS and states.SUCCESS in states.READY_STATES
    assert isinstance(group(t.add.s(i, i) for i in range(3))(), GroupResult)
    with pytest.raises(TimeoutError):
        t.nap.delay(1).get(timeout=0.1)
    queued = t.record.apply_async(("never",), queue="nobody")
    assert queued.revoke() is True and queued.state == states.REVOKED
    with pytest.raises(TaskRevokedError):
        queued.get(timeout=10)
    assert isinstance(queued.get(timeout=10, propagate=False), TaskRevokedError)
    # the config's crontab (from nbq.schedules) drives a beat: its tick runs the shared task
    entry = project.app.conf.beat_schedule["nightly-report"]
    assert isinstance(entry["schedule"], crontab)
    beat = Beat(project.app, tmp_path / "marks")
    beat.start(time.time())
    beat.tick(beat.due["nightly-report"])  # 03:00 UTC: the tick is sent now
    wait_until(lambda: project.lines("nightly"), 20, what="the nightly report run by the worker")


def test_send_task_from_a_host_without_the_code(project, tmp_path):
    """Host A has no tasks module, only the broker URL; host B is the worker."""
    script = textwrap.dedent(f"""
        import nbq
        app = nbq.App("client", broker={project.broker!r})
        print(app.send_task("tasks.add", [1, 2]).get(timeout=10))
        try:
            app.send_task("tasks.nope", [1]).get(timeout=10)
        except Exception as e:
            print(type(e).__name__, e)
        app.close()
    """)
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first == "3"
    assert second.startswith("NotRegistered") and "'tasks.nope'" in second and "-A" in second


def test_countdown_on_another_queue_runs_no_earlier(project):
    sent = time.time()
    res = project.tasks.where.apply_async(queue="lopri", countdown=2)
    name, ran = res.get(timeout=20)
    assert name == "main"
    assert 2.0 <= ran - sent < 10.0


def test_task_routes_from_celeryconfig(project):
    assert project.app.conf.task_routes["tasks.where"] == {"queue": "routed"}
    assert project.app.route("tasks.slow", (), {}, {}) == "lopri"  # a glob pattern
    project.worker("routed", "routed", 1)
    name, _ = project.tasks.where.delay().get(timeout=20)
    assert name == "routed"
    assert project.tasks.where.apply_async(queue="default").get(timeout=10)[0] == "main"


def test_group_chain_chord_starmap_chunks_as_the_tutorials_write_them(project):
    t = project.tasks
    assert group(t.add.s(i, i) for i in range(10))().get(timeout=20) == [i + i for i in range(10)]
    assert chain(t.add.s(4, 4) | t.mul.s(8))().get(timeout=20) == 64
    assert (t.add.s(4, 4) | t.mul.s(8) | t.add.s(1))().get(timeout=20) == 65
    assert chord([t.add.s(i, i) for i in range(10)])(t.xsum.s()).get(timeout=20) == 90
    assert chord([t.add.s(i, i) for i in range(10)])(t.add.s([20])).get(timeout=20) == \
        [i + i for i in range(10)] + [20]
    assert ~t.add.starmap(zip(range(100), range(100))) == [i + i for i in range(100)]
    assert ~t.xsum.map([[1, 2], [3, 4]]) == [3, 7]  # one argument per call
    parts = t.add.chunks(zip(range(100), range(100)), 10)().get(timeout=20)
    assert parts == [[i + i for i in range(k, k + 10)] for k in range(0, 100, 10)]
    assert t.add.chunks(zip(range(4), range(4)), 2).group()().get(timeout=20) == [[0, 2], [4, 6]]


def test_a_failure_stops_a_chain_and_reaches_link_error(project):
    t = project.tasks
    res = (t.add.s(1, 1) | t.boom.s() | t.record.s()).apply_async(link_error=t.on_error.s())
    with pytest.raises(ValueError, match="boom 2"):
        res.get(timeout=20)  # the last step fails with the error that stopped the chain
    assert isinstance(res.parent.get(timeout=10, propagate=False), ValueError)
    assert res.parent.state == "FAILURE" and res.parent.parent.get(timeout=10) == 2
    assert not project.lines("record")
    boom = t.boom.apply_async((5,), link_error=t.on_error.s())
    with pytest.raises(ValueError):
        boom.get(timeout=10)
    wait_until(lambda: any(ln[1] == boom.id for ln in project.lines("on_error")), 10,
               what="the error callback")
    assert ["on_error", boom.id, "ValueError"] in project.lines("on_error")


def test_link_gets_the_result(project):
    t = project.tasks
    t.add.apply_async((2, 3), link=t.record.s(key="linked")).get(timeout=10)
    wait_until(lambda: project.lines("linked"), 10, what="the link callback")
    assert project.lines("linked") == [["linked", "5"]]


def test_a_chord_body_runs_once_when_a_header_worker_dies(project):
    t = project.tasks
    header = [t.dies_once.s("chord", 100)] + [t.add.s(i, i) for i in range(5)]
    res = chord(header)(t.record.s(key="body"))
    assert res.get(timeout=60) == [100, 0, 2, 4, 6, 8]
    assert len(project.lines("body")) == 1
    failing = chord([t.add.s(1, 1), t.boom.s(3)])(t.record.s(key="never"))
    with pytest.raises(ChordError, match="boom 3"):
        failing.get(timeout=20)
    assert not project.lines("never")


def test_retries_with_countdown_and_backoff(project):
    t = project.tasks
    assert t.flaky.delay("a", 2).get(timeout=20) == 2
    runs = project.lines("flaky")
    assert [int(r[3]) for r in runs if r[1] == "a"] == [0, 1, 2]
    assert len({r[2] for r in runs if r[1] == "a"}) == 1  # one task id throughout
    res = t.always_fails.delay("b")
    with pytest.raises(OSError, match="b never works"):
        res.get(timeout=20)
    times = [float(r[2]) for r in project.lines("always_fails") if r[1] == "b"]
    assert len(times) == 3  # the first run and max_retries=2 retries
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2  # backoff doubles


def test_soft_and_hard_time_limits(project):
    t = project.tasks
    assert t.slow_but_careful.delay(5).get(timeout=10) == "cleaned up"
    # the call's limit replaces the task's 0.5 s
    assert t.slow_but_careful.apply_async((0.8,), soft_time_limit=10).get(timeout=10) == "finished"
    before = {p for w in project.app.client.workers() for p in w["processes"]}
    started = time.monotonic()
    res = t.slow.apply_async((30, "hard"), queue="default")
    with pytest.raises(TimeLimitExceeded, match="ran past its time limit of 0.5 s: its worker "
                                                "process .* was killed and replaced"):
        res.get(timeout=20)
    assert time.monotonic() - started < 15  # killed at its limit, not when the sleep ended
    assert res.state == "FAILURE"
    wait_until(lambda: len({p for w in project.app.client.workers() for p in w["processes"]}
                           - before) == 1, what="a new process in place of the killed one")
    after = {p for w in project.app.client.workers() for p in w["processes"]}
    assert len(before - after) == 1 and len(after) == len(before)
    assert t.add.delay(1, 1).get(timeout=10) == 2  # the workers keep serving
    assert project.lines("slow") == [["slow", "hard"]]  # ran once: not re-run after the kill


def test_revoke_before_start_and_expires(project):
    t = project.tasks
    queued = t.record.apply_async(("revoked",), queue="nobody")
    assert queued.revoke() is True
    assert queued.state == "REVOKED"
    expiring = t.record.apply_async(("expired",), queue="later", expires=0.3)
    time.sleep(0.4)  # the point of the test: time passes beyond the expiry before a worker exists
    project.worker("later", "later", 1)
    wait_until(lambda: expiring.state == "REVOKED", 20, what="the expired task revoked")
    assert not project.lines("record") or all(ln[1] != "'expired'" for ln in project.lines("record"))


def test_a_task_defined_in_a_notebook_runs_on_a_worker_that_never_saw_it(project):
    namespace = {"__name__": "__main__", "app": project.app}
    exec(textwrap.dedent("""
        @app.task
        def cube(x):
            return x ** 3
    """), namespace)
    cube = namespace["cube"]
    assert cube.name == "tasks.cube"
    assert cube.delay(3).get(timeout=10) == 27
    assert group(cube.s(i) for i in range(4))().get(timeout=10) == [0, 1, 8, 27]


def test_json_tasks_and_a_worker_that_refuses_pickle(project, tmp_path):
    t = project.tasks
    assert t.add.apply_async(([1], [2]), serializer="json").get(timeout=10) == [1, 2]
    assert t.add.apply_async(((1,), (2,)), serializer="msgpack").get(timeout=10) == [1, 2]
    with pytest.raises(nbq.SerializationError, match="json"):
        t.add.apply_async((object(), 1), serializer="json")
    (tmp_path / "jsononly.py").write_text(textwrap.dedent("""
        from nbq import App
        app = App("jsononly", accept_content=["json"])
        @app.task(name="tasks.add")
        def add(x, y):
            return x + y
    """))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(PROJECT))
    project.procs.nbq("worker", "-A", "jsononly", "--broker", project.broker, "-Q", "json", "-c", "1",
                      cwd=tmp_path, env=env)
    assert t.add.apply_async((1, 2), queue="json", serializer="json").get(timeout=20) == 3
    with pytest.raises(ContentDisallowed, match="accepts json only"):
        t.add.apply_async((1, 2), queue="json").get(timeout=10)


def test_an_unpicklable_argument_is_named_in_the_caller():
    """As Client.submit: the task's own argument and name, not its runner's (body, request)."""
    app = nbq.App("unpicklable", broker="memory://unpicklable")

    @app.task
    def second(x, y):
        return y

    try:
        with pytest.raises(nbq.SerializationError,
                           match=r"^argument 1 \(lock\) of test_tasks\.second could not be pickled"):
            second.delay(1, threading.Lock())
        with pytest.raises(nbq.SerializationError, match=r"keyword argument 'y' \(lock\) of"):
            second.apply_async((1,), {"y": threading.Lock()})
    finally:
        app.close()


def test_app_conf_and_config_from_object():
    app = nbq.App("proj", broker="redis://:secret@127.0.0.1:6390/2", task_serializer="json")
    app.conf.update(CELERY_TASK_RESULT_EXPIRES=3600, task_routes={"a.*": "q"})
    assert (app.conf.broker_url, app.conf.task_serializer, app.conf.result_expires) == \
        ("redis://:secret@127.0.0.1:6390/2", "json", 3600)
    assert app.conf.CELERY_TASK_RESULT_EXPIRES == 3600
    app.config_from_object({"BROKER_URL": "redis://127.0.0.1:1/0", "CELERYD_CONCURRENCY": 4})
    assert (app.conf.broker_url, app.conf.worker_concurrency) == ("redis://127.0.0.1:1/0", 4)

    class Config:
        task_annotations = {"proj.*": {"rate_limit": "10/m"}}
    app.config_from_object(Config)

    @app.task(name="proj.f")
    def f():
        return 1
    app.annotate()
    assert f.rate_limit == "10/m" and app.route("a.b", (), {}, {}) == "q"
    with pytest.raises(TypeError, match="unknown option"):
        app.task(retries=3)(lambda: 1)


def check_retry_state(proj) -> None:
    """A task waiting for its retry reads RETRY for its submitter, for a client that watched it
    before and for one that asks after; STARTED when it runs again; then SUCCESS.  A task that
    never retries never reads RETRY."""
    t = proj.tasks
    early, late = nbq.Client(proj.broker), nbq.Client(proj.broker)
    try:
        res = t.patient.delay(1, 2.0, 0.6)
        watched = nbq.AsyncResult(res.id, client=early)
        wait_until(lambda: res.state == nbq.RETRY, what="the submitter to see RETRY")
        wait_until(lambda: watched.state == nbq.RETRY, what="a watcher to see RETRY")
        asked = nbq.AsyncResult(res.id, client=late)  # after the notice: from the broker's state
        assert asked.state == nbq.RETRY and not asked.ready() and asked.result is None
        assert res.state == nbq.RETRY and not res.ready()  # still waiting for its countdown
        for r in (res, watched, asked):
            wait_until(lambda: r.state == nbq.STARTED, what="the retry to run", timeout=10)
        assert res.get(timeout=10) == 1
        for r in (watched, asked):
            assert r.get(timeout=10) == 1 and r.state == nbq.SUCCESS
        assert res.state == nbq.SUCCESS
        plain = t.patient.delay(0, 0, 0.3)
        seen = set()
        while not plain.ready():
            seen.add(plain.state)
            time.sleep(0.01)
        assert plain.get(timeout=10) == 0 and nbq.RETRY not in seen and plain.state == nbq.SUCCESS
        assert nbq.AsyncResult(plain.id, client=late).state == nbq.SUCCESS
    finally:
        early.shutdown()
        late.shutdown()


def check_retry_lost(proj) -> None:
    """A task whose process dies while it waits for its retry runs again from the start
    elsewhere: it reads STARTED again, not RETRY, then SUCCESS."""
    t = proj.tasks
    res = t.retries_once.delay(1.5)
    wait_until(lambda: res.state == nbq.RETRY, what="the task to wait for its retry")
    pid = int(proj.lines("retries_once")[-1][2])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: res.state == nbq.STARTED, timeout=15, what="the task to run again")
    assert res.get(timeout=15) == 0 and res.state == nbq.SUCCESS
    assert [line[1] for line in proj.lines("retries_once")] == [res.id, res.id]
    proj.app.client.wait_for_workers(2)


def test_a_task_waiting_for_its_retry_reads_retry(project):
    check_retry_state(project)
    check_retry_lost(project)


def test_on_the_zeromq_broker_too(procs, tmp_path):
    from conftest import start_broker
    address = start_broker(procs)
    proj = Project(procs, address, tmp_path / "notes.txt")
    try:
        proj.worker("zmq")
        proj.app.client.wait_for_workers(2)
        t = proj.tasks
        assert t.add.delay(4, 4).get(timeout=10) == 8
        assert chain(t.add.s(4, 4) | t.mul.s(8))().get(timeout=10) == 64
        assert chord([t.add.s(i, i) for i in range(10)])(t.xsum.s()).get(timeout=10) == 90
        assert t.flaky.delay("z", 1).get(timeout=10) == 1
        with pytest.raises(TimeLimitExceeded, match="killed and replaced"):
            t.slow.apply_async((5, "zmq"), queue="default").get(timeout=10)
        assert proj.lines("slow") == [["slow", "zmq"]]
        proj.app.client.wait_for_workers(2)
        assert t.add.delay(4, 4).get(timeout=10) == 8
    finally:
        proj.app.close()


def test_retry_state_on_the_zeromq_broker(procs, tmp_path):
    from conftest import start_broker
    proj = Project(procs, start_broker(procs), tmp_path / "notes.txt")
    try:
        proj.worker("zmq")
        proj.app.client.wait_for_workers(2)
        check_retry_state(proj)
        check_retry_lost(proj)
    finally:
        proj.app.close()


def test_an_app_without_a_broker_starts_its_own_as_a_notebook_would():
    app = nbq.App("notebook")
    try:
        @app.task
        def double(x):
            return 2 * x

        assert double.name == "test_tasks.double"
        assert (double.s(1) | double.s() | double.s())().get(timeout=20) == 8
        assert ~double.map([1, 2, 3]) == [2, 4, 6]
    finally:
        app.close()


@pytest.mark.parametrize("how", ["memory", "eager"])
def test_in_this_process_on_memory_too(tmp_path, how):
    """The project's tasks with no worker process: on memory:// worker threads, and eager
    (task_always_eager: in the caller's thread).  What needs a process (time limits, a worker
    killed) is refused there (test_memory.py)."""
    proj = Project(None, "memory://tasks", tmp_path / "notes.txt")
    t = proj.tasks
    notes, t.NOTES = t.NOTES, str(proj.notes)  # the tasks run here: their notes go where lines() reads
    proj.app.conf.task_always_eager = how == "eager"
    try:
        res = t.add.delay(4, 4)
        assert res.get(timeout=10) == 8 and (res.state, res.successful()) == ("SUCCESS", True)
        with pytest.raises(ValueError, match="boom 1"):
            t.boom.delay(1).get(timeout=10)
        assert proj.app.AsyncResult(res.id).get(timeout=10) == 8
        assert group(t.add.s(i, i) for i in range(10))().get(timeout=20) == [i + i for i in range(10)]
        assert (t.add.s(4, 4) | t.mul.s(8) | t.add.s(1))().get(timeout=20) == 65
        assert chord([t.add.s(i, i) for i in range(10)])(t.xsum.s()).get(timeout=20) == 90
        assert ~t.add.starmap(zip(range(100), range(100))) == [i + i for i in range(100)]
        parts = t.add.chunks(zip(range(20), range(20)), 10)().get(timeout=20)
        assert parts == [[i + i for i in range(k, k + 10)] for k in range(0, 20, 10)]
        assert t.flaky.delay("m", 2).get(timeout=20) == 2
        assert [int(r[3]) for r in proj.lines("flaky") if r[1] == "m"] == [0, 1, 2]
        with pytest.raises(ValueError, match="boom 2"):
            (t.add.s(1, 1) | t.boom.s() | t.record.s())().get(timeout=20)
        assert not proj.lines("record")
        boom = t.boom.apply_async((5,), link_error=t.on_error.s())
        with pytest.raises(ValueError):
            boom.get(timeout=10)
        wait_until(lambda: ["on_error", boom.id, "ValueError"] in proj.lines("on_error"), 10,
                   what="the error callback")
    finally:
        t.NOTES = notes
        proj.app.conf.task_always_eager = False
        proj.app.close()
