"""Live updates: every TICK seconds, each watched broker's changes (State.take_delta) go
to the pages following it, as server-sent events. A page that falls behind is dropped
(its browser reconnects and loads a fresh snapshot)."""
from __future__ import annotations

import json

from tornado.ioloop import PeriodicCallback
from tornado.queues import Queue

from .source import Source

TICK = 0.5          # seconds between deltas
BACKLOG = 20        # deltas a slow page may have waiting before it is dropped


class Hub:
    """The pages following each Source, fed from the server's event loop."""

    def __init__(self) -> None:
        self._pages: dict[Source, set[Queue]] = {}
        self._timer = PeriodicCallback(self._tick, TICK * 1000)

    def follow(self, src: Source) -> Queue:
        """A queue of JSON deltas of src (None: this page is dropped); a delta goes every
        TICK, changes or not, so a page that left is noticed by the failed write."""
        if not self._timer.is_running():
            self._timer.start()
        q: Queue = Queue()
        self._pages.setdefault(src, set()).add(q)
        return q

    def leave(self, src: Source, q: Queue) -> None:
        pages = self._pages.get(src)
        if pages is not None:
            pages.discard(q)

    def _tick(self) -> None:
        for src, pages in list(self._pages.items()):
            delta = src.state.take_delta()
            if not pages:
                continue
            delta["error"] = src.error
            text = json.dumps(delta, default=str)
            for q in list(pages):
                if q.qsize() >= BACKLOG:
                    pages.discard(q)
                    q.put_nowait(None)
                else:
                    q.put_nowait(text)

    def stop(self) -> None:
        self._timer.stop()
