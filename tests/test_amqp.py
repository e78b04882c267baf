"""amqp:// beyond the conformance suite: a worker process killed mid-task, RabbitMQ restarted
mid-run, send_task between processes with no shared code, status and inspect, the URL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import nbq
from nbq import policy
from conftest import Processes, make_client, rabbit_server, rabbit_url, wait_until
from nbq.errors import NbqError
from nbq.transport.amqp.connection import parse


def first_run_hangs(marker: str) -> str:
    """Hangs on its first run (writing its pid), returns at once when run again."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        return "first"
    return "again"


def kill_own_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_process_killed_mid_task_has_its_task_finished_elsewhere_at_once(procs, tmp_path):
    client = make_client("amqp", procs)
    try:
        marker = str(tmp_path / "pid")
        fut = client.submit(first_run_hangs, marker)
        pid = int(wait_until(lambda: os.path.exists(marker) and open(marker).read(), 20,
                             what="the task to start"))
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert fut.result(timeout=15) == "again"
        assert time.monotonic() - killed < 5  # RabbitMQ redelivers at once: no heartbeat wait
    finally:
        client.shutdown(wait=False)


def test_a_task_that_keeps_killing_its_process_fails_with_worker_lost(procs):
    client = make_client("amqp", procs, max_task_deaths=2)
    try:
        fut = client.submit(kill_own_process)
        with pytest.raises(nbq.WorkerLost, match="max_task_deaths=2"):
            fut.result(timeout=30)
        assert client.submit(abs, -4).result(timeout=10) == 4
    finally:
        client.shutdown(wait=False)


@pytest.mark.timeout(300)
def test_rabbitmq_restarted_mid_run_loses_nothing(procs):
    # the node recovers every vhost the session made before it listens again: 30 s and more on
    # a loaded 2-core machine, past the default broker_grace (what the test is about is that
    # nothing is lost, not how long the client waits)
    client = make_client("amqp", procs, broker_grace=180)
    try:
        res = client.map(time.sleep, [0.01] * 300, chunksize=1)
        wait_until(lambda: res.counts()["done"] >= 20, 30, what="the first results")
        late = []  # submitted while RabbitMQ is down, for longer than a first connection is given
        rabbit_server().restart(down_for=policy.CONNECT_TIMEOUT + 2,
                                while_down=lambda: late.append(client.submit(abs, -5)))
        assert res.result(timeout=120) == [None] * 300
        assert late[0].result(timeout=30) == 5
        assert client.submit(abs, -3).result(timeout=30) == 3
    finally:
        client.shutdown(wait=False)


def test_send_task_between_processes_with_no_shared_code(tmp_path):
    from test_tasks import Project
    procs = Processes(tmp_path)
    proj = Project(procs, rabbit_url(), tmp_path / "notes.txt")
    try:
        proj.worker("main")
        proj.app.client.wait_for_workers(2)
        script = textwrap.dedent(f"""
            import nbq
            app = nbq.App("client", broker={proj.broker!r})
            print(app.send_task("tasks.add", [1, 2]).get(timeout=20))
            app.close()
        """)
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                             env=dict(os.environ, PYTHONPATH=""), text=True,
                             capture_output=True, timeout=90)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "3"
    finally:
        proj.app.close()
        procs.stop_all()


def test_status_and_inspect_on_amqp(procs):
    url = rabbit_url()
    procs.nbq("worker", "--broker", url, "-c", "2")
    with nbq.Client(url) as client:
        client.wait_for_workers(2, timeout=30)
    status = procs.nbq("status", "--broker", url)
    out, _ = status.communicate(timeout=60)
    assert status.returncode == 0 and "default" in out, out
    ping = procs.nbq("inspect", "ping", "--broker", url)
    out, _ = ping.communicate(timeout=60)
    assert ping.returncode == 0 and "pong" in out, out


def test_url_forms_and_a_by_id_lookup_without_a_backend():
    params, safe, conf = parse("amqps://u:p%40ss@rabbit.example:5671/prod?result_expires=60")
    assert (params.credentials.username, params.credentials.password) == ("u", "p@ss")
    assert (params.virtual_host, params.port, params.ssl_options is not None) == ("prod", 5671, True)
    assert "p%40ss" not in safe and conf.result_expires == 60 and conf.result_backend == ""
    with pytest.raises(NbqError, match="result_backend"):
        parse("amqp://h/v?result_backend=mysql://x")
    with nbq.Client(rabbit_url(backend=False)) as client:
        with pytest.raises(NbqError, match="result_backend"):
            nbq.AsyncResult("no-such-task", client=client).get(timeout=5)


def test_events_need_a_result_backend_and_say_so():
    with nbq.Client(rabbit_url(backend=False)) as client:
        with pytest.raises(NbqError, match="result_backend"):
            client.events(timeout=0.1)


def test_large_frames_travel_through_the_result_backend(procs):
    import redis
    client = make_client("amqp", procs, workers=1)
    try:
        blob = os.urandom(3 << 20)
        assert client.submit(bytes, blob).result(timeout=30) == blob
        r = redis.Redis.from_url(parse(client.address)[2].result_backend)
        # the task's frame is deleted once acked; the result's is kept (result_budget)
        wait_until(lambda: len(r.keys("nbq:b:*")) == 1, 10, what="the task's large frame deleted")
        assert len(blob) <= r.strlen(r.keys("nbq:b:*")[0]) < len(blob) + 100  # pickled
        r.close()
    finally:
        client.shutdown(wait=False)
