"""The receiver thread: what the broker sends completes, starts and updates the client's work.

One background thread per client receives results (completing futures, filling map
results and sending maps' next chunks), state notices, streamed output, control answers,
events (to their subscriptions) and replies; it sends the batched submits and the heartbeats, and sends the unfinished
work again to a broker that restarted.  A result already seen is dropped, so the user
sees each once.

A client of an embedded broker has no thread of its own for this: the broker's thread
receives for it (Broker.attach), as the two share one interpreter lock anyway, and a
result then reaches its future with one thread wake-up fewer.  What runs here (done
callbacks, a map's next chunks read from its input) then holds up the broker meanwhile.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .. import protocol
from ..errors import BrokerUnavailable, FunctionRefused, NbqError, SerializationError
from ..policy import HEARTBEAT
from . import shipping
from .feeding import cancelled

if TYPE_CHECKING:
    from ..broker import Broker

log = logging.getLogger("nbq.client")


class Receiver:
    """Handles one client's incoming messages, on its receiver thread.

    ``futures`` (task id -> Future) and ``chunks`` (chunk task id -> (MapResult, start,
    n)) are the client's tables of unfinished work, shared with it.
    """

    def __init__(self, conn, sender, functions, feeder, requests, controls: dict, link,
                 futures: dict, chunks: dict, subscriptions) -> None:
        self._conn = conn
        self._sender = sender
        self._sent = sender.sent  # tasks sent, not seen finish (the Sender's table, shared)
        self._functions = functions
        self._feeder = feeder
        self._requests = requests
        self._controls = controls  # control id -> control.Replies
        self._link = link
        self._futures = futures
        self._chunks = chunks
        self._subscriptions = subscriptions  # events.Subscriptions
        self.stopped = False  # the thread should return; nothing is waited for
        self.thread: threading.Thread | None = None  # the thread it receives on
        self._left: threading.Event | None = None    # a host's thread no longer serves it
        self._own: threading.Thread | None = None    # a thread of its own, when it has one

    def start(self, name: str, host: "Broker | None" = None) -> None:
        """Start receiving on a thread of its own, or on ``host``'s (an embedded Broker:
        attach); it stops once stopped, or once this Receiver (its client's) is garbage: it
        is held weakly, as the Receiver holds no client."""
        self._name = name
        if host is None:
            self._own_thread()
            return
        self._left = threading.Event()
        self._after_left: list = []  # what runs once the host's thread has left it
        self._left_lock = threading.Lock()
        host.attach(_guest_turn(weakref.ref(self), self._conn), self._on_left)

    def _on_left(self) -> None:
        with self._left_lock:
            self._left.set()
            after, self._after_left = self._after_left, []
        for fn in after:
            fn()

    def _own_thread(self) -> None:
        self.thread = self._own = threading.Thread(
            target=_receive_loop, name=self._name, daemon=True,
            args=(weakref.ref(self), self._conn))
        self._own.start()

    def join(self, timeout: float) -> None:
        """Wait (up to timeout seconds) until nothing receives for this Receiver any more,
        so that its connection may close; at once on its own thread (a done-callback)."""
        if threading.current_thread() is self.thread:
            return
        if self._left is not None:
            self._left.wait(timeout)
        if self._own is not None:
            self._own.join(timeout)

    def close(self) -> None:
        """Close the connection: now, or, while a host's thread may still poll its sockets
        (the wait for it was cut short), once it has left them."""
        if self._left is not None and threading.current_thread() is not self.thread:
            with self._left_lock:
                if not self._left.is_set():
                    self._after_left.append(self._conn.close)
                    return
        self._conn.close()

    def _handle(self, messages: list) -> None:
        """One turn of the thread: the batched submits, then the messages, then the link."""
        self._sender.flush()
        for header, frames in messages:
            try:
                self.on_message(header, frames)
            except Exception:
                log.exception("error handling a %r message", header.get("k"))
        if self.stopped:
            return
        try:
            error = self._link.keep_alive(bool(messages))
            if error is not None:
                self._give_up(error)
        except Exception:
            log.exception("error keeping the link to the broker")

    def on_message(self, header: dict, frames: list) -> None:
        kind = header.get("k")
        if kind == "res":
            for item, payload in protocol.split(header["t"], frames):
                self._on_result(item, payload)
        elif kind == "started":
            for tid in header["ids"]:
                fut = self._futures.get(tid)
                if fut is not None and fut._state == "PENDING":
                    fut.set_running_or_notify_cancel()
        elif kind == "state":  # a worker's notice: RETRY (waiting for a retry), STARTED again
            for tid in header["ids"]:
                fut = self._futures.get(tid)
                if fut is not None:
                    fut._notice(header["state"])
        elif kind == "out":  # output a running task streams
            fut = self._futures.get(header["id"])
            if fut is not None:
                fut._output(frames)
        elif kind == "ev":
            self._subscriptions.deliver(header)
        elif kind == "ctlr":
            replies = self._controls.get(header.get("ci"))
            if replies is not None:
                replies.add(header["name"], header.get("r"))
        elif kind in ("reply", "welcome"):
            if kind == "welcome" and self._link.welcome(header.get("b")):
                self._resend()
            self._requests.answer(header)

    def _on_result(self, item: dict, payload: list) -> None:
        tid = item["id"]
        if item.get("rv"):
            chunk = self._chunks.get(tid)
            self.revoke(tid)
            if chunk is not None:
                self._feeder.feed(chunk[0].id)  # the window has room again
            return
        fut = self._futures.pop(tid, None)
        if fut is not None:
            self._sent.pop(tid, None)
            try:
                value = protocol.loads(payload)
            except Exception as e:
                fut.set_exception(SerializationError(
                    f"the result of task {tid} could not be unpickled here: {type(e).__name__}: {e}"))
                return
            if fut._state == "PENDING":
                fut.set_running_or_notify_cancel()
            if item.get("ok"):
                fut.set_result(value)
            else:
                fut.set_exception(self._remote_error(value))
            return
        entry = self._chunks.get(tid)
        if entry is None:
            return  # a repeat of a result already seen, or not ours
        res, chunk_start, chunk_n = entry
        start = chunk_start + item.get("s", 0)
        n = item.get("n", 1)
        try:
            values, errors = protocol.loads(payload)
            errors = {i: self._remote_error(r) for i, r in errors.items()}
        except Exception as e:
            values, errors = [None] * n, dict.fromkeys(range(n), SerializationError(
                f"results of map {res.id} items {start}..{start + n - 1} could not be "
                f"unpickled here: {type(e).__name__}: {e}"))
        res._deliver(start, values, errors)
        if res._done.find(0, chunk_start, chunk_start + chunk_n) == -1:
            del self._chunks[tid]
            self._sent.pop(tid, None)
            res._chunks.pop(tid, None)
            self._feeder.feed(res.id)

    def _remote_error(self, record: tuple) -> BaseException:
        """A task's error; a function a worker refused (FunctionRefused) is shipped again
        with the next call, replacing what is stored."""
        exc = protocol.rebuild_error(record)
        if isinstance(exc, FunctionRefused):
            self._functions.refused(exc.hash)
        return exc

    def revoke(self, tid: str) -> int:
        """Mark a task the broker revoked (a future, or a map chunk) here; returns its item count."""
        self._sent.pop(tid, None)
        fut = self._futures.pop(tid, None)
        if fut is not None:
            fut._revoked()
            return 1
        entry = self._chunks.pop(tid, None)
        if entry is None:
            return 0
        res, start, n = entry
        res._chunks.pop(tid, None)
        res._fail(start, n, cancelled(res))
        return n

    def _fail_task(self, tid: str, error: BaseException) -> None:
        """End one of this client's tasks here with error (its map's window moves on)."""
        self._sent.pop(tid, None)
        fut = self._futures.pop(tid, None)
        if fut is not None and not fut.done():
            if fut._state == "PENDING":
                fut.set_running_or_notify_cancel()
            fut.set_exception(error)
        entry = self._chunks.pop(tid, None)
        if entry is not None:
            res, start, n = entry
            res._chunks.pop(tid, None)
            res._fail(start, n, error)
            self._feeder.feed(res.id)

    def fail_unfinished(self) -> None:
        """Fail what can no longer get a result here, so nothing waits on it for ever."""
        for tid, fut in list(self._futures.items()):
            try:
                fut.set_exception(NbqError(f"task {tid} had not finished when its client "
                                           "shut down"))
            except concurrent.futures.InvalidStateError:
                pass  # finished, or cancelled
        self._futures.clear()
        self._feeder.fail_unsent()
        for tid, (res, start, n) in list(self._chunks.items()):
            res._fail(start, n, NbqError(f"items {start}..{start + n - 1} of map {res.id} had "
                                         "not finished when its client shut down"))
        self._chunks.clear()

    def _give_up(self, error: BrokerUnavailable) -> None:
        """The client gave up on its broker: open requests fail, and every wait wakes to raise."""
        self._requests.fail_all(error)
        for fut in list(self._futures.values()):
            with fut._condition:
                fut._condition.notify_all()
        for res in {entry[0] for entry in list(self._chunks.values())}:
            with res._cond:
                res._cond.notify_all()

    def _resend(self) -> None:
        """Send the broker again: functions, unfinished tasks, map ends, watches, requests."""
        sent = self._sent
        self._sender.flush()
        for tid in [t for t in list(sent) if t not in self._futures and t not in self._chunks]:
            sent.pop(tid, None)  # finished (or cancelled) meanwhile
        items, lost = self._sender.resend(self._conn.lost(list(sent)), self._functions)
        maps = {self._chunks[item["id"]][0] for item in items if item["id"] in self._chunks}
        for res in maps:
            if res.id not in self._feeder and res._total is not None:
                self._conn.end_map(res.id, res._total)
        watched = [tid for tid, f in list(self._futures.items())
                   if getattr(f, "_foreign", False) and not f.done()]
        watched += [tid for tid in list(self._chunks) if tid not in sent]
        if watched:
            self._conn.watch(None, ids=watched)
        self._requests.resend()
        self._subscriptions.resend()
        for tid in lost:
            self._fail_task(tid, BrokerUnavailable(
                f"the broker at {self._link.address} restarted and this client no longer keeps "
                f"the pickle of task {tid}'s function (only the newest "
                f"{shipping.FUNCTION_CACHE} are kept): submit it again"))
        log.warning("sent %d unfinished tasks again to the broker at %s", len(items),
                    self._link.address)


def _guest_turn(receiver_ref: "weakref.ref[Receiver]", conn):
    """One turn of receiving on a host's thread (Broker.attach): what has come, and the
    link's heartbeat; False once the client stopped or is garbage."""
    due = 0.0

    def turn(ready: bool) -> bool:
        nonlocal due
        receiver = receiver_ref()
        if receiver is None or receiver.stopped:
            return False
        now = time.monotonic()
        if ready or now >= due:
            due = now + HEARTBEAT / 4
            receiver.thread = threading.current_thread()
            receiver._handle(conn.receive(0))
        return not receiver.stopped
    return turn


def _receive_loop(receiver_ref: "weakref.ref[Receiver]", conn) -> None:
    """The receiver thread: completes futures and maps until the client closes."""
    while True:
        messages = conn.receive(1.0)
        receiver = receiver_ref()
        if receiver is None:
            return
        receiver._handle(messages)
        if receiver.stopped:
            return
        del receiver
