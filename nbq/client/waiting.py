"""nbq.wait and nbq.as_completed: concurrent.futures' own, which also end when a client of
the futures gives up on its silent broker (BrokerUnavailable), instead of waiting for ever.

Each client's link to its broker (link.py) holds a ``lost`` signal, a plain Future failed
with BrokerUnavailable when its broker has been silent for ``broker_grace`` (and replaced
when the broker answers again).
It is waited on beside the user's futures, so nothing polls.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Iterable, Iterator


def _signals(fs: Iterable) -> set:
    """The lost signals of the clients of these futures (other futures have none)."""
    links = {getattr(getattr(f, "_client", None), "_link", None) for f in fs}
    return {link.lost for link in links if link is not None}


def wait(fs: Iterable, timeout: float | None = None,
         return_when: str = cf.ALL_COMPLETED) -> cf._base.DoneAndNotDoneFutures:
    """concurrent.futures.wait; BrokerUnavailable once a client of fs gave up on its broker."""
    fs = set(fs)
    signals = _signals(fs)
    if not signals:
        return cf.wait(fs, timeout, return_when)
    met = cf.Future()  # set by the done-callbacks once return_when holds
    lock = threading.Lock()
    left = [len(fs)]

    def check(f) -> None:
        with lock:
            left[0] -= 1
            failed = (return_when == cf.FIRST_EXCEPTION and not f.cancelled()
                      and f.exception() is not None)
            if (left[0] <= 0 or failed or return_when == cf.FIRST_COMPLETED) and not met.done():
                met.set_result(None)

    if not fs:
        met.set_result(None)
    for f in fs:
        f.add_done_callback(check)  # at once for one already done
    ready, _ = cf.wait(signals | {met}, timeout, cf.FIRST_COMPLETED)
    for s in ready & signals:
        s.result()  # raises BrokerUnavailable
    done = {f for f in fs if f.done()}
    return cf._base.DoneAndNotDoneFutures(done, fs - done)


def as_completed(fs: Iterable, timeout: float | None = None) -> Iterator:
    """concurrent.futures.as_completed; BrokerUnavailable once a client of fs gave up on its
    broker."""
    fs = set(fs)
    total = len(fs)
    signals = _signals(fs)
    finished = cf.as_completed(fs | signals, timeout)
    while fs:
        try:
            f = next(finished)
        except cf.TimeoutError:  # counted as concurrent.futures counts: the caller's futures
            raise cf.TimeoutError(f"{len(fs)} (of {total}) futures unfinished") from None
        if f in signals:
            f.result()  # raises BrokerUnavailable
        else:
            yield f
            fs.discard(f)
