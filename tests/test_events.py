"""Events (nbq/events.py): each kind once per occurrence on every transport, the bounded
store, `nbq events --json`, and how the iterator ends."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import pytest

import nbq
from conftest import TRANSPORTS, rabbit_url, redis_url, start_broker, wait_until

pytestmark = pytest.mark.conformance


def collect(client, until, since: float = 0, timeout: float = 15.0) -> list[dict]:
    """Events from since until until(events) holds (AssertionError after timeout s)."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    it = client.events(since=since, timeout=timeout)
    try:
        for event in it:
            got.append(event)
            if until(got):
                return got
            if time.monotonic() > deadline:
                break
    finally:
        it.close()
    raise AssertionError(f"events did not reach the condition; got {Counter(e['type'] for e in got)}")


def kinds(events: list[dict], tid: str) -> Counter:
    return Counter(e["type"] for e in events if e.get("id") == tid)


def _inc(x):
    return x + 1


def test_each_task_event_once_with_its_fields(client):
    def boom(x):
        raise KeyError(x)

    def half(x):
        if x == 3:
            raise ValueError(x)
        return x

    ok = client.submit(_inc, 1)
    bad = client.submit(boom, "k")
    res = client.map(half, range(10), chunksize=4)
    assert ok.result(timeout=10) == 2
    with pytest.raises(KeyError):
        bad.result(timeout=10)
    assert res.errors() .keys() == {3}
    lone = client.submit(_inc, 1, queue="nobody")  # no worker serves it: it can be revoked
    assert lone.cancel()

    def done(events):
        maps = [e for e in events if e.get("map") == res.id and e["type"] in
                ("task-succeeded", "task-failed")]
        return (kinds(events, ok.id)["task-succeeded"] and kinds(events, bad.id)["task-failed"]
                and sum(e["count"] for e in maps) == 10 and kinds(events, lone.id)["task-revoked"])

    events = collect(client, done)
    assert kinds(events, ok.id) == {"task-sent": 1, "task-received": 1, "task-started": 1,
                                    "task-succeeded": 1}
    assert kinds(events, bad.id) == {"task-sent": 1, "task-received": 1, "task-started": 1,
                                     "task-failed": 1}
    assert kinds(events, lone.id) == {"task-sent": 1, "task-revoked": 1}
    sent = next(e for e in events if e["type"] == "task-sent" and e["id"] == ok.id)
    assert sent["args"] == "(1,)" and sent["name"].endswith("_inc") and sent["queue"] == "default"
    assert sent["map"] is None and sent["ts"] <= time.time()
    succeeded = next(e for e in events if e["type"] == "task-succeeded" and e["id"] == ok.id)
    assert succeeded["runtime"] >= 0 and succeeded["worker"]
    failed = next(e for e in events if e["type"] == "task-failed" and e["id"] == bad.id)
    assert failed["exception"] == "builtins.KeyError" and "KeyError" in failed["traceback"]
    # a map: per chunk, and its progress adds up
    (mapsent,) = [e for e in events if e["type"] == "map-sent" and e["map"] == res.id]
    assert mapsent["total"] == 10
    chunks = [e for e in events if e.get("map") == res.id and e["type"] == "task-sent"]
    assert sorted(e["count"] for e in chunks) == [2, 4, 4]
    done_items = sum(e["count"] for e in events if e.get("map") == res.id
                     and e["type"] == "task-succeeded")
    failed_items = [e for e in events if e.get("map") == res.id and e["type"] == "task-failed"]
    assert (done_items, sum(e["count"] for e in failed_items)) == (9, 1)
    assert failed_items[0]["exception"] == "builtins.ValueError"


def test_a_later_reader_sees_the_past_and_a_live_one_only_what_follows(client):
    assert client.submit(_inc, 5).result(timeout=10) == 6
    live = client.events(timeout=10)  # from now: nothing of the past
    fut = client.submit(_inc, 6)
    assert fut.result(timeout=10) == 7
    seen = []
    for event in live:
        seen.append(event)
        if event.get("id") == fut.id and event["type"] == "task-succeeded":
            break
    live.close()
    assert {e.get("id") for e in seen if "id" in e} == {fut.id}
    past = collect(client, lambda ev: kinds(ev, fut.id)["task-succeeded"])
    assert len({e.get("id") for e in past if e["type"] == "task-sent"}) >= 2


