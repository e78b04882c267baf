"""Failure: killed processes, dead clients, forged and garbage messages. Real processes, real kills."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq

import nbq
from nbq import protocol
from conftest import make_client, pid_alive, standalone_broker, start_broker, wait_until


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


def test_sigkilled_worker_process_task_is_rerun(client, tmp_path):
    runs = tmp_path / "runs"

    def slow(x):
        _append(runs, f"{os.getpid()}\n")
        time.sleep(1.0)
        return x * 2

    fut = client.submit(slow, 21)
    pid = int(wait_until(lambda: runs.exists() and runs.read_text().split()[:1],
                         what="the task to start")[0])
    os.kill(pid, signal.SIGKILL)
    assert fut.result(timeout=15) == 42
    pids = runs.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]
    # the dead process was replaced: two processes serve again
    wait_until(lambda: len(client.workers()[0]["processes"]) == 2, what="a replacement process")
    assert client.gather(client.map(abs, range(-20, 0)), timeout=10) == list(range(20, 0, -1))


def _exits(runs, code):
    _append(runs, f"{os.getpid()}\n")
    os._exit(code)


@pytest.mark.parametrize("limit", [None, 1, 2])
def test_task_that_kills_its_process_fails_after_max_task_deaths(transport, procs, tmp_path, limit):
    runs = tmp_path / "runs"
    kw = {} if limit is None else {"max_task_deaths": limit}
    with make_client(transport, **kw) as client:
        fut = client.submit(_exits, runs, 3)
        n = limit or 3
        with pytest.raises(nbq.WorkerLost, match=rf"died {n} times? while running it "
                                                 rf"\(max_task_deaths={n}\).*exited with code 3"):
            fut.result(timeout=30)
        assert fut.state == nbq.FAILURE
        assert len(runs.read_text().split()) == n
        assert client.submit(abs, -5).result(timeout=10) == 5


def test_max_task_deaths_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="max_task_deaths must be at least 1"):
        nbq.Client(max_task_deaths=0)
    with pytest.raises(TypeError, match="max_task_deaths must be an integer"):
        nbq.Client(max_task_deaths=2.5)


class _ExitsWhenLoaded:
    """A callable whose unpickling (on the worker, before it runs) ends the process."""

    def __call__(self):
        return "never"

    def __reduce__(self):
        return (os._exit, (7,))


def test_function_that_kills_its_process_as_it_loads_fails(transport, procs):
    """The death counts against the task it was loaded for (not an endless re-run)."""
    with make_client(transport, max_task_deaths=2) as client:
        with pytest.raises(nbq.WorkerLost, match="died 2 times.*exited with code 7"):
            client.submit(_ExitsWhenLoaded()).result(timeout=30)
        assert client.submit(abs, -5).result(timeout=10) == 5


def test_item_that_kills_its_process_fails_alone_in_its_chunk(client):
    def f(x):
        if x == 13:
            os.kill(os.getpid(), signal.SIGKILL)
        return x + 1000
    res = client.map(f, range(40), chunksize=20)
    res.wait(30)
    errs = res.errors()
    assert list(errs) == [13] and isinstance(errs[13], nbq.WorkerLost)
    # the chunk's first run (items not marked) and two runs of the item itself
    assert "(item 13): its worker process died 3 times" in str(errs[13])
    assert "SIGKILL" in str(errs[13])
    assert dict(res.as_completed(errors="skip")) == {i: i + 1000 for i in range(40) if i != 13}


def _wait_for_file(runs, go):
    """Note a run, then wait (bounded) until the test says go: the test decides when it ends."""
    _append(runs, f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "done"


def test_sigkilled_supervisor_tasks_move_to_another_worker(transport, procs, tmp_path):
    """A worker that vanished whole says nothing about its task: killed twice under a task
    allowed no death of its own process, the task still completes."""
    address = standalone_broker(transport, procs)
    w1 = procs.nbq("worker", "--broker", address, "-c", "1")
    runs, go = tmp_path / "runs", tmp_path / "go"
    with nbq.Client(address, max_task_deaths=1) as client:
        client.wait_for_workers(1)
        fut = client.submit(_wait_for_file, str(runs), str(go))
        for n in (1, 2):
            wait_until(lambda: runs.exists() and len(runs.read_text().split()) == n,
                       timeout=30, what=f"run {n} of the task to start")
            w2 = procs.nbq("worker", "--broker", address, "-c", "1")
            client.wait_for_workers(2)
            os.kill(w1.pid, signal.SIGKILL)  # the supervisor only: its child dies with it (PDEATHSIG)
            w1 = w2
        wait_until(lambda: len(runs.read_text().split()) == 3, timeout=30,
                   what="the task to run on a third worker")
        go.touch()
        assert fut.result(timeout=15) == "done"
        assert len(runs.read_text().split()) == 3
        wait_until(lambda: [w["pid"] for w in client.workers()] == [w1.pid],
                   what="the dead workers to leave the listing")


def test_a_task_its_dead_process_only_held_is_not_blamed(transport, procs, tmp_path):
    """A task waiting for its eta in a process killed while idle runs, though no death is allowed."""
    address = standalone_broker(transport, procs)
    procs.nbq("worker", "--broker", address, "-c", "1")
    with nbq.Client(address, max_task_deaths=1) as client:
        client.wait_for_workers(1)
        fut = client.apply(abs, (-7,), eta=time.time() + 3)
        wait_until(lambda: client.workers()[0]["active"] == 1, what="the task to be held")
        (pid,) = client.workers()[0]["processes"]
        os.kill(pid, signal.SIGKILL)
        assert fut.result(timeout=30) == 7


def test_app_reject_on_worker_lost(transport, procs, tmp_path):
    """Celery's meaning: False fails the task at the first death of its process (WorkerLost);
    True, per task, re-runs it (until max_task_deaths)."""
    address = standalone_broker(transport, procs)
    procs.nbq("worker", "--broker", address, "-c", "1")
    app = nbq.App("deaths", broker=address, task_reject_on_worker_lost=False)
    try:
        @app.task
        def dies(path):
            _exits(path, 3)

        @app.task(reject_on_worker_lost=True)
        def dies_again(path):
            _exits(path, 4)

        app.client.wait_for_workers(1)
        once, thrice = tmp_path / "once", tmp_path / "thrice"
        with pytest.raises(nbq.WorkerLost, match="died 1 time while running it"):
            dies.delay(str(once)).get(timeout=30)
        assert len(once.read_text().split()) == 1
        with pytest.raises(nbq.WorkerLost, match="died 3 times while running it"):
            dies_again.delay(str(thrice)).get(timeout=30)
        assert len(thrice.read_text().split()) == 3
    finally:
        app.close()


def test_client_sigkilled_takes_its_broker_and_workers_with_it(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import sys, time, nbq
        c = nbq.Client(workers=2)
        c.wait_for_workers(2)
        (w,) = c.workers()
        print(w["pid"], *w["processes"], flush=True)
        time.sleep(600)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 3 and all(pid_alive(x) for x in pids)
        p.kill()
        p.wait()
        wait_until(lambda: not any(pid_alive(x) for x in pids), timeout=10,
                   what="the workers of a killed client to exit")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_notebook_style_definitions_in_main(tmp_path):
    script = tmp_path / "nb.py"
    script.write_text(textwrap.dedent("""
        import nbq
        scale = 3
        class Box:
            def __init__(self, v): self.v = v
            def grown(self): return Box(self.v * scale)
        def make_adder(n):
            return lambda x: x + n
        with nbq.Client(workers=2) as c:
            add5 = make_adder(5)
            assert c.submit(add5, 1).result(10) == 6
            assert c.submit(lambda b: b.grown(), Box(2)).result(10).v == 6
            assert list(c.map(lambda b: b.v, [Box(i) for i in range(5)])) == [0, 1, 2, 3, 4]
            print("ok")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


