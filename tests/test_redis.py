"""Redis-only behaviour: several `nbq worker`s on one private Redis, kills, restarts, auth, forgery.

Every Redis here is started by the tests (tests/redis_server.py) on a free port, never 6379.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

import nbq
from nbq import protocol
from nbq.transport.redis.frames import entry_fields
from nbq.transport.redis.keys import P
from conftest import redis_server, redis_url, wait_until
from redis_server import RedisServer


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


def _workers(procs, url, n, *extra):
    return [procs.nbq("worker", "--broker", url, "-c", "1", *extra) for _ in range(n)]


def test_two_workers_share_a_thousand_tasks_exactly_once(procs, tmp_path):
    url = redis_url()
    _workers(procs, url, 2)
    log = tmp_path / "log"

    def note(i):
        _append(log, f"{os.getpid()} {i}\n")
        time.sleep(0.001)
        return i

    with nbq.Client(url) as client:
        client.wait_for_workers(2)
        futs = [client.submit(note, i) for i in range(1000)]
        assert client.gather(futs, timeout=60) == list(range(1000))
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(i) for _, i in lines) == list(range(1000))
    assert len({pid for pid, _ in lines}) == 2  # both workers took a share


def test_redis_restarted_mid_run_loses_nothing(procs, tmp_path):
    server = RedisServer(tmp_path / "redis")  # its own server: this one is restarted
    try:
        url = server.url()
        _workers(procs, url, 2)
        with nbq.Client(url) as client:
            client.wait_for_workers(2)
            futs = [client.submit(time.sleep, 0.01) for _ in range(300)]
            wait_until(lambda: sum(f.done() for f in futs) >= 20, what="some tasks to finish")
            assert not all(f.done() for f in futs)
            server.restart()  # SIGTERM: the AOF has every acknowledged write
            assert client.gather(futs, timeout=90) == [None] * 300
            assert client.submit(pow, 2, 5).result(timeout=30) == 32
    finally:
        server.stop()


def test_results_by_id_from_a_second_client(procs, tmp_path):
    url = redis_url()
    _workers(procs, url, 1)
    gate = tmp_path / "gate"
    with nbq.Client(url) as first, nbq.Client(url) as second:
        first.wait_for_workers(1)

        def f(x):
            while x >= 5 and not gate.exists():  # the second half waits until the watcher is there
                time.sleep(0.01)
            return x * 10

        res = first.map(f, range(10), chunksize=5)  # chunk 5..9 waits for the gate
        wait_until(lambda: res.counts()["done"] >= 5, what="the first half")
        again = nbq.MapResult.from_id(res.id, client=second)  # stored now, subscribed for later
        gate.write_text("go")
        assert again.result(timeout=20) == [x * 10 for x in range(10)]
        assert res.result(timeout=20) == again.result()


def test_expired_results_are_gone(procs):
    url = redis_url(result_expires=2)
    with nbq.Client(url, workers=1) as client:
        client.wait_for_workers(1)
        res = client.map(abs, range(-5, 0), chunksize=1)
        assert res.result(timeout=20) == [5, 4, 3, 2, 1]
        assert nbq.MapResult.from_id(res.id, client=client).result(timeout=10) == [5, 4, 3, 2, 1]
        r = redis.Redis.from_url(url.split("?")[0])
        assert r.exists(P + "r:" + next(iter(client._chunks), res.id + ":0"))

        def gone():
            try:
                nbq.MapResult.from_id(res.id, client=client)
            except nbq.NbqError:
                return not r.keys(P + "r:*")
            return False
        wait_until(gone, timeout=10, interval=0.2, what="results to expire")


def test_password_url_works_and_a_wrong_one_is_a_one_line_error(procs, tmp_path):
    server = RedisServer(tmp_path / "redis", password="s3cret-pw")
    try:
        url = server.url()
        assert "s3cret-pw@" in url
        with nbq.Client(url, workers=1) as client:
            client.wait_for_workers(1)
            assert client.submit(pow, 3, 3).result(timeout=10) == 27
        admin = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret-pw")
        admin.acl_setuser("alice", enabled=True, passwords=["+alice-pw"], keys=["nbq:*"],
                          commands=["+@all"])
        admin.close()
        acl_url = f"redis://alice:alice-pw@127.0.0.1:{server.port}/1"
        with nbq.Client(acl_url, workers=1) as client:  # an ACL user limited to nbq's keys
            client.wait_for_workers(1)
            assert client.map(abs, [-1, -2]).result(timeout=10) == [1, 2]
        wrong = server.url(password="not-it")
        with pytest.raises(nbq.NbqError) as info:
            nbq.Client(wrong)
        msg = str(info.value)
        assert "not-it" not in msg and "\n" not in msg and f"127.0.0.1:{server.port}" in msg
        out = subprocess.run([sys.executable, "-m", "nbq", "status", "--broker", wrong],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "not-it" not in out.stderr + out.stdout
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        w = procs.nbq("worker", "--broker", wrong, "-c", "1")
        assert w.wait(30) == 1
        text = w.stdout.read()
        assert "not-it" not in text and "credentials" in text
    finally:
        server.stop()


class _MakesFile:
    """Unpickling this creates a file: proof that a payload was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_forged_entry_is_never_unpickled(procs, tmp_path):
    url = redis_url()
    _workers(procs, url, 1)
    marker = tmp_path / "pwned"
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        assert client.gather([client.submit(abs, -i) for i in range(50)], timeout=15)[-1] == 49
        r = redis.Redis.from_url(url)
        forger = protocol.Signer(b"not the key")
        fn = protocol.dumps(_MakesFile(str(marker)))
        h = protocol.function_hash(fn[0])
        from nbq.transport.redis.frames import pack
        r.set(P + "fn:" + h, pack(forger.encode({"k": "fn", "h": h}, fn)))
        payload = protocol.dumps(((_MakesFile(str(marker)),), {}))
        for i, fh in enumerate([h, client._ship(abs)]):
            msg = forger.encode({"k": "tasks", "t": [{"id": f"forged-{i}", "h": fh, "c": client.id,
                                                      "nf": len(payload), "q": "default"}]}, payload)
            r.xadd(P + "q:default", entry_fields(msg))
        # a correctly signed task naming the forged function: the function is refused, not loaded
        tid = f"{client.id}-names-forged-fn"
        named = client._futures[tid] = nbq.Future(tid, client)
        args = protocol.dumps(((), {}))
        client._conn.submit([{"id": tid, "h": h, "q": "default", "f": 1, "nf": len(args)}], args)
        with pytest.raises(nbq.SignatureError, match="refused"):
            named.result(timeout=15)
        good = client.submit(abs, -1)
        futs = [client.submit(abs, -i) for i in range(100)]
        assert client.gather(futs, timeout=15) == list(range(100)) and good.result(10) == 1
        wait_until(lambda: r.xlen(P + "q:default") == 0, what="forged entries to be dropped")
    assert not marker.exists()


