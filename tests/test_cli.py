"""The `nbq` command line, run as real subprocesses: demo, broker + worker + status, errors, keys."""
from __future__ import annotations

import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

import nbq
from conftest import free_port, pid_alive, redis_url, start_broker, wait_until

PIPE = subprocess.PIPE


def run_nbq(procs, *args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """Run one `nbq` command to its end; stdout and stderr kept apart."""
    p = procs.nbq(*args, stdout=PIPE, stderr=PIPE)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def children() -> set[int]:
    """The pids of this process's children (Linux: /proc/self/task/*/children)."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(map(int, f.read().split()))
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return pids


def worker_row(status_out: str, pid: int) -> list[str] | None:
    """The `nbq status` row of the worker whose supervisor has this pid, split into columns."""
    for line in status_out.splitlines():
        cols = line.split()
        if len(cols) == 6 and cols[2] == str(pid):
            return cols
    return None


def assert_one_line_error(rc: int, err: str, command: str) -> str:
    assert rc not in (0, None), (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nbq {command}: error: "), lines[0]
    return lines[0]


# -- demo ----------------------------------------------------------------------

def test_demo_prints_dataframe_rows_speed_and_full_progress(procs):
    p = procs.nbq("demo", "--items", "20000", "--workers", "2", stdout=PIPE, stderr=PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)
    assert "Traceback" not in err, err

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["seed", "pi", "error"])
    for i, line in enumerate(lines[header + 1:header + 6]):  # df.head(): seeds 0..4
        index, seed, pi, error = line.split()
        assert int(index) == int(seed) == i, line
        assert 0.0 <= float(pi) <= 4.0 and math.isclose(float(error), abs(float(pi) - math.pi),
                                                         abs_tol=1e-5), line
    assert "2 worker processes" in out, out
    assert "20,000 rows" in out, out
    assert any("items/s" in line for line in lines), out

    assert "100%" in err and "20,000/20,000 done" in err, err


# -- broker + worker + status + client ----------------------------------------------

def test_broker_worker_status_and_a_remote_client(procs):
    address = start_broker(procs)
    worker = procs.nbq("worker", "--broker", address, "-c", "2", stdout=PIPE, stderr=PIPE)

    def listed():
        rc, out, err = run_nbq(procs, "status", "--broker", address)
        assert rc == 0, err
        row = worker_row(out, worker.pid)
        return (out, row) if row is not None and row[3] == "2" else None

    out, row = wait_until(listed, timeout=20, interval=0.1, what="`nbq status` to list the worker")
    wid, host, pid, concurrency, active, queues = row
    assert (host, pid, concurrency, queues) == (socket.gethostname(), str(worker.pid), "2", "default")
    assert wid.startswith(f"{socket.gethostname()}:{worker.pid}:"), wid
    assert out.startswith(f"broker {address}: "), out
    assert any(line.startswith("queue lengths: ") for line in out.splitlines()), out

    before = children()
    with nbq.Client(address) as client:  # connects; starts no workers of its own
        assert not children() - before
        client.wait_for_workers(2, timeout=20)
        workers = client.workers()
        assert [w["pid"] for w in workers] == [worker.pid], workers
        assert len(workers[0]["processes"]) == 2 and worker.pid not in workers[0]["processes"]
        ran_on = client.submit(os.getpid).result(timeout=20)
        assert ran_on in workers[0]["processes"]
        assert client.submit(pow, 3, 4).result(timeout=20) == 81
        assert client.map(lambda x: x * x, range(50)).result(timeout=20) == [x * x for x in range(50)]
    assert worker.poll() is None  # the client leaving does not stop a worker it did not start


# -- errors are one readable line ----------------------------------------------------

def test_status_without_a_broker_is_one_line_error(procs):
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    rc, out, err = run_nbq(procs, "status", "--broker", address, timeout=15)
    assert time.monotonic() - t0 < 15
    line = assert_one_line_error(rc, err, "status")
    assert address in line, line
    assert out == ""


@pytest.mark.parametrize("args, command, words", [
    (["worker", "-c", "0"], "worker", "--concurrency"),
    (["status", "--broker", "http://x"], "status", "unsupported broker address"),
    (["worker", "--broker", "http://x", "-c", "1"], "worker", "unsupported broker address"),
    (["worker", "-A", "no_such_module_nbq", "--broker", "tcp://127.0.0.1:1"], "worker",
     "no module named 'no_such_module_nbq'"),
    (["broker", "--bind", "127.0.0.1:5555"], "broker", "cannot listen on '127.0.0.1:5555'"),
    (["demo", "--items", "0"], "demo", "--items must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(procs, args, command, words):
    rc, out, err = run_nbq(procs, *args, timeout=15)
    line = assert_one_line_error(rc, err, command)
    assert words in line, line


def test_broker_on_a_port_in_use_is_a_one_line_error(procs):
    """A second `nbq broker` on a port taken (by another broker, say) says so and exits."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        rc, _, err = run_nbq(procs, "broker", "--bind", address, timeout=15)
    line = assert_one_line_error(rc, err, "broker")
    assert f"cannot listen on '{address}'" in line and "in use" in line, line


def test_unknown_log_level_is_a_usage_error(procs):
    rc, out, err = run_nbq(procs, "--log-level", "verbose", "status", timeout=15)
    assert rc == 2 and "Traceback" not in err, err
    assert "--log-level" in err and "'verbose'" in err, err


def test_worker_exits_with_an_error_when_its_broker_stops(procs):
    address = f"tcp://127.0.0.1:{free_port()}"
    broker = procs.nbq("broker", "--bind", address)
    assert "listening" in broker.stdout.readline()
    worker = procs.nbq("worker", "--broker", address, "-c", "1", stdout=PIPE, stderr=PIPE)

    def connected():
        rc, out, _ = run_nbq(procs, "status", "--broker", address)
        return rc == 0 and worker_row(out, worker.pid) is not None

    wait_until(connected, timeout=20, interval=0.1, what="the worker to connect")
    assert worker.poll() is None

    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=10) == 0
    rc = worker.wait(timeout=15)
    line = assert_one_line_error(rc, worker.stderr.read(), "worker")
    assert "broker" in line and address in line, line


