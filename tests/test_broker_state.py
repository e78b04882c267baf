"""The ZeroMQ broker's state structures on their own: the index of idle worker processes
(dispatch finds one without a scan over all), the compact queued task, what a gone process's
tasks become, and the door through which clients of the broker's own process hand it messages."""
from __future__ import annotations

import os
import select
import threading

from nbq.broker.door import Door
from nbq.broker.members import Members, ProcessRecord
from nbq.broker.outbox import Outbox
from nbq.broker.queues import QueuedTask, Queues
from nbq.broker.ready import Ready
from nbq.broker.results import Results
from nbq.events import EventLog


def proc(wid: str, queues: tuple = ("default",)) -> ProcessRecord:
    return ProcessRecord(wid, "sup", 1, queues)


def idle_by_queues(ready: Ready) -> dict:
    return {q: list(procs) for q, procs in ready.groups()}


def test_ready_groups_idle_processes_by_their_queues():
    ready = Ready()
    a, b, c = proc("a"), proc("b"), proc("c", ("lopri",))
    for p in (a, b, c):
        ready.add(p)
    assert idle_by_queues(ready) == {("default",): ["a", "b"], ("lopri",): ["c"]}
    assert a.idle and len(ready) == 3
    ready.discard(a)
    ready.discard(c)
    assert not a.idle and idle_by_queues(ready) == {("default",): ["b"]}
    ready.discard(a)  # twice: nothing changes
    assert len(ready) == 1


def test_ready_keeps_an_unreachable_process_apart_until_its_time():
    ready = Ready()
    p = proc("a")
    p.away_until = 10.0
    ready.add(p)
    assert p.idle and idle_by_queues(ready) == {} and len(ready) == 1
    ready.wake(9.0)
    assert idle_by_queues(ready) == {}
    ready.wake(10.0)
    assert idle_by_queues(ready) == {("default",): ["a"]} and p.away_until == 0.0
    p.away_until = 20.0
    ready.discard(p)
    ready.add(p)
    ready.discard(p)  # gone while away: never comes back
    ready.wake(30.0)
    assert len(ready) == 0


def test_queued_task_keeps_its_header_item_and_frames():
    item = {"id": "t1", "h": "f0", "c": "c1", "f": 1, "nf": 1}
    task = QueuedTask(dict(item, ar="(1,)"), [b"payload"])
    assert task.item == item and task.rest is None  # its args repr is its task-sent event's
    assert task["id"] == "t1" and task.get("ar") is None and "mp" not in task
    assert task.f == 1 and not task.retrying
    task.retrying = True
    assert task.retrying and task.f == 1
    task.retrying = False
    assert not task.retrying and task.f == 1
    assert task.frames == (b"payload",) and task.original is None
    assert task.n == 1 and task.undelivered() == [0]
    chunk = {"id": "m:10", "h": "f0", "c": "c1", "mp": "m", "s0": 10, "n": 3, "nf": 2, "q": "x"}
    task = QueuedTask(dict(chunk), [b"a", b"b"])
    assert task.item == chunk and task.frames == (b"a", b"b")
    assert task.n == 3 and task.get("s0") == 10 and task.get("pr", 0) == 0
    task.delivered[1] = 1
    assert task.undelivered() == [0, 2]
    message = [b"header", b"signature", b"payload"]
    task = QueuedTask({"id": "t2", "h": "f0", "c": "c1", "nf": 1}, message[2:], message)
    assert task.original is message and task.frames == [b"payload"]


def test_a_gone_processs_tasks_run_again_first_in_the_order_they_were_queued():
    """A dead process's batch goes back ahead of its priority's queue, in its order: the task
    it was running (its death counted) first, then the ones it held; FIFO kept within."""
    queues = Queues()
    outbox = Outbox(None, None)  # nothing is sent: no task fails, no client waits
    members = Members(queues, Results(queues, outbox, 1 << 20, 60.0, EventLog(60.0, 100, False)),
                      outbox, 4.0, 1 << 20)
    queues.receive({"c": "c1", "t": [{"id": i, "h": "f", "nf": 1, "pr": 5} for i in "xyzw"]},
                   [b"p"] * 4, None)
    dead = proc("s/0")
    members.procs[dead.wid] = dead
    lane = queues.lanes["default"].head()
    dead.running = [lane.popleft() for _ in range(3)]  # x, y, z handed out as one batch
    for task in dead.running:
        task.where = dead.wid
    members.on_lost(None, {"w": dead.wid, "how": "was killed", "at": ["x", 0]}, [], None)
    assert [t.id for t in queues.lanes["default"].head()] == ["x", "y", "z", "w"]
    assert queues.tasks["x"].get("st") == 1 and not queues.tasks["y"].get("st")


def test_batches_share_the_queue_but_never_below_a_quarter_batch():
    from nbq.policy import BATCH_MAX, Costs
    costs = Costs()
    assert costs.batch("f", 1000) == 1  # not measured: one task at a time
    costs.add("f", 1e-6)  # trivial: a full batch is BATCH_MAX tasks
    assert costs.batch("f") == BATCH_MAX and costs.batch("f", 1000) == BATCH_MAX
    assert costs.batch("f", 100) == 100  # a fair share of what is queued
    # with many processes idle a share may be a few tasks: a quarter batch still goes at once
    assert costs.batch("f", 3) == BATCH_MAX // 4
    costs.add("g", 0.0009)  # ~1 ms: two to a batch, and a share of one is one
    assert costs.batch("g") == 2 and costs.batch("g", 1) == 1
    costs.add("h", 0.01)  # long: always alone
    assert costs.batch("h", 1000) == 1


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_the_door_wakes_its_reader_while_a_message_waits_and_loses_none():
    door = Door()
    try:
        door.put(b"e1", {"k": "a"}, [])
        door.put(b"e1", {"k": "b"}, [])
        assert readable(door.fd)
        assert [h["k"] for _, h, _ in door.take()] == ["a", "b"]
        assert not readable(door.fd)  # nothing waits: the broker's poll sleeps
        # several threads put while the reader takes: each message taken once, in each
        # thread's order, and never one waiting behind a quiet pipe
        writers, each = 4, 1000
        def put_all(i: int) -> None:
            for j in range(each):
                door.put(b"e%d" % i, {"n": j}, [])
        threads = [threading.Thread(target=put_all, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        taken: list = []
        while len(taken) < writers * each:
            assert readable(door.fd, 5.0), "messages wait behind a door that did not ring"
            taken += door.take()
        for t in threads:
            t.join()
        for i in range(writers):
            assert [h["n"] for peer, h, _ in taken if peer == b"e%d" % i] == list(range(each))
        if readable(door.fd):  # at most a spare ring, with nothing behind it
            assert door.take() == []
        assert not readable(door.fd)
    finally:
        door.close()


def test_a_put_while_the_door_is_read_still_wakes_the_reader(monkeypatch):
    door = Door()
    try:
        door.put(b"e", {"n": 0}, [])
        read = os.read

        def put_then_read(fd: int, n: int) -> bytes:  # another thread puts as the pipe is read
            door.put(b"e", {"n": 1}, [])
            return read(fd, n)

        monkeypatch.setattr(os, "read", put_then_read)
        assert [h["n"] for _, h, _ in door.take()] == [0, 1]
        monkeypatch.setattr(os, "read", read)
        door.put(b"e", {"n": 2}, [])
        assert readable(door.fd), "a message waits behind a door that did not ring"
        assert [h["n"] for _, h, _ in door.take()] == [2]
    finally:
        door.close()
