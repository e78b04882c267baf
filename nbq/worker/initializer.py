"""A worker process's initializer: run once in each process before its first task.

It comes from ``nbq worker --init MODULE:FUNC`` (imported by the supervisor, called in
each process), or from a Client's ``initializer=f, initargs=(...)`` for the workers it
starts: (f, initargs) cloudpickled and signed with the shared key (``encode``), handed
to ``nbq worker`` on a pipe (``--init-fd``), verified there and unpickled in each
process, so a function defined in a notebook works.  A process whose initializer fails keeps
serving: every task it is given fails with the initializer's exception, labelled,
so nothing waits for a process that can never run it (as the stdlib executors
fail their futures when an initializer fails).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
from typing import Any, Callable

from .. import protocol
from ..errors import SignatureError
from .execute import unimportable

log = logging.getLogger("nbq.worker")


class Initializer:
    """A named call, run in each worker process before its first task."""

    def __init__(self, name: str, call: Callable[[], Any]) -> None:
        self.name = name
        self._call = call

    def run(self) -> BaseException | None:
        """Run it; returns its exception (labelled) when it fails, else None."""
        try:
            self._call()
        except BaseException as e:
            e = unimportable(e, f"the initializer {self.name}")
            e.add_note(f"raised by the initializer {self.name} in worker process {os.getpid()} on "
                       f"{socket.gethostname()}: every task given to that process fails with it")
            log.error("the initializer %s failed in worker process %d: each task it is given "
                      "fails with this error", self.name, os.getpid(), exc_info=e)
            return e
        return None


def from_spec(spec: str) -> Initializer:
    """``--init MODULE:FUNC``: FUNC of MODULE, imported now so a wrong name fails at start."""
    module, sep, attr = spec.partition(":")
    if not (sep and module and attr):
        raise ValueError(f"--init {spec!r}: give MODULE:FUNC, e.g. --init tasks:load_model")
    try:
        fn = functools.reduce(getattr, attr.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--init {spec}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"--init {spec}: {type(fn).__name__} is not callable")
    return Initializer(spec, fn)


def encode(key: bytes, fn: Callable, args: tuple) -> bytes:
    """(fn, args) pickled and signed, as bytes for ``decode`` in ``nbq worker``."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    payload = protocol.dumps_named((fn, tuple(args)), f"the initializer {name} or its initargs")
    frames = protocol.Signer(key).encode({"k": "init", "name": name}, payload)
    return b"".join(len(f).to_bytes(8, "little") + bytes(f) for f in frames)


def decode(key: bytes, data: bytes) -> Initializer:
    """The initializer ``encode`` made; SignatureError unless it was signed with key.

    It is unpickled in each process when it runs, so a module missing there fails its tasks.
    """
    frames, i = [], 0
    while i + 8 <= len(data):
        n = int.from_bytes(data[i:i + 8], "little")
        frames.append(data[i + 8:i + 8 + n])
        i += 8 + n
    header, payload = protocol.Signer(key).decode(frames)
    if header.get("k") != "init":
        raise SignatureError("the initializer handed to this worker is not an nbq initializer message")

    def call() -> None:
        fn, args = protocol.loads(payload)
        fn(*args)

    return Initializer(str(header.get("name")), call)
