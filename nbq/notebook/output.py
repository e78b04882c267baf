"""A remote cell's output, received in the kernel: streamed while it runs, the rest at the end.

A remote cell submitted with ``stream=True`` sends its output events while it
runs through the worker's transport (TaskContext.output → WorkerConnection.output
→ the client's ``out`` messages → Future.stream_output), from a worker on any
machine: batches of JSON ``[first sequence number, events]`` (text and MIME
bundles only; nothing is unpickled).  ``OutputStream.follow`` hands them on in
order while the task runs.  The result still carries every event, so whatever
did not stream (a gap, a transport that dropped a batch) is handed on when the
task finishes, in order and without repeats.

``write_events`` is what the magic hands them to: streams to stdout/stderr,
bundles through IPython's display publisher.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

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

    POLL = 0.05

    def __init__(self) -> None:
        self.shown = 0            # events handed on, in order, from the stream
        self.gap = False          # one went missing: the rest is handed on from the result
        self._got: list = []      # events streamed in, not handed on yet
        self._cv = threading.Condition()

    def __enter__(self) -> "OutputStream":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _receive(self, frames: list[bytes]) -> None:
        """A batch of streamed events (the client's receiver thread): [first seq, events]."""
        try:
            start, events = json.loads(frames[0])
        except (ValueError, TypeError, IndexError):
            return
        with self._cv:
            if self.gap or start != self.shown + len(self._got):
                self.gap = True
                return
            self._got.extend(events)
            self._cv.notify()

    def follow(self, fut, on_events: Callable[[list], None] = write_events,
               timeout: float | None = None) -> "RemoteCellResult":
        """fut's result; meanwhile the events that stream in go to on_events, a batch at a
        time and in order, and when fut finishes, the events that did not stream.

        Raises TimeoutError after timeout seconds (fut keeps running), and what
        fut.result() raises.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        fut.stream_output(self._receive)
        try:
            while not fut.done():
                fut._await(0)  # BrokerUnavailable once the client has given up on its broker
                wait = self.POLL
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    wait = min(wait, left)
                self._hand_on(wait, on_events)
            self._hand_on(0, on_events)
        finally:
            fut.stream_output(None)
        result = fut.result()
        on_events(result.outputs[self.shown:])
        return result

    def _hand_on(self, wait: float, on_events: Callable[[list], None]) -> None:
        """Hand on what streamed in, waiting up to wait seconds for something."""
        with self._cv:
            if not self._got:
                self._cv.wait(wait)
            batch, self._got = self._got, []
            self.shown += len(batch)
        if batch:
            on_events(batch)
