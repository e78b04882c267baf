"""The index of idle worker processes, so that dispatch never scans every process.

Idle processes are grouped by the queues they serve (a supervisor's processes share
one list, so there are as many groups as distinct lists, not as processes): dispatch
looks at each group once, hands its processes batches while their queues hold tasks,
and leaves the group at the first process that finds none, each step O(1).  A process
that could not be reached at its last send waits apart until its ``away_until``.
"""
from __future__ import annotations

from typing import Any, Iterator


class Ready:
    """Idle worker processes (members.ProcessRecord) by the queues they serve."""

    __slots__ = ("_groups", "_away")

    def __init__(self) -> None:
        self._groups: dict[tuple, dict[str, Any]] = {}  # queues -> idle processes, by id
        self._away: dict[str, Any] = {}                 # idle, unreachable until away_until

    def add(self, proc: Any) -> None:
        """proc is idle: it takes work from its queues (once back, when it is away)."""
        proc.idle = True
        if proc.away_until:
            self._away[proc.wid] = proc
        else:
            self._groups.setdefault(proc.queues, {})[proc.wid] = proc

    def discard(self, proc: Any) -> None:
        """proc is busy or gone: no work goes to it from here."""
        proc.idle = False
        if self._away.pop(proc.wid, None) is not None:
            return
        group = self._groups.get(proc.queues)
        if group is not None and group.pop(proc.wid, None) is not None and not group:
            del self._groups[proc.queues]

    def wake(self, now: float) -> None:
        """Processes away until now or earlier take work again."""
        if not self._away:
            return
        for proc in [p for p in self._away.values() if p.away_until <= now]:
            del self._away[proc.wid]
            proc.away_until = 0.0
            self.add(proc)

    def groups(self) -> Iterator[tuple[tuple, dict[str, Any]]]:
        """(queues, their idle processes by id) of each group; a group may empty as it is used."""
        return iter(list(self._groups.items()))

    def __len__(self) -> int:
        return sum(map(len, self._groups.values())) + len(self._away)
