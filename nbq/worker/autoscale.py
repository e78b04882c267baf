"""--autoscale MAX,MIN: as many worker processes as tasks running and queued, within MIN..MAX.

Grown at once; shrunk (idle processes only, so a busy one is never stopped) once fewer
were wanted for AUTOSCALE_KEEPALIVE seconds.  The supervisor applies the answer through
grow and shrink, as pool_grow/pool_shrink do.
"""
from __future__ import annotations

import os

#: --autoscale shrinks the pool once it has wanted fewer processes for this long
#: (Celery's AUTOSCALE_KEEPALIVE; the environment variable NBQ_AUTOSCALE_KEEPALIVE sets it)
AUTOSCALE_KEEPALIVE = 30.0


class Autoscale:
    """The pool size wanted between ``low`` and ``high`` processes, and since when fewer."""

    def __init__(self, high: int, low: int) -> None:
        self.high, self.low = high, low
        self._calm_since: float | None = None  # since when fewer processes are wanted

    def change(self, concurrency: int, busy: int, idle: int, queued: int, now: float) -> int:
        """Processes to start (> 0) or to retire among the ``idle`` ones (< 0), or 0, for a
        pool of ``concurrency`` processes, ``busy`` of them running a task, ``queued`` tasks
        waiting."""
        want = min(self.high, max(self.low, busy + queued))
        if want >= concurrency:
            self._calm_since = None
            return want - concurrency
        if self._calm_since is None:
            self._calm_since = now
            return 0
        if now - self._calm_since >= float(os.environ.get("NBQ_AUTOSCALE_KEEPALIVE",
                                                          AUTOSCALE_KEEPALIVE)):
            self._calm_since = None
            return -min(concurrency - want, idle)
        return 0
