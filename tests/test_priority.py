"""Message priority (0-9, 9 most urgent, none counts as 0), on both transports, with real
`nbq worker -A tasks` processes: a queue serves its most urgent tasks first, FIFO within one."""
from __future__ import annotations

import pytest

import nbq
from conftest import Processes, redis_url, start_broker, wait_until
from test_tasks import Project

#: (label, priority) in the order sent: mixed, with repeats to show FIFO within a priority.
SENT = [("a", 3), ("b", None), ("c", 9), ("d", 0), ("e", 5), ("f", 9), ("g", 1), ("h", 7),
        ("i", 2), ("j", 0), ("k", 8), ("l", 4), ("m", 6), ("n", 3), ("o", None)]


@pytest.mark.parametrize("transport", ["zmq", "redis"])
def test_most_urgent_first_fifo_within_a_priority(transport, procs: Processes, tmp_path):
    broker = start_broker(procs) if transport == "zmq" else redis_url()
    proj = Project(procs, broker, tmp_path / "notes.txt")
    try:
        proj.worker("one", "prio", 1)
        proj.app.client.wait_for_workers(1)
        t = proj.tasks
        release = tmp_path / "release"
        gate = t.gate.apply_async((str(release),), queue="prio")
        wait_until(lambda: proj.lines("gate"), timeout=20, what="the only worker busy")
        sent = [t.ranked.apply_async((label,), queue="prio", priority=pr) for label, pr in SENT[:8]]
        sent.append(t.ranked_urgent.apply_async(("u",), queue="prio"))  # the task's own: 7
        sent += [t.ranked.apply_async((label,), queue="prio", priority=pr) for label, pr in SENT[8:]]
        release.touch()
        assert gate.get(timeout=20) is True
        assert [r.get(timeout=20) for r in sent] == [label for label, _ in SENT[:8]] + ["u"] + \
            [label for label, _ in SENT[8:]]
        order = [label for _, label in proj.lines("ranked")]
        urgency = dict(SENT, u=7)
        expected = sorted(urgency, key=lambda label: -(urgency[label] or 0))  # stable: FIFO
        assert expected[:4] == ["c", "f", "k", "h"] and expected[-4:] == ["b", "d", "j", "o"]
        assert order == expected
    finally:
        proj.app.close()


def test_priority_settings_and_validation():
    app = nbq.App("prio", broker="redis://127.0.0.1:1/0")  # never connected: nothing is sent
    app.conf.task_default_priority = 2

    @app.task
    def plain():
        return 1

    @app.task(priority=8)
    def own():
        return 1

    def resolved(sig):
        sig.freeze()
        return sig.options["priority"]

    assert resolved(plain.s()) == 2 and resolved(own.s()) == 8
    assert resolved(own.signature(priority=0)) == 0
    for bad in (10, -1, "high", 2.5, True):
        with pytest.raises(ValueError, match=r"priority of .*plain must be an integer from 0 to 9"):
            plain.apply_async(priority=bad)
    app.close()


@pytest.mark.parametrize("transport", ["zmq", "redis"])
def test_a_backlog_met_by_an_idle_worker_runs_most_urgent_first(transport, procs, tmp_path):
    broker = start_broker(procs) if transport == "zmq" else redis_url()
    proj = Project(procs, broker, tmp_path / "notes.txt")
    try:
        t = proj.tasks
        sent = [t.ranked.apply_async((label,), queue="prio", priority=pr) for label, pr in SENT]
        proj.worker("one", "prio", 1)
        assert [r.get(timeout=30) for r in sent] == [label for label, _ in SENT]
        urgency = dict(SENT)
        assert [label for _, label in proj.lines("ranked")] == \
            sorted(urgency, key=lambda label: -(urgency[label] or 0))
    finally:
        proj.app.close()


def test_redis_entries_read_together_from_several_streams_all_run_once(procs, tmp_path):
    """A revoked head of the most urgent stream leaves the idle worker's XREADGROUP to return
    an entry of each other stream: the most urgent runs, the others are held, run next, once."""
    proj = Project(procs, redis_url(), tmp_path / "notes.txt")
    try:
        t = proj.tasks
        revoked = t.ranked.apply_async(("x",), queue="prio", priority=9)
        rest = [t.ranked.apply_async((label,), queue="prio", priority=pr)
                for label, pr in (("y", 5), ("z", None), ("w", 5), ("v", 2))]
        revoked.revoke()
        proj.worker("one", "prio", 1)
        assert [r.get(timeout=30) for r in rest] == ["y", "z", "w", "v"]
        order = [label for _, label in proj.lines("ranked")]
        assert order[0] == "y" and sorted(order) == ["v", "w", "y", "z"]
        assert revoked.state == "REVOKED"
    finally:
        proj.app.close()
