"""The ZeroMQ transport: DEALER sockets talking to nbq's broker (nbq/broker/).

A client has two sockets so that user threads can send while the receiver
thread blocks: ``t<client id>`` sends, ``c<client id>`` receives.  Supervisors
are ``s<id>`` and worker processes ``w<id>``.  No socket has a high-water mark:
flow is bounded by the work submitted, and nothing is ever dropped.

Sockets reconnect by themselves when a broker restarts at the same address:
a client's hello doubles as its heartbeat (client.py re-sends its unfinished
work when the broker's boot id changes), a supervisor's heartbeats register it
again, and a worker process watches its socket's link and says hello again,
when it is next idle, after the link dropped and came back.

A ``tasks`` or ``res`` message's frames of shm.SHARE_MIN bytes or more go through shared
memory when the broker's welcome says it is of this host (``lo``, shm.py): the socket then
carries a signed descriptor, and a client maps (and unlinks) the results' segments.

A socket to a non-loopback address is encrypted and authenticated with CURVE
(secure.py).  The broker's ``welcome`` says its largest message (``mx``); a client
refuses to send a larger one (MessageTooLarge, before anything leaves).
"""
from __future__ import annotations

import json
import logging
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import protocol, secure, shm
from ..errors import KeyMismatch, SignatureError
from .. import zmqframes
from .base import MessageClient, SupervisorConnection, WorkerConnection, check_key

log = logging.getLogger("nbq.transport")
RESULT_HEADROOM = 64 << 10  # bytes of a result message beside its payload (header, signature)


LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
#: Seconds a waiting worker process waits for tasks before it looks at its link's events.
#: Waiting on its socket alone costs fewer system calls per task than on both; a broker
#: restarted meanwhile hears its hello this much later at most.
LINK_CHECK = 0.25


def _dealer(ctx: zmq.Context, identity: bytes, address: str, key: bytes,
            watch: bool = False) -> zmq.Socket:
    """A DEALER connected to address; with watch, its link events (get_monitor_socket) too."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 2000)
    if secure.needs_curve(address):
        secure.connect_curve(sock, key)
    if watch:  # before connecting, so that no event is missed
        sock.get_monitor_socket(LINK_EVENTS)
    sock.connect(address)
    return sock


def _decode(signer: protocol.Signer, msg: list):
    """(header, payload) of a verified message; None for any other, logged unless it is the
    broker's refusal of this side's key (protocol.refused), which the caller handles."""
    try:
        return signer.decode(msg)
    except SignatureError as e:
        if protocol.refused(msg) is None:
            log.warning("dropped a message: %s", e)
        return None


class BrokerClient(MessageClient):
    """What a client of nbq's broker does to what it sends and notes of what comes, through a
    socket (ZmqClient) or handed over inside the broker's process (embedded.EmbeddedClient)."""

    raise_limit = "start the broker with a larger --max-message-size"
    max_message_size: int | None = None  # the broker's, from its welcome
    _shared: str | None = None  # the broker's shared memory prefix, when of this host

    def _outgoing(self, header: dict, frames: list) -> list:
        """frames as they leave: a task's large ones through shared memory, when it can."""
        if header["k"] == "tasks" and shm.usable(self._shared):
            return shm.export(frames, self._shared)
        return frames

    def _arrived(self, header: dict, frames: list) -> tuple[dict, list]:
        """A message from the broker, noted: its welcome says its largest message and shared
        memory prefix; a result's segments are this client's (mapped and unlinked)."""
        kind = header.get("k")
        if kind == "welcome":
            self.max_message_size = header.get("mx")
            self._shared = header.get("lo")
        elif kind == "res":
            frames = shm.hold(frames, forget=True)
        return header, frames


