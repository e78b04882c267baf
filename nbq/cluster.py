"""Starting what a Client needs on this machine: a private broker, local worker processes.

The embedded broker runs on a thread of the client's process (the client talks
to it in-process, workers over loopback TCP), so it lives and dies with the
client.  Local workers are an ``nbq worker`` subprocess holding the read end of
a lifeline pipe: when the client exits, even by SIGKILL, the pipe closes and
the worker and its processes exit.  The worker reads the client's key on its
standard input: a key is never on a command line nor in an environment.
"""
from __future__ import annotations

import contextlib
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
                 result_expires: float | None = None, initializer: bytes | None = None) -> None:
        """``initializer``: what worker.initializer.encode made, for the local workers."""
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
            self._start_workers(key, initializer)

    def _start_workers(self, key: bytes, initializer: bytes | None) -> None:
        r, w = os.pipe()
        # local workers import what the client can: its modules, its notebook's folder
        path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        env = dict(os.environ, PYTHONPATH=path)
        env.pop("NBQ_KEY", None)
        cmd = [sys.executable, "-m", "nbq", "worker", "--broker", self.address,
               "--concurrency", str(self.workers), "--lifeline", str(r), "--key-file", "-"]
        init_r, init_w = os.pipe() if initializer is not None else (None, None)
        if init_r is not None:
            cmd += ["--init-fd", str(init_r)]
        try:
            self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                          pass_fds=[fd for fd in (r, init_r) if fd is not None])
        finally:
            for fd in (r, init_r):
                if fd is not None:
                    os.close(fd)
        self._lifeline = w
        # in the order the worker reads them: the key, then the initializer
        _hand_over(self._proc.stdin, key)
        if init_w is not None:
            _hand_over(open(init_w, "wb"), initializer)

    def close(self) -> None:
        """Stop local workers (closing their lifeline) and the embedded broker.

        Each step runs even when one before it is interrupted (a Ctrl-C while the
        workers finish); a repeated call does what is left.
        """
        with contextlib.ExitStack() as steps:  # callbacks run last-registered first
            steps.callback(self._stop_broker)
            steps.callback(self._stop_workers)
            if self._lifeline is not None:
                lifeline, self._lifeline = self._lifeline, None
                os.close(lifeline)

    def _stop_workers(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        finally:  # also when interrupted: its worker processes die with it (PR_SET_PDEATHSIG)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self._thread.join(5.0)
            self.broker = None
        if self.context is not None:
            self.context.term()
            self.context = None


def _hand_over(pipe, data: bytes) -> None:
    """Write data to a pipe the worker reads as it starts, and close it."""
    try:
        with pipe:
            pipe.write(data)
    except BrokenPipeError:  # the worker died at once: it says why on stderr
        pass
