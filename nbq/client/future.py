"""nbq.Future: a concurrent.futures.Future with a task id and Celery-style state names."""
from __future__ import annotations

import _thread
import concurrent.futures
import logging
import time
from typing import Callable
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, RUNNING

from ..states import FAILURE, PENDING, RETRY, REVOKED, STARTED, SUCCESS


class _Gate(_thread.RLock):
    """A future's lock and the waits for its change: what the threading.Condition of a
    concurrent.futures.Future gives it (acquire, release, ``with``, wait, notify_all), with
    acquire, release, enter and exit in C, made in a fraction of a Condition's time.  A
    future is made per task, and a Condition's Python layers cost ~10 µs per task made,
    run and waited for (its creation ~17 % of a thread submitting 10,000);
    concurrent.futures.wait and as_completed use it as they use the Condition.
    """

    __slots__ = ("_sleepers",)

    def __init__(self) -> None:
        self._sleepers: list = []  # a lock per wait, held until notify_all releases it

    def wait(self, timeout: float | None = None) -> bool:
        """Let go of the lock (held) until notify_all or timeout, then take it again; False
        on timeout."""
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._sleepers.append(waiter)
        saved = self._release_save()
        woken = False
        try:
            woken = waiter.acquire(True, -1 if timeout is None else max(timeout, 0))
        finally:
            self._acquire_restore(saved)
            if not woken:  # timed out, or interrupted (Ctrl-C, a signal handler's exception)
                try:
                    self._sleepers.remove(waiter)
                except ValueError:  # notified between the timeout and taking the lock again
                    pass
        return woken

    def notify_all(self) -> None:
        """Wake every wait (the lock held)."""
        sleepers = self._sleepers
        for waiter in sleepers:
            waiter.release()
        sleepers.clear()


class Future(concurrent.futures.Future):
    """The eventual result of one task; works with concurrent.futures.wait and as_completed."""

    _retrying = False  # a started task waiting to run again after a retry (a state notice)
    _on_output: "Callable[[list[bytes]], None] | None" = None
    _early: "list[list[bytes]] | None" = None  # output that came before stream_output

    def __init__(self, task_id: str, client=None) -> None:
        # the fields concurrent.futures.Future.__init__ sets (a test checks them), with a _Gate
        # for its Condition
        self._condition = _Gate()
        self._state = "PENDING"
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self.id = task_id
        self._client = client

    @property
    def state(self) -> str:
        """One of PENDING, STARTED, RETRY (waiting to run again after a retry), SUCCESS,
        FAILURE, REVOKED."""
        with self._condition:
            s = self._state
            if s == FINISHED:
                return FAILURE if self._exception is not None else SUCCESS
            if s == RUNNING:
                return RETRY if self._retrying else STARTED
            if s in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return REVOKED
            return PENDING

    def result(self, timeout: float | None = None):
        """The task's value (its exception raised); BrokerUnavailable once the client has
        waited broker_grace for a silent broker (the task is kept: ask again later)."""
        if self._state != FINISHED:
            self._await(timeout)
        if self._state == FINISHED and self._exception is None:  # (a finished future stays so)
            return self._result
        return super().result(0)

    def exception(self, timeout: float | None = None):
        """The task's exception, or None; waits as result() does."""
        self._await(timeout)
        return super().exception(0)

    def _await(self, timeout: float | None) -> None:
        """Wait until done or timeout (then result(0) raises TimeoutError), raising
        BrokerUnavailable while the client has given up waiting for its broker."""
        client = self._client
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._state not in (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED):
                if client is not None:
                    client._check_broker()  # woken by the client when it gives up
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                self._condition.wait(remaining)

    def cancel(self) -> bool:
        """Cancel the task if no worker has started it; True means it will never run."""
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            if self._state != "PENDING":
                return False
        if self._client is None or not self._client._cancel_tasks([self.id]).get(self.id):
            return False
        self._client._revoke(self.id)
        return self.cancelled()

    def stream_output(self, fn: "Callable[[list[bytes]], None] | None") -> None:
        """Call fn(frames) with each piece of output the running task streams
        (WorkerConnection.output: a remote cell's prints), on the client's receiver thread;
        what came before this call is handed over first.  None stops."""
        with self._condition:
            self._on_output = fn
            early, self._early = self._early, None
        for frames in early or ():
            self._call_output(fn, frames)

    def _output(self, frames: list) -> None:
        frames = [bytes(f) for f in frames]
        with self._condition:
            fn = self._on_output
            if fn is None:
                self._early = (self._early or []) + [frames]
                return
        self._call_output(fn, frames)

    def _call_output(self, fn: Callable, frames: list[bytes]) -> None:
        if fn is None:
            return
        try:
            fn(frames)
        except Exception:
            logging.getLogger("nbq.client").exception("error handling task %s's output", self.id)

    def _notice(self, state: str) -> None:
        """A worker's state notice (receiver thread): RETRY while the task waits for its
        retry, STARTED when it runs again."""
        with self._condition:
            if self._state == "PENDING":
                self._state = RUNNING  # as set_running_or_notify_cancel, under the same lock
            if self._state == RUNNING:
                self._retrying = state == RETRY

    def _revoked(self) -> bool:
        """Mark cancelled here (the broker has agreed, or the process running it was killed by
        a revoke with terminate) and wake every waiter, as an executor does."""
        with self._condition:
            if self._state == CANCELLED_AND_NOTIFIED:
                return True
            if self._state == FINISHED:
                return False
            self._state = CANCELLED  # what Future.cancel() does, for a RUNNING one too
            self._condition.notify_all()
        self._invoke_callbacks()
        self.set_running_or_notify_cancel()
        return True

    def __repr__(self) -> str:
        return f"<nbq.Future {self.id} {self.state}>"