class ZmqClient(BrokerClient):

    def __init__(self, address: str, key: bytes, client_id: str) -> None:
        self.ctx = zmq.Context()
        self.signer = protocol.Signer(key)
        self.key, self.address = key, address
        self._hello_rq: int | None = None
        self.cid = client_id
        self._rx = _dealer(self.ctx, b"c" + client_id.encode(), address, key)
        self._tx = _dealer(self.ctx, b"t" + client_id.encode(), address, key)
        self._lock = threading.Lock()
        wake_addr = f"inproc://nbq-wake-{client_id}"
        self._wake_r = self.ctx.socket(zmq.PAIR)
        self._wake_r.bind(wake_addr)
        self._wake_w = self.ctx.socket(zmq.PAIR)
        self._wake_w.connect(wake_addr)
        self._poller = zmq.Poller()
        self._poller.register(self._rx, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)

    def hello(self, rq: int | None) -> None:
        """Announce the receiving socket; the broker answers with welcome (and its boot id),
        or a refusal."""
        self._hello_rq = rq
        self._rx.send_multipart(self.signer.encode({"k": "hello", "c": self.cid, "rq": rq,
                                                    "lo": shm.locality()}))

    def _put(self, header: dict, frames: list) -> None:
        msg = self.signer.encode(header, self._outgoing(header, frames))
        with self._lock:
            zmqframes.send(self._tx, msg)

    def receive(self, timeout: float | None) -> list[tuple[dict, list]]:
        events = dict(self._poller.poll(None if timeout is None else timeout * 1000))
        if self._wake_r in events:
            while self._wake_r.poll(0):
                self._wake_r.recv()
        out = []
        while self._rx.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            msg = self._rx.recv_multipart(copy=False)
            decoded = _decode(self.signer, msg) or self._refused(msg)
            if decoded is not None:
                out.append(self._arrived(*decoded))
        return out

    def _refused(self, msg: list) -> tuple[dict, list] | None:
        """The answer to hello when the broker refused this client's key: a welcome saying why."""
        try:
            check_key(self.key, protocol.refused(msg), self.address)
        except KeyMismatch as e:
            return {"k": "welcome", "rq": self._hello_rq, "refused": str(e)}, []
        return None

    def wake(self) -> None:
        with self._lock:
            self._wake_w.send(b"")

    def close(self) -> None:
        try:
            self._send({"k": "bye"})
        except zmq.ZMQError:
            pass
        for s in (self._rx, self._tx, self._wake_r, self._wake_w):
            s.close(linger=500)
        self.ctx.term()


def death(w: str, how: str, at: list | None, end: dict | None) -> dict:
    """A process's death as the broker reads it, in a supervisor's ``lost`` and in its
    replacement's hello (``was``): "at" [task id, item] only when the item is known, "run"
    the task id."""
    return {"w": w, "how": how, "end": end, "at": at if at and at[1] is not None else None,
            "run": at and at[0]}


class ZmqSupervisor(SupervisorConnection):
    def __init__(self, address: str, key: bytes, sid: str) -> None:
        self.ctx = zmq.Context()
        self.signer = protocol.Signer(key)
        self.key, self.address = key, address
        self.sid = sid
        self.sock = _dealer(self.ctx, b"s" + sid.encode(), address, key)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)

    def _send(self, header: dict) -> None:
        header["sup"] = self.sid
        self.sock.send_multipart(self.signer.encode(header))

    def heartbeat(self, info: dict) -> None:
        self._send(dict(info, k="hb"))

    def lost(self, wid: str, how: str, at: list | None, end: dict | None = None,
             leaving: bool = False) -> None:  # a send: never waits
        self._send({"k": "lost", **death(wid, how, at, end)})

    def answer(self, request: dict, name: str, reply) -> None:
        self._send({"k": "ctlr", "c": request["c"], "ci": request["ci"], "name": name, "r": reply})

    def poll(self, timeout: float, fds: list[int]) -> tuple[list[dict], list[int]]:
        for fd in fds:
            self._poller.register(fd, zmq.POLLIN)
        try:
            events = dict(self._poller.poll(timeout * 1000))
        finally:
            for fd in fds:
                self._poller.unregister(fd)
        messages = []
        if self.sock in events:
            while True:
                try:
                    msg = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                decoded = _decode(self.signer, msg)
                if decoded is not None:
                    messages.append(decoded[0])
                else:  # the broker's refusal of this worker's key: stop, saying so
                    check_key(self.key, protocol.refused(msg), self.address)
        return messages, [fd for fd in fds if fd in events]

    def close(self, goodbye: bool) -> None:
        if goodbye:
            self._send({"k": "bye"})
        self.sock.close(linger=500 if goodbye else 0)
        self.ctx.term()


