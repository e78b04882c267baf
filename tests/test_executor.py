"""Executor conformance, run against every transport: concurrent.futures semantics hold."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest

import nbq
from conftest import held_until, make_client, wait_until

pytestmark = pytest.mark.conformance  # every transport, memory:// too (conftest.py)


def test_is_an_executor(shared_client):
    assert isinstance(shared_client, concurrent.futures.Executor)


def test_submit_result_and_state(shared_client):
    fut = shared_client.submit(pow, 2, 10)
    assert isinstance(fut, nbq.Future) and isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=10) == 1024
    assert fut.state == nbq.SUCCESS == "SUCCESS"
    assert fut.id and fut.id != shared_client.submit(pow, 2, 1).id


def test_kwargs_lambdas_closures_and_classes(shared_client):
    offset = 10

    class Point:
        def __init__(self, x):
            self.x = x

    f = shared_client.submit(lambda p, scale=1: Point(p.x * scale + offset), Point(3), scale=2)
    assert f.result(timeout=10).x == 16


def test_large_arrays_travel_both_ways_and_arrive_writable(shared_client):
    import numpy as np
    a = np.arange(1 << 20, dtype=np.float64)  # 8 MB: its own frame (on Redis, its own key)
    out = shared_client.submit(np.negative, a).result(timeout=60)
    assert np.array_equal(out, -a) and out.flags.writeable


def test_rebinding_a_global_is_seen():
    """A function re-submitted after a global it names is rebound uses the new value."""
    global FACTOR
    with make_client("zmq", workers=1) as c:
        FACTOR = 2
        assert c.submit(lambda x: x * FACTOR, 5).result(10) == 10
        FACTOR = 3
        assert c.submit(lambda x: x * FACTOR, 5).result(10) == 15


def test_remote_exception_keeps_type_and_traceback(shared_client):
    def boom(x):
        raise KeyError(f"no {x}")
    fut = shared_client.submit(boom, "key")
    with pytest.raises(KeyError, match="no key") as info:
        fut.result(timeout=10)
    assert "in boom" in str(info.value.__cause__)
    assert fut.state == nbq.FAILURE
    assert isinstance(fut.exception(), KeyError)


class UnloadableError(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def test_exception_that_does_not_unpickle_is_remote_error(shared_client):
    def boom():
        raise UnloadableError(1, 2)
    with pytest.raises(nbq.RemoteError) as info:
        shared_client.submit(boom).result(timeout=10)
    assert info.value.type_name.endswith("UnloadableError")
    assert info.value.message == "1-2" and "in boom" in info.value.traceback


def test_unpicklable_argument_fails_in_caller(shared_client):
    lock = threading.Lock()
    with pytest.raises(nbq.SerializationError, match="argument 0 .lock. of"):
        shared_client.submit(id, lock)
    with pytest.raises(nbq.SerializationError, match="input of map"):
        shared_client.map(id, [1, lock, 3])
    with pytest.raises(nbq.SerializationError, match="the function"):
        shared_client.submit(lambda: lock.locked())


def test_unpicklable_result_fails_that_task_only(shared_client):
    fut = shared_client.submit(threading.Lock)
    with pytest.raises(nbq.SerializationError, match="could not be pickled"):
        fut.result(timeout=10)
    res = shared_client.map(lambda i: threading.Lock() if i == 2 else i, range(5), chunksize=5)
    res.wait(10)
    errs = res.errors()
    assert list(errs) == [2] and isinstance(errs[2], nbq.SerializationError)
    assert dict(res.as_completed(errors="skip")) == {0: 0, 1: 1, 3: 3, 4: 4}


def test_memory_error_fails_alone_and_worker_keeps_serving(shared_client):
    def hog():
        raise MemoryError("pretend the heap is full")
    with pytest.raises(MemoryError):
        shared_client.submit(hog).result(timeout=10)
    assert shared_client.submit(abs, -3).result(timeout=10) == 3


def test_map_in_order_with_first_error_raised(shared_client):
    def f(x):
        if x in (7, 3):
            raise ValueError(x)
        return x * 2
    res = shared_client.map(f, range(10), chunksize=2)
    it = iter(res)
    assert [next(it) for _ in range(3)] == [0, 2, 4]
    with pytest.raises(ValueError, match="3"):
        next(it)
    with pytest.raises(ValueError, match="3"):
        res.result(timeout=10)
    assert sorted(res.errors()) == [3, 7]


def test_map_several_iterables_and_starmap(shared_client):
    assert list(shared_client.map(pow, [2, 3, 4], [2, 2, 2])) == [4, 9, 16]
    assert shared_client.starmap(pow, [(2, 3), (3, 3)]).result(10) == [8, 27]
    assert list(shared_client.map(pow, iter([2, 3]), iter([1, 1, 1]))) == [2, 3]


@pytest.mark.parametrize("chunksize", [None, 1, 7, 10_000])
def test_map_10000_items(shared_client, chunksize):
    res = shared_client.map(lambda x: x * x, range(10_000), chunksize=chunksize)
    assert len(res) == 10_000
    assert res.result(timeout=60) == [x * x for x in range(10_000)]
    assert res.done() and res.errors() == {}


def test_failing_item_does_not_fail_its_chunk(shared_client):
    res = shared_client.map(lambda x: 1 // (x % 10), range(100), chunksize=50)
    res.wait(20)
    assert sorted(res.errors()) == list(range(0, 100, 10))
    assert all(isinstance(e, ZeroDivisionError) for e in res.errors().values())
    assert dict(res.as_completed(errors="skip")) == {i: 1 // (i % 10) for i in range(100) if i % 10}


def test_map_timeout(client, tmp_path):
    gate = tmp_path / "gate"
    held = held_until(gate)
    res = client.map(lambda first: None if first else held(), [True, False], timeout=1.0,
                     chunksize=1)
    it = iter(res)
    try:
        assert next(it) is None
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            next(it)
        assert time.monotonic() - t0 < 15.0  # at the map's deadline, not when its item ends
        assert not res.done()
    finally:
        gate.touch()


def test_result_timeout(shared_client):
    fut = shared_client.submit(time.sleep, 0.5)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.1)
    assert fut.result(timeout=10) is None


def test_as_completed_and_wait(shared_client, tmp_path):
    gate = tmp_path / "gate"
    futs = [shared_client.submit(held_until(gate)), shared_client.submit(time.sleep, 0.0)]
    first = next(nbq.as_completed(futs, timeout=10))
    assert first is futs[1]
    assert not futs[0].done()
    gate.touch()
    done, not_done = nbq.wait(futs, timeout=10, return_when=nbq.ALL_COMPLETED)
    assert done == set(futs) and not not_done
    done, _ = concurrent.futures.wait([shared_client.submit(abs, -1)], timeout=10)
    assert done.pop().result() == 1


def test_as_completed_timeout_counts_the_callers_futures(shared_client, tmp_path):
    """The TimeoutError says how many of the futures given are unfinished, as
    concurrent.futures' does (not counting what nbq waits on beside them)."""
    fut = shared_client.submit(held_until(tmp_path / "gate"))
    try:
        with pytest.raises(TimeoutError, match=r"^1 \(of 1\) futures unfinished$"):
            list(nbq.as_completed([fut], timeout=0.05))
    finally:
        (tmp_path / "gate").touch()
    assert fut.result(timeout=10) is None


