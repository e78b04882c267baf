"""A map's cancel, Ctrl-C, wait/errors, iteration and next(), on every transport.

Each item touches a file named after its position when it starts, so a test knows
exactly which items ran: a cancelled item never does.
"""
from __future__ import annotations

import concurrent.futures
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import make_client, redis_url, wait_until

pytestmark = pytest.mark.conformance  # every transport, memory:// too (conftest.py)

N = 60


def toucher(folder: Path, seconds: float = 0.3):
    """A function that marks its item as run (a file named after it), then sleeps."""
    def work(i):
        (folder / str(i)).touch()
        time.sleep(seconds)
        return i
    return work


def ran(folder: Path) -> set[int]:
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()}


def start_map(client, kind: str, folder: Path, read: list):
    work = toucher(folder)

    def numbers():
        for i in range(N):
            read.append(i)
            yield i
    if kind == "list":
        return client.map(work, list(range(N)), chunksize=1)
    if kind == "generator":
        return client.map(work, numbers(), chunksize=1)
    return client.starmap(lambda i, s: toucher(folder, s)(i), [(i, 0.3) for i in range(N)],
                          chunksize=1)


@pytest.mark.parametrize("kind", ["list", "generator", "starmap"])
def test_cancel_stops_every_item_not_started_and_the_map_finishes(client, kind, tmp_path):
    read: list = []
    res = start_map(client, kind, tmp_path, read)
    wait_until(lambda: len(ran(tmp_path)) >= 2, 30, what="two items to start")
    n = res.cancel()
    wait_until(res.done, 10, what="the cancelled map to finish")
    total = len(res)
    if kind == "generator":  # read no further than the chunks sent: the map ends there
        assert total == len(read) < N
    else:
        assert total == N
    errors = res.errors()
    # all but the items started before the cancel (exactly those: see below), counted
    assert len(errors) == n >= (1 if kind == "generator" else N // 2)
    assert all(isinstance(e, concurrent.futures.CancelledError) for e in errors.values())
    assert client.submit(abs, -3).result(timeout=30) == 3  # the workers have moved past them
    assert ran(tmp_path) == set(range(total)) - set(errors)  # no cancelled item ran
    assert res.counts()["done"] == total
    with pytest.raises(concurrent.futures.CancelledError):
        res.result(timeout=10)
    with pytest.raises(concurrent.futures.CancelledError):
        list(res)
    assert res.cancel() == 0


def test_shutdown_after_a_cancel_returns(transport, procs, tmp_path):
    c = make_client(transport, procs)
    res = c.map(toucher(tmp_path), range(N), chunksize=1)
    wait_until(lambda: ran(tmp_path), 30, what="an item to start")
    res.cancel()
    done = threading.Event()
    threading.Thread(target=lambda: (c.shutdown(wait=True), done.set()), daemon=True).start()
    assert done.wait(30), "shutdown hung on a cancelled map"
    assert res.done()


def test_shutdown_cancel_futures_cancels_items_not_sent(transport, procs, tmp_path):
    c = make_client(transport, procs)
    res = c.map(toucher(tmp_path), range(N), chunksize=1)
    wait_until(lambda: ran(tmp_path), 30, what="an item to start")
    done = threading.Event()
    threading.Thread(target=lambda: (c.shutdown(wait=True, cancel_futures=True), done.set()),
                     daemon=True).start()
    assert done.wait(30), "shutdown(cancel_futures=True) hung on a map"
    assert res.done() and len(res.errors()) >= N // 2


CTRL_C_SCRIPT = """
import pathlib, sys, threading, time
import nbq

folder, address, how = pathlib.Path(sys.argv[1]), sys.argv[2] or None, sys.argv[3]
client = nbq.Client(address, workers=2)
client.wait_for_workers(2)

def work(i):
    (folder / str(i)).touch()
    time.sleep(0.3)
    return i

numbers = range({n}) if how != "list-generator" else (i for i in range({n}))
res = client.map(work, numbers, chunksize=1)

def announce():  # "waiting" once the main thread waits inside the map, not a moment before
    while True:
        f = sys._current_frames().get(threading.main_thread().ident)
        while f is not None and not f.f_code.co_filename.endswith("mapresult.py"):
            f = f.f_back
        if f is not None:
            print("waiting", flush=True)
            return
        time.sleep(0.005)

threading.Thread(target=announce, daemon=True).start()
try:
    if how.startswith("list"):
        list(res)
    elif how == "for":
        for x in res:
            pass
    else:
        res.result()
except KeyboardInterrupt:
    print("interrupted", flush=True)
res.wait(timeout=30)
print("cancelled", len(res), sorted(res.errors()), flush=True)
client.submit(abs, -1).result(timeout=30)  # the workers have moved past the cancelled items
client.shutdown()
print("bye", flush=True)
"""


@pytest.mark.parametrize("how", ["list", "for", "result", "list-generator"])
def test_ctrl_c_while_waiting_on_a_map_cancels_the_rest(transport, procs, tmp_path, how):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(CTRL_C_SCRIPT.format(n=N)))
    folder = tmp_path / "ran"
    folder.mkdir()
    address = {"redis": redis_url(), "memory": "memory://"}.get(transport, "")
    p = procs.start([sys.executable, str(script), str(folder), address, how])
    first = p.stdout.readline()
    assert first.strip() == "waiting", first + p.communicate(timeout=30)[0]
    wait_until(lambda: len(ran(folder)) >= 2, 30, what="two items to start")
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0, out
    lines = out.splitlines()
    assert lines[0] == "interrupted" and lines[-1] == "bye", out
    total, cancelled = lines[1].removeprefix("cancelled ").split(" ", 1)
    total, cancelled = int(total), set(eval(cancelled))  # a printed list of ints
    assert total == N if how != "list-generator" else total < N
    assert len(cancelled) >= (1 if how == "list-generator" else N // 2)
    assert ran(folder) == set(range(total)) - cancelled


def test_errors_waits_for_the_map_and_partial_gives_the_failures_so_far(client, tmp_path):
    gate = tmp_path / "gate"

    def f(i):
        if i == 0:
            raise ValueError("zero")
        while not gate.exists():
            time.sleep(0.01)
        if i == 3:
            raise KeyError(i)
        return i
    res = client.map(f, range(4), chunksize=1)
    wait_until(lambda: 0 in res.errors(partial=True), 30, what="item 0 to fail")
    assert list(res.errors(partial=True)) == [0] and not res.done()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        res.wait(timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(res.errors()))
    waiter.start()
    time.sleep(0.2)
    assert not waited  # errors() waits for the whole map
    gate.touch()
    waiter.join(30)
    assert sorted(waited[0]) == [0, 3]
    assert isinstance(waited[0][0], ValueError) and isinstance(waited[0][3], KeyError)
    assert res.wait(timeout=30) is None and res.done()


def test_errors_right_after_map(client):
    res = client.map(lambda x: 1 / x, [1, 0, 2, 0], chunksize=1)
    assert sorted(res.errors()) == [1, 3]


def test_iteration_gives_runs_of_values_and_raises_the_first_failure(shared_client):
    res = shared_client.map(lambda x: 1 / (x - 500), range(1000), chunksize=7)
    for _ in range(2):  # a map can be looked at twice
        out = []
        with pytest.raises(ZeroDivisionError):
            for x in res:
                out.append(x)
        assert out == [1 / (x - 500) for x in range(500)]
    xs = list(range(20_000))
    assert list(shared_client.map(lambda x: x + 1, xs)) == [x + 1 for x in xs]
    assert sum(shared_client.map(lambda x: x * 2, iter(xs), chunksize=333)) == sum(xs) * 2
    assert list(shared_client.map(abs, [])) == []


def test_next_is_a_cursor_and_iteration_starts_from_the_first(shared_client):
    res = shared_client.map(lambda x: 10 // x, [1, 2, 0, 5])
    assert next(res) == 10 and next(res) == 5
    with pytest.raises(ZeroDivisionError):
        next(res)
    assert next(res) == 2  # past the failure
    with pytest.raises(StopIteration):
        next(res)
    with pytest.raises(ZeroDivisionError):
        list(res)  # from the first item, whatever next() has taken
    it = shared_client.map(abs, [-4, -5])
    assert next(it) == 4 and list(it) == [4, 5] and next(it) == 5
    assert next(shared_client.map(abs, (x for x in [-7, 8]))) == 7


def test_a_maps_timeout_bounds_iteration_and_next(client):
    res = client.map(time.sleep, [2, 2], timeout=0.3)
    for consume in (list, next, lambda r: [x for x in r]):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            consume(res)
        assert time.monotonic() - t0 < 1.5


class CountingCondition:
    """A map's condition, counting how often it is taken."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond, self.entered = cond, 0

    def __enter__(self):
        self.entered += 1
        return self.cond.__enter__()

    def __exit__(self, *exc):
        return self.cond.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.cond, name)


def test_iteration_takes_the_lock_per_run_of_values_not_per_item(shared_client):
    """White-box of nbq/mapresult.py: counts how often iteration takes the map's own
    condition (no public behaviour shows it but speed, which belongs in benchmarks/)."""
    n = 100_000
    for consume in (list, sum):
        res = shared_client.map(lambda x: x, range(n), chunksize=10_000)
        res._cond = counting = CountingCondition(res._cond)  # the same lock, counted
        assert consume(res) == consume(range(n))  # while the map runs
        assert counting.entered < 300
        counting.entered = 0
        assert consume(res) == consume(range(n))  # a finished map
        assert counting.entered < 10
