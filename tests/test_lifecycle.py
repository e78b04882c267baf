"""A client's life: creation checks, shutdown (waited, interrupted, repeated), exit, initializer,
modules the workers lack."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import CancelledError

import cloudpickle
import pytest

import nbq
from conftest import make_client, pid_alive, redis_url, standalone_broker, wait_until


@contextlib.contextmanager
def interrupt_after(seconds: float):
    """A KeyboardInterrupt in this (the main) thread after seconds, as a Ctrl-C would."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, raise_interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def local_pids(client: nbq.Client) -> list[int]:
    """The pids of the client's local worker supervisor and of its worker processes."""
    return [p for w in client.workers() for p in (w["pid"], *w["processes"])]


def assert_all_stopped(pids: list[int], threads_before: set) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=15,
               what="local workers to exit")
    wait_until(lambda: not [t for t in threading.enumerate() if t not in threads_before],
               timeout=15, what="the client's threads to end")


# -- workers <= 0 --------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, -1])
def test_no_workers_is_a_value_error_in_the_caller(workers):
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="workers must be a positive number"):
        nbq.Client(workers=workers)
    with pytest.raises(ValueError, match="workers must be a positive number"):
        nbq.Client(redis_url(), workers=workers)
    assert set(threading.enumerate()) <= before


def test_worker_with_concurrency_zero_exits_with_a_clear_error(procs):
    p = procs.nbq("worker", "--broker", "tcp://127.0.0.1:9", "--concurrency", "0")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "nbq worker: error: --concurrency must be at least 1" in out


# -- shutdown after a map's timeout --------------------------------------------------------

def test_shutdown_after_a_map_timeout_waits_for_the_map_and_returns(transport, procs):
    client = make_client(transport, procs)
    r = client.map(time.sleep, [1, 1], timeout=0.3)
    with pytest.raises(TimeoutError):
        list(r)
    client.shutdown(wait=True)
    assert r.result(timeout=0) == [None, None]


def test_leaving_a_with_block_after_a_map_timeout(transport, procs):
    with make_client(transport, procs) as client:
        r = client.map(time.sleep, [0.5, 0.5], timeout=0.1)
        with pytest.raises(TimeoutError):
            r.result()
    assert r.result(timeout=0) == [None, None]


def test_shutdown_with_cancel_futures_after_a_map_timeout(transport, procs):
    client = make_client(transport, procs)
    r = client.map(time.sleep, [2.0] * 20, chunksize=1, timeout=0.2)
    with pytest.raises(TimeoutError):
        list(r)
    t0 = time.monotonic()
    client.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t0 < 12  # not the 20 s the 20 items take on 2 processes
    assert r.done()
    cancelled = [i for i, e in r.errors().items() if isinstance(e, CancelledError)]
    assert cancelled and len(cancelled) == len(r.errors())


# -- a failed shutdown leaves nothing behind -----------------------------------------------

def test_shutdown_interrupted_while_waiting_stops_everything(transport, procs):
    before = set(threading.enumerate())
    client = make_client(transport, procs)
    pids = local_pids(client)
    futs = [client.submit(time.sleep, 60) for _ in range(2)]
    wait_until(lambda: all(f.running() for f in futs), what="both tasks to start")
    r = client.map(time.sleep, [60] * 100, chunksize=1)  # more than are sent at first
    with interrupt_after(0.5), pytest.raises(KeyboardInterrupt):
        client.shutdown(wait=True)
    assert_all_stopped(pids, before)
    for f in futs:  # nothing is left waiting for a result that cannot come
        with pytest.raises(nbq.NbqError, match="had not finished when its client shut down"):
            f.result(timeout=5)
    with pytest.raises(nbq.NbqError, match="had not finished"):
        r.result(timeout=5)
    client.shutdown()  # a second shutdown returns normally
    with pytest.raises(RuntimeError):
        client.submit(abs, 1)