@pytest.mark.parametrize("chunksize", [2.5, "3"])
def test_map_refuses_a_chunksize_that_is_not_an_int(shared_client, chunksize):
    """As ProcessPoolExecutor.map: a TypeError in the caller, not a map that never ends."""
    with pytest.raises(TypeError, match="chunksize must be an int"):
        shared_client.map(abs, range(3), chunksize=chunksize)


@pytest.mark.parametrize("queue", [None, 5, ""])
def test_a_queue_that_is_not_a_name_fails_in_the_caller(shared_client, queue):
    """Not a task sent where no worker will ever look (and a shutdown waiting for it)."""
    with pytest.raises((TypeError, ValueError), match="queue must be"):
        shared_client.submit(abs, 1, queue=queue)
    with pytest.raises((TypeError, ValueError), match="queue must be"):
        shared_client.map(abs, [1], queue=queue)


def test_future_waits_as_a_standard_future_across_threads():
    """nbq.Future waits on a lock of its own, not a threading.Condition: it keeps every field
    concurrent.futures.Future has, and its waits, callbacks, wait() and as_completed()."""
    assert set(vars(concurrent.futures.Future())) <= set(vars(nbq.Future("t")))
    fut, other, third = nbq.Future("a"), nbq.Future("b"), nbq.Future("c")
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    got, called = [], []
    fut.add_done_callback(called.append)
    threads = [threading.Thread(target=lambda: got.append(fut.result(timeout=30)))
               for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(fut._condition._sleepers) == 3)  # all three wait
    fut.set_running_or_notify_cancel()
    fut.set_result(7)
    for t in threads:
        t.join(30)
    assert got == [7, 7, 7] and called == [fut] and fut.state == nbq.SUCCESS
    assert concurrent.futures.wait([other, third], timeout=0.01).done == set()
    setter = threading.Timer(0.05, lambda: (third.set_running_or_notify_cancel(),
                                            third.set_exception(KeyError("k"))))
    setter.start()
    assert next(concurrent.futures.as_completed([other, third], timeout=30)) is third
    assert isinstance(third.exception(timeout=0), KeyError)
    cancelled = []

    def wait_other():
        try:
            other.result(timeout=30)
        except concurrent.futures.CancelledError as e:
            cancelled.append(e)
    waiter = threading.Thread(target=wait_other)
    waiter.start()
    wait_until(lambda: other._condition._sleepers)
    assert other._revoked() and other.cancelled()
    waiter.join(30)
    assert cancelled and other.state == nbq.REVOKED


