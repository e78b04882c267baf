"""MapResult: the results of one map, in input order, without a Future per item.

Items travel in chunks (one task each).  Values land in one list by input
position; a bytearray marks which positions are done.  The input is read
lazily: at most ``window`` chunks are in flight, and the client's receiver
thread reads the next chunk when one completes, so a generator of ten million
items never has ten million items in memory at once.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import NbqError

if TYPE_CHECKING:
    import pandas

ERROR_MODES = ("raise", "include", "skip")


class MapResult:
    """Results of client.map / client.starmap, by input position."""

    def __init__(self, client, map_id: str, *, star: bool, total: int | None,
                 deadline: float | None = None, args: list | None = None) -> None:
        self._client = client
        self.id = map_id
        self._star = star
        self._total = total            # None until the input is exhausted
        self._deadline = deadline
        self._args = args              # the input, kept for to_dataframe(include_args=True)
        self._values: list = [None] * total if total is not None else []
        self._done = bytearray(total) if total is not None else bytearray()
        self._errors: dict[int, BaseException] = {}
        self._ndone = 0
        self._log: list[tuple[int, int]] = []   # (start, n) in completion order
        self._chunks: dict[str, tuple[int, int]] = {}  # chunk task id -> (start, n) in flight
        self._cond = threading.Condition()
        self._listeners: list[Callable[["MapResult"], None]] = []
        self._started = time.monotonic()
        self._finished_at: float | None = None
        self._cursor = 0               # where next(res) is

    # -- filled by the client -------------------------------------------------

    def _grow(self, n: int) -> None:
        """Make room for n more items of an input of unknown length."""
        self._values.extend(itertools.repeat(None, n))
        self._done.extend(bytes(n))

    def _set_total(self, total: int) -> None:
        with self._cond:
            self._total = total
            del self._values[total:]
            del self._done[total:]
            self._check_finished()

    def _deliver(self, start: int, values: list, errors: dict[int, BaseException]) -> None:
        """Record results for positions start..start+len(values); repeats are ignored."""
        n = len(values)
        with self._cond:
            if self._done.find(1, start, start + n) == -1:   # the usual case: all new
                self._values[start:start + n] = values
                self._done[start:start + n] = b"\x01" * n
                for i, e in errors.items():
                    self._errors[start + i] = e
                fresh = n
            else:
                fresh = 0
                for i, v in enumerate(values):
                    p = start + i
                    if not self._done[p]:
                        self._done[p] = 1
                        self._values[p] = v
                        if i in errors:
                            self._errors[p] = errors[i]
                        fresh += 1
            self._ndone += fresh
            self._log.append((start, n))
            self._check_finished()
            self._cond.notify_all()
        self._notify()

    def _fail(self, start: int, n: int, exc: BaseException) -> None:
        self._deliver(start, [None] * n, dict.fromkeys(range(n), exc))

    def _check_finished(self) -> None:
        if self._total is not None and self._ndone >= self._total and self._finished_at is None:
            self._finished_at = time.monotonic()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn(self)

    def add_listener(self, fn: Callable[["MapResult"], None]) -> None:
        """Call fn(self) from the receiver thread whenever items complete (progress displays)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[["MapResult"], None]) -> None:
        self._listeners.remove(fn)

    # -- the user's side ------------------------------------------------------

    def __len__(self) -> int:
        """The number of items; for a generator input, waits until it has all been read
        (``list(res)`` asks first; a wait like any other on the map: see _wait)."""
        self._wait(lambda: self._total is not None, None)
        return self._total

    @property
    def total(self) -> int | None:
        """The number of items, or None while a generator input is still being read."""
        return self._total

    def counts(self) -> dict:
        """A snapshot for progress displays: done, failed, total, elapsed seconds, rate."""
        with self._cond:
            done, failed, total = self._ndone, len(self._errors), self._total
        end = self._finished_at or time.monotonic()
        elapsed = end - self._started
        return {"done": done, "failed": failed, "total": total, "elapsed": elapsed,
                "rate": done / elapsed if elapsed > 0 else 0.0}

    def done(self) -> bool:
        """True when every item has a result or an error."""
        with self._cond:
            return self._total is not None and self._ndone >= self._total

    def _wait(self, predicate: Callable[[], bool], timeout: float | None) -> None:
        """Wait for predicate (under the lock) until timeout or the map's deadline.

        A KeyboardInterrupt (Ctrl-C in a notebook) while waiting cancels the items
        not yet started, as leaving the standard library's map generator does.
        """
        deadline = self._deadline
        if timeout is not None:
            t = time.monotonic() + timeout
            deadline = t if deadline is None else min(deadline, t)
        try:
            with self._cond:
                while not predicate():
                    self._client._check_broker()  # BrokerUnavailable: woken when the client gives up
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"map {self.id}: {self._ndone} of "
                                           f"{self._total if self._total is not None else '?'} "
                                           "items done when the timeout expired")
                    self._cond.wait(remaining)
        except KeyboardInterrupt:
            if not self.done() and not self._client.closed:
                self.cancel()
            raise

    def _ended_before(self, i: int) -> bool:
        return self._total is not None and i >= self._total

    def _ready(self, i: int) -> bool:
        """Position i has its value or error, or the map ends before it (under the lock)."""
        return self._ended_before(i) or i < len(self._done) and self._done[i] == 1

    def __iter__(self) -> Iterator[Any]:
        """Values in input order from the first; the first failure is raised when it is reached.

        Each call starts again from the first item (so a notebook can look at a map
        twice); the values come in runs of those ready, not a wait per item.
        """
        return itertools.chain.from_iterable(self._runs())

    def _runs(self) -> Iterator[list]:
        i = 0
        while True:
            self._wait(lambda: self._ready(i), None)
            with self._cond:
                if self._ended_before(i):
                    return
                end = self._done.find(0, i)
                if end == -1:
                    end = len(self._done)
                # every failure is at i or beyond: one before i would have been raised
                failed = min(self._errors) if self._errors else end
            if failed > i:
                yield self._values[i:min(end, failed)]
            if failed < end:
                raise self._errors[failed]
            i = end

    def __next__(self) -> Any:
        """The next value in input order, from a cursor of the map's own (``next(res)``).

        Raises a failure when the cursor reaches it (the cursor moves past it), and
        StopIteration after the last item.  Iterating the map is not affected.
        """
        i = self._cursor
        self._wait(lambda: self._ready(i), None)
        if self._ended_before(i):
            raise StopIteration
        self._cursor = i + 1
        err = self._errors.get(i)
        if err is not None:
            raise err
        return self._values[i]

    def result(self, timeout: float | None = None) -> list:
        """All values in input order; raises the first failure in input order."""
        self._wait(self.done, timeout)
        if self._errors:
            raise self._errors[min(self._errors)]
        return list(self._values)

    def errors(self, partial: bool = False) -> dict[int, BaseException]:
        """Failures by input position, once the map has finished (it waits, as
        to_dataframe() does); with partial=True, at once: the failures so far."""
        if not partial:
            self._wait(self.done, None)
        with self._cond:
            return dict(self._errors)

    def wait(self, timeout: float | None = None) -> None:
        """Return when every item has finished, without fetching values.

        Raises TimeoutError after timeout seconds (or at the map's own deadline).
        """
        self._wait(self.done, timeout)

    def as_completed(self, errors: str = "raise", timeout: float | None = None
                     ) -> Iterator[tuple[int, Any]]:
        """(index, value) pairs in completion order.

        errors="raise" raises a failure when reached, "include" yields the
        exception as the value, "skip" leaves failed items out.
        """
        _check_mode(errors)
        seen = 0
        while True:
            self._wait(lambda: len(self._log) > seen or self.done(), timeout)
            with self._cond:
                batch = self._log[seen:]
                finished = self.done() and len(self._log) == seen + len(batch)
            seen += len(batch)
            for start, n in batch:
                for p in range(start, start + n):
                    err = self._errors.get(p)
                    if err is None:
                        yield p, self._values[p]
                    elif errors == "raise":
                        raise err
                    elif errors == "include":
                        yield p, err
            if finished:
                return

    def cancel(self) -> int:
        """Cancel every item no worker has started; returns how many were cancelled."""
        return self._client._cancel_map(self)

    def progress(self, display: Callable | None = None):
        """Show live progress: a widget in a notebook, a text bar elsewhere."""
        from .progress import show
        return show(self, display)

    def to_dataframe(self, include_args: bool = False, errors: str = "raise",
                     partial: bool = False) -> pandas.DataFrame:
        """The results as a pandas DataFrame indexed by input position (see frames.py).

        Waits for the whole map, unless partial=True: then it returns at once with
        the rows of the items done so far (errors= applies to the failures among
        them), so a long map can be looked at while it runs.
        """
        _check_mode(errors)
        if include_args and self._args is None:
            raise NbqError("include_args=True needs the map's inputs, which this client does "
                           "not have (a map found by id); call to_dataframe() without it")
        from .frames import to_dataframe
        if not partial or self.done():
            self._wait(self.done, None)
            return to_dataframe(self._values, self.errors(), self._args, star=self._star,
                                include_args=include_args, errors_mode=errors)
        with self._cond:     # a consistent snapshot: the receiver thread keeps delivering
            done = bytes(self._done)
            values = self._values[:len(done)]
            failed = dict(self._errors)
            # the inputs kept from a generator still being read grow meanwhile: take a copy
            args = self._args[:len(done)] if include_args and self._total is None else self._args
        positions = list(itertools.compress(range(len(done)), done))
        return to_dataframe(values, failed, args, star=self._star, include_args=include_args,
                            errors_mode=errors, positions=positions)

    @classmethod
    def from_id(cls, map_id: str, client=None) -> "MapResult":
        """Find a map again by its id, from any client on the same broker."""
        from .registry import current_client
        return (client or current_client())._find_map(map_id)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """text/plain with the counts: what nbconvert and GitHub show."""
        from .progress import format_counts
        return {"text/plain": f"{self!r}\n{format_counts(self.counts())}"}

    def _ipython_display_(self) -> None:
        """In a Jupyter kernel, displaying a MapResult shows its live progress (a widget)."""
        from .progress import kernel_display
        shown = kernel_display()
        if shown is not None:
            shown(self)
        else:
            from IPython.display import display
            display(self._repr_mimebundle_(), raw=True)

    def __repr__(self) -> str:
        c = self.counts()
        total = "?" if c["total"] is None else c["total"]
        return f"<nbq.MapResult {self.id} {c['done']}/{total} done, {c['failed']} failed>"


def _check_mode(errors: str) -> None:
    if errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {', '.join(map(repr, ERROR_MODES))}, "
                         f"not {errors!r}")

