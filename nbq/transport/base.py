"""The transport interface: what a client, a supervisor and a worker process need of a broker.

Each transport (zmq.py, and others) implements these three connections; all
above them (client.py, worker/) is written against this interface only.
Messages are (header dict, payload frames) pairs as protocol.py defines;
a connection signs what it sends and verifies what it receives.

A connection whose key differs from the cluster's refuses to start, before it
reads anything (so a wrong-key worker takes no task): its transport learns the
fingerprint of the cluster's key (keys.py) and calls check_key, which raises
KeyMismatch.  A client connection learns it in answer to hello (see hello), a
supervisor's or worker's when it is made or at its first poll.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from .. import keys
from ..errors import KeyMismatch


def check_key(key: bytes, cluster: str | None, where: str, hint: str = "") -> None:
    """Raise KeyMismatch when the cluster at `where` uses a key whose fingerprint is
    `cluster` (None: not known yet) and key's differs; the message never shows a key."""
    mine = keys.fingerprint(key)
    if cluster is not None and cluster != mine:
        raise KeyMismatch(f"the signing key from {keys.source_of(key)} differs from the one the "
                          f"cluster at {where} uses (key fingerprints {mine} here, {cluster} there):"
                          f" use the same key everywhere (copy the key file, or set NBQ_KEY){hint}")


class ClientConnection(ABC):
    """A client's link: send from any thread, receive on the client's receiver thread.

    Client → broker kinds: fn, tasks, cancel, watch, mapend, info, join, ctl, bye
    (see broker.py for their fields); broker → client: welcome, res, started, state
    (ids, s: RETRY or STARTED, from a worker's notice), reply, ctlr (one worker's answer
    to a ctl).
    """

    #: Whether the broker keeps queued work through an outage (Redis): then a client
    #: re-sends nothing after a silence, only what lost() names to a broker that restarted.
    durable = False

    @abstractmethod
    def hello(self, rq: int | None) -> None:
        """Announce this client; the broker answers {"k": "welcome", "rq": rq, "b": its boot
        id}, or, when this client's key differs from the cluster's, {"k": "welcome", "rq": rq,
        "refused": check_key's message} (the client raises KeyMismatch with it).  Also the
        client's heartbeat, with rq None: what the broker says proves it alive."""

    @abstractmethod
    def send(self, header: dict, frames: list = ()) -> None:
        """Send one message to the broker; thread-safe."""

    def lost(self, ids: list[str]) -> list[str]:
        """Of these unfinished task ids, those a restarted broker no longer holds, to be
        sent again (the receiver thread asks, after a welcome with a new boot id)."""
        return ids

    @abstractmethod
    def receive(self, timeout: float | None) -> list[tuple[dict, list]]:
        """Messages for this client (waiting up to timeout seconds); receiver thread only."""

    @abstractmethod
    def wake(self) -> None:
        """Make a pending receive() return now; thread-safe."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets; the broker keeps this client's results for result_expires."""


class SupervisorConnection(ABC):
    """A supervisor's link: heartbeats, deaths of its processes, orders from the broker."""

    @abstractmethod
    def heartbeat(self, info: dict) -> None:
        """Tell the broker this supervisor is alive; its answer (an ``hb`` from poll) carries
        ``ql``, how many tasks wait in info's queues (up to info["as"]), when info has ``as``."""

    @abstractmethod
    def lost(self, wid: str, how: str, at: list | None, end: dict | None = None,
             leaving: bool = False) -> None:
        """Report that worker process wid died; at = [task id, item position or None] it was
        running, if any (its death counts against that task); end says why the supervisor
        killed it, if it did: that task ends, never re-run (deaths.py).  leaving: this worker
        is stopping, so an unreachable broker is not waited for (its tasks are recovered as a
        dead worker's are)."""

    @abstractmethod
    def poll(self, timeout: float, fds: list[int]) -> tuple[list[dict], list[int]]:
        """Wait for broker messages or readable fds; returns (messages, ready fds)."""

    @abstractmethod
    def answer(self, request: dict, name: str, reply) -> None:
        """Send this worker's reply (JSON) to the client of a control request (a ``ctl`` from poll)."""

    @abstractmethod
    def close(self, goodbye: bool) -> None:
        """Leave; with goodbye the broker re-queues running tasks without counting a death."""


class WorkerConnection(ABC):
    """A worker process's link: fetch tasks, fetch functions, report results."""

    @abstractmethod
    def fetch(self, timeout: float | None = None) -> list[tuple[dict, list]]:
        """The next batch of tasks, waiting for it up to timeout seconds (None: for ever)."""

    @abstractmethod
    def function(self, h: str) -> list:
        """Payload frames of the function with content hash h."""

    @abstractmethod
    def report(self, results: list[tuple[dict, list]], ready: bool) -> None:
        """Send result parts; ready means this process has finished its batch."""

    def notice(self, ids: list[str], state: str) -> None:
        """Tell the clients of these tasks (submitter and watchers) their state, RETRY (waiting
        for a retry, held here) or STARTED (running again), as a ``state`` message; later
        watchers see RETRY too.  Only retries send these: no cost for other tasks."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets."""
