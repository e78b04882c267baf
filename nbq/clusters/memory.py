"""The cluster of a memory:// client: worker threads of this process, or none (inline).

``Client("memory://")`` runs tasks in ``workers`` threads (default os.cpu_count(),
none when its broker has threads already) of the client's own process, each running the worker loop worker processes run
(nbq/worker/threads.py); ``Client("memory://", inline=True)`` runs each task in the
thread that submits it, during submit/map, so a debugger stops there.  Every
memory:// client of a process shares one in-process broker per address
(``memory://`` or ``memory://name``): results, AsyncResult by id, joins and claims
are shared, and threads of one client run another's tasks, as workers of one
broker do.  Threads stop with the client that started them (tasks then wait, as on a
broker whose workers stopped).  The broker outlives its clients (until the process ends), keeping
results for result_expires; a client that gives result_expires sets it for the
broker.

Refused, with NbqError, where a process is needed: ``max_task_deaths`` (a task
that kills its worker kills this process), an ``initializer`` (it runs once per
worker process), and, at run time, time limits and ``revoke(terminate=True)``.
"""
from __future__ import annotations

import os

from ..deaths import MAX_DEATHS
from ..errors import NbqError
from ..transport.base import ClientConnection
from ..transport.memory import MemoryClient, broker
from ..worker.threads import ThreadPool, run_inline
from .base import Cluster


class MemoryCluster(Cluster):
    """Worker threads serving this process's memory:// broker at address."""

    def __init__(self, address: str = "memory://", workers: int | None = None, *,
                 inline: bool = False, key: bytes | None = None,
                 result_expires: float | None = None, initializer: object = None,
                 max_task_deaths: int = MAX_DEATHS) -> None:
        """``workers``: threads to start (0: none; None: os.cpu_count(), or none when the
        broker at address has worker threads already: they serve this client too, as the
        workers of a running broker serve every client of it); ``inline``: no threads, each
        task runs in the thread that submits it."""
        if initializer is not None:
            raise NbqError("memory:// runs tasks in threads of this process, not in worker "
                           "processes: there is no process for an initializer to prepare; "
                           "call it yourself before submitting")
        if max_task_deaths != MAX_DEATHS:
            raise NbqError("max_task_deaths counts deaths of worker processes; memory:// runs "
                           "tasks in this process, which a task that crashes its worker ends "
                           "with it: leave max_task_deaths out")
        if inline and workers:
            raise ValueError("an inline memory:// client runs tasks in the submitting thread: "
                             "give inline=True or workers=N, not both")
        super().__init__(address, key=key)  # key: None loads it, as any cluster does
        self.broker = broker(address)  # the process's: it outlives this cluster
        if result_expires is not None:
            self.broker.result_expires = float(result_expires)
        self.inline = inline
        self.unit_size = workers or 1
        if workers is None and not inline and not self.broker.supervisors:
            workers = os.cpu_count() or 1
        if workers and not inline:
            self._scale(workers)

    def client_connection(self, client_id: str) -> ClientConnection:
        return MemoryClient(self.address, client_id,
                            inline=run_inline if self.inline else None)

    def _start(self, name: str, n: int) -> ThreadPool:
        return ThreadPool(self.address, name, n)

    def _stop(self, pool: ThreadPool) -> None:
        pool.close()

    def _ended(self, pool: ThreadPool) -> str | None:
        return None

    def _log(self, pool: ThreadPool) -> str:
        return "(memory:// worker threads log to this process's logging)"

    def _stop_broker(self) -> None:
        """The broker is the process's, shared by its memory:// clients: it stays."""
        self.broker = None
