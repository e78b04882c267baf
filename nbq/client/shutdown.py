"""The Client's shutdown sequence: stop taking work, wait for what was submitted, then stop
the receiver thread, the connection and the local cluster.

Its states, in order: open; ``_closed`` (no new work accepted: shutdown() has begun, or
the receiver stopped); ``_conn_closed`` (the connection is closed, once); ``_down`` (every
step of ``_shutdown_now`` has been done).  A shutdown interrupted (Ctrl-C, an error)
still stops the threads and local processes before the interruption propagates, and a
second call does what is left.  ClientShutdown is a base of Client (executor.py), which
owns the collaborators it stops.
"""
from __future__ import annotations

import contextlib
import os

from . import registry


class ClientShutdown:
    """shutdown(), ``closed`` and the steps that stop a Client, each run even when one
    before it fails or is interrupted."""

    _closed = False       # no new work accepted
    _conn_closed = False
    _down = False         # every step of _shutdown_now has been done

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("cannot submit to an nbq client after shutdown")

    @property
    def closed(self) -> bool:
        """True once shut down, and in a process forked from the one that made it (its threads
        stayed behind): such a client sends nothing, make a new one."""
        return self._closed or self._pid != os.getpid()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; wait for what was submitted; stop local workers and broker.

        A map's ``timeout`` bounds waits on that map only, never this wait.  Whatever
        interrupts the wait (Ctrl-C, an error), the client's threads and local
        processes are stopped before it propagates; a second call finishes a stop
        that was itself interrupted.
        """
        if self._inbox.stopped:
            self._shutdown_now()
            return
        self._closed = True
        try:
            if cancel_futures:
                self._feeder.stop_all()
                pending = [tid for tid, f in list(self._futures.items()) if f._state == "PENDING"]
                pending += list(self._chunks)
                if pending:
                    answer = self._requests.ask("cancel", lambda rq: self._conn.cancel(rq, pending))
                    for tid, ok in answer.items():
                        if ok:
                            self._revoke(tid)
            if wait:
                self._wait_for_work()
        finally:
            self._shutdown_now()

    def _wait_for_work(self) -> None:
        """Until every task and map item this client submitted has finished; BrokerUnavailable
        once the client has given up on its broker."""
        for fut in list(self._futures.values()):
            if not getattr(fut, "_foreign", False):
                fut._await(None)
        for res, *_ in list(self._chunks.values()):
            with res._cond:  # not res._wait: that obeys the map's own timeout
                while not res.done():
                    self._check_broker()  # woken when the client gives up on its broker
                    res._cond.wait()

    def _shutdown_now(self) -> None:
        """Stop the receiver thread, the connection and the local cluster, each step run even
        when one before it fails or is interrupted; a repeated call does what is left."""
        if self._down:
            return
        self._closed = self._inbox.stopped = True
        with contextlib.ExitStack() as steps:  # callbacks run last-registered first
            steps.callback(self._close_cluster)
            steps.callback(self._subscriptions.end_all)
            steps.callback(self._inbox.fail_unfinished)
            steps.callback(self._close_connection)
            steps.callback(self._stop_receiver)
            if not self._conn_closed:
                steps.callback(self._conn.wake)
                self._sender.flush()
        self._down = True
        registry.closed(self)

    def _close_cluster(self) -> None:
        if self._owns_cluster:
            self._cluster.close()

    def _stop_receiver(self) -> None:
        self._inbox.join(5.0)

    def _close_connection(self) -> None:
        if not self._conn_closed:
            self._conn_closed = True
            self._inbox.close()