def test_worker_on_queue_a_never_takes_queue_b(procs, tmp_path):
    url = redis_url()
    procs.nbq("worker", "--broker", url, "-c", "1", "-Q", "a")
    ran = tmp_path / "ran-b"
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        fb = client.submit(lambda: ran.write_text("b"), queue="b")
        fa = [client.submit(pow, 2, i, queue="a") for i in range(20)]
        assert client.gather(fa, timeout=15) == [2 ** i for i in range(20)]
        assert client.map(abs, [-1, -2], queue="a").result(timeout=15) == [1, 2]
        # b's entry is still undelivered (not pending on any consumer) after all of a's ran
        assert not fb.done() and not ran.exists()
        assert client.status()["queues"]["b"] == 1
        (w,) = client.workers()
        assert w["queues"] == ["a"]
        procs.nbq("worker", "--broker", url, "-c", "1", "-Q", "b")
        assert fb.result(timeout=15) == 1 and ran.exists()  # write_text returns 1


def test_status_command_lists_workers_and_queues(procs):
    url = redis_url()
    w = procs.nbq("worker", "--broker", url, "-c", "2", "-Q", "default,gpu")
    with nbq.Client(url) as client:
        client.wait_for_workers(2)
    out = subprocess.run([sys.executable, "-m", "nbq", "status", "--broker", url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert str(w.pid) in out.stdout and "default,gpu" in out.stdout and "gpu=0" in out.stdout


def test_session_server_is_private():
    assert redis_server().port != 6379


def test_rediss_url_round_trip_with_a_worker(procs, tmp_path):
    server = RedisServer(tmp_path / "redis", tls=True)  # TLS only: no plain port at all
    try:
        url = server.url()
        assert url.startswith(f"rediss://127.0.0.1:{server.port}/")
        with pytest.raises(redis.ConnectionError):  # plain TCP on the TLS port gets nowhere
            redis.Redis(port=server.port, socket_timeout=2).ping()
        _workers(procs, url, 1)
        with nbq.Client(url) as client:
            client.wait_for_workers(1)
            assert client.submit(pow, 2, 10).result(timeout=20) == 1024
            assert client.map(abs, range(-50, 0)).result(timeout=20) == list(range(50, 0, -1))
    finally:
        server.stop()


def test_large_frames_are_stored_apart_once_and_inputs_dropped_when_done(procs):
    import numpy as np
    url = redis_url()
    _workers(procs, url, 1)
    r = redis.Redis.from_url(url)
    with nbq.Client(url) as owner, nbq.Client(url) as other:
        owner.wait_for_workers(1)
        x = np.arange(1 << 18, dtype=np.float64)  # 2 MB in, 2 MB out
        fut = owner.submit(np.negative, x)
        assert np.array_equal(fut.result(timeout=30), -x)
        wait_until(lambda: len(r.keys(P + "b:*")) == 1, what="the input's key to be deleted")
        (key,) = r.keys(P + "b:*")
        assert r.strlen(key) == x.nbytes  # the result's frame, stored once
        assert max(len(b) for b in r.lrange(P + "r:" + fut.id, 0, -1)) < 4096
        assert np.array_equal(nbq.AsyncResult(fut.id, client=other).get(timeout=10), -x)


def test_a_clients_result_stream_is_trimmed_as_it_reads(procs):
    url = redis_url()
    _workers(procs, url, 1)
    r = redis.Redis.from_url(url)
    with nbq.Client(url) as client:
        client.wait_for_workers(1)
        for i in range(200):  # one result message each
            assert client.submit(abs, -i).result(timeout=10) == i
        wait_until(lambda: r.xlen(P + "rs:" + client.id) < 64, what="the read results to be trimmed")
