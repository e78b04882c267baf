"""`nbq worker` as a daemon: warm and cold shutdown, processes replaced after N tasks or past a
memory limit, autoscale, --detach with pid and log files, `nbq multi kill|show`; real
`nbq worker` supervisors on the ZeroMQ broker and on Redis."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import nbq
from conftest import pid_alive, standalone_broker, wait_until


def nap(seconds: float, value):
    time.sleep(seconds)
    return value


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def once_slow(path: str) -> str:
    """Sleeps a minute the first time (a worker stopped cold kills it), returns at once after."""
    if os.path.exists(path):
        return "again"
    open(path, "w").close()
    time.sleep(60)
    return "first"


def hog(megabytes: int, hold: float) -> int:
    """Holds `megabytes` of resident memory for `hold` seconds; returns this process's pid."""
    block = b"\x01" * (megabytes << 20)
    time.sleep(hold)
    del block
    return os.getpid()


def worker(procs, broker: str, *args: str) -> subprocess.Popen:
    return procs.nbq("worker", "--broker", broker, "-l", "info", *args)


def client_of(broker: str, workers: int = 1) -> nbq.Client:
    """A client that fails a task at its first death: a death counted wrongly shows."""
    client = nbq.Client(broker, max_task_deaths=1)
    client.wait_for_workers(workers)
    return client


def test_sigterm_is_warm_then_cold_and_neither_counts_a_death(transport, procs, tmp_path):
    broker = standalone_broker(transport, procs)
    first = worker(procs, broker, "-c", "1")
    with client_of(broker) as client:
        def processes() -> int:
            return sum(len(w["processes"]) for w in client.workers())

        held = client.apply(nap, (0, "held"), eta=time.time() + 4)
        wait_until(lambda: any(client.control("scheduled", timeout=2).values()),
                   what="the process to hold the task due later")
        running = client.submit(nap, 1.5, "finished")
        wait_until(lambda: running.state == "STARTED", what="the task to start")
        queued = client.submit(nap, 0, "queued")
        first.send_signal(signal.SIGTERM)
        # warm: the running task finishes, then the worker leaves without waiting for the ETA
        assert running.result(timeout=10) == "finished"
        assert first.wait(timeout=5) == 0
        assert not held.done() and not queued.done()
        second = worker(procs, broker, "-c", "2")  # what the first held runs here, once
        assert queued.result(timeout=15) == "queued"
        assert held.result(timeout=15) == "held"

        # cold: a second SIGTERM kills the running task; it runs again elsewhere, no death counted
        marker = str(tmp_path / "started")
        slow = client.submit(once_slow, marker)
        wait_until(lambda: os.path.exists(marker), what="the slow task to start")
        t0 = time.monotonic()
        second.send_signal(signal.SIGTERM)
        wait_until(lambda: processes() == 1, what="the idle process to leave (warm)")
        assert second.poll() is None  # warm: waiting for the running task
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=5) == 0 and time.monotonic() - t0 < 8
        worker(procs, broker, "-c", "1")
        assert slow.result(timeout=15) == "again"


def test_sigquit_is_cold(transport, procs, tmp_path):
    broker = standalone_broker(transport, procs)
    w = worker(procs, broker, "-c", "1")
    with client_of(broker) as client:
        marker = str(tmp_path / "started")
        slow = client.submit(once_slow, marker)
        wait_until(lambda: os.path.exists(marker), what="the slow task to start")
        w.send_signal(signal.SIGQUIT)
        assert w.wait(timeout=5) == 0
        worker(procs, broker, "-c", "1")
        assert slow.result(timeout=15) == "again"


def test_max_tasks_per_child_replaces_the_process(transport, procs):
    broker = standalone_broker(transport, procs)
    worker(procs, broker, "-c", "1", "--max-tasks-per-child", "2")
    with client_of(broker) as client:
        pids = client.map(pid_after, [0.0] * 7, chunksize=1).result(timeout=30)
    counts = {pid: pids.count(pid) for pid in pids}
    assert len(counts) >= 4 and max(counts.values()) <= 2, pids


