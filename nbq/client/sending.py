"""Sending tasks: a lone submit at once, submits in quick succession batched.

The ``Sender`` also keeps every task it sent until the client sees it finish, to send
it again to a broker that restarted or lost it (``resend``).
"""
from __future__ import annotations

import threading
import time

from .. import protocol
from ..deaths import MAX_DEATHS
from ..schema import PRIORITY_MAX

DIRECT_SEND = 64 * 1024  # tasks with payloads this large skip the outbox and go at once
BURST = 0.0002           # a submit sooner than this after the previous one joins a batch
RESEND_BATCH = 1 << 20   # bytes of tasks per message when re-sending


class Sender:
    """Sends one client's tasks over its connection.

    ``lock`` orders what goes out: tasks, batches and the functions they name
    (shipping.FunctionCache uses it too).  ``sent`` holds each task sent and not seen
    finish, by id: (item, payload).
    """

    def __init__(self, conn) -> None:
        self._conn = conn
        self.lock = threading.Lock()
        self.sent: dict[str, tuple[dict, list]] = {}
        self._outbox: list[tuple[dict, list]] = []  # tasks the receiver thread sends, batched
        self._last_send = 0.0

    def send(self, item: dict, payload: list) -> None:
        """Send a task, or queue it for the receiver thread to send with others as one message.

        A lone submit goes at once (lowest latency); submits in quick succession
        are queued and leave as a few large messages (highest throughput).
        Large payloads always go at once, alone, so they are never copied.
        An inline connection's submit runs the task: it goes at once, with no lock held
        (the task may send tasks through this client).
        """
        if self._conn.inline:
            with self.lock:
                self.sent[item["id"]] = (item, payload)
            self._conn.submit([item], payload)
            return
        now = time.perf_counter()
        with self.lock:
            self.sent[item["id"]] = (item, payload)
            burst = now - self._last_send < BURST
            self._last_send = now
            if not self._outbox and (not burst or protocol.frame_size(payload) >= DIRECT_SEND):
                self._conn.submit([item], payload)
                return
            first = not self._outbox
            self._outbox.append((item, payload))
        if first:
            self._conn.wake()

    def flush(self) -> None:
        """Send the queued tasks as one message (the receiver thread, and before a request)."""
        with self.lock:
            if not self._outbox:
                return
            out, self._outbox = self._outbox, []
            items, frames = [], []
            for item, payload in out:
                items.append(item)
                frames.extend(payload)
            # sent under the lock, so batches leave in the order they were queued
            self._conn.submit(items, frames)

    def resend(self, ids: list[str], functions) -> tuple[list[dict], list[str]]:
        """Send these tasks again to a restarted broker, each after its function
        (shipping.FunctionCache: it has none of them now).  Returns the items sent and the
        ids of those not sent: their function's pickle is no longer kept."""
        lost, tasks = [], []
        with self.lock:
            functions.forget_sent()
            for tid in ids:
                entry = self.sent.get(tid)
                if entry is None:
                    continue
                if not functions.send_again(entry[0]["h"]):
                    lost.append(tid)
                    continue
                tasks.append(entry)
            batch, frames, size = [], [], 0
            for item, payload in tasks:
                batch.append(item)
                frames.extend(payload)
                size += protocol.frame_size(payload)
                if size >= RESEND_BATCH:
                    self._conn.submit(batch, frames)
                    batch, frames, size = [], [], 0
            if batch:
                self._conn.submit(batch, frames)
        return [item for item, _ in tasks], lost


def client_task_header(max_task_deaths: int) -> dict:
    """Header fields of every task a Client sends (none for the defaults), its options checked."""
    if not isinstance(max_task_deaths, int) or isinstance(max_task_deaths, bool):
        raise TypeError(f"max_task_deaths must be an integer, not {max_task_deaths!r}")
    if max_task_deaths < 1:
        raise ValueError(f"max_task_deaths must be at least 1 (1: a task fails at the first "
                         f"death of its process), not {max_task_deaths}")
    return {} if max_task_deaths == MAX_DEATHS else {"md": max_task_deaths}


def check_queue(queue: object) -> None:
    """Raise unless queue is a queue's name: a task sent under None or 5 would wait where no
    worker looks (and a shutdown with it)."""
    if not isinstance(queue, str):
        raise TypeError(f"queue must be a queue's name (a str such as 'default'), not "
                        f"{type(queue).__name__}")
    if not queue:
        raise ValueError("queue must be a queue's name, not an empty string")


def task_options(eta: float | None, expires: float | None, priority: int | None,
                 max_task_deaths: int | None, argsrepr: str | None = None,
                 parent_id: str | None = None, root_id: str | None = None) -> dict:
    """The header fields of Client.apply's options (none for the defaults)."""
    if priority is not None and (type(priority) is not int or not 0 <= priority <= PRIORITY_MAX):
        raise ValueError(f"priority must be an integer from 0 to {PRIORITY_MAX}, not {priority!r}")
    if max_task_deaths is not None and (type(max_task_deaths) is not int or max_task_deaths < 1):
        raise ValueError(f"max_task_deaths must be an integer of at least 1, not "
                         f"{max_task_deaths!r}")
    header: dict = {}
    if eta is not None:
        header["eta"] = float(eta)
    if expires is not None:
        header["x"] = float(expires)
    if priority:
        header["pr"] = priority
    if max_task_deaths is not None:
        header["md"] = max_task_deaths
    if argsrepr is not None:
        header["ar"] = argsrepr[:200]
    if parent_id is not None:
        header["pa"] = parent_id
    if root_id is not None:
        header["ro"] = root_id
    return header
