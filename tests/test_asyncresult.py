"""nbq.AsyncResult: a task found by id from another client, on every transport."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import CancelledError
from contextlib import contextmanager

import pytest

import nbq
from conftest import TRANSPORTS, held_until, wait_until

pytestmark = pytest.mark.conformance  # every transport, memory:// too (conftest.py)


@pytest.fixture
def other(shared_client):
    """A second client on the same broker, with no workers of its own."""
    c = nbq.Client(shared_client.address)
    yield c
    c.shutdown()


def test_result_by_id_from_another_client(shared_client, other):
    fut = shared_client.submit(pow, 2, 8)
    res = nbq.AsyncResult(fut.id, client=other)
    assert res.get(timeout=10) == 256
    assert res.id == fut.id and res.ready() and res.successful() and not res.failed()
    assert res.state == nbq.SUCCESS and res.result == 256 and res.traceback is None
    assert nbq.AsyncResult(fut.id, client=other).get(timeout=10) == 256  # stored: asked again


def test_a_finished_task_found_by_id_reads_finished_at_once(shared_client, other):
    """The stored result comes just behind the broker's answer: the new AsyncResult is
    SUCCESS as soon as it exists, never PENDING for a moment."""
    futs = [shared_client.submit(int, i) for i in range(50)]
    shared_client.gather(futs, timeout=20)
    states = [nbq.AsyncResult(f.id, client=other).state for f in futs]
    assert states == [nbq.SUCCESS] * len(futs)


def test_failure_by_id_carries_type_and_traceback(shared_client, other):
    def boom():
        raise ValueError("nope")
    fut = shared_client.submit(boom)
    with pytest.raises(ValueError):
        fut.result(timeout=10)
    res = nbq.AsyncResult(fut.id, client=other)
    with pytest.raises(ValueError, match="nope"):
        res.get(timeout=10)
    assert res.failed() and res.state == nbq.FAILURE
    assert isinstance(res.get(timeout=10, propagate=False), ValueError)
    assert isinstance(res.result, ValueError) and "in boom" in res.traceback


def test_celerys_other_names_for_id_result_and_state(shared_client, other):
    """res.task_id, res.info and res.status, as Celery projects read them."""
    def boom():
        raise ValueError("nope")
    good = nbq.AsyncResult(shared_client.submit(pow, 2, 8).id, client=other)
    bad = nbq.AsyncResult(shared_client.submit(boom).id, client=other)
    assert good.get(timeout=10) == 256 and good.task_id == good.id
    assert (good.info, good.status) == (256, nbq.SUCCESS)
    assert isinstance(bad.get(timeout=10, propagate=False), ValueError)
    assert isinstance(bad.info, ValueError) and bad.status == nbq.FAILURE


def _held(gate: str) -> None:
    """Runs until the test creates gate (30 s at most)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)


def test_running_task_seen_started_then_done(shared_client, other, tmp_path):
    gate = tmp_path / "gate"
    fut = shared_client.submit(_held, str(gate))
    wait_until(lambda: fut.state == nbq.STARTED, what="the task to start")
    res = nbq.AsyncResult(fut.id, client=other)
    assert res.state == nbq.STARTED and not res.ready()
    gate.touch()
    assert res.get(timeout=10) is None and res.successful()


class Alarm(Exception):
    """What the SIGALRM handler below raises."""


@contextmanager
def alarm_raising(seconds: float):
    """SIGALRM makes its handler raise Alarm in the main thread after seconds; pytest-timeout's
    own alarm is put back after."""
    def ring(signum, frame):
        raise Alarm("the alarm rang")

    previous = signal.signal(signal.SIGALRM, ring)
    left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    set_at = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if left:
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - set_at), 0.001))


