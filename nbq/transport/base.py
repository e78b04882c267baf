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

from .. import keys, protocol
from ..errors import KeyMismatch, MessageTooLarge


def check_key(key: bytes, cluster: str | None, where: str, hint: str = "") -> None:
    """Raise KeyMismatch when the cluster at `where` uses a key whose fingerprint is
    `cluster` (None: not known yet) and key's differs; the message never shows a key."""
    mine = keys.fingerprint(key)
    if cluster is not None and cluster != mine:
        raise KeyMismatch(f"the signing key from {keys.source_of(key)} differs from the one the "
                          f"cluster at {where} uses (key fingerprints {mine} here, {cluster} there):"
                          f" use the same key everywhere (copy the key file, or set NBQ_KEY){hint}")


class ClientConnection(ABC):
    """A client's link to its broker: every operation the layers above use.

    Operations are sent from any thread and never wait for the broker; what the
    broker says comes back through receive(), on the client's receiver thread, as
    (header, frames) messages of these kinds:

      welcome  the answer to hello: rq, b (the broker's boot id), or refused (a message)
      reply    the answer to a request: rq, r (the answer, as each operation says)
      res      results: t (one item per task or map chunk: id, ok, s start, n, nf frames)
      started  ids: tasks a worker started
      state    ids, s: a worker's notice (RETRY: held for a retry; STARTED: running again)
      ctlr     ci, n (a worker's name), r (its reply): one worker's answer to control()
      out      id, frames: output events of a running task (output streaming)
      ev       sub, ev: events (events.py's dicts) for the subscription sub (see events)

    A request's rq is the client's number for it; an operation given rq None wants no reply.
    Driver errors never escape: an unreachable broker is silence (the client notices it,
    and raises BrokerUnavailable after its grace period).
    """

    #: Whether the broker keeps queued work through an outage (Redis): then a client
    #: re-sends nothing after a silence, only what lost() names to a broker that restarted.
    durable = False

    #: Whether submit() runs the tasks itself, in the calling thread, before it returns
    #: (memory:// inline): the client then sends each task at once, never batching it for
    #: its receiver thread, and a map's whole input from the caller's thread.
    inline = False

    @abstractmethod
    def hello(self, rq: int | None) -> None:
        """Announce this client; the broker answers {"k": "welcome", "rq": rq, "b": its boot
        id}, or, when this client's key differs from the cluster's, {"k": "welcome", "rq": rq,
        "refused": check_key's message} (the client raises KeyMismatch with it).  Also the
        client's heartbeat, with rq None: what the broker says proves it alive."""

    @abstractmethod
    def ship(self, h: str, frames: list, name: str = "") -> None:
        """Store the pickled function whose content hash is h, for the tasks that name it;
        name (events.name_of) is what its tasks' events call it."""

    @abstractmethod
    def submit(self, tasks: list[dict], frames: list) -> None:
        """Queue tasks (headers as protocol.py describes, each naming its nf payload frames,
        in order in frames).  Their results come as ``res`` messages; a task id the broker
        already holds is not queued twice.  Raises MessageTooLarge, before sending anything,
        for a task larger than the broker accepts."""

    @abstractmethod
    def end_map(self, map_id: str, total: int) -> None:
        """Map map_id has total items in all: no more chunks follow (MapResult.from_id)."""

    @abstractmethod
    def cancel(self, rq: int, ids: list[str]) -> None:
        """Revoke these tasks if no worker has started them.  Reply: {task id: revoked?};
        each revoked task's result comes as a ``res`` item with rv set."""

    @abstractmethod
    def watch(self, rq: int | None, ids: list[str] = (), maps: list[str] = ()) -> None:
        """Send this client the results of these tasks and of these maps' chunks, stored and
        to come.  Reply: {"known": {task id: PENDING, STARTED, RETRY or DONE}, "maps": {map id:
        {"total", "star", "chunks": [(task id, (start, n))]}}}, before any stored result."""

    @abstractmethod
    def info(self, rq: int) -> None:
        """Reply: the broker's state (status.py's form): workers, queues, counts."""

    @abstractmethod
    def join(self, rq: int, key: str, member: str, total: int) -> None:
        """Add member to the set named key (a chord's header); reply {"fire": True} to the one
        call that completes it (total members), {"fire": False} to the others."""

    @abstractmethod
    def claim(self, rq: int, key: str, ttl: float) -> None:
        """Claim-once: reply {"won": True} to the first claim of key among every client of
        this broker for ttl seconds, {"won": False} to the rest (beat ticks: one beat sends
        a due entry, however many run)."""

    @abstractmethod
    def control(self, rq: int, command: str, arguments: dict, destination: list[str] | None,
                ci: str) -> None:
        """Broadcast a control command to every worker (those named in destination).  Reply:
        {"n": how many it reached}; each one's answer comes as a ``ctlr`` message with ci."""

    @abstractmethod
    def events(self, sub: str, since: float | None, live: bool) -> None:
        """Subscribe (live) or unsubscribe (not live) this client's subscription sub to
        the broker's events (events.py).  Subscribing sends the stored events from since
        (epoch seconds; None: none), then each new one as it happens, as ``ev`` messages
        (sub, ev: a list of event dicts, in time order), until unsubscribed or this client
        leaves.  A broker with events off sends none."""

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
        """Leave (telling the broker); it keeps this client's results for result_expires."""


