"""Message priority (0-9, 9 most urgent, none counts as 0), on both transports, with real
`nbq worker -A tasks` processes: a queue serves its most urgent tasks first, FIFO within one."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

import nbq
from conftest import Processes, redis_url, start_broker, wait_until
from relay import Relay
from test_tasks import Project

#: (label, priority) in the order sent: mixed, with repeats to show FIFO within a priority.
SENT = [("a", 3), ("b", None), ("c", 9), ("d", 0), ("e", 5), ("f", 9), ("g", 1), ("h", 7),
        ("i", 2), ("j", 0), ("k", 8), ("l", 4), ("m", 6), ("n", 3), ("o", None)]


@contextlib.contextmanager
def project_on(transport: str, procs: Processes, tmp_path,
               broker: str | None = None) -> Iterator[Project]:
    """The test project on a broker of its own (ZeroMQ) or a fresh Redis database, or on the
    broker address given; no workers."""
    broker = broker or (start_broker(procs) if transport == "zmq" else redis_url())
    proj = Project(procs, broker, tmp_path / "notes.txt")
    try:
        yield proj
    finally:
        proj.app.close()


@contextlib.contextmanager
def one_busy_worker(transport: str, procs: Processes, tmp_path,
                    broker: str | None = None) -> Iterator[tuple]:
    """(project, release path, gate result): one worker process on queue prio, busy with a
    gate task until the release path exists, so what is sent meanwhile waits in the queue."""
    with project_on(transport, procs, tmp_path, broker) as proj:
        proj.worker("one", "prio", 1)
        proj.app.client.wait_for_workers(1)
        release = tmp_path / "release"
        gate = proj.tasks.gate.apply_async((str(release),), queue="prio")
        wait_until(lambda: proj.lines("gate"), timeout=20, what="the only worker busy")
        yield proj, release, gate


def all_queued(proj: Project, n: int) -> None:
    """Wait until the broker holds the n tasks just sent (a client sends a quick succession of
    submits from its sender thread: without this the worker could be released before some arrive)."""
    wait_until(lambda: sum(proj.app.client.status()["queues"].values()) >= n, timeout=20,
               what=f"{n} tasks queued")


def ran(proj: Project) -> list[str]:
    """The labels of the ranked tasks and dies_once values that ran, in the order they ran."""
    return [line.split()[-1] for line in proj.notes.read_text().splitlines()
            if line.startswith(("ranked ", "survived "))]


def a_death_queued(proj: Project, key: str) -> tuple:
    """(d, [a, c, b]) sent and queued: d at priority 5 kills its process the first time it
    runs, then a at 5, c at 9, b at 5.  Run by one process: c, then d, which dies; d runs
    again first among priority 5 (before a and b) once the broker knows of the death."""
    t = proj.tasks
    dies = t.dies_once.apply_async((key, "d"), queue="prio", priority=5)
    rest = [t.ranked.apply_async((label,), queue="prio", priority=pr)
            for label, pr in (("a", 5), ("c", 9), ("b", 5))]
    all_queued(proj, 4)
    return dies, rest


def ran_dead_first(proj: Project, dies, rest) -> None:
    """Every one of a_death_queued's tasks done, d re-run first among priority 5."""
    assert dies.get(timeout=30) == "d" and [r.get(timeout=30) for r in rest] == ["a", "c", "b"]
    assert ran(proj) == ["c", "d", "a", "b"]


def by_urgency(sent: list[tuple[str, int | None]]) -> list[str]:
    """The labels in the order they should run: most urgent first, none as 0, FIFO within one."""
    return [label for label, pr in sorted(sent, key=lambda s: -(s[1] or 0))]


@pytest.mark.parametrize("transport", ["zmq", "redis"])
def test_most_urgent_first_fifo_within_a_priority(transport, procs, tmp_path):
    with one_busy_worker(transport, procs, tmp_path) as (proj, release, gate):
        t = proj.tasks
        sent = [t.ranked.apply_async((label,), queue="prio", priority=pr) for label, pr in SENT[:8]]
        sent.append(t.ranked_urgent.apply_async(("u",), queue="prio"))  # the task's own: 7
        sent += [t.ranked.apply_async((label,), queue="prio", priority=pr) for label, pr in SENT[8:]]
        all_queued(proj, len(sent))
        release.touch()
        assert gate.get(timeout=20) is True
        labels = [label for label, _ in SENT[:8]] + ["u"] + [label for label, _ in SENT[8:]]
        assert [r.get(timeout=20) for r in sent] == labels
        expected = by_urgency(SENT[:8] + [("u", 7)] + SENT[8:])
        assert expected[:4] == ["c", "f", "k", "h"] and expected[-4:] == ["b", "d", "j", "o"]
        assert [label for _, label in proj.lines("ranked")] == expected


@pytest.mark.parametrize("transport", ["zmq", "redis"])
def test_a_task_requeued_after_its_worker_died_goes_first_among_its_priority(transport, procs,
                                                                              tmp_path):
    with one_busy_worker(transport, procs, tmp_path) as (proj, release, gate):
        dies, rest = a_death_queued(proj, f"requeue-{transport}")
        release.touch()
        assert gate.get(timeout=20) is True
        ran_dead_first(proj, dies, rest)


def test_a_death_heard_after_its_replacements_hello_still_runs_first(procs, tmp_path):
    """The supervisor's "lost" held on the wire (a relay in front of the broker holds what the
    supervisor sends from its "lost" on) while the process forked in place of the dead one
    says hello on its own connection: that hello names the death, so the broker re-queues
    the dead process's task before it hands the replacement anything (without it the
    replacement ran a and b first: the death came later, on the other connection)."""
    broker = start_broker(procs, None, "--heartbeat-timeout", "60")  # the held one stays a member
    with Relay(broker, b'"k":"lost"') as relay, \
            one_busy_worker("zmq", procs, tmp_path, relay.address) as (proj, release, gate):
        dies, rest = a_death_queued(proj, "held")
        release.touch()
        assert gate.get(timeout=20) is True
        assert relay.held.wait(timeout=30), "the supervisor never said lost"
        wait_until(lambda: len(ran(proj)) >= 2, timeout=30, what="the replacement's first task")
        relay.release()
        ran_dead_first(proj, dies, rest)


@pytest.mark.parametrize("transport", ["zmq", "redis"])
def test_a_backlog_met_by_an_idle_worker_runs_most_urgent_first(transport, procs, tmp_path):
    with project_on(transport, procs, tmp_path) as proj:
        t = proj.tasks
        sent = [t.ranked.apply_async((label,), queue="prio", priority=pr) for label, pr in SENT]
        proj.worker("one", "prio", 1)
        assert [r.get(timeout=30) for r in sent] == [label for label, _ in SENT]
        assert [label for _, label in proj.lines("ranked")] == by_urgency(SENT)


def test_redis_entries_read_together_from_several_streams_all_run_once(procs, tmp_path):
    """A revoked head of the most urgent stream leaves the idle worker's XREADGROUP to return
    an entry of each other stream: the most urgent runs, the others are held, run next, once."""
    with project_on("redis", procs, tmp_path) as proj:
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