class ZmqWorker(WorkerConnection):
    def __init__(self, address: str, key: bytes, wid: str, hello: dict) -> None:
        self.ctx = zmq.Context()
        self.signer = protocol.Signer(key)
        self.wid = wid
        self.sock = _dealer(self.ctx, b"w" + wid.encode(), address, key, watch=True)
        self._links = self.sock.get_monitor_socket()  # made by _dealer, before connecting
        self._dropped = False  # the link went down: say hello once it is back
        self._poller = zmq.Poller()  # (Socket.poll makes one per call)
        self._poller.register(self.sock, zmq.POLLIN)
        self._functions: dict[str, list] = {}
        self._address, self._key = address, key
        self._out: zmq.Socket | None = None  # output streaming's socket (output())
        self._out_lock = threading.Lock()
        self._hello = dict(hello, k="hello", w=wid, lo=shm.locality())
        if hello.get("was"):  # the death it replaces: heard before it takes work (base.py)
            self._hello["was"] = death(**hello["was"])
        self._shared: str | None = None  # the broker's shared memory prefix, when of this host
        self.sock.send_multipart(self.signer.encode(self._hello))

    def fetch(self, timeout: float | None = None) -> list[tuple[dict, list]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = LINK_CHECK if deadline is None else min(LINK_CHECK, deadline - time.monotonic())
            if not self._poller.poll(max(0, int(wait * 1000))):
                self._relink()
                if deadline is not None and time.monotonic() >= deadline:
                    return []
                continue
            msg = zmqframes.receive(self.sock)
            decoded = _decode(self.signer, msg)
            if decoded is None:
                if protocol.refused(msg) is None:  # (a refusal of the key: the supervisor stops)
                    self._reject(msg)
                continue
            header, frames = decoded
            if header["k"] == "welcome":  # results must fit in the broker's largest message
                self.max_result = header["mx"] - RESULT_HEADROOM
                self._shared = header.get("lo")
            elif header["k"] == "fn":
                self._functions[header["h"]] = frames
            elif header["k"] == "tasks":
                return list(protocol.split(header["t"], frames))

    def _relink(self) -> None:
        """Say hello again once the link to the broker is back after dropping (a restarted
        broker knows nothing of this process; called only while idle, so it is true)."""
        while self._links.poll(0):
            event = recv_monitor_message(self._links)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._dropped = True
            elif event == zmq.EVENT_CONNECTED and self._dropped:
                self._dropped = False
                log.info("worker process %s: reconnected to the broker", self.wid)
                self.sock.send_multipart(self.signer.encode(self._hello))

    def _reject(self, msg: list) -> None:
        """Tell the broker which tasks a badly signed message named, so they fail and we get more."""
        try:
            ids = [t["id"] for t in json.loads(msg[0].bytes)["t"]]
        except Exception:
            ids = []
        self.sock.send_multipart(self.signer.encode({"k": "rej", "w": self.wid, "ids": ids}))

    def function(self, h: str) -> list:
        return self._functions.pop(h)

    def report(self, results: list[tuple[dict, list]], ready: bool) -> None:
        items, frames = [], []
        for item, payload in results:
            items.append(item)
            frames.extend(payload)
        if shm.usable(self._shared):
            frames = shm.export(frames, self._shared)
        msg = self.signer.encode({"k": "res", "w": self.wid, "t": items, "rdy": int(ready)}, frames)
        zmqframes.send(self.sock, msg)

    def notice(self, ids: list[str], state: str) -> None:
        zmqframes.send(self.sock, self.signer.encode({"k": "ntc", "w": self.wid, "ids": ids,
                                                      "state": state}))

    def output(self, task: dict, frames: list) -> None:
        msg = self.signer.encode({"k": "out", "w": self.wid, "id": task["id"]}, frames)
        with self._out_lock:  # a task's threads print too: a socket of its own, made once
            if self._out is None:
                self._out = _dealer(self.ctx, b"o" + self.wid.encode(), self._address, self._key)
            try:
                zmqframes.send(self._out, msg, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # not connected yet, or the broker is gone: it travels with the result

    def close(self) -> None:
        if self._out is not None:
            self._out.close(linger=1000)
        self.sock.disable_monitor()
        self._links.close(linger=0)
        self.sock.close(linger=1000)
        self.ctx.term()
