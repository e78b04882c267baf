"""One broker watched: a Client, a thread folding its event stream into a State (the kept
past first: ``Client.events(since=0)``, so a restarted dashboard has its history back), and
a thread asking the broker who is connected and how long its queues are."""
from __future__ import annotations

import re
import threading

from ..client import Client
from ..errors import NbqError
from ..transport import across_processes
from .state import State

STATUS_INTERVAL = 1.0   # seconds between the broker's info requests


def shown(address: str) -> str:
    """The address as pages and /metrics show it: a password in it replaced by ***."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", address)


class Source:
    """A broker's State, kept current by two daemon threads until ``close()``."""

    def __init__(self, broker: str, max_tasks: int | None = None) -> None:
        self.address = shown(broker)
        self.client = Client(broker, timeout=5.0)
        self.client.wait_at_exit = False
        self.state = State() if max_tasks is None else State(max_tasks)
        self._errors: dict[str, str | None] = {"events": None, "status": None}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._follow, name="nbq-dashboard-events",
                                          daemon=True),
                         threading.Thread(target=self._poll, name="nbq-dashboard-status",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _follow(self) -> None:
        """Fold events from the oldest kept on, then live until close() shuts the client
        down; a stream that ends otherwise (the broker went away) is asked for again from
        the last event's time, skipping those of that instant already folded."""
        last, seen = 0.0, set()   # the latest event's time, the events of that instant
        while not self._stop.is_set():
            since, replaying = last, last > 0
            try:
                for ev in self.client.events(since=since):
                    ts = ev.get("ts", 0.0)
                    key = (ev.get("type"), ev.get("id"), ev.get("worker"), ev.get("map"),
                           ev.get("count"))
                    if replaying:
                        if ts < since or (ts == since and key in seen):
                            continue
                        replaying = ts <= since
                    if ts > last:
                        last, seen = ts, {key}
                    elif ts == last:
                        seen.add(key)
                    self.state.fold([ev])
                    self._errors["events"] = None
            except (NbqError, TimeoutError, RuntimeError) as e:   # RuntimeError: shut down
                self._errors["events"] = None if self._stop.is_set() else f"events: {e}"
            self._stop.wait(STATUS_INTERVAL)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.state.apply_status(self.client.status())
                self._errors["status"] = None
            except (NbqError, TimeoutError) as e:
                self._errors["status"] = f"the broker at {self.address} did not answer: {e}"
            except RuntimeError:   # close() shut the client down
                return
            self._stop.wait(STATUS_INTERVAL)

    @property
    def error(self) -> str | None:
        """What went wrong reading the broker lately, for the page (None: nothing)."""
        return "; ".join(e for e in self._errors.values() if e) or None

    def close(self) -> None:
        self._stop.set()
        self.client.shutdown(wait=False)   # ends the event stream
        for t in self._threads:
            t.join(5.0)


class Sources:
    """The Source of each broker a server was asked about, made on first use."""

    def __init__(self, default: str | None = None) -> None:
        self.default = default
        self._lock = threading.Lock()
        self._by_address: dict[str, Source] = {}

    def get(self, address: str | None) -> Source:
        address = address or self.default
        if not address:
            raise NbqError("no broker to show: open the dashboard with ?broker=ADDRESS (the "
                           "link in a Client's repr does), or set NBQ_BROKER for the server")
        across_processes(address, "the dashboard")   # a memory:// broker is another process's
        with self._lock:
            src = self._by_address.get(address)
            if src is None:
                src = self._by_address[address] = Source(address)
            return src

    def all(self) -> list[Source]:
        with self._lock:
            return list(self._by_address.values())

    def close(self) -> None:
        for src in self.all():
            src.close()
        with self._lock:
            self._by_address.clear()