class _MakesFile:
    """Unpickling this creates a file: proof that a payload was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("size", ["small", "large"])
def test_forged_message_is_never_unpickled(procs, tmp_path, size):
    """Signed with the wrong key: small ones dropped by the broker, large ones by the worker."""
    address = start_broker(procs)
    procs.nbq("worker", "--broker", address, "-c", "1")
    marker = tmp_path / "pwned"
    with nbq.Client(address) as client:
        client.wait_for_workers(1)
        # warm up abs, so that the broker batches abs tasks: a forged task must never join a batch
        assert client.gather([client.submit(abs, -i) for i in range(200)], timeout=15)[-1] == 199
        forger = protocol.Signer(b"not the key")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.IDENTITY, b"tevil")
            sock.connect(address)
            fn = protocol.dumps(_MakesFile(str(marker)))
            h = protocol.function_hash(fn[0])
            sock.send_multipart(forger.encode({"k": "fn", "h": h, "c": "evil"}, fn))
            blob = b"x" * (2 << 20 if size == "large" else 10)
            payload = protocol.dumps(((_MakesFile(str(marker)), blob), {}))
            futs = [client.submit(abs, -i) for i in range(100)]
            for i in range(3):
                sock.send_multipart(forger.encode(
                    {"k": "tasks", "c": client.id, "t": [{"id": f"forged-{i}", "h": client._ship(abs),
                                                          "nf": len(payload), "q": "default"}]}, payload))
            futs += [client.submit(abs, -i) for i in range(100, 200)]
            # the broker and worker still serve, and no forged task is left behind
            assert client.gather(futs, timeout=15) == list(range(200))
            wait_until(lambda: client.status()["tasks"] == 0, what="forged tasks to be dropped")
        finally:
            sock.close(0)
            ctx.term()
    assert not marker.exists()


def test_garbage_frames_do_not_crash_the_broker(procs):
    address = start_broker(procs)
    procs.nbq("worker", "--broker", address, "-c", "1")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    for msg in ([b""], [b"\x00" * 3], [b"{}", b"sig"], [b"not json", b"x" * 32, b"payload"],
                [os.urandom(100) for _ in range(5)], [b'{"k":"tasks"}', b"", b""]):
        sock.send_multipart(msg)
    sock.close(0)
    ctx.term()
    with nbq.Client(address) as client:
        client.wait_for_workers(1)
        assert client.submit(pow, 3, 3).result(timeout=10) == 27


def _start_sleeper():
    return subprocess.Popen(["sleep", "1000"]).pid


@pytest.mark.parametrize("how", ["process killed", "worker stopped", "worker killed"])
def test_a_tasks_subprocess_ends_with_its_worker(procs, how):
    """Each worker process leads a process group: what its tasks start goes with it."""
    address = start_broker(procs)
    worker = procs.nbq("worker", "--broker", address, "-c", "1")
    sleeper = None
    try:
        with nbq.Client(address) as client:
            client.wait_for_workers(1)
            sleeper = client.submit(_start_sleeper).result(timeout=15)
            assert pid_alive(sleeper)
            (pid,) = client.workers()[0]["processes"]
            if how == "process killed":
                os.kill(pid, signal.SIGKILL)
            else:
                worker.send_signal(signal.SIGTERM if how == "worker stopped" else signal.SIGKILL)
                worker.wait(15)
            wait_until(lambda: not pid_alive(sleeper), timeout=10, what="the task's subprocess to end")
            if how == "process killed":  # the worker goes on with a new process
                assert client.submit(abs, -3).result(timeout=15) == 3
    finally:
        if sleeper is not None and pid_alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_no_task_is_lost_to_a_worker_killed_unnoticed(procs):
    """ZeroMQ: a worker SIGKILLed whole (nobody reports its death) is missed by heartbeats only
    after seconds; tasks submitted meanwhile are not lost: they all run on the live worker,
    each once, those handed to the gone process (before the broker's socket noticed it had
    gone) after the heartbeat timeout at most."""
    address = start_broker(procs)
    dead = procs.nbq("worker", "--broker", address, "-c", "1")
    with nbq.Client(address) as client:
        client.wait_for_workers(1)
        (child,) = client.workers()[0]["processes"]
        procs.nbq("worker", "--broker", address, "-c", "1")
        client.wait_for_workers(2)
        dead.kill()
        dead.wait()
        wait_until(lambda: not pid_alive(child), what="its process to die with it")
        assert client.gather([client.submit(abs, -i) for i in range(5)],
                             timeout=30) == list(range(5))
        wait_until(lambda: len(client.workers()) == 1, timeout=30, what="the dead worker missed")


def test_death_rules():
    """deaths.py, the rules both transports apply, on a chunk of 4 items."""
    from nbq import deaths
    chunk = {"id": "t", "m": "map", "n": 4, "md": 2}
    # held, not running; or its worker gone whole (nobody reports): as it was
    assert deaths.after_death(chunk, [0, 1, 2, 3], ["other", None]) == ([], chunk)
    assert deaths.after_death(chunk, [0, 1, 2, 3], None)[1] is chunk
    # running, item unknown (a first run is not marked): counts against every item
    fail, again = deaths.after_death(chunk, [0, 1, 2, 3], ["t", None])
    assert fail == [] and again["a"] == 1 and again["st"] == 1
    # then the item it was running: 1 + 1 reaches md=2, it fails alone
    fail, again = deaths.after_death(again, [1, 2, 3], ["t", 2])
    assert fail == [2] and again["ex"] == [2] and again["skip"] == 1
    # died between items (the marked one was delivered): nothing counts
    fail, same = deaths.after_death(again, [3], ["t", 1])
    assert fail == [] and same["skip"] == 3 and same.get("dp") == again.get("dp")
    # a second unknown death reaches md for every item left
    assert deaths.after_death(again, [1, 3], ["t", None]) == ([1, 3], None)
    _, payload = deaths.ending(again, 1, "worker process 9 was killed by signal 9 (SIGKILL)", None)
    _, errors = protocol.loads(payload)
    assert str(protocol.rebuild_error(errors[0])) == (
        "task t (item 1): its worker process died 2 times while running it (max_task_deaths=2); "
        "the last time, worker process 9 was killed by signal 9 (SIGKILL)")