class MessageClient(ClientConnection):
    """A ClientConnection that sends each operation as one message of the kinds the ZeroMQ
    broker reads (protocol.py, broker/loop.py): a subclass delivers them (``_put``), to a
    broker or to its own stand-in for one (the Redis client answers them from Redis).

    A message larger than the broker's max_message_size is never sent: a batch of tasks
    goes task by task, anything else raises MessageTooLarge in the caller."""

    cid: str
    #: The broker's largest message (None until known), and how a user raises it.
    max_message_size: int | None = None
    raise_limit = ""

    @abstractmethod
    def _put(self, header: dict, frames: list) -> None:
        """Deliver one message as it is; thread-safe."""

    def _send(self, header: dict, frames: list = ()) -> None:
        limit = self.max_message_size
        if frames and limit is not None and protocol.frame_size(frames) > limit:
            if header["k"] == "tasks" and len(header["t"]) > 1:
                for item, payload in protocol.split(header["t"], frames):
                    self._send({"k": "tasks", "t": [item]}, payload)
                return
            raise MessageTooLarge(
                f"this {header['k']!r} message is {protocol.frame_size(frames):,} bytes, more "
                f"than max_message_size ({limit:,} bytes) at the broker: send less at once (a "
                f"large input as a file or a shared path), or {self.raise_limit}")
        header["c"] = self.cid
        self._put(header, frames)

    def ship(self, h: str, frames: list, name: str = "") -> None:
        self._send({"k": "fn", "h": h, "name": name[:200]}, frames)

    def events(self, sub: str, since: float | None, live: bool) -> None:
        self._send({"k": "events", "sub": sub, "since": since, "live": int(live)})

    def submit(self, tasks: list[dict], frames: list) -> None:
        self._send({"k": "tasks", "t": tasks}, frames)

    def end_map(self, map_id: str, total: int) -> None:
        self._send({"k": "mapend", "mp": map_id, "total": total})

    def cancel(self, rq: int, ids: list[str]) -> None:
        self._send({"k": "cancel", "rq": rq, "ids": ids})

    def watch(self, rq: int | None, ids: list[str] = (), maps: list[str] = ()) -> None:
        self._send({"k": "watch", "rq": rq, "ids": list(ids), "maps": list(maps)})

    def info(self, rq: int) -> None:
        self._send({"k": "info", "rq": rq})

    def join(self, rq: int, key: str, member: str, total: int) -> None:
        self._send({"k": "join", "rq": rq, "key": key, "member": member, "total": total})

    def claim(self, rq: int, key: str, ttl: float) -> None:
        self._send({"k": "claim", "rq": rq, "key": key, "ttl": ttl})

    def control(self, rq: int, command: str, arguments: dict, destination: list[str] | None,
                ci: str) -> None:
        self._send({"k": "ctl", "rq": rq, "cmd": command, "args": arguments, "dest": destination,
                    "ci": ci})


class SupervisorConnection(ABC):
    """A supervisor's link: heartbeats, deaths of its processes, orders from the broker."""

    @abstractmethod
    def heartbeat(self, info: dict) -> None:
        """Tell the broker this supervisor is alive; its answer (an ``hb`` from poll) carries
        ``queued``, how many tasks wait in info's queues (up to info["autoscale"]), when info has
        ``autoscale``."""

    @abstractmethod
    def lost(self, wid: str, how: str, at: list | None, end: dict | None = None,
             leaving: bool = False) -> None:
        """Report that worker process wid died; at = [task id, item position or None] it was
        running, if any (its death counts against that task); end says why the supervisor
        killed it, if it did: that task ends, never re-run (deaths.py).  leaving: this worker
        is stopping, so an unreachable broker is not waited for (its tasks are recovered as a
        dead worker's are).  The process started in its place names the same death in its
        hello (``was``, WorkerConnection): the broker acts on whichever comes first, once."""

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
    """A worker process's link: fetch tasks, fetch functions, report results.

    A transport makes one from (address, key, wid, hello) in the forked process (its
    ``worker_connector``).  hello is the supervisor's heartbeat info with the process's
    ``pid`` and ``was``: the death this process replaces, as its supervisor's lost() was
    told it ({"w", "how", "at", "end"}), or None.  The death comes before the replacement's
    work: a transport whose broker may hear the replacement before the supervisor's lost()
    (the ZeroMQ broker: two connections) acts on ``was`` first, once whichever comes first
    (the tasks queued behind the dead process's would otherwise run before them).  Redis
    and RabbitMQ ignore it: on Redis lost() has re-queued them before it returns, before the
    fork; RabbitMQ re-queues them itself when the dead process's connection closes, which
    the kernel does before the supervisor can reap it, so before the replacement connects.
    """

    #: The largest result payload the broker takes (its largest message, less room for a
    #: result message's header), once this connection knows it (fetch sets it); None: no
    #: limit known.  The worker process fails a larger result with MessageTooLarge.
    max_result: int | None = None

    @abstractmethod
    def fetch(self, timeout: float | None = None) -> list[tuple[dict, list]]:
        """The next batch of tasks, waiting for it up to timeout seconds (None: for ever)."""

    @abstractmethod
    def function(self, h: str) -> list:
        """Payload frames of the function with content hash h."""

    @abstractmethod
    def report(self, results: list[tuple[dict, list]], ready: bool) -> None:
        """Send result parts; ready means this process has finished its batch."""

    @abstractmethod
    def notice(self, ids: list[str], state: str) -> None:
        """Tell the clients of these tasks (submitter and watchers) their state, RETRY (waiting
        for a retry, held here) or STARTED (running again), as a ``state`` message; later
        watchers see RETRY too.  Only retries send these: no cost for other tasks."""

    @abstractmethod
    def output(self, task: dict, frames: list) -> None:
        """Stream output of the running task (its header as fetched) to the client that
        submitted it, as an ``out`` message; thread-safe (a task's threads print too).  Best
        effort: output that cannot go now is dropped here (it also travels with the result)."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets."""
