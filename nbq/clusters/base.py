"""The cluster object every launcher shares: a broker, units of workers, scale, adapt, close.

A cluster owns the broker its workers dial (an embedded ZeroMQ broker on a thread
of this process, bound to ``listen``, or a given ``tcp://`` / ``redis://``
address) and a set of *units*: one ``nbq worker`` started somewhere (an SSH
session, a Slurm job, a local subprocess) running some worker processes.  A
launcher subclass implements four small hooks:

    _start(name, n) -> handle   start unit `name` of n processes; return at once
    _stop(handle)               stop it (and wait a little for it to go)
    _ended(handle) -> str|None  why it ended (its last output), None while it runs
    _log(handle) -> str         its output so far

``worker_command(name, n, python)`` is the command a unit runs; the unit hands it
``handshake()`` on its standard input (the signing key, one line) and keeps that
input open as the worker's lifeline: when the cluster's process dies, even by
SIGKILL, the input closes and the worker exits.  (A launcher without a standard
input to keep, a batch job, writes the key to a 0600 file instead.)  A key is
never on a command line nor in an environment.  The worker is named ``name`` (its ``-n``), which is how the
cluster finds its units among the broker's workers.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import platform
import sys
import threading
import time
import uuid
import warnings
import weakref
from typing import Any

import zmq

from .. import keys
from ..broker import Broker
from ..errors import LaunchError, NbqError
from ..policy import RESULT_EXPIRES
from .. import version
from ..transport import client_connection, with_result_expires
from ..transport.base import ClientConnection
from ..client.embedded import EmbeddedClient
from . import table
from .scaling import ADAPT_WAIT, Adapter, Unit, plan_shrink

log = logging.getLogger("nbq.cluster")

STOP_WAIT = 5.0        # a unit asked to stop is killed after this long
LAUNCHED_BROKER_GRACE = 10.0  # a launched worker whose broker is silent this long exits


class LaunchWarning(UserWarning):
    """Some of a cluster's units failed to start while others serve."""


def versions() -> str:
    """This side's nbq and Python versions, as a worker compares them (``--versions``)."""
    return f"{version.__version__}/{platform.python_version()}"


def _end(thread: threading.Thread | None, context: zmq.Context | None) -> None:
    """Wait for a stopped broker's thread, then end its context."""
    if thread is not None:
        thread.join(5.0)
    if context is not None:
        context.term()