def test_get_without_propagate_is_interrupted_by_ctrl_c_and_signal_handlers(shared_client, other,
                                                                           tmp_path):
    """get(propagate=False) returns the task's own failure, never what interrupts the wait: a
    Ctrl-C or a signal handler's exception is raised, as in Celery, and the task goes on."""
    gate = tmp_path / "gate"
    fut = shared_client.submit(held_until(gate))
    res = nbq.AsyncResult(fut.id, client=other)
    try:
        with pytest.raises(KeyboardInterrupt):
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # as in a terminal
            res.get(propagate=False)
        with alarm_raising(0.2), pytest.raises(Alarm):
            res.get(timeout=30, propagate=False)
        assert not res.ready()  # both came while the task ran: neither waited for its end
    finally:
        gate.touch()
    assert res.get(timeout=30, propagate=False) is None and res.successful()


def test_unknown_id_is_pending(other):
    res = nbq.AsyncResult("no-such-task", client=other)
    assert res.state == nbq.PENDING and not res.ready() and res.result is None
    with pytest.raises(TimeoutError):
        res.get(timeout=0.2)


def test_revoke_from_another_client(transport, procs, tmp_path):
    from conftest import make_client
    c = make_client(transport, procs, workers=1)
    try:
        blocker = c.submit(time.sleep, 0.8)
        wait_until(lambda: blocker.state == nbq.STARTED, what="the blocker to start")
        marker = tmp_path / "ran"
        queued = c.submit(lambda: marker.write_text("ran"))
        with nbq.Client(c.address) as other:
            res = nbq.AsyncResult(queued.id, client=other)
            assert res.revoke() is True
            assert res.state == nbq.REVOKED and res.ready()
        blocker.result(timeout=10)
        assert c.submit(abs, -1).result(timeout=10) == 1
        assert not marker.exists()
        assert nbq.AsyncResult(blocker.id, client=c).revoke(terminate=True) is False  # done
    finally:
        c.shutdown(wait=False)


@pytest.mark.parametrize("transport", TRANSPORTS)  # kills a process: memory:// has none to kill
def test_revoke_with_terminate_kills_the_process_running_a_plain_task(client):
    fut = client.submit(time.sleep, 60)
    wait_until(lambda: fut.state == nbq.STARTED, what="the task to start")
    assert nbq.AsyncResult(fut.id, client=client).revoke(terminate=True) is True
    with pytest.raises(CancelledError):
        fut.result(timeout=10)
    assert fut.state == nbq.REVOKED
    assert client.submit(abs, -2).result(timeout=10) == 2  # a new process serves


def test_owner_and_watchers_see_a_revoke_by_another_client(transport, procs):
    from conftest import make_client
    c = make_client(transport, procs, workers=1)
    try:
        blocker = c.submit(time.sleep, 0.8)
        wait_until(lambda: blocker.state == nbq.STARTED, what="the blocker to start")
        queued = c.submit(abs, -1)
        with nbq.Client(c.address) as other, nbq.Client(c.address) as watcher:
            watched = nbq.AsyncResult(queued.id, client=watcher)
            assert nbq.AsyncResult(queued.id, client=other).revoke() is True
            wait_until(lambda: queued.state == nbq.REVOKED, timeout=3, what="the owner to see it")
            wait_until(lambda: watched.state == nbq.REVOKED, timeout=3, what="the watcher to see it")
    finally:
        c.shutdown(wait=False)


def test_results_expire_after_result_expires(transport, procs):
    from conftest import make_client
    c = make_client(transport, procs, workers=1, result_expires=1)
    try:
        fut = c.submit(pow, 2, 3)
        res = c.map(abs, [-1, -2])
        assert fut.result(timeout=10) == 8 and res.result(timeout=10) == [1, 2]
        with nbq.Client(c.address) as other:
            assert nbq.AsyncResult(fut.id, client=other).get(timeout=10) == 8  # kept for now

            def gone():
                try:
                    nbq.MapResult.from_id(res.id, client=other)
                except nbq.NbqError:
                    return nbq.AsyncResult(fut.id, client=other).state == nbq.PENDING
                return False
            wait_until(gone, timeout=10, interval=0.2, what="the results to expire")
    finally:
        c.shutdown(wait=False)
