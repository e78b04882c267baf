"""A worker process: fetch a batch, run it, report results, repeat."""
from __future__ import annotations

import time

from ..transport.base import WorkerConnection
from .execute import Functions, run
from .marker import Marker

#: Results of a long batch are sent at least this often, so a slow task late in
#: a batch never holds back the results of the quick ones before it.
FLUSH_SECONDS = 0.005


def serve(conn: WorkerConnection, marker: Marker | None = None) -> None:
    """Serve tasks until the process is stopped; re-runs mark their items in marker."""
    functions = Functions(conn.function)
    mark = marker.mark if marker is not None else None
    while True:
        batch = conn.fetch()
        out: list = []
        flushed = time.monotonic()
        last = len(batch) - 1
        for i, (item, frames) in enumerate(batch):
            if item.get("st") or item.get("a"):
                run(item, frames, functions.get(item["h"]),
                    lambda r, p: conn.report([(r, p)], ready=False), mark)
                if marker is not None:
                    marker.clear()
            else:
                run(item, frames, functions.get(item["h"]), lambda r, p: out.append((r, p)))
            if out and i < last and time.monotonic() - flushed > FLUSH_SECONDS:
                conn.report(out, ready=False)
                out = []
                flushed = time.monotonic()
        conn.report(out, ready=True)
