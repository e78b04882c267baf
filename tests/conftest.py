"""Shared fixtures: real brokers and worker processes, started and stopped by their own handles."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

import nbq
from ports import free_port

# A suite started in the background of a non-interactive shell inherits SIGINT ignored, and
# so would every process it starts; the Ctrl-C tests need what a terminal gives a user.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TRANSPORTS = ["zmq", "redis"]
#: The transports every behaviour of the contract must hold on: a test module, class or
#: function marked ``conformance`` gets its ``transport``, ``shared_client`` and ``client``
#: fixtures over these; tests that kill or signal a worker process stay on TRANSPORTS.
CONFORMANCE = TRANSPORTS + ["memory", "amqp"]


def pytest_configure(config):
    config.addinivalue_line("markers", "conformance: run the transport fixtures on memory:// "
                            "too (tests of what every transport must do)")


def _own_parametrization(metafunc, name: str) -> bool:
    """Whether the test asks for fixture name and nothing else parametrizes it."""
    if name not in metafunc.fixturenames:
        return False
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if name in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return False
    defs = metafunc._arg2fixturedefs.get(name)
    return bool(defs) and defs[-1].params is None and defs[-1].func.__module__ == __name__


def pytest_generate_tests(metafunc):
    """The transports of the ``transport`` and ``shared_client`` fixtures: CONFORMANCE for
    tests marked conformance, else TRANSPORTS."""
    names = CONFORMANCE if metafunc.definition.get_closest_marker("conformance") else TRANSPORTS
    if _own_parametrization(metafunc, "transport"):
        metafunc.parametrize("transport", names, indirect=True)
    if _own_parametrization(metafunc, "shared_client"):
        metafunc.parametrize("shared_client", names, indirect=True, scope="module")


@pytest.fixture(scope="session", autouse=True)
def _key(tmp_path_factory):
    """Every nbq process of the suite signs with a key of its own, not the user's."""
    path = tmp_path_factory.mktemp("key") / "key"
    os.environ["NBQ_KEY_FILE"] = str(path)
    os.environ.pop("NBQ_KEY", None)
    os.environ.pop("NBQ_BROKER", None)
    yield path


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll predicate until it returns a true value (returned) or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def held_until(gate):
    """A task (any arguments) that ends once the test creates the file gate, 30 s at most: it
    outlasts the waits the test makes while it runs, and ends when the test says, not after a
    fixed sleep.  A closure, so that workers get it by value, not by importing conftest."""
    gate = str(gate)

    def held(*_):
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
    return held


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def widget_states(nb) -> dict:
    """The ipywidgets model states an executed notebook saved, by model id."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return state.get("state", {})


def execute_notebook(path, tmp_path):
    """Run a notebook top to bottom on the venv's ipykernel (nbclient); returns it executed.

    Fails if the notebook as committed holds error outputs."""
    import nbclient
    import nbformat
    committed = nbformat.read(path, as_version=4)
    assert not [o for c in committed.cells for o in c.get("outputs", [])
                if o.output_type == "error"], "error outputs are committed"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def standalone_broker(transport: str, procs: "Processes") -> str:
    """The address of a broker no client owns: an `nbq broker` subprocess, a fresh Redis db,
    or a fresh vhost of the private RabbitMQ."""
    if transport == "amqp":
        return rabbit_url()
    return start_broker(procs) if transport == "zmq" else redis_url()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


class Processes:
    """Starts nbq commands as subprocesses and stops every one of them at teardown."""

    def __init__(self, tmp_path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tmp_path

    def nbq(self, *args: str, **kw) -> subprocess.Popen:
        """`nbq ARGS` as a subprocess that can import the test modules (as a user's workers
        import the user's modules)."""
        here = os.path.dirname(os.path.abspath(__file__))
        kw.setdefault("env", dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH")) if p)))
        return self.start([sys.executable, "-m", "nbq", *args], **kw)

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("text", True)
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        """SIGTERM (a worker's warm shutdown), a second SIGTERM after 1 s for what still runs
        (cold: a test's leftover long task is not waited for), SIGKILL after 10 s more."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for signum, timeout in ((signal.SIGTERM, 1), (signal.SIGKILL, 10)):
            for p in self.procs:
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.send_signal(signum)
        for p in self.procs:
            p.wait()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop_all()


def start_broker(procs: Processes, address: str | None = None, *options: str) -> str:
    """An `nbq broker` subprocess on address (default: a free loopback port), given options;
    returns the address.

    Given the address of one that was killed, it is that broker restarted.  A new one binds
    port 0 and reports the port it got, so no other process can take it in between."""
    p = procs.nbq("broker", "--bind", address or "tcp://127.0.0.1:0", *options)
    line = p.stdout.readline()
    assert "listening on " in line, line + p.stdout.read()
    return address or line.split("listening on ", 1)[1].split(",")[0].strip()


@pytest.fixture
def transport(request) -> str:
    """The transport's name (parametrized by pytest_generate_tests)."""
    return request.param


_redis = None      # the session's private redis-server, started on first use
_redis_dir = None


@pytest.fixture(scope="session", autouse=True)
def _redis_session(tmp_path_factory):
    """Where the private Redis keeps its files; stops it (by its handle) at the end."""
    global _redis, _redis_dir
    _redis_dir = tmp_path_factory.mktemp("redis")
    yield
    if _redis is not None:
        _redis.stop()
        _redis = None


def redis_server():
    """The session's private redis-server (AOF, own temp dir, free 127.0.0.1 port), started lazily."""
    global _redis
    if _redis is None:
        from redis_server import RedisServer
        _redis = RedisServer(_redis_dir)
    return _redis


def redis_url(**query) -> str:
    """A fresh, flushed database of the session's private Redis."""
    return redis_server().url(**query)


_rabbit = None     # the session's private RabbitMQ node, started on first use
_rabbit_dir = None


@pytest.fixture(scope="session", autouse=True)
def _rabbit_session(tmp_path_factory):
    """Where the private RabbitMQ keeps its files; stops it (by its handles) at the end."""
    global _rabbit, _rabbit_dir
    _rabbit_dir = tmp_path_factory.mktemp("rabbitmq")
    yield
    if _rabbit is not None:
        _rabbit.stop()
        _rabbit = None


def rabbit_server():
    """The session's private RabbitMQ node (tests/rabbitmq_server.py), started lazily, and
    again if a test left it down (its failure stays that test's, not every later one's)."""
    global _rabbit
    if _rabbit is not None and (_rabbit.proc is None or _rabbit.proc.poll() is not None):
        _rabbit.stop()
        _rabbit = None
    if _rabbit is None:
        from rabbitmq_server import RabbitServer
        _rabbit = RabbitServer(_rabbit_dir)
    return _rabbit


def rabbit_url(backend: bool = True, **query) -> str:
    """A fresh vhost of the session's private RabbitMQ; with backend, a fresh database of the
    private Redis as its result_backend (by-id lookups, cancel, chords)."""
    if backend:
        query["result_backend"] = quote(redis_url(), safe="")
    return rabbit_server().url(**query)


_memory_brokers = itertools.count()


def make_client(transport: str, procs: Processes | None = None, workers: int = 2, **kw) -> nbq.Client:
    """A client on the given transport with `workers` local worker processes, all connected."""
    if transport == "zmq":
        client = nbq.Client(workers=workers, **kw)
    elif transport == "redis":
        client = nbq.Client(redis_url(), workers=workers, **kw)
    elif transport == "amqp":
        client = nbq.Client(rabbit_url(), workers=workers, **kw)
    elif transport == "memory":  # a broker of its own in this process, as each zmq client has
        client = nbq.Client(f"memory://test-{next(_memory_brokers)}", workers=workers, **kw)
    else:
        raise ValueError(transport)
    client.wait_for_workers(workers)
    return client


@pytest.fixture(scope="module")
def shared_client(request):
    """One client per module and transport, for tests that leave no state behind."""
    client = make_client(request.param)
    yield client
    client.shutdown()


@pytest.fixture
def client(transport, procs):
    """A fresh client for tests that change or break things."""
    c = make_client(transport, procs)
    yield c
    c.shutdown(wait=False)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The session's private Slurm (munged, slurmctld, slurmd: tests/slurm_server.py), started
    by the first test that asks for it; SLURM_CONF names it while it runs."""
    from slurm_server import SlurmServer
    server = SlurmServer(tmp_path_factory.mktemp("slurm"))
    yield server
    server.stop()
