"""Events on amqp:// (nbq/events.py): kept in the result backend's Redis exactly as the Redis
transport keeps them (redis/events.py: the capped streams nbq:ev and nbq:evh, written in
the pipelines the parties send the backend anyway); a client's subscriptions read them there.

Without a result backend there are no events: subscribing raises NbqError naming the setting
(RabbitMQ keeps no history one could read from a time, and a second store only for events
would be one more thing to run and bound)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ... import events
from ...errors import NbqError
from ..redis import events as stored_events

log = logging.getLogger("nbq.transport.amqp")

BLOCK_MS = 500  # a live read's wait: how soon the reader notices its last subscription ended


def _text(b) -> str:
    return b.decode() if isinstance(b, bytes) else b


class Feed:
    """A client's event subscriptions: the stored events at once, then live ones, read by a
    thread of its own (XREAD BLOCK on the backend's two streams) while any subscription lasts."""

    def __init__(self, store, deliver: Callable[[list], None]) -> None:
        self.store = store
        self._deliver = deliver  # ev messages [(header, frames)] to the client's receiver
        self._lock = threading.Lock()
        self._subs: dict[str, str] = {}  # subscription -> the last nbq:ev entry it has seen
        self._last: dict[str, str] = {}  # stream -> the last entry read
        self._thread: threading.Thread | None = None
        self._closing = False

    def subscribe(self, sub: str, since: float | None, live: bool) -> None:
        """Start (the events from since, then live) or end a subscription."""
        if not live:
            with self._lock:
                self._subs.pop(sub, None)
            return
        st = self.store
        past, last, last_beat = st.retry("reading events", lambda: stored_events.history(
            st, time.time() if since is None else since))
        self._deliver([({"k": "ev", "sub": sub, "ev": batch}, []) for batch in events.batches(past)])
        with self._lock:
            self._last.setdefault(stored_events.STREAM, last)
            self._last.setdefault(stored_events.BEATS, last_beat)
            self._subs[sub] = last
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nbq-amqp-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        st = self.store
        while True:
            with self._lock:
                if not self._subs or self._closing:
                    self._last.clear()
                    self._thread = None
                    return
                streams = dict(self._last)
            try:
                got = st.retry("reading events", lambda: st.r.xread(streams, block=BLOCK_MS),
                               give_up=lambda: True)
            except NbqError as e:
                log.warning("%s", e)
                time.sleep(BLOCK_MS / 1000)
                continue
            out = []
            with self._lock:
                for stream, entries in got or ():
                    stream = _text(stream)
                    for eid, fields in entries:
                        eid = self._last[stream] = _text(eid)
                        new = stored_events.decode(st, fields, f"event entry {eid}")
                        out += [({"k": "ev", "sub": sub, "ev": new}, []) for sub, seen in self._subs.items()
                                if new and (stream == stored_events.BEATS or stored_events.after(eid, seen))]
            if out:
                self._deliver(out)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            thread = self._thread
        if thread is not None:
            thread.join(BLOCK_MS / 1000 * 4)
