"""Policies every transport shares: timings, limits, batching by measured cost, backoff.

One place for the numbers and rules the ZeroMQ broker and the Redis transport
(and any new transport) must agree on, so that they behave alike.
"""
from __future__ import annotations

HEARTBEAT = 1.0           # seconds between heartbeats (supervisors; a client's hellos)
HEARTBEAT_TIMEOUT = 4.0   # silence after which a supervisor and its processes are dead
CONNECT_TIMEOUT = 10.0    # no first answer from a broker for this long: cannot reach it
STARTED_DELAY = 0.01      # a task still running this long after it was taken is reported STARTED
BATCH_SECONDS = 0.002     # a batch of short tasks lasts about this long
BATCH_MAX = 256           # tasks in one batch at most
RESULT_EXPIRES = 86400.0  # seconds results stay fetchable by id
MAX_MESSAGE_SIZE = 512 << 20  # bytes of one message, as Redis's largest value
RESULT_BUDGET = 256 << 20     # bytes of delivered results kept for AsyncResult/from_id
EVENTS_KEEP = 3600.0      # seconds of events a broker keeps (events.py)
EVENTS_MAX = 100_000      # events a broker keeps at most (worker heartbeats apart)
BACKOFF_FIRST = 0.1       # seconds before the first retry of a lost connection
BACKOFF_MAX = 5.0         # the longest wait between retries


class Costs:
    """Seconds per task of each function (an average of the durations workers report), and
    the batch size that follows: ~BATCH_SECONDS of measured work, else one task."""

    def __init__(self) -> None:
        self._cost: dict[str, float] = {}

    def add(self, h: str | None, seconds: float | None) -> None:
        """Count one task of function h that ran this long (None: not measured)."""
        if h is None or seconds is None:
            return
        old = self._cost.get(h)
        self._cost[h] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def batch(self, h: str | None, queued: int | None = None) -> int:
        """How many tasks of function h to hand out at once; queued (when known) caps it at
        a fair share, so that one process does not take what others could run, but not below
        a quarter batch (~0.5 ms of work): with many processes idle, shares of a few tasks
        would cost more in messages (~50 µs each, both ends) than they spread."""
        cost = self._cost.get(h)
        if cost is None or cost > BATCH_SECONDS / 2:
            return 1
        n = min(BATCH_MAX, int(BATCH_SECONDS / max(cost, 1e-6)))
        return max(1, n if queued is None else min(n, max(queued, n // 4)))

    def batches(self) -> dict[str, int]:
        """batch(h) of each function measured, where it is more than one task."""
        return {h: n for h in self._cost if (n := self.batch(h)) > 1}


def backoff(delay: float) -> float:
    """The wait after one of delay before the next retry of a lost connection."""
    return min(max(delay, BACKOFF_FIRST / 2) * 2, BACKOFF_MAX)
