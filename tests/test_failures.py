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
from conftest import pid_alive, standalone_broker, start_broker, wait_until


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
    pid = int(wait_until(lambda: runs.exists() and runs.read_text().split()[0], what="the task to start"))
    os.kill(pid, signal.SIGKILL)
    assert fut.result(timeout=15) == 42
    pids = runs.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]
    # the dead process was replaced: two processes serve again
    wait_until(lambda: len(client.workers()[0]["processes"]) == 2, what="a replacement process")
    assert client.gather(client.map(abs, range(-20, 0)), timeout=10) == list(range(20, 0, -1))


def test_task_that_kills_its_process_twice_fails_alone(client):
    fut = client.submit(os._exit, 3)
    with pytest.raises(nbq.WorkerLost, match="exited with code 3"):
        fut.result(timeout=15)
    assert fut.state == nbq.FAILURE
    assert client.submit(abs, -5).result(timeout=10) == 5


def test_item_that_kills_its_process_fails_alone_in_its_chunk(client):
    def f(x):
        if x == 13:
            os.kill(os.getpid(), signal.SIGKILL)
        return x + 1000
    res = client.map(f, range(40), chunksize=20)
    res._wait(res.done, 30)
    errs = res.errors()
    assert list(errs) == [13] and isinstance(errs[13], nbq.WorkerLost)
    assert "SIGKILL" in str(errs[13])
    assert [res._values[i] for i in range(40) if i != 13] == [i + 1000 for i in range(40) if i != 13]


def test_sigkilled_supervisor_tasks_move_to_another_worker(transport, procs, tmp_path):
    address = standalone_broker(transport, procs)
    w1 = procs.nbq("worker", "--broker", address, "-c", "1")
    with nbq.Client(address) as client:
        client.wait_for_workers(1)
        runs = tmp_path / "runs"

        def slow():  # the first run waits to be killed, however slowly the test goes
            _append(runs, f"{os.getpid()}\n")
            if len(runs.read_text().split()) == 1:
                time.sleep(60)
            return "done"

        fut = client.submit(slow)
        wait_until(runs.exists, what="the task to start")
        w2 = procs.nbq("worker", "--broker", address, "-c", "1")
        client.wait_for_workers(2)
        t0 = time.monotonic()
        os.kill(w1.pid, signal.SIGKILL)  # the supervisor only: its child dies with it (PDEATHSIG)
        assert fut.result(timeout=15) == "done"
        assert time.monotonic() - t0 < 15
        assert len(runs.read_text().split()) == 2
        wait_until(lambda: [w["pid"] for w in client.workers()] == [w2.pid],
                   what="the dead worker to leave the listing")


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
