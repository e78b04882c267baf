"""The index of idle worker processes, so that dispatch never scans every process, and the
count of each host's processes running short tasks, so that they are not spread thin.

Idle processes are grouped by their host and the queues they serve (a supervisor's
processes share one list, so there are as many groups as distinct hosts and lists, not
as processes): dispatch looks at each group once, hands its processes batches while their
queues hold tasks, and leaves the group at the first process that finds none (or whose
host's cores are taken by short tasks), each step O(1).  A process that could not be
reached at its last send waits apart until its ``away_until``.

Short tasks (dispatch.py) run on at most as many processes of a host at once as its
workers said it has cores (``Host.cpus``): a burst of them is run by the processes already
busy, each taking its next batch as it reports, instead of waking every idle process of
the host to share one core among several (the operating system's work per task then grows
with the processes).  Longer tasks go one to each idle process, counted or not.  A process
holding short tasks for over LATE seconds (one of them blocked, say) counts no more, so
that the others of its host are not kept from short tasks by it.
"""
from __future__ import annotations

from typing import Any, Iterator

LATE = 0.1  # seconds after which a process running short tasks no longer counts (~50 batches)


class Host:
    """A machine's worker processes, as dispatch counts them."""

    __slots__ = ("name", "cpus", "said", "procs", "short")

    def __init__(self, name: str) -> None:
        self.name = name
        self.cpus = 0        # cores its workers may use (the most one said); 0: not said, no limit
        self.said: dict[str, int] = {}  # supervisor id -> cores it said (0: nothing)
        self.procs = 0       # its worker processes
        self.short: dict[Any, float] = {}  # those running short tasks -> since (oldest first)

    def tell(self, sid: str, cpus: int | None) -> None:
        """Supervisor sid of this host says its processes may use cpus cores (None: gone)."""
        if cpus is None:
            self.said.pop(sid, None)
        else:
            self.said[sid] = cpus
        self.cpus = max(self.said.values(), default=0)

    def full(self, now: float) -> bool:
        """Whether as many of its processes run short tasks as it has cores (the one running
        them since LATE before now, if any, counts no more)."""
        if not 0 < self.cpus <= len(self.short):
            return False
        proc, since = next(iter(self.short.items()))
        if now - since < LATE:
            return True
        del self.short[proc]
        return False

    @property
    def slots(self) -> int:
        """How many of its processes may run short tasks at once."""
        return min(self.cpus, self.procs) if self.cpus else self.procs


class Ready:
    """Idle worker processes (members.ProcessRecord) by their host and the queues they serve."""

    __slots__ = ("_groups", "_away")

    def __init__(self) -> None:
        self._groups: dict[tuple, dict[str, Any]] = {}  # (host, queues) -> idle processes, by id
        self._away: dict[str, Any] = {}                 # idle, unreachable until away_until

    def add(self, proc: Any) -> None:
        """proc is idle: it takes work from its queues (once back, when it is away)."""
        proc.idle = True
        self._short(proc, None)
        if proc.away_until:
            self._away[proc.wid] = proc
        else:
            self._groups.setdefault((proc.host, proc.queues), {})[proc.wid] = proc

    def discard(self, proc: Any, short: float | None = None) -> None:
        """proc is busy (short: with short tasks since then, taking one of its host's cores)
        or gone: no work goes to it from here."""
        proc.idle = False
        self._short(proc, short)
        if self._away.pop(proc.wid, None) is not None:
            return
        key = (proc.host, proc.queues)
        group = self._groups.get(key)
        if group is not None and group.pop(proc.wid, None) is not None and not group:
            del self._groups[key]

    @staticmethod
    def _short(proc: Any, since: float | None) -> None:
        short = proc.host.short
        if short:
            short.pop(proc, None)
        if since is not None:  # (last: the oldest stay first)
            short[proc] = since

    def wake(self, now: float) -> None:
        """Processes away until now or earlier take work again."""
        if not self._away:
            return
        for proc in [p for p in self._away.values() if p.away_until <= now]:
            del self._away[proc.wid]
            proc.away_until = 0.0
            self.add(proc)

    def groups(self) -> Iterator[tuple[tuple, dict[str, Any]]]:
        """((host, queues), their idle processes by id) of each group; a group may empty as
        it is used."""
        return iter(list(self._groups.items()))

    def __len__(self) -> int:
        return sum(map(len, self._groups.values())) + len(self._away)