def test_max_memory_per_child_replaces_and_stops_a_task_past_twice_the_limit(transport, procs):
    broker = standalone_broker(transport, procs)
    worker(procs, broker, "-c", "1", "--max-memory-per-child", "200MB")
    with client_of(broker) as client:
        before = client.submit(pid_after, 0).result(timeout=10)
        # past the limit after its task: the task succeeds and its process is replaced
        assert client.submit(hog, 250, 0).result(timeout=20) == before
        replaced = client.submit(pid_after, 0).result(timeout=10)
        assert replaced != before
        # past twice the limit while it runs: it fails alone, saying so; the worker serves on
        t0 = time.monotonic()
        greedy = client.submit(hog, 600, 20)
        with pytest.raises(nbq.WorkerLost) as e:
            greedy.result(timeout=20)
        assert time.monotonic() - t0 < 10
        text = str(e.value)
        assert "past twice --max-memory-per-child (200.0 MB)" in text, text
        used = float(text.split("used ")[1].split(" MB")[0])
        assert 400 < used < 700, text
        assert client.submit(nap, 0, "next").result(timeout=10) == "next"


def test_autoscale_grows_with_the_queue_and_shrinks_when_idle(transport, procs):
    broker = standalone_broker(transport, procs)
    env = dict(os.environ, NBQ_AUTOSCALE_KEEPALIVE="1",
               PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    procs.nbq("worker", "--broker", broker, "--autoscale", "3,1", env=env)
    with client_of(broker) as client:
        def processes() -> int:
            return sum(w["concurrency"] for w in client.workers())

        wait_until(lambda: processes() == 1, what="one process to begin with")
        res = client.map(nap, [1.0] * 9, [None] * 9, chunksize=1)
        wait_until(lambda: processes() == 3, timeout=10, what="the pool to grow to 3")
        assert res.result(timeout=20) == [None] * 9  # shrinking killed nothing, counted no death
        wait_until(lambda: processes() == 1, timeout=10, what="the idle pool to shrink to 1")


def test_detach_writes_the_pidfile_and_stops_on_sigterm(transport, procs, tmp_path):
    broker = standalone_broker(transport, procs)
    pidfile, logfile = tmp_path / "w.pid", tmp_path / "w.log"
    launcher = worker(procs, broker, "-c", "1", "--detach", "--pidfile", str(pidfile),
                      "--logfile", str(logfile))
    assert launcher.wait(timeout=10) == 0  # the command returns; the daemon goes on
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="the pid file"))
    try:
        assert pid != launcher.pid and os.getsid(pid) != os.getsid(0)
        with client_of(broker) as client:
            assert client.submit(pid_after, 0).result(timeout=10) != pid
        again = worker(procs, broker, "--detach", "--pidfile", str(pidfile))
        assert again.wait(timeout=10) == 1 and f"worker {pid} is running" in again.stdout.read()
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), timeout=10, what="the daemon to exit")
        assert not pidfile.exists()
        assert "nbq.worker" in logfile.read_text()  # its log went to the log file
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_multi_show_and_kill(tmp_path, procs):
    broker = standalone_broker("zmq", procs)
    files = [f"--pidfile={tmp_path}/%n.pid", f"--logfile={tmp_path}/%n%I.log"]

    def multi(*args):
        return subprocess.run([sys.executable, "-m", "nbq", "multi", *args, *files],
                              capture_output=True, text=True, timeout=60)

    out = multi("start", "k1", "--broker", broker, "-c", "1")
    assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr
    pid = int((tmp_path / "k1.pid").read_text())
    try:
        shown = multi("show", "k1", "--broker", broker, "-c", "1").stdout
        assert f"-m nbq worker -n k1@%h --broker {broker} -c 1" in shown, shown
        assert f"running as pid {pid}" in shown, shown
        out = multi("kill", "k1")
        assert out.returncode == 0 and f"KILL -> {pid}" in out.stdout, out.stdout
        assert not pid_alive(pid) and not (tmp_path / "k1.pid").exists()
        assert "not running" in multi("show", "k1").stdout
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("args, message", [
    (["--max-memory-per-child", "lots"], "give a size such as 200MB, 1GiB, or a number of KiB"),
    (["--autoscale", "2,5"], "give MAX,MIN processes with 1 <= MIN <= MAX"),
    (["--pidfile", "w.pid"], "--pidfile and --logfile go with --detach"),
    (["--max-tasks-per-child", "-1"], "--max-tasks-per-child must be at least 1"),
])
def test_bad_daemon_options_are_one_line_errors(procs, args, message):
    p = procs.nbq("worker", "--broker", "tcp://127.0.0.1:9", *args)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 1 and message in out and "Traceback" not in out, out


def test_sizes():
    from nbq.worker.daemon import parse_autoscale, parse_size
    assert parse_size("200MB") == 200_000_000 and parse_size("1GiB") == 1 << 30
    assert parse_size("204800") == 200 << 20 and parse_size("1.5g") == 1_500_000_000
    assert parse_autoscale("8,2") == (8, 2) and parse_autoscale("4") == (4, 1)
