"""Remote control, as Celery's: `app.control` and `nbq inspect|control` against real `nbq worker -A tasks`
supervisors, on the standalone ZeroMQ broker and on a private Redis."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest

from conftest import TRANSPORTS, Processes, standalone_broker, wait_until
from test_tasks import PROJECT, Project

HOST = socket.gethostname()
ALPHA, BETA = f"alpha@{HOST}", f"beta@{HOST}"


@pytest.fixture(scope="module", params=TRANSPORTS)
def workers(request, tmp_path_factory):
    """Two named workers (alpha: 2 processes, beta: 1) of the Celery project on one broker;
    only alpha consumes queue solo."""
    procs = Processes(tmp_path_factory.mktemp("procs"))
    proj = Project(procs, standalone_broker(request.param, procs),
                   tmp_path_factory.mktemp("notes") / "notes.txt")
    proj.worker("alpha", "default,solo", 2, "-n", "alpha@%h")
    proj.worker("beta", "default", 1, "-n", "beta@%h")
    proj.app.client.wait_for_workers(3)
    yield proj
    proj.app.close()
    procs.stop_all()


def nbq_cli(proj: Project, *args: str) -> tuple[int, str, str]:
    p = proj.procs.nbq(*args, "--broker", proj.broker, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, cwd=PROJECT)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


def test_ping_reaches_every_worker_or_those_named_and_returns_when_all_answered(workers):
    control = workers.app.control
    t0 = time.monotonic()
    replies = control.ping(timeout=30.0)
    assert time.monotonic() - t0 < 15.0  # the broker said how many to expect: no waiting out the timeout
    assert sorted(replies, key=lambda r: list(r)) == [{ALPHA: {"ok": "pong"}}, {BETA: {"ok": "pong"}}]
    assert control.inspect(destination=[BETA]).ping() == {BETA: {"ok": "pong"}}
    assert control.inspect(destination=["nobody@nowhere"], timeout=0.2).ping() is None
    answer = control.broadcast("no_such_command", reply=True, destination=[ALPHA])
    assert list(answer[0]) == [ALPHA] and "unknown control command" in answer[0][ALPHA]["error"]


def test_inspect_registered_stats_and_active(workers):
    inspect = workers.app.control.inspect(timeout=5.0)
    registered = inspect.registered()
    assert set(registered) == {ALPHA, BETA}
    assert {"tasks.add", "tasks.nap", "tasks.flaky"} <= set(registered[ALPHA])
    stats = inspect.stats()
    assert stats[ALPHA]["pool"]["max-concurrency"] == 2 and len(stats[ALPHA]["pool"]["processes"]) == 2
    assert stats[BETA]["pool"]["max-concurrency"] == 1
    assert inspect.reserved() == {ALPHA: [], BETA: []}
    assert inspect.scheduled() == {ALPHA: [], BETA: []}
    r = workers.tasks.nap.delay(3)
    t0 = time.time()
    # while its process loads the function, a task shows with no name yet
    running = wait_until(lambda: [t for ts in (inspect.active() or {}).values() for t in ts
                                  if t["id"] == r.id and t["name"]],
                         what="the task in `inspect active`")
    (task,) = running
    assert task["name"] == "tasks.nap"
    assert t0 - 1 <= task["time_start"] <= time.time()
    owner = task["hostname"]
    assert task["worker_pid"] in stats[owner]["pool"]["processes"]
    assert r.get(timeout=10) == 3
    wait_until(lambda: not any((inspect.active() or {}).values()), what="no active task")



def test_inspect_scheduled_lists_tasks_held_until_their_eta(workers):
    from datetime import datetime
    inspect = workers.app.control.inspect([ALPHA], timeout=5.0)
    sent = time.time()
    later = workers.tasks.add.apply_async((2, 3), countdown=3, queue="solo")
    (held,) = wait_until(lambda: inspect.scheduled()[ALPHA], what="the task in `inspect scheduled`")
    assert held["request"]["id"] == later.id and held["request"]["name"] == "tasks.add"
    assert held["request"]["worker_pid"] in inspect.stats()[ALPHA]["pool"]["processes"]
    assert abs(datetime.fromisoformat(held["eta"]).timestamp() - (sent + 3)) < 1.0
    assert later.get(timeout=10) == 5
    wait_until(lambda: inspect.scheduled() == {ALPHA: []}, what="nothing scheduled")


def test_cli_inspect_prints_each_worker_as_celery_does(workers):
    rc, out, err = nbq_cli(workers, "inspect", "ping", "-A", "tasks", "-t", "5")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines == [f"->  {ALPHA}: OK", "        pong", f"->  {BETA}: OK", "        pong"]
    rc, out, err = nbq_cli(workers, "inspect", "registered", "-d", BETA, "-t", "5")
    assert rc == 0, err
    assert out.splitlines()[0] == f"->  {BETA}: OK" and '"tasks.add"' in out
    rc, out, err = nbq_cli(workers, "inspect", "ping", "-d", "nobody@nowhere", "-t", "0.3")
    assert rc == 1 and "no worker replied within 0.3 s" in err and "Traceback" not in err


def starts(task, n: int, **options) -> list[float]:
    """Start times of n calls of task sent at once to queue solo (alpha's 2 processes), sorted."""
    results = [task.apply_async(queue="solo", **options) for _ in range(n)]
    return sorted(r.get(timeout=60) for r in results)


def least_span(n: int, every: float, processes: int = 2) -> float:
    """The least time between the first and last of n times starts() returns when the
    worker's processes start the task at most once every `every` s.

    A task reads its clock after the limit let it start, maybe much later on a loaded
    machine, so neighbouring times may be closer than `every`.  But each process runs one
    task at a time: when the earliest time is read, at most `processes` of the n tasks have
    started, so the other n - processes started later, `every` apart, and the last of them
    read its time after its start."""
    return (n - 1 - processes) * every


#: n calls of an unlimited task on two processes end within this many seconds (a hang
#: catcher; far below least_span(NO_LIMIT_N, 0.2), the tightest limit these tests lift)
NO_LIMIT_N, NO_LIMIT_SPAN = 20, 2.0


def test_rate_limit_from_the_task_option_holds_across_the_workers_processes(workers):
    times = starts(workers.tasks.limited, 10)  # rate_limit="600/m": one start per 0.1 s
    # a limit per process (not shared by the worker's two) would start them in about 0.4 s
    assert least_span(10, 0.1) <= times[-1] - times[0] < 5.0, times


def test_rate_limit_from_task_annotations_60_per_minute(workers):
    times = starts(workers.tasks.metered, 10)
    assert least_span(10, 1.0) <= times[-1] - times[0] < 20.0, times


def test_rate_limit_changed_at_run_time_from_the_command_line(workers):
    t = workers.tasks
    times = starts(t.stamp, NO_LIMIT_N)
    assert times[-1] - times[0] < NO_LIMIT_SPAN, times  # no limit: not held at all
    rc, out, err = nbq_cli(workers, "control", "rate_limit", "tasks.stamp", "300/m", "-t", "5")
    assert rc == 0, err
    assert out.splitlines() == [f"->  {ALPHA}: OK", "        new rate limit set successfully",
                                f"->  {BETA}: OK", "        new rate limit set successfully"]
    times = starts(t.stamp, 8)
    assert times[-1] - times[0] >= least_span(8, 0.2), times
    replies = workers.app.control.rate_limit("tasks.stamp", None, reply=True, timeout=5)
    assert {name: r for reply in replies for name, r in reply.items()} == {
        ALPHA: {"ok": "new rate limit set successfully"}, BETA: {"ok": "new rate limit set successfully"}}
    times = starts(t.stamp, NO_LIMIT_N)
    assert times[-1] - times[0] < NO_LIMIT_SPAN, times
    rc, out, err = nbq_cli(workers, "control", "rate_limit", "tasks.stamp", "often")
    assert rc == 1 and "bad rate limit 'often'" in err and "Traceback" not in err


def test_a_new_rate_limit_applies_from_the_next_start(workers):
    """Under 1/h a task runs once; changed to 600/m, the call waiting for its turn starts within
    seconds (about half a second unloaded; not an hour later, as booked under the old rate), and
    so does the next."""
    t = workers.tasks
    t.hourly.apply_async(queue="solo").get(timeout=20)
    waiting = t.hourly.apply_async(queue="solo")
    inspect = workers.app.control.inspect([ALPHA], timeout=5.0)
    wait_until(lambda: any(a["id"] == waiting.id for a in (inspect.active() or {}).get(ALPHA, ())),
               what="the second call held by the 1/h limit")
    with pytest.raises(TimeoutError):
        waiting.get(timeout=0.3)
    changed = time.time()
    assert len(workers.app.control.rate_limit("tasks.hourly", "600/m", reply=True, timeout=5)) == 2
    assert waiting.get(timeout=10) - changed < 8.0  # not the hour booked under the old rate
    sent = time.time()
    assert t.hourly.apply_async(queue="solo").get(timeout=10) - sent < 8.0


def test_a_bad_rate_limit_fails_where_the_task_is_declared():
    import nbq
    app = nbq.App("bad")
    with pytest.raises(ValueError, match="bad rate limit '10/week': write N/s, N/m or N/h"):
        app.task(rate_limit="10/week")(lambda: 1)
    with pytest.raises(ValueError, match="bad rate limit"):
        app.control.rate_limit("tasks.add", "fast")


def alpha_processes(proj: Project) -> set[int]:
    return {p for w in proj.app.client.workers() if w["name"] == ALPHA for p in w["processes"]}


def test_revoke_with_terminate_kills_the_running_task_and_its_process_is_replaced(workers):
    t = workers.tasks
    before = alpha_processes(workers)
    running = t.nap.apply_async((60,), queue="solo")
    wait_until(lambda: any(a["id"] == running.id for a in
                           (workers.app.control.inspect(destination=[ALPHA]).active() or {})
                           .get(ALPHA, ())), what="the task running")
    started = time.monotonic()
    assert running.revoke(terminate=True) is True
    wait_until(lambda: running.state == "REVOKED", what="the terminated task REVOKED")
    assert time.monotonic() - started < 10
    wait_until(lambda: len(alpha_processes(workers) - before) == 1 and
               len(alpha_processes(workers)) == 2, what="a new process in place of the killed one")
    assert t.add.apply_async((1, 2), queue="solo").get(timeout=10) == 3  # alpha keeps serving
    second = t.nap.apply_async((60,), queue="solo")
    wait_until(lambda: second.state == "STARTED", what="the second task started")
    assert workers.app.control.revoke(second.id, terminate=True, signal="SIGKILL") is True
    wait_until(lambda: second.state == "REVOKED", what="the second task REVOKED")
    queued = t.nap.apply_async((1,), queue="nobody")
    assert queued.revoke(terminate=True) is True and queued.state == "REVOKED"
    done = t.add.apply_async((2, 2), queue="solo")
    assert done.get(timeout=10) == 4 and done.revoke(terminate=True) is False


def test_pool_grow_and_shrink_add_and_cancel_consumer_and_shutdown(workers):
    gamma_name = f"gamma@{HOST}"
    gamma = workers.worker("gamma", "default", 1, "-n", "gamma@%h")
    control = workers.app.control
    wait_until(lambda: control.inspect([gamma_name], timeout=0.5).ping(), what="gamma to answer")

    def seen() -> dict:
        """gamma as the broker (or Redis) lists it."""
        return next((w for w in workers.app.client.workers() if w["name"] == gamma_name), {})

    assert control.pool_grow(2, [gamma_name], reply=True, timeout=5) == [
        {gamma_name: {"ok": "pool will grow"}}]
    def grown() -> bool:
        """On Redis a process is listed once it registers, the concurrency at the supervisor's
        next heartbeat (each second): either can come first."""
        w = seen()
        return len(w.get("processes", ())) == 3 and w.get("concurrency") == 3

    wait_until(grown, what="three processes and a concurrency of 3")
    assert control.pool_shrink(1, [gamma_name], reply=True, timeout=5) == [
        {gamma_name: {"ok": "pool will shrink"}}]
    wait_until(lambda: len(seen().get("processes", ())) == 2, what="two processes")
    (reply,) = control.pool_shrink(2, [gamma_name], reply=True, timeout=5)
    assert "keeps at least one" in reply[gamma_name]["error"]

    waiting = workers.tasks.add.apply_async((5, 5), queue="gammaq")
    rc, out, err = nbq_cli(workers, "control", "add_consumer", "gammaq", "-d", gamma_name, "-t", "5")
    assert rc == 0 and out.splitlines() == [f"->  {gamma_name}: OK", "        add consumer gammaq"]
    assert waiting.get(timeout=15) == 10
    assert seen()["queues"] == ["default", "gammaq"]
    assert control.cancel_consumer("gammaq", [gamma_name], reply=True, timeout=5) == [
        {gamma_name: {"ok": "no longer consuming from gammaq"}}]
    wait_until(lambda: seen()["queues"] == ["default"], what="gammaq dropped")

    rc, out, err = nbq_cli(workers, "control", "shutdown", "-d", gamma_name, "-t", "5")
    assert rc == 0 and out.splitlines() == [f"->  {gamma_name}: OK", "        shutting down"]
    assert gamma.wait(timeout=15) == 0
    wait_until(lambda: not seen(), what="gamma gone from the broker's workers")


def test_cli_revoke_and_terminate(workers):
    t = workers.tasks
    queued = t.nap.apply_async((1,), queue="nobody")
    rc, out, err = nbq_cli(workers, "control", "revoke", queued.id)
    assert rc == 0 and out.splitlines() == [f"->  {queued.id}: revoked"], err
    wait_until(lambda: queued.state == "REVOKED", what="the queued task REVOKED")
    running = t.nap.apply_async((60,), queue="solo")
    wait_until(lambda: running.state == "STARTED", what="the task to start")
    rc, out, err = nbq_cli(workers, "control", "revoke", running.id)
    assert rc == 1 and "nbq control terminate SIGTERM ID stops a running one" in err
    rc, out, err = nbq_cli(workers, "control", "terminate", "KILL", running.id)
    assert rc == 0 and out.splitlines() == [f"->  {running.id}: revoked"], err
    wait_until(lambda: running.state == "REVOKED", what="the terminated task REVOKED")
    rc, out, err = nbq_cli(workers, "control", "terminate", "SIGNOPE", running.id)
    assert rc == 1 and "unknown signal 'SIGNOPE'" in err and "Traceback" not in err