def test_a_future_wait_interrupted_by_a_signal_leaves_no_waiter_behind():
    """A signal handler's exception (as Ctrl-C's KeyboardInterrupt) ends a result() wait; the
    future keeps no trace of that wait, and a later wait gets the result."""
    class Alarm(Exception):
        pass

    def ring(signum, frame):
        raise Alarm
    fut = nbq.Future("a")
    old = signal.signal(signal.SIGALRM, ring)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Alarm):
            fut.result(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert fut._condition._sleepers == []
    fut.set_running_or_notify_cancel()
    fut.set_result(5)
    assert fut.result(timeout=1) == 5


def test_mapresult_as_completed_modes(shared_client):
    def f(x):
        if x == 2:
            raise ValueError("two")
        return x
    res = shared_client.map(f, range(5), chunksize=1)
    assert sorted(res.as_completed(errors="skip")) == [(0, 0), (1, 1), (3, 3), (4, 4)]
    pairs = dict(res.as_completed(errors="include"))
    assert isinstance(pairs.pop(2), ValueError) and pairs == {0: 0, 1: 1, 3: 3, 4: 4}
    with pytest.raises(ValueError):
        list(res.as_completed())
    with pytest.raises(ValueError, match="errors must be one of"):
        list(res.as_completed(errors="ignore"))


def test_generator_input_is_read_lazily(shared_client):
    read = []

    def numbers():
        for i in range(10_000_000):
            read.append(i)
            yield i

    res = shared_client.map(lambda x: x, numbers(), chunksize=100)
    assert res.total is None
    # only a bounded window has been read: not ten million items
    assert len(read) <= 100 * 64
    res.cancel()
    assert len(res) <= 100 * 200


def test_generator_input_completes_and_input_error_fails_its_position(shared_client):
    res = shared_client.map(lambda x: -x, (i for i in range(1000)), chunksize=64)
    assert res.result(timeout=20) == [-i for i in range(1000)] and len(res) == 1000

    def broken():
        yield from range(300)
        raise OSError("disk gone")

    res = shared_client.map(abs, broken(), chunksize=64)
    res.wait(20)
    assert len(res) == 301 and list(res.errors()) == [300]
    assert isinstance(res.errors()[300], nbq.InputError)


def test_submit_after_shutdown_raises(transport, procs):
    c = make_client(transport, procs, workers=1)
    c.shutdown()
    with pytest.raises(RuntimeError):
        c.submit(abs, 1)
    with pytest.raises(RuntimeError):
        c.map(abs, [1])


def test_shutdown_waits_for_submitted_work(transport, procs, tmp_path):
    marker = tmp_path / "done"
    with make_client(transport, procs, workers=1) as c:
        fut = c.submit(lambda: (time.sleep(0.5), marker.write_text("x")))
    assert fut.done() and marker.exists()


def test_cancel_queued_task_never_runs(transport, procs, tmp_path):
    c = make_client(transport, procs, workers=1)
    try:
        blocker = c.submit(time.sleep, 1.0)
        wait_until(lambda: blocker.state == nbq.STARTED, what="the blocker to start")
        marker = tmp_path / "ran"
        queued = c.submit(lambda: marker.write_text("ran"))
        assert queued.state == nbq.PENDING
        assert queued.cancel() is True
        assert queued.cancelled() and queued.state == nbq.REVOKED
        assert blocker.cancel() is False  # started: cannot cancel
        blocker.result(timeout=10)
        assert c.submit(abs, -2).result(timeout=10) == 2  # the worker has moved past it
        assert not marker.exists()
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result()
    finally:
        c.shutdown(wait=False)


def test_mapresult_cancel_counts_and_marks_items(transport, procs, tmp_path):
    c = make_client(transport, procs, workers=1)
    try:
        res = c.map(lambda x: (time.sleep(0.2), x)[1], range(20), chunksize=2)
        wait_until(lambda: res.counts()["done"] >= 2, what="the first chunk")
        n = res.cancel()
        assert 10 <= n <= 16
        res.wait(10)
        errs = res.errors()
        assert len(errs) == n
        assert all(isinstance(e, concurrent.futures.CancelledError) for e in errs.values())
    finally:
        c.shutdown(wait=False)


def test_thousand_tasks_exactly_once(shared_client, tmp_path):
    log = tmp_path / "log"

    def note(i):
        with open(log, "a") as f:
            f.write(f"{i}\n")
        return i
    futs = [shared_client.submit(note, i) for i in range(1000)]
    assert shared_client.gather(futs, timeout=60) == list(range(1000))
    lines = log.read_text().split()
    assert sorted(map(int, lines)) == list(range(1000))


def test_hundred_thousand_submits_before_reading(shared_client, request):
    """ZeroMQ's ROUTER drops messages past its high-water mark unless flow control prevents it:
    100,000 submits before the first read on zmq (DESIGN.md); 20,000 elsewhere (the queue is a
    server's, and the test's point there is only that nothing waits on the reader)."""
    n = 100_000 if request.node.callspec.params["shared_client"] == "zmq" else 20_000
    futs = [shared_client.submit(abs, -i) for i in range(n)]
    assert shared_client.gather(futs, timeout=120) == list(range(n))


def test_workers_listing(shared_client):
    (w,) = shared_client.workers()
    assert w["concurrency"] == 2 and len(w["processes"]) == 2
    in_process = shared_client.address.startswith("memory://")  # worker threads, not processes
    assert w["host"] and (w["pid"] == os.getpid()) == in_process and w["active"] >= 0


def test_map_result_by_id_from_another_client(shared_client):
    res = shared_client.map(lambda x: x + 1, range(100), chunksize=10)
    res.result(timeout=20)
    other = nbq.Client(shared_client.address)
    try:
        again = nbq.MapResult.from_id(res.id, client=other)
        assert again.result(timeout=10) == list(range(1, 101))
        with pytest.raises(nbq.NbqError, match="no map with id"):
            nbq.MapResult.from_id("nope", client=other)
    finally:
        other.shutdown()


def test_to_dataframe_from_a_map(shared_client):
    res = shared_client.map(lambda x: {"x": x, "sq": x * x}, range(50))
    df = res.to_dataframe(include_args=True)
    assert list(df.columns) == ["arg", "x", "sq"] and len(df) == 50
    assert df["sq"].dtype == "int64" and df.loc[7, "sq"] == 49
    res = shared_client.starmap(lambda a, b: a / b, [(1, 1), (1, 0), (3, 1)])
    df = res.to_dataframe(include_args=True, errors="include")
    assert list(df.columns) == ["arg0", "arg1", "result", "error"]
    assert "ZeroDivisionError" in df.loc[1, "error"] and df.loc[2, "result"] == 3.0


def held_row(x: int, gate: str) -> dict:
    """A row for x; items from 4 on first wait (30 s at most) for the test to create gate."""
    deadline = time.monotonic() + 30
    while x >= 4 and not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} was never created")
        time.sleep(0.005)
    if x == 1:
        raise ValueError("one")
    return {"x": x, "half": x / 2, "even": x % 2 == 0}


