"""Progress displays for a MapResult or a list of futures: ``nbq.progress(obj)``.

A display is any callable taking the MapResult; it is registered as a listener
and called from the client's receiver thread as items complete.  Displays
throttle themselves (at most ~10 redraws a second) and always draw the end.

The display seam: this module draws a text bar and knows nothing of widgets.
In a Jupyter kernel, when no display is given, it looks up the entry point
named ``jupyter`` in the group ``nbq.display`` (nbq declares
``nbq.notebook.widgets:widget_progress`` there, in pyproject.toml): a callable
taking the MapResult that attaches and shows its display and returns it.  The
lookup happens once, at the first progress shown in a kernel; without such an
entry point, a kernel gets the text bar (and a displayed MapResult its text).
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from typing import Callable, TextIO

MIN_INTERVAL = 0.1


def format_counts(c: dict) -> str:
    """'1,234/10,000 done, 2 failed, 5,321/s, ETA 2s' from MapResult.counts()."""
    total = c["total"]
    parts = [f"{c['done']:,}/{'?' if total is None else format(total, ',')} done"]
    if c["failed"]:
        parts.append(f"{c['failed']:,} failed")
    parts.append(f"{c['rate']:,.0f}/s")
    if total is not None and c["done"] < total and c["rate"] > 0:
        parts.append(f"ETA {(total - c['done']) / c['rate']:.0f}s")
    else:
        parts.append(f"{c['elapsed']:.1f}s")
    return ", ".join(parts)


class TextBar:
    """A one-line bar redrawn in place on a terminal stream."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._last = 0.0
        self._lock = threading.Lock()
        self._ended = False

    def __call__(self, res) -> None:
        c = res.counts()
        finished = c["total"] is not None and c["done"] >= c["total"]
        now = time.monotonic()
        with self._lock:
            if self._ended or (not finished and now - self._last < MIN_INTERVAL):
                return
            self._last = now
            self._ended = finished
            frac = c["done"] / c["total"] if c["total"] else 0.0
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {frac:4.0%} {format_counts(c)}" + ("\n" if finished else ""))
            self.stream.flush()


def in_kernel() -> bool:
    """True inside a Jupyter kernel (ZMQInteractiveShell), where widgets can be shown.

    IPython is only looked at if something already imported it.
    """
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def kernel_display() -> Callable | None:
    """The display of the ``nbq.display`` entry point ``jupyter`` when in a Jupyter kernel
    (see the module docstring), else None."""
    return _display_entry_point() if in_kernel() else None


@functools.cache
def _display_entry_point() -> Callable | None:
    from importlib.metadata import entry_points
    for ep in entry_points(group="nbq.display", name="jupyter"):
        return ep.load()
    return None


def show(res, display: Callable | None = None):
    """Attach display to res and draw it once now.

    The default display is the kernel's (a widget: see the module docstring) in
    a Jupyter kernel and a text bar on stderr elsewhere.
    """
    if display is None:
        shown = kernel_display()
        if shown is not None:
            return shown(res)
    display = display or TextBar()
    res.add_listener(display)
    display(res)
    return display


class FuturesProgress:
    """Makes a list of futures look like a MapResult to progress displays (counts, listeners)."""

    def __init__(self, futures) -> None:
        self.futures = list(futures)
        self.id = f"{len(self.futures)} futures"
        self._lock = threading.Lock()
        self._listeners: list[Callable] = []
        self._done = self._failed = 0
        self._started = time.monotonic()
        self._finished_at: float | None = None if self.futures else self._started
        for f in self.futures:
            f.add_done_callback(self._on_done)

    def _on_done(self, f) -> None:
        with self._lock:
            self._done += 1
            if f.cancelled() or f.exception() is not None:
                self._failed += 1
            if self._done >= len(self.futures) and self._finished_at is None:
                self._finished_at = time.monotonic()
            listeners = list(self._listeners)
        for fn in listeners:
            fn(self)

    def add_listener(self, fn: Callable) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable) -> None:
        with self._lock:
            self._listeners.remove(fn)

    def counts(self) -> dict:
        """done, failed, total, elapsed, rate (as MapResult.counts)."""
        with self._lock:
            done, failed = self._done, self._failed
        end = self._finished_at or time.monotonic()
        elapsed = end - self._started
        return {"done": done, "failed": failed, "total": len(self.futures), "elapsed": elapsed,
                "rate": done / elapsed if elapsed > 0 else 0.0}

    def done(self) -> bool:
        with self._lock:
            return self._done >= len(self.futures)


def progress(obj, display: Callable | None = None):
    """Live progress of a MapResult or of a list of futures: ``nbq.progress(futures)``."""
    if not (hasattr(obj, "counts") and hasattr(obj, "add_listener")):
        obj = FuturesProgress(obj)
    return show(obj, display)