def test_retried_task_events(client):
    app = nbq.App("events-retry", broker=client.address)
    try:
        @app.task(bind=True, max_retries=2)
        def flaky(self):
            if self.request.retries < 1:
                raise self.retry(countdown=0.2)
            return "ok"

        r = flaky.delay()
        assert r.get(timeout=15) == "ok"
        assert any(e.get("id") == r.id for e in app.events(since=0, timeout=0.5))  # the app's own
        events = collect(client, lambda ev: kinds(ev, r.id)["task-succeeded"])
        assert kinds(events, r.id) == {"task-sent": 1, "task-received": 1, "task-started": 2,
                                       "task-retried": 1, "task-succeeded": 1}
        assert next(e for e in events if e.get("id") == r.id)["name"].endswith("flaky")
    finally:
        app.close()


def test_chain_steps_name_their_parent_and_root(client):
    app = nbq.App("events-chain", broker=client.address)
    try:
        @app.task
        def add(x, y):
            return x + y

        res = nbq.chain(add.s(1, 2) | add.s(3) | add.s(4))()
        assert res.get(timeout=15) == 10
        second, first = res.parent, res.parent.parent
        # a step's task-sent is written by the process that sent it (the previous step's
        # worker), so it may come after the last step's success: wait for every one
        events = collect(client, lambda ev: kinds(ev, res.id)["task-succeeded"] and all(
            kinds(ev, t.id)["task-sent"] for t in (first, second, res)))
        sent = {e["id"]: e for e in events if e["type"] == "task-sent"}
        assert sent[first.id]["args"] == "(1, 2)" and "parent" not in sent[first.id]
        assert (sent[second.id]["parent"], sent[second.id]["root"]) == (first.id, first.id)
        assert (sent[res.id]["parent"], sent[res.id]["root"]) == (second.id, first.id)
    finally:
        app.close()


def test_iterator_ends_on_timeout_and_when_its_client_closes(transport, procs):
    address = {"zmq": lambda: start_broker(procs), "redis": redis_url, "amqp": rabbit_url,
               "memory": lambda: "memory://events-idle"}[transport]()
    with nbq.Client(address) as client:  # no worker: no heartbeat, nothing happens
        t0 = time.monotonic()
        assert list(client.events(timeout=0.3)) == []
        assert time.monotonic() - t0 < 3
        it = client.events()
        threading.Timer(0.3, client.shutdown).start()
        t0 = time.monotonic()
        assert list(it) == []
        assert time.monotonic() - t0 < 5
        with pytest.raises(RuntimeError):
            client.events()


@pytest.mark.parametrize("transport", [*TRANSPORTS, "amqp"])  # processes to start and stop
def test_worker_events_once_each(transport, procs, tmp_path):
    address = {"zmq": lambda: start_broker(procs), "redis": redis_url, "amqp": rabbit_url}[transport]()
    with nbq.Client(address) as client:
        worker = procs.nbq("worker", "--broker", address, "-c", "1")
        events = collect(client, lambda ev: any(e["type"] == "worker-heartbeat" for e in ev))
        (online,) = [e for e in events if e["type"] == "worker-online"]
        sid = online["worker"]
        assert client.submit(_inc, 1).result(timeout=10) == 2

        def counted(ev):
            return [e for e in ev if e["type"] == "worker-heartbeat" and e["worker"] == sid
                    and e["processed"] >= 1]

        beat = counted(collect(client, counted, since=time.time()))[0]
        assert beat["host"] and beat["pid"] == worker.pid and beat["active"] == 0
        assert beat["queues"] == ["default"] and len(beat["processes"]) == 1
        assert beat["memory"] > 0 and beat["load"] >= 0 and beat["failed"] == 0
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)
        events = collect(client, lambda ev: any(e["type"] == "worker-offline" for e in ev))
        assert Counter(e["type"] for e in events if e.get("worker") == sid
                       and e["type"] != "worker-heartbeat") == {"worker-online": 1,
                                                                "worker-offline": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)  # kills a process
