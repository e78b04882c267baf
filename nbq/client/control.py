"""Control commands to workers (Celery's broadcast with reply=True), and terminating the
process that runs a task."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable

from ..errors import NbqError

log = logging.getLogger("nbq.client")


class Controls:
    """One client's control commands; the workers' replies arrive on the receiver thread,
    which adds each to ``replies`` (control id -> Replies)."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.replies: dict[str, Replies] = {}

    def broadcast(self, request: Callable, command: str, arguments: dict | None,
                  destination: list[str] | None, timeout: float) -> dict[str, Any]:
        """Client.control, its request made with request (Client._request)."""
        ci = uuid.uuid4().hex
        replies = self.replies[ci] = Replies()
        try:
            dest = None if destination is None else list(destination)
            n = request(  # a command is never sent twice
                "control", lambda rq: self._conn.control(rq, command, arguments or {}, dest, ci),
                again=False)["n"]
            return replies.wait(n, timeout)
        finally:
            self.replies.pop(ci, None)


def terminate(control: Callable[..., dict], fut, sig: str, timeout: float = 5.0) -> bool:
    """Have the worker running fut's task kill its process with sig, through control
    (Client.control); True once one did.

    Asked again until timeout: a task just handed to a process may not show as running yet.
    """
    tid = fut.id
    deadline = time.monotonic() + timeout
    while True:
        if fut.done():
            return False
        replies = control("revoke", {"task_id": tid, "terminate": True, "signal": sig},
                          timeout=1.0)
        for name, reply in replies.items():
            if "error" in reply:
                raise NbqError(f"worker {name} could not terminate task {tid}: {reply['error']}")
        if any(tid in r.get("terminated", ()) for r in replies.values()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


class Replies:
    """Replies to one control command by worker name, awaited by the caller of Client.control."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._got: dict[str, Any] = {}
        self._count = 0

    def add(self, name: str, reply: Any) -> None:
        with self._cv:
            if name in self._got:
                log.warning("two workers are named %s: give each its own with `nbq worker -n`", name)
                name = f"{name} ({self._count})"
            self._got[name] = reply
            self._count += 1
            self._cv.notify_all()

    def wait(self, n: int, timeout: float) -> dict[str, Any]:
        """The replies once n have come, or those that came within timeout seconds."""
        with self._cv:
            self._cv.wait_for(lambda: self._count >= n, timeout)
            return dict(self._got)
