"""One in-process broker per address per process: ``memory://`` is the process's default,
``memory://name`` another, so every client of one address in a process shares its broker."""
from __future__ import annotations

import os
import threading

from .. import MEMORY_SCHEME
from .state import MemoryBroker

_brokers: dict[str, MemoryBroker] = {}
_brokers_lock = threading.Lock()
_pid = os.getpid()


def broker(address: str) -> MemoryBroker:
    """The in-process broker of address (``memory://`` or ``memory://name``), made on first use;
    a forked child has none of its parent's (their threads stayed behind)."""
    global _pid
    name = MEMORY_SCHEME + address[len(MEMORY_SCHEME):].strip("/")
    with _brokers_lock:
        if _pid != os.getpid():
            _brokers.clear()
            _pid = os.getpid()
        found = _brokers.get(name)
        if found is None:
            found = _brokers[name] = MemoryBroker(name)
        return found
