"""A TCP relay in front of a ZeroMQ broker that holds a connection's traffic on a cue: a real
delay on the wire, as a loaded host makes one, for tests of order across connections.

Every connection to ``address`` is relayed to the broker byte for byte, both ways, by two
threads.  Once what one connection sends contains ``cue`` (e.g. ``b'"k":"lost"'``: message
headers are compact JSON, and loopback sockets are not encrypted), the rest of what that
connection sends, from the chunk holding the cue on, waits until ``release()``; ``held`` is
set then.  One hold at most: after release everything flows.
"""
from __future__ import annotations

import socket
import threading

CHUNK = 65536


class Relay:
    def __init__(self, broker: str, cue: bytes) -> None:
        host, port = broker.removeprefix("tcp://").rsplit(":", 1)
        self._target = (host, int(port))
        self._cue = cue
        self.held = threading.Event()       # a connection sent the cue: it is held
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        """Let the held connection's bytes go on (and every later one's)."""
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                broker = socket.create_connection(self._target)
            except OSError:  # the broker is down: the peer reconnects later
                peer.close()
                continue
            with self._lock:
                self._sockets += [peer, broker]
            threading.Thread(target=self._pump, args=(peer, broker, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, peer, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watched: bool) -> None:
        """src's bytes to dst; what a peer sends (watched) is held from the cue until release."""
        tail = b""  # the last bytes seen, so a cue split across two chunks is found
        try:
            while chunk := src.recv(CHUNK):
                if watched and not self._released.is_set():
                    if self._cue in tail + chunk and self._take_hold():
                        self._released.wait()
                    tail = (tail + chunk)[-len(self._cue):]
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _take_hold(self) -> bool:
        """Whether this connection is the one held (the first to send the cue)."""
        with self._lock:
            if self.held.is_set():
                return False
            self.held.set()
            return True
