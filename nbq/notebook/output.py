"""A remote cell's output, received in the kernel: streamed while it runs, the rest at the end.

``OutputStream`` binds a PULL socket on 127.0.0.1 for one cell; its ``spec``
(address, a random token and this host's name) goes inside the (signed) task
as remote_cell's ``stream``.  A worker on this machine pushes each output
event as JSON (text and MIME bundles only, nothing is unpickled) tagged with
the token and its sequence number; ``follow`` hands them on in order while the
task runs.  The result still carries every event, so whatever did not stream
(a worker on another machine, which cannot reach a loopback socket, or a gap)
is handed on when the task finishes, in order and without repeats.

``write_events`` is what the magic hands them to: streams to stdout/stderr,
bundles through IPython's display publisher.
"""
from __future__ import annotations

import socket
import sys
import time
import uuid
from typing import TYPE_CHECKING, Callable, Sequence

import zmq

if TYPE_CHECKING:
    from .remotecell import RemoteCellResult


def write_event(event: Sequence) -> None:
    """One output event here: ("stdout"|"stderr", text) or ("display", data, metadata)."""
    if event[0] == "display":
        _flush()
        from IPython.display import publish_display_data
        publish_display_data(event[1], event[2] or None)
    else:
        # left to the stream's own buffering (a kernel sends a message per flush, not
        # per write); the other stream is flushed first so stdout/stderr keep their order
        stream, other = (sys.stdout, sys.stderr) if event[0] == "stdout" else (sys.stderr, sys.stdout)
        other.flush()
        stream.write(event[1])


def write_events(events: Sequence[Sequence]) -> None:
    """Output events here, in their order, then flushed."""
    for event in events:
        write_event(event)
    _flush()


def _flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


class OutputStream:
    """The kernel's end of one cell's output stream (see the module docstring)."""

    POLL_MS = 50

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.token = uuid.uuid4().hex
        self.spec = {"address": f"tcp://127.0.0.1:{port}", "token": self.token,
                     "host": socket.gethostname()}
        self.shown = 0            # events handed on, in order, from the stream
        self.gap = False          # one went missing: the rest is handed on from the result

    def __enter__(self) -> "OutputStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def follow(self, fut, on_events: Callable[[list], None] = write_events,
               timeout: float | None = None) -> "RemoteCellResult":
        """fut's result; meanwhile the events that stream in go to on_events, a batch at a
        time and in order, and when fut finishes, the events that did not stream.

        Raises TimeoutError after timeout seconds (fut keeps running), and what
        fut.result() raises.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not fut.done():
            fut._await(0)  # BrokerUnavailable once the client has given up on its broker
            wait_ms = self.POLL_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                wait_ms = max(1, min(wait_ms, int(left * 1000)))
            self._drain(wait_ms, on_events)
        self._drain(0, on_events)
        result = fut.result()
        on_events(result.outputs[self.shown:])
        return result

    def _drain(self, timeout_ms: int, on_events: Callable[[list], None]) -> None:
        """Hand on what arrives within timeout_ms (and right after), a batch per POLL_MS."""
        batch: list = []
        started = time.monotonic()
        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            try:
                token, seq, event = self.sock.recv_json(zmq.NOBLOCK)
            except (zmq.ZMQError, ValueError, TypeError):
                continue
            if token != self.token or self.gap:
                continue
            if seq != self.shown:
                self.gap = True
                continue
            batch.append(event)
            self.shown += 1
            if time.monotonic() - started >= self.POLL_MS / 1000:
                on_events(batch)
                batch, started = [], time.monotonic()
        on_events(batch)