def test_a_task_rerun_after_sigkill_shows_its_rerun_and_one_result(client, tmp_path):
    runs = tmp_path / "runs"

    def slow(x):
        with open(runs, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return x * 2

    fut = client.submit(slow, 21)
    pid = int(wait_until(lambda: runs.exists() and runs.read_text().split()[:1],
                         what="the task to start")[0])
    # on Redis a process's events travel with its next message (STARTED_DELAY at most for a
    # submitted task): the kill comes once they have
    collect(client, lambda ev: kinds(ev, fut.id)["task-started"])
    os.kill(pid, signal.SIGKILL)
    assert fut.result(timeout=20) == 42
    events = collect(client, lambda ev: kinds(ev, fut.id)["task-succeeded"])
    assert kinds(events, fut.id) == {"task-sent": 1, "task-received": 2, "task-started": 2,
                                     "task-succeeded": 1}
    workers = [e["worker"] for e in events if e.get("id") == fut.id and e["type"] == "task-started"]
    assert workers[0] != workers[1]


def test_the_zeromq_broker_keeps_events_by_count_and_age(procs):
    for options in (("--events-max", "20"), ("--events-keep", "1")):
        with nbq.Client(start_broker(procs, None, *options), workers=1) as client:
            futs = [client.submit(_inc, i) for i in range(30)]
            client.gather(futs, timeout=20)
            if options[0] == "--events-max":  # 20 records: a task's received and started share one
                kept = _past(client)
                assert 20 <= len(kept) <= 40 and kept[-1]["type"] == "task-succeeded"
                assert not {f.id for f in futs[:5]} & {e["id"] for e in kept}  # the oldest went
            else:  # older than a second: dropped
                assert len(_past(client)) > 20
                wait_until(lambda: not _past(client), timeout=10,
                           what="events older than --events-keep to be dropped")


def _past(client) -> list[dict]:
    """The task and map events the broker keeps (heartbeats apart: each worker's last)."""
    return [e for e in client.events(since=0, timeout=0.5)  # the kept ones come in one message
            if e["type"].startswith(("task-", "map-"))]


@pytest.mark.parametrize("transport", ["redis"])
def test_the_redis_stream_is_capped(transport):
    from nbq.keys import load_key
    from nbq.transport.redis.events import EventWriter, history
    from nbq.transport.redis.store import Store
    store = Store(redis_url(events_max=10), load_key())
    try:
        writer = EventWriter(store)
        for i in range(1000):
            writer.add([{"type": "task-sent", "ts": time.time(), "id": str(i)}])
            writer.flush()
        past, _, _ = history(store, 0)
        assert 10 <= len(past) < 1000 and past[-1]["id"] == "999"
    finally:
        store.close()


@pytest.mark.parametrize("transport", ["zmq"])
def test_nbq_events_json_prints_parseable_lines(transport, procs):
    address = start_broker(procs)
    with nbq.Client(address, workers=1) as client:
        fut = client.submit(_inc, 41)
        assert fut.result(timeout=10) == 42
        reader = procs.nbq("events", "--broker", address, "--json", "--since", "60",
                           stderr=None)
        seen = []
        for line in reader.stdout:
            seen.append(json.loads(line))
            if seen[-1].get("id") == fut.id and seen[-1]["type"] == "task-succeeded":
                break
        reader.terminate()
        assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= {
            e["type"] for e in seen if e.get("id") == fut.id}


@pytest.mark.parametrize("transport", ["zmq"])  # a worker process the test plays itself
def test_a_task_a_worker_rejects_is_rejected_once(transport, procs):
    import zmq

    from nbq import keys, protocol
    address = start_broker(procs)
    signer = protocol.Signer(keys.load_key())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"wfake/0")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(signer.encode({"k": "hello", "w": "fake/0", "sup": "fake", "pid": 1,
                                           "host": "h", "spid": 1, "conc": 1,
                                           "queues": ["rejq"]}))
        with nbq.Client(address) as client:
            fut = client.submit(_inc, 1, queue="rejq")
            tid = None
            while tid is None:  # as a worker whose check of the message failed: rej
                assert sock.poll(10_000), "no task came"
                header, _ = signer.decode(sock.recv_multipart())
                if header["k"] == "tasks":
                    tid = header["t"][0]["id"]
            sock.send_multipart(signer.encode({"k": "rej", "w": "fake/0", "ids": [tid]}))
            with pytest.raises(nbq.SignatureError):
                fut.result(timeout=10)
            events = collect(client, lambda ev: kinds(ev, tid)["task-failed"])
            assert kinds(events, tid) == {"task-sent": 1, "task-received": 1, "task-started": 1,
                                          "task-rejected": 1, "task-failed": 1}
    finally:
        sock.close(0)
        ctx.term()
