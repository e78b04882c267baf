"""memory://: what only the in-process transport does (inline running, sharing one process's
broker, refusing what needs a process) and Celery's task_always_eager on it.  What every
transport must do runs on memory:// too, in the conformance tests (conftest.CONFORMANCE)."""
from __future__ import annotations

import ast
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nbq
from nbq.errors import NbqError, SerializationError
from nbq.worker import context
from conftest import wait_until

MEMORY_SOURCES = Path(nbq.__file__).parent / "transport" / "memory"


def helper() -> str:
    """What a task calls; a test monkeypatches it in this process."""
    return "original"


def calls_helper(_=None) -> str:
    return helper()


def sets_breakpoint() -> str:
    breakpoint()
    return "after the breakpoint"


@pytest.fixture
def inline():
    client = nbq.Client("memory://", inline=True)
    yield client
    client.shutdown(wait=False)


@pytest.fixture
def threads():
    client = nbq.Client("memory://threads", workers=2)
    yield client
    client.shutdown(wait=False)


# -- inline: the caller's thread --------------------------------------------------

def test_inline_runs_each_task_in_the_submitting_thread(inline):
    me = threading.get_ident()
    fut = inline.submit(threading.get_ident)
    assert fut.done() or fut.result(timeout=5)  # it ran during submit; the result follows
    assert fut.result(timeout=5) == me
    assert set(inline.map(lambda _: threading.get_ident(), range(300), chunksize=7)) == {me}
    assert set(inline.map(lambda _: threading.get_ident(), iter(range(50)))) == {me}


def test_inline_tasks_stop_at_a_breakpoint_in_the_callers_thread(inline, monkeypatch):
    stopped = []
    monkeypatch.setattr(sys, "breakpointhook", lambda *a, **k: stopped.append(threading.get_ident()))
    assert inline.submit(sets_breakpoint).result(timeout=5) == "after the breakpoint"
    assert stopped == [threading.get_ident()]


@pytest.mark.parametrize("how", ["inline", "threads"])
def test_tasks_run_in_this_process_and_see_what_it_patched(how, inline, threads, monkeypatch):
    """Proof that a task runs here: it calls the function this process monkeypatched (a worker
    process would import the module afresh and call the original)."""
    client = inline if how == "inline" else threads
    assert client.submit(calls_helper).result(timeout=5) == "original"
    monkeypatch.setattr(sys.modules[__name__], "helper", lambda: "patched")
    assert client.submit(calls_helper).result(timeout=5) == "patched"
    assert list(client.map(calls_helper, range(3))) == ["patched"] * 3


def test_a_countdown_and_a_retry_run_inline_before_submit_returns(inline):
    app = nbq.App("inline_retry", broker="memory://", task_always_eager=True)
    try:
        @app.task(bind=True, max_retries=3, default_retry_delay=0.05)
        def flaky(self, failures):
            if self.request.retries < failures:
                raise self.retry()
            return self.request.retries, threading.get_ident()

        assert flaky.delay(2).get(timeout=5) == (2, threading.get_ident())
        sent = time.time()
        res = flaky.apply_async((0,), countdown=0.3)
        assert time.time() - sent >= 0.3 and res.get(timeout=5)[0] == 0
    finally:
        app.close()


# -- pickling holds in-process ------------------------------------------------------

@pytest.mark.parametrize("how", ["inline", "threads"])
def test_what_cannot_be_pickled_fails_in_the_caller_naming_it(how, inline, threads):
    client = inline if how == "inline" else threads
    with pytest.raises(SerializationError, match=r"argument 0 \(lock\) of"):
        client.submit(abs, threading.Lock())
    with pytest.raises(SerializationError, match="input of map"):
        client.map(abs, [1, threading.Lock()])
    with pytest.raises(SerializationError, match="could not be pickled"):
        client.submit(threading.Lock).result(timeout=5)  # the result: fails on the worker


def test_a_task_gets_its_own_copy_of_its_arguments(threads):
    data = {"n": 1}
    assert threads.submit(lambda d: d.update(n=2) or d, data).result(timeout=5) == {"n": 2}
    assert data == {"n": 1}


# -- one broker per address per process ----------------------------------------------

def test_clients_of_one_address_share_its_broker_and_threads():
    first = nbq.Client("memory://shared", workers=2)
    try:
        fut = first.submit(pow, 2, 5)
        assert fut.result(timeout=5) == 32
        with nbq.Client("memory://shared") as second:  # the broker has threads: it starts none
            assert [w["concurrency"] for w in second.workers()] == [2]
            assert nbq.AsyncResult(fut.id, client=second).get(timeout=5) == 32
            assert second.submit(abs, -3).result(timeout=5) == 3  # run by first's threads
            assert second.claim("k", 60) and not first.claim("k", 60)
        with nbq.Client("memory://elsewhere", workers=1) as other:  # another broker
            assert nbq.AsyncResult(fut.id, client=other).state == nbq.PENDING
    finally:
        first.shutdown()


def test_control_commands_reach_the_worker_threads(threads):
    fut = threads.submit(time.sleep, 1.0)
    wait_until(lambda: fut.state == nbq.STARTED, what="the task to start")
    replies = threads.control("active")
    assert [t["id"] for r in replies.values() for t in r] == [fut.id]
    assert list(threads.control("ping").values()) == [{"ok": "pong"}]
    fut.result(timeout=5)


# -- what needs a process: a clear error ----------------------------------------------

def test_process_only_options_are_refused():
    with pytest.raises(NbqError, match="max_task_deaths"):
        nbq.Client("memory://", max_task_deaths=1)
    with pytest.raises(NbqError, match="initializer"):
        nbq.Client("memory://", workers=1, initializer=print)
    with pytest.raises(ValueError, match="inline"):
        nbq.Client("memory://", workers=2, inline=True)
    with pytest.raises(ValueError, match="memory://"):
        nbq.Client("tcp://127.0.0.1:1", inline=True)


