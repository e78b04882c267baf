"""The ZeroMQ broker's socket loop: one ROUTER socket, each message checked, then handled.

One ROUTER socket serves everyone; the first byte of a peer's identity says
what it is: ``c`` a client's receiving socket, ``t`` a client's sending
socket, ``s`` a worker supervisor (``nbq worker``), ``w`` one worker process,
``o`` a worker process's output socket.

Message kinds (header ``k``), see protocol.py for the frame layout, and the
handler table in Broker.__init__ for the module that handles each:

  from a client     hello (rx socket; also its heartbeat, every second) · fn · tasks · cancel
                    · watch · mapend · info · join · claim (claim-once: key, ttl)
                    · ctl (a control command: cmd, a arguments, d destination names or
                      null for all, ci the client's collection id) · events (sub, since,
                      live: subscribe to events or end a subscription) · bye
  from a supervisor hb (heartbeat, answered; n its worker name) · lost (a worker process
                    died; run: the task it was running, at: [that task, item] when the item
                    is known; end: why the supervisor killed it, see deaths.py) · ctlr (its
                    answer to a ctl: c, ci, n, r) · bye
  from a worker     hello (idle, ready for work) · res (results; with rdy the worker is idle
                    again) · rej (a message it got failed its signature check) · ntc (a state
                      notice: ids, s RETRY when a retry holds them, STARTED when they run again)
                    · out (a running task's output, from its output socket: w, id)
  to a client       welcome (b: this broker's boot id, new at each start; mx: its largest
                    message) · res · started · state (a worker's notice: ids, s) · reply
                    · ctlr (forwarded as it came) · out (forwarded as it came)
                    · ev (sub, ev: events, the stored ones first, then each turn's new ones)
  to a supervisor   hb (ql: tasks queued for it, when its hb has as, its --autoscale maximum)
                    · ctl (as the client sent it, with c) · stop
  to a worker       welcome (mx: the broker's largest message; lo: its shared memory prefix,
                    to peers of its host, shm.py) · fn · tasks
  to the sender of a hello or hb whose signature failed: keyfp, unsigned (fp: the fingerprint
                    of the broker's key, so a peer with another key stops, saying so; keys.py)

The broker acts on a message only once it is verified (signature), well formed
(schema.py) and not a replay (replay.py); any other is dropped, counted in
``info``'s "dropped" and logged at most every DROP_LOG_EVERY seconds, and its
sender gets nothing.  Verifying costs ~0.8 ms per MB, paid in the loop.

Its state lives in parts by job: queues.py (tasks, lanes by priority, parked
tasks), dispatch.py (credit, batches, STARTED), results.py (results, watchers,
maps, joins, claims, expiry), members.py (supervisors, processes, deaths,
control) and outbox.py (sends; messages held for clients away); events.py (core) the events
made from what these see, kept in a ring buffer (EventLog) and sent to subscribers.

An embedded broker (a thread of the client's process) takes its clients' messages through
its door (door.py: as objects, no socket, no signature inside one process) and runs their
receiving (``attach``): the client and its broker share one interpreter lock, so one thread
doing both saves a thread wake-up per result, and nothing runs in parallel that did before.

A broker that restarts starts empty: each client re-sends what it has not
seen finish, supervisors' heartbeats and worker processes' hellos (on
reconnecting) register them again (queues.py, members.py).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

import zmq

from .. import events, keys, policy, protocol, replay, schema, secure, shm
from ..errors import NbqError, SignatureError
from .dispatch import Dispatcher
from .door import Door
from .members import Members
from .outbox import Outbox
from .queues import Queues
from .results import Results

log = logging.getLogger("nbq.broker")

DROP_LOG_EVERY = 1.0  # seconds between warnings of dropped messages
DRAIN_MAX = 10000     # messages handled at most before dispatching
# plain integers: with pyzmq's enums, ``events & POLLIN`` runs enum.Flag.__and__ in Python
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Broker:
    """Routes tasks to worker processes and results back; run() until stop()."""

    def __init__(self, key: bytes, bind: str | list[str] = "tcp://127.0.0.1:5555",
                 context: zmq.Context | None = None,
                 result_expires: float = policy.RESULT_EXPIRES,
                 heartbeat_timeout: float = policy.HEARTBEAT_TIMEOUT,
                 max_message_size: int = policy.MAX_MESSAGE_SIZE,
                 result_budget: int = policy.RESULT_BUDGET,
                 max_age: float = replay.DEFAULT_MAX_AGE, curve: bool | None = None,
                 events_on: bool = True, events_keep: float = policy.EVENTS_KEEP,
                 events_max: int = policy.EVENTS_MAX) -> None:
        self.signer = protocol.Signer(key)
        self.fingerprint = keys.fingerprint(key)
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)  # a larger frame: peer disconnected
        self.max_message_size = max_message_size
        binds = [bind] if isinstance(bind, str) else list(bind)
        self.curve = any(map(secure.needs_curve, binds)) if curve is None else curve
        self._zap = secure.CurveGate(self.sock, key) if self.curve else None
        self.addresses = []
        for addr in binds:
            try:
                addr = self._bind(addr)
            except zmq.ZMQError as e:  # a port in use, a typo: said in a line, sockets closed
                self.sock.close(linger=0)
                if self._zap:
                    self._zap.close()
                raise NbqError(f"cannot listen on {addr!r}: {zmq.strerror(e.errno)} (give --bind "
                               "tcp://HOST:PORT with a free port)") from None
            self.addresses.append(addr)
        self._stop_r = self.ctx.socket(zmq.PAIR)
        self._stop_addr = f"inproc://nbq-broker-stop-{id(self)}"
        self._stop_r.bind(self._stop_addr)
        self.boot = uuid.uuid4().hex[:12]  # tells a client this is a broker it has not seen

        self.door = Door()  # clients of this process (client/embedded.py)
        self.outbox = Outbox(self.sock, self.signer)
        self.outbox.shared = shm.prefix(self.boot)  # large frames by shared memory on this host
        if self.outbox.shared is not None:
            shm.sweep()  # what brokers that were killed left behind
        self.queues = Queues()
        self.events = events.EventLog(events_keep, events_max, events_on)
        self.results = Results(self.queues, self.outbox, result_budget, result_expires,
                               self.events)
        self.members = Members(self.queues, self.results, self.outbox, heartbeat_timeout,
                               max_message_size)
        self.dispatcher = Dispatcher(self.queues, self.members, self.results, self.outbox)
        self._timer = 0.0
        self._guests: list[tuple[Callable[[bool], bool], Callable[[], None]]] = []
        self._new_guests: list = []  # attached by other threads, served from the next turn
        self._ended = False
        self.replays = replay.ReplayWindow(max_age)
        self.dropped = {"signature": 0, "invalid": 0, "replay": 0, "size": 0}
        self._drop_log_at = 0.0
        results, members = self.results, self.members
        self._handlers = {
            "hello": self._on_hello, "bye": self._on_bye, "fn": self._on_fn,
            "tasks": self._on_tasks, "info": self._on_info, "events": self._on_events,
            "cancel": results.on_cancel, "watch": results.on_watch,
            "mapend": results.on_mapend, "join": results.on_join, "claim": results.on_claim,
            "out": results.on_out,
            "hb": members.on_hb, "lost": members.on_lost, "rej": members.on_rej,
            "ntc": members.on_ntc, "ctl": members.on_ctl, "ctlr": members.on_ctlr,
            "res": self.dispatcher.on_res,
        }

    # -- loop -----------------------------------------------------------------

    def _bind(self, addr: str) -> str:
        """Listen on addr (``tcp://HOST:0``: a free port); the address bound."""
        if addr.startswith("tcp://") and addr.endswith(":0"):
            port = self.sock.bind_to_random_port(addr.rsplit(":", 1)[0])
            return f"{addr.rsplit(':', 1)[0]}:{port}"
        self.sock.bind(addr)
        return addr

    def run(self) -> None:
        """Serve until stop() is called from any thread."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        poller.register(self.door.fd, zmq.POLLIN)
        zap = self._zap.sock if self._zap is not None else None
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        try:
            while True:
                wait = policy.STARTED_DELAY if self.dispatcher.starting else policy.HEARTBEAT / 2
                ready = dict(poller.poll(wait * 1000))
                if self._stop_r in ready:
                    break
                if zap in ready:
                    self._zap.answer()
                rung = self.door.fd in ready
                heard = self.sock in ready
                if heard or rung:
                    self._drain(rung, heard)
                now = time.monotonic()
                self.dispatcher.flush_started(now)
                if self.events.subscribers:
                    self._publish()
                sent = self.outbox.flush()
                if self._new_guests or self._guests:
                    self._serve_guests(sent or rung)
                if now >= self._timer:
                    self._timer = now + policy.HEARTBEAT / 2
                    self.members.check_heartbeats(now)
                    self.results.expire(time.time())
                    self.replays.forget(time.time())
                    self.events.prune(time.time())
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask run() to return; safe from another thread."""
        s = self.ctx.socket(zmq.PAIR)
        s.connect(self._stop_addr)
        s.send(b"")
        s.close(linger=1000)

    def attach(self, turn: Callable[[bool], bool], left: Callable[[], None]) -> None:
        """Serve a guest on this broker's thread (a client of this process receiving): ``turn(ready)``
        is called on each loop turn (at least every HEARTBEAT / 2 seconds), ``ready`` True
        when something may have come for it (sent to a client, or its door rang), until it
        returns False; then ``left()``.  Safe from any thread."""
        self._new_guests.append((turn, left))
        if self._ended:  # no turn will come (left may be called twice: it must not mind)
            left()

    def _serve_guests(self, ready: bool) -> None:
        """One turn of each guest; those done are unregistered and told so."""
        while self._new_guests:
            self._guests.append(self._new_guests.pop(0))
            ready = True  # what was sent to it before it came is waiting
        for guest in list(self._guests):
            turn, left = guest
            try:
                more = turn(ready)
            except Exception:  # a guest's bug must not stop the broker
                log.exception("error in a guest of the broker's thread")
                more = False
            if not more:
                self._guests.remove(guest)
                left()

    def _shutdown(self) -> None:
        self._ended = True
        self._guests += self._new_guests
        for guest in self._guests:
            guest[1]()
        self._guests.clear()
        self.members.stop_all()
        if self.outbox.shared is not None:
            shm.sweep(own=self.outbox.shared)
        self.sock.close(linger=200)
        self._stop_r.close(linger=0)
        self.door.close()
        if self._zap is not None:
            self._zap.close()

    def _drain(self, rung: bool = False, heard: bool = True) -> None:
        """Handle what came through the door (rung) and the socket (heard: poll said it is
        readable; what comes meanwhile makes the next poll return at once), then dispatch."""
        for peer, header, frames in self.door.take() if rung else ():
            self._act(peer, header, frames, None)
        sock = self.sock
        for _ in range(DRAIN_MAX if heard else 0):
            # asked, not raised: zmq.Again and recv_multipart's per-frame option reads cost
            # more than the rest of receiving a small message
            if not sock.get(_EVENTS) & _POLLIN:
                break
            frame = sock.recv(copy=False)
            msg = [frame]
            while frame.more:  # a message's frames arrive together
                frame = sock.recv(copy=False)
                msg.append(frame)
            self.handle(msg)
        try:
            self.dispatcher.dispatch()
        except Exception:  # a bug here must not take the broker down with every queued task
            log.exception("error dispatching tasks")

    def handle(self, msg: list) -> None:
        """Handle one message that is verified, well formed and new; drop any other, changing nothing."""
        peer = msg[0].bytes
        body = msg[1:]
        if protocol.frame_size(body) > self.max_message_size:
            self._drop(peer, "size", f"it is larger than max_message_size ({self.max_message_size})")
            return
        try:
            header, frames = self.signer.decode(body)
        except SignatureError as e:
            self._drop(peer, "signature", str(e))
            self._refuse(peer, body)
            return
        why = schema.refuse(peer, header, frames)
        if why is not None:
            self._drop(peer, "invalid", why)
            return
        why = self.replays.refuse(header, time.time())
        if why is not None:
            self._drop(peer, "replay", why)
            return
        self._act(peer, header, frames, body)

    def _act(self, peer: bytes, header: dict, frames: list, body: list | None) -> None:
        """Handle a message that may be acted on: verified, or from this process (body None)."""
        try:
            self._handlers[header["k"]](peer, header, frames, body)
        except Exception:  # a bad but signed message must not stop the broker
            log.exception("error handling %r from %r", header.get("k"), peer[:40])

    def _drop(self, peer: bytes, what: str, why: str) -> None:
        """Count a dropped message; log it unless another was logged less than a second ago."""
        self.dropped[what] += 1
        now = time.monotonic()
        if now >= self._drop_log_at:
            self._drop_log_at = now + DROP_LOG_EVERY
            log.warning("dropped a message from %r: %s (dropped so far: %s)", peer[:40], why,
                        ", ".join(f"{n} {k}" for k, n in self.dropped.items() if n))

    def _refuse(self, peer: bytes, body: list) -> None:
        """Answer a hello or heartbeat whose signature failed with this broker's key fingerprint,
        unsigned: a client or worker with another key then stops with a clear error."""
        if len(body) != 2 or len(body[0]) > 1000:
            return
        try:
            kind = protocol.loads_header(body[0]).get("k")
        except (ValueError, AttributeError):
            return
        if kind in ("hello", "hb"):
            self.outbox.send_raw(peer, protocol.refusal(self.fingerprint))

    # -- handlers of the broker as a whole ------------------------------------

    def _on_hello(self, peer, header, frames, body):
        """A worker process ready for work, or a client (its hello is also its heartbeat)."""
        if peer[:1] == b"w":
            self.members.on_process_hello(peer, header, frames, body)
            return
        self.outbox.connect(header["c"], peer, header.get("lo"))
        self.outbox.send(peer, {"k": "welcome", "rq": header.get("rq"), "b": self.boot,
                                "mx": self.max_message_size,
                                "lo": self.outbox.shared if self.outbox.sharing(header["c"])
                                else None})

    def _on_bye(self, peer, header, frames, body):
        if peer[:1] == b"s":
            self.members.on_supervisor_bye(peer, header, frames, body)
        else:
            self.outbox.disconnect(header["c"])
            self.events.leave(header["c"])

    def _on_fn(self, peer, header, frames, body):
        self.queues.add_function(header["h"], frames)
        if header.get("name"):
            self.events.names[header["h"]] = header["name"]

    def _on_tasks(self, peer, header, frames, body):
        sent, log_event = header["mt"], self.events.task
        for task, ar in self.queues.receive(header, frames, body):
            frames = task.frames
            held = shm.hold(frames, unlink=True)  # the broker's until it is done
            if held is not frames:
                task.frames = held
            self.results.add_chunk(task)
            log_event(sent, events.TASK_SENT, task, None, ar)  # the record keeps ar, not the task

    def _on_events(self, peer, header, frames, body):
        """Subscribe a client to events (the stored ones from since first), or unsubscribe it."""
        sub = (header["c"], header["sub"])
        if not header["live"] or not self.events.on:
            self.events.subscribers.discard(sub)
            return
        if header.get("since") is not None:
            for batch in events.batches(self.events.since(header["since"])):
                self.outbox.to_client(sub[0], self.signer.encode(
                    {"k": "ev", "sub": sub[1], "ev": batch}))
        self.events.subscribers.add(sub)

    def _publish(self) -> None:
        """Send the events that happened since the last turn to every subscriber."""
        new = self.events.take_new()
        for batch in events.batches(new) if new else ():
            for cid, sub in self.events.subscribers:
                self.outbox.to_client(cid, self.signer.encode({"k": "ev", "sub": sub, "ev": batch}))

    def _on_info(self, peer, header, frames, body):
        self.outbox.reply(header, {
            "workers": self.members.workers(), "queues": self.queues.counts(),
            "tasks": len(self.queues.tasks), "results": len(self.results.store),
            "dropped": dict(self.dropped)})
