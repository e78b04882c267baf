"""The notebook progress display: an ipywidgets bar fed by the client's receiver thread.

``ProgressWidget(res)`` is a listener (see nbq/client/progress.py): the receiver thread
calls it as chunks complete; it redraws at most every ``MIN_INTERVAL``
seconds so a million-item map does not flood the kernel's iopub channel, and
a timer draws the state that a skipped call left behind.  The final state is
always drawn, and the display's text/plain part is replaced with the final
counts then, so a saved notebook shows them in nbconvert and on GitHub.

This module imports ipywidgets; nbq/client/progress.py loads ``widget_progress``
through the ``nbq.display`` entry point only when a kernel shows progress.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets

from ..client.progress import MIN_INTERVAL, format_counts


def _finished(c: dict) -> bool:
    return c["total"] is not None and c["done"] >= c["total"]


def _eta(c: dict) -> str:
    total, done, rate = c["total"], c["done"], c["rate"]
    if total is None or done >= total or rate <= 0:
        return ""
    return f"ETA {(total - done) / rate:,.1f}s"


class ProgressWidget:
    """A live bar (IntProgress) and label (HTML): done / failed / total, rate, elapsed, ETA.

    Red ("danger") once anything failed, green ("success") when every item is
    done without failures.
    """

    def __init__(self, res: Any, label: str | None = None) -> None:
        self.res = res
        self.label = label if label is not None else f"nbq {getattr(res, 'id', '')}".strip()
        c = res.counts()
        self.bar = ipywidgets.IntProgress(value=0, min=0, max=max(1, c["total"] or 1),
                                          description="", bar_style="info",
                                          layout=ipywidgets.Layout(width="45%"))
        self.text = ipywidgets.HTML(value="")
        self.box = ipywidgets.HBox([self.bar, self.text])
        self.draws = 0               # how many times the widget state was set (for tests)
        self.display_id: str | None = None
        self._lock = threading.Lock()
        self._last = 0.0
        self._ended = False
        self._timer: threading.Timer | None = None
        self._draw(c)

    # -- the listener -----------------------------------------------------------

    def __call__(self, res: Any = None) -> None:
        """Redraw from res.counts(), at most every MIN_INTERVAL s; the end is always drawn."""
        c = self.res.counts()
        now = time.monotonic()
        with self._lock:
            if self._ended:
                return
            if not _finished(c) and now - self._last < MIN_INTERVAL:
                if self._timer is None:   # draw later what this call would have shown
                    self._timer = threading.Timer(MIN_INTERVAL - (now - self._last), self._late)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._draw(c)

    def _late(self) -> None:
        with self._lock:
            if self._timer is not threading.current_thread():
                return          # a draw since then cancelled this timer (or replaced it)
            self._timer = None
            if not self._ended:
                self._draw(self.res.counts())

    def _draw(self, c: dict) -> None:
        """Set the widgets' state (caller holds the lock, or it is __init__)."""
        self._last = time.monotonic()
        if self._timer is not None:     # this draw shows what the timer would have
            self._timer.cancel()
            self._timer = None
        finished = _finished(c)
        total = c["total"]
        if total is not None:
            self.bar.max = max(1, total)
        self.bar.value = min(c["done"], self.bar.max)
        self.bar.bar_style = "danger" if c["failed"] else ("success" if finished else "info")
        self.bar.description = f"{c['done'] / total:.0%}" if total else ""
        self.text.value = self.summary(c, html=True)
        self.draws += 1
        if finished:
            self._ended = True
            self._detach()
            self._publish_final(c)
            _resend_at_next_cell(self)

    def _detach(self) -> None:
        try:
            self.res.remove_listener(self)
        except (ValueError, AttributeError):
            pass

    # -- text -------------------------------------------------------------------

    def summary(self, c: dict | None = None, html: bool = False) -> str:
        """'done / failed / total, rate, elapsed, ETA' as text (or HTML for the label)."""
        c = c or self.res.counts()
        total = "?" if c["total"] is None else f"{c['total']:,}"
        failed = f"{c['failed']:,} failed"
        if html and c["failed"]:
            failed = f"<b style='color:#c62828'>{failed}</b>"
        parts = [f"{c['done']:,} / {total} done", failed, f"{c['rate']:,.0f}/s",
                 f"{c['elapsed']:,.1f}s elapsed"]
        eta = _eta(c)
        if eta:
            parts.append(eta)
        text = ", ".join(parts)
        return f"<span style='font-family:monospace'>{text}</span>" if html else text

    def plain(self) -> str:
        """The text/plain fallback: a text bar with the counts."""
        c = self.res.counts()
        frac = c["done"] / c["total"] if c["total"] else 0.0
        filled = int(frac * 30)
        return f"{self.label} [{'#' * filled}{'-' * (30 - filled)}] {frac:4.0%} {format_counts(c)}"

    # -- display ----------------------------------------------------------------

    def _bundle(self) -> dict:
        return {"text/plain": self.plain(),
                "application/vnd.jupyter.widget-view+json": {
                    "version_major": 2, "version_minor": 0, "model_id": self.box.model_id}}

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return self._bundle()

    def _ipython_display_(self) -> None:
        """Show the bar with a display id, so the final counts can replace the text part.

        Shown once: ``nbq.progress(...)`` as a cell's last line displays it and
        returns it, and the second display would be a duplicate.
        """
        from IPython.display import display
        if self.display_id is not None:
            return
        handle = display(self._bundle(), raw=True, display_id=True)
        with self._lock:
            self.display_id = getattr(handle, "display_id", None)
            ended = self._ended
        if ended:
            self._publish_final(self.res.counts())

    def _publish_final(self, c: dict) -> None:
        if self.display_id is None:
            return
        try:
            from IPython.display import update_display
            update_display(self._bundle(), raw=True, display_id=self.display_id)
        except Exception:   # no kernel any more: the widget state itself is final
            pass

    def close(self) -> None:
        """Stop listening and close the widgets' comms."""
        self._detach()
        with self._lock:
            self._ended = True
            if self._timer is not None:
                self._timer.cancel()
        self.box.close()
        self.bar.close()
        self.text.close()


_ended_since_last_cell: list[ProgressWidget] = []


def _resend_at_next_cell(w: ProgressWidget) -> None:
    """Send w's final state and final text again when the next cell starts.

    The final draw comes from the receiver thread, possibly between two cells;
    a front end (or nbclient) keeps only messages sent during a cell, so the
    final widget state and text/plain could be missing from a saved notebook
    without this.
    """
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        return
    if shell is None:
        return
    if _resend not in shell.events.callbacks["pre_execute"]:
        shell.events.register("pre_execute", _resend)
    _ended_since_last_cell.append(w)


def _resend() -> None:
    while _ended_since_last_cell:
        w = _ended_since_last_cell.pop()
        for widget in (w.bar, w.text):
            if widget.comm is not None:
                widget.send_state()
        w._publish_final(w.res.counts())


def widget_progress(res: Any, display: bool = True) -> ProgressWidget:
    """Attach a ProgressWidget to res (a MapResult or futures adapter) and show it."""
    w = ProgressWidget(res)
    if not w._ended:
        res.add_listener(w)
        w(res)   # anything that completed between creation and registration
    if display:
        from IPython.display import display as show
        show(w)
    return w