# -- the key file ----------------------------------------------------------------

LOAD_KEY = "import nbq.keys as k; print(k.load_key().decode())"


def test_default_key_file_is_created_private_and_reused(procs, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NBQ_KEY", "NBQ_KEY_FILE")}
    env["HOME"] = str(home)

    def load_key(env: dict) -> str:
        p = procs.start([sys.executable, "-c", LOAD_KEY], env=env, stdout=PIPE, stderr=PIPE)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        return out.strip()

    path = home / ".config" / "nbq" / "key"
    assert not path.exists()
    first = load_key(env)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    assert len(first) >= 32 and path.read_text().strip() == first
    assert load_key(env) == first

    from_env = "the-key-from-the-environment-" + "x" * 32
    assert load_key(dict(env, NBQ_KEY=from_env)) == from_env
    assert path.read_text().strip() == first


def test_multi_starts_stops_and_restarts_named_workers(tmp_path):
    """`nbq multi` as `celery multi`: detached named workers with pid and log files."""
    url = redis_url()
    files = [f"--pidfile={tmp_path}/%n.pid", f"--logfile={tmp_path}/%n%I.log"]

    def multi(*args):
        return subprocess.run([sys.executable, "-m", "nbq", "multi", *args, *files],
                              capture_output=True, text=True, timeout=60)

    def pids():
        return {p.stem: int(p.read_text()) for p in tmp_path.glob("*.pid")}

    try:
        out = multi("start", "w1", "w2", "--broker", url, "-c", "1")
        assert out.returncode == 0 and out.stdout.count(": OK") == 2, out.stdout + out.stderr
        first = pids()
        assert set(first) == {"w1", "w2"}
        with nbq.Client(url) as client:
            client.wait_for_workers(2)
            assert client.submit(pow, 2, 10).result(timeout=10) == 1024
            host = socket.gethostname()  # each node answers remote control under its own name
            assert set(client.control("ping", timeout=5)) == {f"w1@{host}", f"w2@{host}"}
        assert "already running" in multi("start", "w1", "--broker", url).stdout
        out = multi("restart", "w1", "--broker", url, "-c", "1")
        assert "stopped" in out.stdout and ": OK" in out.stdout, out.stdout
        assert not pid_alive(first["w1"]) and pids()["w1"] != first["w1"]
        out = multi("stopwait", "w1", "w2")
        assert out.stdout.count("stopped") == 2, out.stdout
        assert not pids() and not any(pid_alive(p) for p in first.values())
        assert (tmp_path / "w1.log").exists()
    finally:
        for pid in pids().values():  # whatever a failed assertion left running
            os.kill(pid, signal.SIGKILL)
