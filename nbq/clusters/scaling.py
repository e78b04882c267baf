"""How many worker processes a cluster runs: its units, which stop when it shrinks, adapt().

A cluster grows by starting units (base.py); it shrinks by stopping whole units, idle
then newest first, and (scale, not adapt) by asking one serving unit to stop some of its
processes.  adapt() runs a thread that sizes the cluster to the tasks running and queued.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Cluster

log = logging.getLogger("nbq.cluster")

ADAPT_INTERVAL = 1.0   # seconds between adapt's looks at the queue
ADAPT_WAIT = 5.0       # adapt's default: an idle unit stops after this many seconds idle


@dataclass
class Unit:
    """One launched ``nbq worker``: where, how many processes, and the launcher's handle."""
    name: str
    host: str
    processes: int
    handle: Any
    started: float = field(default_factory=time.monotonic)
    failure: str | None = None
    idle_since: float | None = None
    reported: bool = False  # its failure was raised or warned about


def plan_shrink(live: list[Unit], active: dict[str, int], surplus: int,
                idle_for: float | None, now: float) -> tuple[list[Unit], tuple[Unit, int] | None]:
    """What to stop for ``surplus`` fewer processes: (the whole units to stop, and (a unit,
    how many of its processes to stop) or None).

    Whole units worth at most surplus processes go, idle then newest first; ``idle_for``
    (adapt) keeps every unit not idle that long, and never shrinks within a unit.  Else what
    is left is stopped within one serving unit (which stops its idle processes first).
    ``active``: running tasks by unit name, of the units the broker knows.
    """
    order = sorted(live, key=lambda u: (active.get(u.name, 0) > 0, -u.started))
    stop: list[Unit] = []
    for unit in order:
        if unit.processes > surplus:
            continue
        if idle_for is not None and (active.get(unit.name, 1) > 0 or unit.idle_since is None
                                     or now - unit.idle_since < idle_for):
            continue
        surplus -= unit.processes
        stop.append(unit)
    if not surplus or idle_for is not None:
        return stop, None
    stopped = {u.name for u in stop}
    unit = next((u for u in order if u.name not in stopped and u.processes > surplus
                 and u.name in active), None)
    return stop, (unit, surplus) if unit is not None else None


class Adapter:
    """adapt()'s thread: each ADAPT_INTERVAL, size the cluster to running + queued tasks."""

    def __init__(self, cluster: "Cluster", minimum: int, maximum: int, wait: float) -> None:
        self.minimum, self.maximum, self.wait = minimum, maximum, wait
        self._cluster = weakref.ref(cluster)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbq-adapt", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread (waiting for it, unless called from it)."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stopped.is_set():
            cluster = self._cluster()
            if cluster is None or cluster._closed:
                return
            try:
                self.step(cluster, time.monotonic())
            except Exception:
                log.exception("adapt could not size the cluster; trying again")
            del cluster
            self._stopped.wait(ADAPT_INTERVAL)

    def step(self, cluster: "Cluster", now: float) -> None:
        """One look: note idle units, then grow to running + queued tasks (within minimum and
        maximum), or, nothing queued, stop units idle for ``wait`` seconds."""
        st = cluster._status()
        queued = sum(st["queues"].values())
        mine = [w for w in st["workers"] if w["name"] in cluster._units]
        active = sum(w["active"] for w in mine)
        with cluster._lock:
            for w in mine:
                unit = cluster._units[w["name"]]
                unit.idle_since = (unit.idle_since or now) if w["active"] == 0 else None
            want = max(self.minimum, min(self.maximum, active + queued))
            if want > cluster.processes:
                cluster._scale(want)
            elif want < cluster.processes and not queued:
                cluster._scale(want, idle_for=self.wait)