def _ignore_sigterm_and_sleep(seconds: float, mark: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(mark, "w").close()
    time.sleep(seconds)


def test_shutdown_interrupted_while_stopping_workers_still_stops_them(transport, procs, tmp_path):
    before = set(threading.enumerate())
    client = make_client(transport, procs)
    pids = local_pids(client)
    client.submit(_ignore_sigterm_and_sleep, 60, str(tmp_path / "mark"))
    wait_until((tmp_path / "mark").exists, what="the task to start")
    # the worker process ignores SIGTERM, so its supervisor takes 2 s to stop it:
    # the interrupt comes while shutdown waits for the local workers to exit
    with interrupt_after(0.5), pytest.raises(KeyboardInterrupt):
        client.shutdown(wait=False)
    assert_all_stopped(pids, before)
    client.shutdown()


# -- exit finishes submitted work ----------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent("""
    import sys, time
    import nbq

    def show(f):
        print("result", f.result(), flush=True)

    def square_later(i):
        time.sleep(0.3)
        return i * i

    def note(i, path=sys.argv[2]):
        time.sleep(0.05)
        with open(path, "a") as out:
            out.write(f"{i}\\n")

    client = nbq.Client(sys.argv[1] if sys.argv[1] != "-" else None, workers=2)
    for i in range(4):
        client.submit(square_later, i).add_done_callback(show)
    client.map(note, range(20), chunksize=1)
    print("end of script", flush=True)
""")


def test_a_script_ending_without_shutdown_finishes_its_work(transport, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(EXIT_SCRIPT)
    for run in range(3):
        address = "-" if transport == "zmq" else redis_url()
        notes = tmp_path / f"notes{run}"
        out = subprocess.run([sys.executable, str(script), address, str(notes)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "end of script"
        assert sorted(lines[1:]) == ["result 0", "result 1", "result 4", "result 9"], out.stdout
        assert sorted(int(x) for x in notes.read_text().split()) == list(range(20))


# -- modules the workers cannot import -----------------------------------------------------

@contextlib.contextmanager
def client_only_module(folder, name: str, code: str):
    """A module importable in this process only (on its sys.path, not in any worker's env)."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(code))
    saved = sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(name)
    finally:
        if name in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.unregister_pickle_by_value(sys.modules[name])
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved


def test_a_module_only_the_client_has_fails_clearly_until_shipped(transport, procs, tmp_path):
    address = standalone_broker(transport, procs)
    (tmp_path / "elsewhere").mkdir()
    procs.nbq("worker", "--broker", address, "-c", "1", cwd=tmp_path / "elsewhere")
    name = f"helpers_{uuid.uuid4().hex[:8]}"
    with client_only_module(tmp_path / "mods", name, """
            def triple(x):
                return 3 * x
            """) as helpers, nbq.Client(address) as client:
        client.wait_for_workers(1)
        with pytest.raises(ModuleNotFoundError) as failed:
            client.submit(helpers.triple, 2).result(timeout=30)
        message = str(failed.value)
        assert f"cannot import module {name!r}" in message
        assert socket.gethostname() in message
        assert f"nbq.ship({name})" in message and f"ship=[{name}]" in message
        with pytest.raises(ModuleNotFoundError, match=f"nbq.ship\\({name}\\)"):
            client.map(helpers.triple, [1, 2]).result(timeout=30)

        nbq.ship(helpers)  # the same function, submitted again, now travels by value
        assert client.submit(helpers.triple, 2).result(timeout=30) == 6
        assert client.map(helpers.triple, [1, 2]).result(timeout=30) == [3, 6]

        cloudpickle.unregister_pickle_by_value(helpers)
        with nbq.Client(address, ship=[name]) as shipping:
            assert shipping.submit(helpers.triple, 5).result(timeout=30) == 15


def test_nbq_worker_imports_modules_of_the_folder_it_runs_in(transport, procs, tmp_path):
    address = standalone_broker(transport, procs)
    project = tmp_path / "project"
    with client_only_module(project, "tasks", """
            def shout(text):
                return text.upper() + "!"
            """) as tasks, nbq.Client(address) as client:
        nbq_command = os.path.join(os.path.dirname(sys.executable), "nbq")  # not python -m
        procs.start([nbq_command, "worker", "--broker", address, "-c", "1"], cwd=project)
        client.wait_for_workers(1)
        assert client.submit(tasks.shout, "hi").result(timeout=30) == "HI!"


def test_worker_help_says_the_folder_is_on_sys_path():
    out = subprocess.run([sys.executable, "-m", "nbq", "worker", "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    assert "current directory is put first on sys.path" in " ".join(out.split())


# -- initializer -----------------------------------------------------------------------------

def _process_pids(client: nbq.Client) -> list[int]:
    return [p for w in client.workers() for p in w["processes"]]


def test_initializer_runs_once_in_each_process_and_in_a_replacement(transport, procs, tmp_path):
    marks = tmp_path / "inits"
    marks.mkdir()

    def load_model(folder, name):  # defined here, as in a notebook: it travels by value
        os.environ["NBQ_TEST_MODEL"] = name
        with open(os.path.join(folder, str(os.getpid())), "a") as f:
            f.write("init\n")

    client = make_client(transport, procs, workers=2, initializer=load_model,
                         initargs=(str(marks), "model-1"))
    try:
        def model_here(_):
            return os.getpid(), os.environ.get("NBQ_TEST_MODEL")

        pids = _process_pids(client)
        seen = client.map(model_here, range(40), chunksize=1).result(timeout=60)
        assert {model for _, model in seen} == {"model-1"}
        assert {pid for pid, _ in seen} <= set(pids)
        assert sorted(int(f.name) for f in marks.iterdir()) == sorted(pids)
        assert all(f.read_text() == "init\n" for f in marks.iterdir())

        os.kill(pids[0], signal.SIGKILL)
        new = wait_until(lambda: [p for p in _process_pids(client) if p not in pids],
                         timeout=30, what="a replacement process")[0]
        wait_until((marks / str(new)).exists, what="the replacement's initializer")
        seen = client.map(model_here, range(40), chunksize=1).result(timeout=60)
        assert {model for _, model in seen} == {"model-1"}
        assert (marks / str(new)).read_text() == "init\n" and len(list(marks.iterdir())) == 3
    finally:
        client.shutdown(wait=False)


def test_a_failing_initializer_fails_the_tasks_with_its_error(transport, procs):
    def load_model():
        raise FileNotFoundError("no model at /models/m.pt")

    client = make_client(transport, procs, workers=2, initializer=load_model)
    try:
        with pytest.raises(FileNotFoundError, match="no model at /models/m.pt") as failed:
            client.submit(abs, -1).result(timeout=30)
        assert any("raised by the initializer" in note and "load_model" in note
                   for note in failed.value.__notes__)
        with pytest.raises(FileNotFoundError, match="no model"):
            client.map(abs, range(10)).result(timeout=30)
    finally:
        client.shutdown(wait=False)


def test_an_initializer_needs_local_workers(procs):
    with pytest.raises(ValueError, match="nbq worker --init"):
        nbq.Client("tcp://127.0.0.1:9", initializer=print)
    with pytest.raises(TypeError, match="initializer must be callable"):
        nbq.Client(workers=1, initializer="load_model")


def test_an_initializer_not_signed_with_the_key_is_refused():
    from nbq.worker import initializer
    data = initializer.encode(b"k" * 32, print, ("hi",))
    assert initializer.decode(b"k" * 32, data).name == "print"
    with pytest.raises(nbq.SignatureError):
        initializer.decode(b"x" * 32, data)


def test_nbq_worker_init_runs_a_function_of_a_module_beside_it(transport, procs, tmp_path):
    address = standalone_broker(transport, procs)
    project = tmp_path / "project"
    with client_only_module(project, "tasks", """
            import os

            def setup():
                os.environ["NBQ_TEST_SETUP"] = f"set up in {os.getpid()}"

            def read():
                return os.environ.get("NBQ_TEST_SETUP"), os.getpid()
            """) as tasks, nbq.Client(address) as client:
        nbq_command = os.path.join(os.path.dirname(sys.executable), "nbq")
        procs.start([nbq_command, "worker", "--broker", address, "-c", "2",
                     "--init", "tasks:setup"], cwd=project)
        client.wait_for_workers(2)
        seen = client.map(lambda _: tasks.read(), range(20), chunksize=1).result(timeout=60)
        assert all(setup == f"set up in {pid}" for setup, pid in seen)


@pytest.mark.parametrize("spec, error", [
    ("nosuchmodule:setup", "--init nosuchmodule:setup: ModuleNotFoundError: No module named"),
    ("tasks", "--init 'tasks': give MODULE:FUNC"),
    ("os:nosuchfunction", "--init os:nosuchfunction: AttributeError"),
])
def test_nbq_worker_init_with_a_wrong_name_exits_with_a_clear_error(procs, spec, error):
    p = procs.nbq("worker", "--broker", "tcp://127.0.0.1:9", "--init", spec)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1 and f"nbq worker: error: {error}" in out, out


APP_SCRIPT = textwrap.dedent("""
    import sys
    import nbq

    app = nbq.App("proj", broker=sys.argv[1])

    @app.task(name="proj.add")
    def add(x, y):
        return x + y

    add.delay(2, 3)
    print("sent", flush=True)
""")


def test_a_celery_style_script_exits_once_its_tasks_are_sent(transport, procs, tmp_path):
    """As with Celery, a task sent to a broker outlives the script: exit does not wait for a
    worker to run it (none runs here), and the task is still queued for one."""
    address = standalone_broker(transport, procs)
    script = tmp_path / "send.py"
    script.write_text(APP_SCRIPT)
    out = subprocess.run([sys.executable, str(script), address], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout == "sent\n", out.stderr
    with nbq.Client(address) as client:
        assert client.status()["queues"] == {"default": 1}
