"""Progress displays for a MapResult: a text bar here; the display is pluggable.

A display is any callable taking the MapResult; it is registered as a listener
and called from the client's receiver thread as items complete.  Displays
throttle themselves (at most ~10 redraws a second) and always draw the end.
"""
from __future__ import annotations

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


def show(res, display: Callable | None = None):
    """Attach display (default: a text bar on stderr) to res and draw it once now."""
    display = display or TextBar()
    res.add_listener(display)
    display(res)
    return display
