"""Time series of a broker, one bucket a second, the last SPAN seconds: throughput (items
done and failed), latency percentiles of the runtimes reported, tasks sent, queue lengths;
and each queue's rate in and out over the last RATE_WINDOW seconds."""
from __future__ import annotations

import math
import time
from collections import OrderedDict

SPAN = 600          # seconds kept
RATE_WINDOW = 10    # seconds a queue's rate is measured over
QUANTILES = (0.5, 0.95, 0.99)


class Series:
    """Per-second buckets, oldest first; the caller holds the state's lock."""

    def __init__(self) -> None:
        self.buckets: OrderedDict[int, dict] = OrderedDict()
        self.totals: dict[str, int] = {}   # event type -> items, since the dashboard started
        self.sent_upto = 0                 # buckets before this second went out in a delta

    def _bucket(self, ts: float) -> dict:
        sec = int(ts)
        b = self.buckets.get(sec)
        if b is None:
            b = self.buckets[sec] = {"t": sec, "done": 0, "failed": 0, "sent": 0, "runtimes": [],
                                     "queues": {}, "in": {}, "out": {}}
            if len(self.buckets) > 1 and sec < next(reversed(self.buckets)):
                self.buckets = OrderedDict(sorted(self.buckets.items()))
            while self.buckets and next(iter(self.buckets)) < sec - SPAN:
                self.buckets.popitem(last=False)
        return b

    def count(self, kind: str, ts: float, queue: str | None, runtime: float | None,
              n: int) -> None:
        """One task event of n items."""
        self.totals[kind] = self.totals.get(kind, 0) + n
        if ts < time.time() - SPAN:
            return
        b = self._bucket(ts)
        q = queue or "default"
        if kind == "task-sent" or kind == "map-sent":
            b["sent"] += n
            b["in"][q] = b["in"].get(q, 0) + n
        elif kind in ("task-succeeded", "task-failed"):
            b["done" if kind == "task-succeeded" else "failed"] += n
            b["out"][q] = b["out"].get(q, 0) + n
            if runtime is not None:
                b["runtimes"].append(runtime)

    def sample_queues(self, lengths: dict[str, int], ts: float) -> None:
        self._bucket(ts)["queues"] = dict(lengths)

    def closed_upto(self) -> int:
        """The current second: buckets before it no longer change (bar late events)."""
        return int(time.time())

    def rows(self, since: int = 0) -> list[dict]:
        """Closed buckets from since on, with percentiles instead of runtimes; a second with
        no bucket (nothing happened) is a row of zeros, from the first bucket on."""
        if not self.buckets:
            return []
        now = int(time.time())
        out = []
        for sec in range(max(since, next(iter(self.buckets)), now - SPAN), now):
            b = self.buckets.get(sec)
            if b is None:
                out.append({"t": sec, "done": 0, "failed": 0, "sent": 0, "queues": {},
                            "p50": None, "p95": None, "p99": None})
                continue
            out.append({"t": sec, "done": b["done"], "failed": b["failed"], "sent": b["sent"],
                        "queues": b["queues"],
                        **dict(zip(("p50", "p95", "p99"), quantiles(b["runtimes"])))})
        return out

    def queue_rates(self) -> dict[str, tuple[float, float]]:
        """Each queue's (in, out) items per second over the last RATE_WINDOW seconds."""
        now = int(time.time())
        rates: dict[str, list[float]] = {}
        for sec in range(now - RATE_WINDOW, now):
            b = self.buckets.get(sec)
            if b is None:
                continue
            for side, i in (("in", 0), ("out", 1)):
                for q, n in b[side].items():
                    rates.setdefault(q, [0.0, 0.0])[i] += n / RATE_WINDOW
        return {q: (r[0], r[1]) for q, r in rates.items()}

    def percentiles(self) -> dict[float, float | None]:
        """Runtime quantiles over the kept span (for /metrics)."""
        runtimes = [r for b in self.buckets.values() for r in b["runtimes"]]
        return dict(zip(QUANTILES, quantiles(runtimes)))


def quantiles(values: list[float]) -> list[float | None]:
    """QUANTILES of values (nearest rank), None for no values."""
    if not values:
        return [None] * len(QUANTILES)
    s = sorted(values)
    return [s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] for q in QUANTILES]
