"""Sending from the broker's ROUTER socket: to a peer at once, to clients after dispatch.

The socket has no high-water mark and ROUTER_MANDATORY is set, so nothing is
dropped silently: a send to a peer that is not connected fails (the caller
decides), and a message for a client that is gone waits for it to say hello
again.  Messages for clients are queued while a batch of incoming messages is
handled and sent once idle worker processes have their next tasks.
"""
from __future__ import annotations

from typing import Callable

import zmq

from .. import protocol, shm
from .. import zmqframes


class Outbox:
    """The broker's sends, and the clients it sends to (by client id)."""

    def __init__(self, sock: zmq.Socket, signer: protocol.Signer) -> None:
        self.sock = sock
        self.signer = signer
        self.clients: dict[str, bytes] = {}          # client id -> routing id of its rx socket
        self.unsent: dict[str, list] = {}            # messages for a client not connected yet
        self._outgoing: list[tuple[str, list]] = []  # for clients, sent after dispatching
        self.shared: str | None = None               # this broker's shared memory prefix (shm.py)
        self._sharing: set[str] = set()              # clients of its host: sent descriptors
        self.local: dict[bytes, Callable[[list], None]] = {}  # peers of this process (door.py)

    def shares(self, lo: str | None) -> bool:
        """Whether a peer that said hello with locality lo is sent shared memory descriptors."""
        return self.shared is not None and lo is not None and lo == shm.locality()

    def sharing(self, cid: str) -> bool:
        """Whether client cid is sent shared memory descriptors (else bytes)."""
        return cid in self._sharing
    def send(self, peer: bytes, header: dict, frames: list = ()) -> bool:
        """Sign and send now; False when the peer is not connected."""
        return self.send_raw(peer, self.signer.encode(header, frames))

    def send_raw(self, peer: bytes, msg: list) -> bool:
        """Send a message (signed already) now; False when the peer is not connected.
        To a client of this process it is handed over, not sent."""
        local = self.local.get(peer)
        if local is not None:
            local(msg)
            return True
        try:
            zmqframes.send(self.sock, [peer, *msg])
            return True
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False

    def to_client(self, cid: str, msg: list) -> None:
        """Queue a message for a client; sent once idle workers have their next tasks."""
        self._outgoing.append((cid, msg))

    def reply(self, header: dict, result) -> None:
        """Answer a client's request (its ``rq``) with result."""
        self.to_client(header["c"], self.signer.encode({"k": "reply", "rq": header["rq"],
                                                        "r": result}))

    def connect(self, cid: str, peer: bytes, lo: str | None = None) -> None:
        """A client said hello from peer (lo: its locality): what waited for it goes with the
        next flush."""
        self.clients[cid] = peer
        if self.shares(lo):
            self._sharing.add(cid)
        else:
            self._sharing.discard(cid)
        self._outgoing.extend((cid, msg) for msg in self.unsent.pop(cid, ()))

    def disconnect(self, cid: str) -> None:
        """A client left: nothing more is kept for it."""
        self.clients.pop(cid, None)
        self._sharing.discard(cid)
        self.unsent.pop(cid, None)

    def flush(self) -> bool:
        """Send what is queued for clients; keep what cannot go for when they say hello.
        Returns whether anything was queued."""
        out, self._outgoing = self._outgoing, []
        for cid, msg in out:
            peer = self.clients.get(cid)
            if peer is None or not self.send_raw(peer, msg):
                self.unsent.setdefault(cid, []).append(msg)
        return bool(out)
