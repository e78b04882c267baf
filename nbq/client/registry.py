"""The clients open in this process: the current one (``current_client``), and those shut
down at the interpreter's exit, each waiting for its work as
``shutdown(wait=client.wait_at_exit)``.

Nothing is registered at import: the exit hook is registered with the first client.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref

from ..errors import NbqError

_current: "weakref.ref | None" = None
_open_clients: weakref.WeakSet = weakref.WeakSet()
_exit_lock = threading.Lock()
_exit_registered = False


def current_client():
    """The most recently created client that is still open, in this process.

    A forked child (a worker process of ``nbq worker -B``, whose beat has a
    client) does not get its parent's: that client's threads stayed behind.
    """
    client = _current() if _current is not None else None
    if client is None or client.closed:
        raise NbqError("no nbq client is open: create one with nbq.Client()")
    return client


def opened(client) -> None:
    """client is connected: it becomes the current client, and shuts down at exit."""
    global _current
    _current = weakref.ref(client)
    _at_exit(client)


def closed(client) -> None:
    """client has shut down: nothing to do for it at exit."""
    _open_clients.discard(client)


def _at_exit(client) -> None:
    """Have client shut down, waiting for its work, when the interpreter exits.

    As the stdlib executors do, the hook runs before the interpreter joins its
    threads (threading._register_atexit), so done-callbacks still run; it is
    registered once, with the first client, not at import.
    """
    global _exit_registered
    with _exit_lock:
        if not _exit_registered:
            try:
                threading._register_atexit(_shutdown_at_exit)
            except (AttributeError, RuntimeError):  # not CPython, or the interpreter is exiting
                atexit.register(_shutdown_at_exit)
            _exit_registered = True
        _open_clients.add(client)


def _shutdown_at_exit() -> None:
    with contextlib.ExitStack() as stops:  # each client is stopped, whatever another raises
        for client in list(_open_clients):
            if client._pid == os.getpid():  # a forked child's copy has no threads to stop
                stops.callback(client.shutdown, wait=client.wait_at_exit)