class Cluster:
    """Worker processes started by a launcher, all serving one broker.

    ``broker``: None for an embedded ZeroMQ broker on a thread of this process,
    bound to ``listen`` (an address the workers can reach: the loopback default
    serves this machine only), or the address of a running broker (``tcp://``,
    ``redis://``).  ``nbq.Client(cluster)`` submits to it.
    """

    #: processes per unit when scale() adds units (a launcher sets it)
    unit_size: int = 1

    def __init__(self, broker: str | None = None, *, listen: str = "tcp://127.0.0.1:0",
                 key_file: str | None = None, result_expires: float | None = None,
                 key: keys.Key | None = None) -> None:
        """``key``: the signing key already loaded (by a Client), else loaded from key_file."""
        self.key = key if key is not None else keys.load_key(key_file)
        self.id = uuid.uuid4().hex[:8]
        self.context: zmq.Context | None = None
        self.broker: Broker | None = None
        self._thread: threading.Thread | None = None
        if broker is None:
            self.context = zmq.Context()
            self.broker = Broker(self.key, listen, self.context,
                                 result_expires=result_expires or RESULT_EXPIRES,
                                 events_on=os.environ.get("NBQ_EVENTS", "1") != "0")
            self.address = self.broker.addresses[0]
            self._thread = threading.Thread(target=self.broker.run, name="nbq-broker", daemon=True)
            self._thread.start()
        else:
            self.address = with_result_expires(broker, result_expires)
        self._units: dict[str, Unit] = {}   # started, not stopped, not failed
        self._failed: dict[str, Unit] = {}  # ended on their own
        self._count = itertools.count()
        self._lock = threading.RLock()
        self._client = None
        # the users' Client(cluster)s: shut down before the broker stops (their sockets on its
        # context would hold close() forever)
        self._clients: "weakref.WeakSet" = weakref.WeakSet()
        self._adapter: Adapter | None = None
        self._closed = False
        atexit.unregister(_close_all)  # registered once, when a cluster first opens
        atexit.register(_close_all)
        _open.add(self)

    # -- hooks a launcher implements ------------------------------------------

    def _start(self, name: str, n: int) -> Any:
        """Start unit ``name`` of n worker processes; return its handle without waiting."""
        raise NotImplementedError

    def _stop(self, handle: Any) -> None:
        """Stop a unit; return once it is gone (or after STOP_WAIT, having killed it)."""
        raise NotImplementedError

    def _ended(self, handle: Any) -> str | None:
        """Why the unit ended (the end of its output), or None while it runs."""
        raise NotImplementedError

    def _log(self, handle: Any) -> str:
        """The unit's output so far."""
        raise NotImplementedError

    def _place(self) -> str:
        """The host label of the next unit (a launcher with several hosts picks one)."""
        return "local"

    # -- what a unit runs -----------------------------------------------------

    def worker_command(self, name: str, n: int, python: str = sys.executable,
                       key_file: str | None = None) -> list[str]:
        """The ``nbq worker`` command of unit ``name``, refusing to start unless its nbq and
        Python versions are this process's.

        ``key_file`` None: the worker reads handshake() on standard input, which then
        stays open as its lifeline.  Else the path of a 0600 file the launcher wrote in a
        private directory (no lifeline: the worker stops when its broker stops answering,
        within seconds).
        """
        return [python, "-m", "nbq", "worker", "--broker", self.address, "--concurrency", str(n),
                "--hostname", name, *(["--key-file", key_file] if key_file else ["--handshake"]),
                "--versions", versions(), "--broker-grace", f"{LAUNCHED_BROKER_GRACE:g}"]

    def host(self) -> Broker | None:
        """The embedded ZeroMQ broker, whose thread also receives for its clients
        (Broker.attach), or None."""
        return self.broker if isinstance(self.broker, Broker) else None

    def client_connection(self, client_id: str) -> ClientConnection:
        """The connection of a client of this cluster to its broker (embedded: through its
        door, as objects)."""
        host = self.host()
        if host is not None:
            return EmbeddedClient(host, client_id)
        return client_connection(self.address, self.key, client_id)

    def handshake(self) -> bytes:
        """What a unit writes on the worker's standard input (then keeps it open)."""
        return keys.handshake(self.key)

    # -- the public surface ---------------------------------------------------

    @property
    def processes(self) -> int:
        """Worker processes of the units started and not failed."""
        with self._lock:
            return sum(u.processes for u in self._units.values() if u.failure is None)

    def scale(self, n: int) -> None:
        """Run n worker processes: start units on more hosts, or stop units (idle ones first).

        An explicit size ends adapt().  Returns at once; wait_for_workers() waits.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"scale needs a number of worker processes >= 0, not {n!r}")
        self._stop_adapting()
        self._scale(n)

    def _scale(self, n: int, idle_for: float | None = None) -> None:
        """scale(n) without ending adapt; ``idle_for``: stop only units idle this long."""
        self._check_open()
        with self._lock:
            self._reap()
            have = self.processes
            while have < n:
                k = min(self.unit_size, n - have)
                name = f"nbq-{self.id}-{next(self._count)}@{self._place()}"
                host = name.split("@", 1)[1]
                log.info("starting %s (%d processes)", name, k)
                self._units[name] = Unit(name, host, k, self._start(name, k))
                have += k
            if have > n:
                self._shrink(have - n, idle_for)

    def _shrink(self, surplus: int, idle_for: float | None) -> None:
        """Stop surplus processes as scaling.plan_shrink says: whole units, then (not for
        adapt) some processes of one serving unit."""
        live = [u for u in self._units.values() if u.failure is None]
        stop, within = plan_shrink(live, self._activity(), surplus, idle_for, time.monotonic())
        for unit in stop:
            self._retire(unit)
        if within is not None:  # no whole unit fits: one unit stops some processes
            unit, n = within
            self._status()  # the cluster's client exists
            self._client.control("pool_shrink", {"n": n}, [unit.name], timeout=5.0)
            unit.processes -= n

    def _retire(self, unit: Unit) -> None:
        log.info("stopping %s", unit.name)
        self._units.pop(unit.name, None)
        self._stop(unit.handle)

    def adapt(self, minimum: int = 0, maximum: int = 64, wait: float = ADAPT_WAIT) -> None:
        """Grow with queued work up to ``maximum`` processes; stop units idle for ``wait``
        seconds while nothing is queued, down to ``minimum``.  A busy unit is never stopped."""
        if not (isinstance(minimum, int) and isinstance(maximum, int) and 0 <= minimum <= maximum):
            raise ValueError(f"adapt needs 0 <= minimum <= maximum, not {minimum!r}, {maximum!r}")
        if not wait >= 0:
            raise ValueError(f"adapt's wait is seconds idle before a unit stops (>= 0), not {wait!r}")
        self._check_open()
        self._stop_adapting()
        self._adapter = Adapter(self, minimum, maximum, wait)

    def wait_for_workers(self, n: int | None = None, timeout: float = 30.0) -> None:
        """Wait until n processes (default: all started) serve; units that failed meanwhile are
        reported (LaunchWarning naming each), or raised (LaunchError) when none serves."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._reap()
                units = list(self._units.values())
            joined = self._joined()
            want = self.processes if n is None else n
            if sum(joined.values()) >= want and all(u.failure or u.name in joined for u in units):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(joined.values())} of {want} worker processes joined "
                                   f"within {timeout:g} s; cluster.logs() shows their output")
            time.sleep(0.05)
        self._report_failures()

    @property
    def workers(self) -> list[dict]:
        """Each unit: name, host, processes, state (starting, running, failed: why), active
        tasks and memory (bytes, of the worker and its processes, where the broker knows it)."""
        with self._lock:
            self._reap()
            units = list(self._units.values()) + list(self._failed.values())
        info = {w["name"]: w for w in self._status()["workers"]} if units and not self._closed \
            else {}
        rows = []
        for u in units:
            w = info.get(u.name)
            state = (f"failed: {u.failure}" if u.failure else "running" if w else "starting")
            rows.append({"name": u.name, "host": u.host, "processes": u.processes, "state": state,
                         "active": w["active"] if w else 0,
                         "memory": w.get("memory") if w else None})
        return rows

    def logs(self) -> dict[str, str]:
        """Each unit's output (its worker's log), by unit name."""
        with self._lock:
            units = list(self._units.values()) + list(self._failed.values())
        return {u.name: self._log(u.handle) for u in units}

    def close(self) -> None:
        """Stop adapting, every unit, then the embedded broker.

        Each step runs even when one before it fails or is interrupted (a Ctrl-C while
        units stop); a repeated call does what is left.
        """
        self._closed = True
        _open.discard(self)
        with contextlib.ExitStack() as steps:  # callbacks run last-registered first
            steps.callback(table.show_closed, self)
            steps.callback(self._stop_broker)
            steps.callback(self._stop_client)
            steps.callback(self._stop_units)
            steps.callback(self._stop_adapting)

    def _stop_units(self) -> None:
        while True:
            with self._lock:
                if not self._units:
                    return
                _, unit = self._units.popitem()
            self._stop(unit.handle)

    def _stop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        for c in [client, *self._clients]:
            if c is not None:
                c.shutdown(wait=False)

    def _stop_broker(self) -> None:
        thread, context = self._thread, self.context
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        self.context = None
        if thread is threading.current_thread():  # a client's done-callback, which runs on
            # the broker's thread (Broker.attach): the loop ends once it returns
            threading.Thread(target=_end, args=(thread, context), daemon=True).start()
        else:
            _end(thread, context)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repr_html_(self) -> str:
        return table.html_table(self)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """The table, live in Jupyter (table.py)."""
        return table.bundle(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}: {self.processes} worker processes>"

    # -- the broker's view ----------------------------------------------------

    def _reap(self) -> None:
        """Move units that ended on their own to _failed (with their last words)."""
        for unit in list(self._units.values()):
            why = self._ended(unit.handle)
            if why is not None:
                unit.failure = why or "exited"
                self._units.pop(unit.name)
                self._failed[unit.name] = unit

    def _report_failures(self) -> None:
        with self._lock:
            new = [u for u in self._failed.values() if not u.reported]
            for u in new:
                u.reported = True
            serving = bool(self._units)
        if not new:
            return
        text = "; ".join(f"{u.host}: {u.failure}" for u in new)
        if not serving:
            raise LaunchError(f"no worker started: {text}")
        warnings.warn(f"{len(new)} worker unit(s) failed to start ({text}); the others serve",
                      LaunchWarning, stacklevel=3)

    def _status(self) -> dict:
        """The broker's info: workers and queues (through a client of this cluster's own)."""
        with self._lock:
            if self._client is None:
                self._check_open()  # no new client once close() has begun
                from ..client import Client, registry
                current = registry._current  # this client is the cluster's, not the user's
                self._client = Client(self)
                registry._current = current
            client = self._client
        return client.status()

    def _joined(self) -> dict[str, int]:
        """Processes serving, by unit name, of this cluster's units."""
        return {w["name"]: len(w["processes"]) for w in self._status()["workers"]
                if w["name"] in self._units}

    def _activity(self) -> dict[str, int]:
        """Running tasks by unit name."""
        return {w["name"]: w["active"] for w in self._status()["workers"]}

    def _stop_adapting(self) -> None:
        if self._adapter is not None:
            self._adapter.stop()
            self._adapter = None

    def _check_open(self) -> None:
        if self._closed:
            raise NbqError(f"{type(self).__name__} is closed: make a new one")


def _close_all() -> None:
    """Clusters still open when the interpreter exits stop their workers."""
    for cluster in list(_open):
        cluster.close()


_open: "weakref.WeakSet[Cluster]" = weakref.WeakSet()
