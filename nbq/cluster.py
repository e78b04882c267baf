"""What a Client needs on this machine: a private broker and local worker processes.

The embedded broker runs on a thread of the client's process (the client talks
to it in-process, workers over loopback TCP), so it lives and dies with the
client.  Local workers are a unit of the shared cluster interface (clusters/base.py):
an ``nbq worker`` subprocess reading the client's key on its standard input and
holding that input open as its lifeline: when the client exits, even by SIGKILL,
the pipe closes and the worker and its processes exit.  A key is never on a
command line nor in an environment.
"""
from __future__ import annotations

import os
import subprocess
import sys

from typing import Callable

from . import keys
from .clusters.base import STOP_WAIT, Cluster
from .deaths import MAX_DEATHS
from .transport import is_memory


def client_cluster(address: "str | Cluster | None", workers: int | None, *,
                   key_file: str | None, result_expires: float | None,
                   initializer: Callable | None, initargs: tuple, inline: bool = False,
                   max_task_deaths: int = MAX_DEATHS) -> tuple[Cluster, bool]:
    """The cluster of Client(address, workers, ...) and whether it is the client's own to
    close: the user's Cluster as given, a MemoryCluster for a memory:// address (worker
    threads of this process, or ``inline``: none), else a LocalCluster for the address
    (NBQ_BROKER when none: without either, a private broker) with ``workers`` local worker
    processes (``os.cpu_count()`` for a private broker).  Checks the arguments that choose it."""
    if isinstance(address, Cluster):
        if workers is not None or initializer is not None:
            raise ValueError("a cluster's workers are its own: size it with cluster.scale(n) "
                             "or cluster.adapt(), not Client(cluster, workers=...)")
        return address, False
    from .worker import initializer as worker_init
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive number of processes (or None), "
                         f"not {workers!r}")
    address = address or os.environ.get("NBQ_BROKER") or None
    if initializer is not None:
        if not callable(initializer):
            raise TypeError(f"initializer must be callable, not {initializer!r}")
        if address is not None and workers is None:
            raise ValueError("an initializer runs in the worker processes this client starts: "
                             "give workers=N, or start workers with `nbq worker --init "
                             "MODULE:FUNC`")
    key = keys.load_key(key_file)
    if is_memory(address):
        from .clusters.memory import MemoryCluster
        return MemoryCluster(address, workers, inline=inline, key=key,
                             result_expires=result_expires, initializer=initializer,
                             max_task_deaths=max_task_deaths), True
    if inline:
        raise ValueError("inline=True runs tasks in the submitting thread of this process: "
                         "it needs the address memory://")
    init = None if initializer is None else worker_init.encode(key, initializer, initargs)
    return LocalCluster(key, address, workers, result_expires=result_expires,
                        initializer=init), True


class LocalCluster(Cluster):
    """The broker address a client uses, and the local worker processes started for it."""

    def __init__(self, key: bytes, address: str | None, workers: int | None,
                 result_expires: float | None = None, initializer: bytes | None = None) -> None:
        """``initializer``: what worker.initializer.encode made, for the local workers."""
        super().__init__(address, key=key, result_expires=result_expires)
        if address is None and workers is None:
            workers = os.cpu_count() or 1
        self.unit_size = workers or 1
        self._initializer = initializer
        if workers:
            self._scale(workers)

    def _start(self, name: str, n: int) -> subprocess.Popen:
        # local workers import what the client can: its modules, its notebook's folder
        path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        env = dict(os.environ, PYTHONPATH=path)
        env.pop("NBQ_KEY", None)
        cmd = self.worker_command(name, n)
        init_r, init_w = os.pipe() if self._initializer is not None else (None, None)
        if init_r is not None:
            cmd += ["--init-fd", str(init_r)]
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                    pass_fds=[init_r] if init_r is not None else [])
        finally:
            if init_r is not None:
                os.close(init_r)
        # in the order the worker reads them: the key, then the initializer
        try:
            proc.stdin.write(self.handshake())
            proc.stdin.flush()
        except BrokenPipeError:  # the worker died at once: it says why on stderr
            pass
        if init_w is not None:
            _hand_over(open(init_w, "wb"), self._initializer)
        return proc

    def _stop(self, proc: subprocess.Popen) -> None:
        """Close the lifeline; kill the worker if it has not gone within STOP_WAIT seconds."""
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            pass
        finally:  # also when interrupted: its worker processes die with it (PR_SET_PDEATHSIG)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _ended(self, proc: subprocess.Popen) -> str | None:
        code = proc.poll()
        return None if code is None else f"the worker exited with code {code} (see its stderr)"

    def _log(self, proc: subprocess.Popen) -> str:
        return "(local workers write to this process's standard error)"


def _hand_over(pipe, data: bytes) -> None:
    """Write data to a pipe the worker reads as it starts, and close it."""
    try:
        with pipe:
            pipe.write(data)
    except BrokenPipeError:  # the worker died at once: it says why on stderr
        pass