def test_a_running_task_cannot_be_terminated(threads):
    fut = threads.submit(time.sleep, 1.0)
    wait_until(lambda: fut.state == nbq.STARTED, what="the task to start")
    with pytest.raises(NbqError, match="cannot be terminated"):
        nbq.AsyncResult(fut.id, client=threads).revoke(terminate=True)
    assert fut.result(timeout=5) is None


@pytest.mark.parametrize("eager", [True, False])
def test_time_limits_fail_with_a_clear_error(eager):
    app = nbq.App("limits", broker="memory://limits", task_always_eager=eager)
    try:
        @app.task(time_limit=5)
        def limited():
            return "ran"

        with pytest.raises(NbqError, match="time limit .* memory://"):
            limited.delay().get(timeout=10)
        with pytest.raises(NbqError, match="soft_time_limit=1"):
            app.signature(limited.name, soft_time_limit=1, time_limit=None).delay().get(timeout=10)
    finally:
        app.close()


@pytest.mark.parametrize("command", [["worker", "--broker", "memory://"],
                                     ["broker", "--bind", "memory://"],
                                     ["status", "--broker", "memory://x"]])
def test_commands_of_other_processes_refuse_memory_addresses(command):
    done = subprocess.run([sys.executable, "-m", "nbq", *command], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "lives inside the process" in done.stderr and "Traceback" not in done.stderr


# -- Celery's task_always_eager ----------------------------------------------------------

@pytest.fixture(params=["task_always_eager", "CELERY_ALWAYS_EAGER"])
def eager_app(request):
    app = nbq.App("eager", broker="redis://127.0.0.1:1/0")  # never dialled: eager sends nothing
    setattr(app.conf, request.param, True)

    @app.task
    def add(x, y):
        return x + y, threading.get_ident()

    @app.task
    def total(pairs):
        return sum(x for x, _ in pairs)

    @app.task
    def boom(x):
        raise KeyError(f"boom {x}")

    app.t = {"add": add, "total": total, "boom": boom}
    yield app
    app.close()


def test_eager_tasks_run_in_the_callers_thread(eager_app):
    add = eager_app.t["add"]
    me = threading.get_ident()
    assert add.delay(2, 2).get(timeout=5) == (4, me)
    res = add.apply_async((1, 2), queue="elsewhere", priority=5)
    assert res.get(timeout=5) == (3, me) and res.state == "SUCCESS"
    assert eager_app.AsyncResult(res.id).get(timeout=5) == (3, me)


def test_eager_canvas(eager_app):
    add, total = eager_app.t["add"], eager_app.t["total"]
    me = threading.get_ident()
    assert nbq.group(add.s(i, i) for i in range(4))().get(timeout=5) == [(2 * i, me)
                                                                         for i in range(4)]
    assert nbq.chord([add.s(i, i) for i in range(4)])(total.s()).get(timeout=5) == 12
    steps = (add.s(1, 1) | total.si([(5, 0)]) | add.s(10))()
    assert steps.get(timeout=5) == (15, me) and steps.parent.get(timeout=5) == 5


def test_eager_failures_propagate_as_celerys_task_eager_propagates(eager_app):
    boom = eager_app.t["boom"]
    res = boom.delay(1)  # stored as the result; raised by get()
    with pytest.raises(KeyError, match="boom 1"):
        res.get(timeout=5)
    assert res.state == "FAILURE"
    eager_app.conf.update(CELERY_EAGER_PROPAGATES_EXCEPTIONS=True)
    assert eager_app.conf.task_eager_propagates is True
    with pytest.raises(KeyError, match="boom 2"):
        boom.delay(2)  # raised here, at sending


def test_an_app_on_memory_runs_canvas_on_worker_threads():
    app = nbq.App("threaded", broker="memory://app")
    try:
        @app.task
        def add(x, y):
            return x + y

        @app.task
        def tsum(xs):
            return sum(xs)

        assert (add.s(1, 2) | add.s(3))().get(timeout=10) == 6
        assert nbq.chord([add.s(i, i) for i in range(6)])(tsum.s()).get(timeout=10) == 30
        assert app.client.workers()[0]["pid"] == __import__("os").getpid()
    finally:
        app.close()


# -- layering ----------------------------------------------------------------------------

def test_the_transport_imports_nothing_above_it():
    for path in MEMORY_SOURCES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = (node.module or "").split(".")
                above = parts[0] if node.level == 3 else None  # from ...x: a sibling of transport
                assert above not in ("client", "worker", "notebook", "tasks", "magics"), path


def test_concurrent_calls_on_worker_threads_each_see_their_own_request():
    pool = nbq.Client("memory://requests", workers=2)  # the app's client shares its threads
    app = nbq.App("requests", broker="memory://requests")
    try:
        @app.task(bind=True)
        def whoami(self):
            time.sleep(0.2)  # the other thread's call starts meanwhile
            return self.request.id

        results = [whoami.delay() for _ in range(4)]
        assert [r.get(timeout=10) for r in results] == [r.id for r in results]
        assert context.current() is None  # no call is left current once they have all ended
    finally:
        app.close()
        pool.shutdown()


def test_a_call_on_a_worker_thread_is_not_the_callers(threads):
    """While a memory:// thread runs a call, the user's own threads are not inside it (an App
    there still sends through its own client, not a worker's)."""
    fut = threads.submit(time.sleep, 1.0)
    wait_until(lambda: fut.state == nbq.STARTED, what="the task to start")
    assert context.current() is None
    fut.result(timeout=5)