def test_to_dataframe_partial_while_the_map_runs(shared_client, tmp_path):
    """Chunks of 4: the first (items 0-3, item 1 failing) completes; the others wait on a gate.
    partial=True gives the rows done so far with their dtypes; without it, to_dataframe waits."""
    gate = str(tmp_path / "gate")
    res = shared_client.map(held_row, range(10), [gate] * 10, chunksize=4)
    full: list = []
    waiting = threading.Thread(target=lambda: full.append(res.to_dataframe(errors="skip")))
    try:
        wait_until(lambda: res.counts()["done"] == 4, timeout=30, what="the first chunk")
        with pytest.raises(ValueError, match="one"):
            res.to_dataframe(partial=True)
        df = res.to_dataframe(partial=True, errors="skip", include_args=True)
        assert list(df.index) == [0, 2, 3] and not res.done()
        assert list(df.columns) == ["arg0", "arg1", "x", "half", "even"]
        assert df.dtypes.astype(str).tolist()[2:] == ["int64", "float64", "bool"]
        assert df["arg0"].tolist() == [0, 2, 3] and df.index.dtype == "int64"
        inc = res.to_dataframe(partial=True, errors="include")
        assert list(inc.index) == [0, 1, 2, 3] and inc.loc[1, "error"] == "ValueError('one')"
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive() and not full    # held items: the whole frame is not ready
    finally:
        open(gate, "w").close()
    waiting.join(30)
    (df,) = full
    assert list(df.index) == [0, *range(2, 10)]
    assert df.dtypes.astype(str).tolist() == ["int64", "float64", "bool"]
    assert res.to_dataframe(partial=True, errors="skip").equals(df)
