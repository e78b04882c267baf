"""Starting what a Client needs on this machine: a private broker, local worker processes.

The embedded broker runs on a thread of the client's process (the client talks
to it in-process, workers over loopback TCP), so it lives and dies with the
client.  Local workers are an ``nbq worker`` subprocess holding the read end of
a lifeline pipe: when the client exits, even by SIGKILL, the pipe closes and
the worker and its processes exit.  The worker reads the client's key on its
standard input: a key is never on a command line nor in an environment.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import zmq

from .broker import DEFAULT_RESULT_EXPIRES, Broker
from .transport import with_result_expires


class LocalCluster:
    """The broker address a client uses, and the local pieces started for it."""

    def __init__(self, key: bytes, address: str | None, workers: int | None,
                 result_expires: float | None = None) -> None:
        self.context: zmq.Context | None = None
        self.broker: Broker | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._lifeline: int | None = None
        if address is None:
            self.context = zmq.Context()
            inproc = f"inproc://nbq-broker-{id(self)}"
            self.broker = Broker(key, ["tcp://127.0.0.1:0", inproc], self.context,
                                 result_expires=result_expires or DEFAULT_RESULT_EXPIRES)
            self.address = self.broker.addresses[0]
            self.connect_address = inproc
            self._thread = threading.Thread(target=self.broker.run, name="nbq-broker", daemon=True)
            self._thread.start()
            workers = os.cpu_count() or 1 if workers is None else workers
        else:
            self.address = self.connect_address = with_result_expires(address, result_expires)
        self.workers = workers or 0
        if self.workers:
            self._start_workers(key)

    def _start_workers(self, key: bytes) -> None:
        r, w = os.pipe()
        # local workers import what the client can: its modules, its notebook's folder
        path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        env = dict(os.environ, PYTHONPATH=path)
        env.pop("NBQ_KEY", None)
        cmd = [sys.executable, "-m", "nbq", "worker", "--broker", self.address,
               "--concurrency", str(self.workers), "--lifeline", str(r), "--key-file", "-"]
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=(r,), env=env, stdin=subprocess.PIPE)
        finally:
            os.close(r)
        self._lifeline = w
        try:
            self._proc.stdin.write(key)
            self._proc.stdin.close()
        except BrokenPipeError:  # the worker died at once: it says why on stderr
            pass

    def close(self) -> None:
        """Stop local workers (closing their lifeline) and the embedded broker."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._proc is not None:
            try:
                self._proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.broker is not None:
            self.broker.stop()
            self._thread.join(5.0)
            self.broker = None
        if self.context is not None:
            self.context.term()
            self.context = None
