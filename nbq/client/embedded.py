"""A client of the embedded broker of its own process: messages handed over, not sent.

``nbq.Client()`` runs its broker on a thread of its own process; its connection puts each
message through the broker's door (broker/door.py) as objects, unsigned (the process is
the trust boundary), and the broker hands back what it sends the client without a socket:
messages it signed itself, or verified when they came from a worker process (whose
messages are still signed, and verified before anything is loaded), so the client only
reads them.  The client's receiving runs on the broker's thread (Broker.attach), so
``receive`` only takes what the broker handed over.

Clients in other processes reach the same broker at its address (transport/zmq.py).
"""
from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from .. import protocol, shm
from ..transport.zmq import BrokerClient

if TYPE_CHECKING:
    from ..broker import Broker


class EmbeddedClient(BrokerClient):
    """A ClientConnection to a Broker object of this process."""

    def __init__(self, broker: "Broker", client_id: str) -> None:
        self.cid = client_id
        self._door = broker.door
        self._local = broker.outbox.local
        self._peer = b"e" + client_id.encode()  # no socket's identity starts so (schema.py)
        self._inbox: collections.deque = collections.deque()
        self._local[self._peer] = self._handed

    def hello(self, rq: int | None) -> None:
        self._put({"k": "hello", "c": self.cid, "rq": rq, "lo": shm.locality()}, [])

    def _put(self, header: dict, frames: list) -> None:
        if header["k"] == "tasks":  # the broker keeps and changes its items: its own copies
            header["t"] = [dict(item) for item in header["t"]]
        header["mt"] = time.time()  # when it was sent (task-sent events)
        self._door.put(self._peer, header, self._outgoing(header, list(frames)))

    def _handed(self, msg: list) -> None:
        """What the broker sends this client (its thread): signed by it, or verified when it
        came, so only read."""
        self._inbox.append(self._arrived(protocol.loads_header(msg[0]), list(msg[2:])))

    def receive(self, timeout: float | None) -> list[tuple[dict, list]]:
        """What the broker handed over since the last call (its thread calls it: never waits)."""
        inbox, out = self._inbox, []
        while inbox:
            out.append(inbox.popleft())
        return out

    def wake(self) -> None:
        self._door.ring()

    def close(self) -> None:
        self._put({"k": "bye", "c": self.cid}, [])
        self._local.pop(self._peer, None)
