"""What happens to a task whose worker process died: shared by the ZeroMQ broker and the Redis transport.

Pure functions over a task's header item; the caller stores and sends.
The first death re-runs the task item by item.  When a re-run dies, the item
it was running (the supervisor read it from the process's marker) fails with
WorkerLost and the others run again.  A task that keeps dying with no item to
blame fails after MAX_DEATHS.

A process its supervisor killed on purpose (a hard time limit, a revoke with
terminate) is reported with ``end`` = {"id": task id, "how": "time_limit" or
"revoked", "text": why}: that task is not re-run; its undelivered positions
fail with TimeLimitExceeded, or are revoked.
"""
from __future__ import annotations

from . import protocol
from .errors import TimeLimitExceeded, WorkerLost

MAX_DEATHS = 3  # deaths of a task's process with no item to blame before it fails


def after_death(item: dict, undelivered: list[int], at,
                end: dict | None = None) -> tuple[list[int], dict | None]:
    """(positions to end with ``ending``, the item to re-run or None) for a task whose process died.

    undelivered: positions of the task with no result yet; at: the (task id,
    position) the dead process was running, if known; end: why its supervisor
    killed it, if it did.
    """
    if end is not None and end.get("id") == item["id"]:
        return list(undelivered), None
    exclude = set(item.get("ex", ()))
    todo = [p for p in undelivered if p not in exclude]
    killer = None
    if item.get("a", 0) >= 1:
        if at and at[0] == item["id"] and at[1] in todo:
            killer = at[1]
        elif len(todo) == 1:
            killer = todo[0]
    item = dict(item)
    fail: list[int] = []
    if killer is not None:
        fail.append(killer)
        exclude.add(killer)
        todo.remove(killer)
    else:
        item["a"] = item.get("a", 0) + 1
        if item["a"] > MAX_DEATHS:
            return todo, None
    if not todo:
        return fail, None
    item.update(skip=todo[0], ex=sorted(exclude), st=1)
    return fail, item


def ending(item: dict, pos: int, why: str, end: dict | None) -> tuple[dict, list]:
    """The result part of a position after_death ended: revoked, TimeLimitExceeded, or WorkerLost."""
    if end is not None and end.get("id") == item["id"]:
        if end["how"] == "revoked":
            return {"id": item["id"], "rv": 1, "s": pos, "n": 1, "nf": 0}, []
        return failure(item, pos, 1, TimeLimitExceeded(end["text"]))
    return failure(item, pos, 1, _lost_error(item, pos, why))


def _lost_error(item: dict, pos: int, why: str) -> WorkerLost:
    """The error an item that killed its process (again) fails with."""
    return WorkerLost(f"{why} while running task {item['id']}"
                      + (f" (item {item.get('s0', 0) + pos})" if item.get("n", 1) > 1 else "")
                      + "; it was re-run and its process died again")


def failure(item: dict, start: int, n: int, exc: BaseException) -> tuple[dict, list]:
    """A result part (header item, payload) failing items start..start+n of a task with exc."""
    record = protocol.error_record(exc)
    if item.get("m", "call") == "call":
        payload = protocol.dumps(record)
    else:
        payload = protocol.dumps(([None] * n, dict.fromkeys(range(n), record)))
    return {"id": item["id"], "s": start, "n": n, "ok": 0, "nf": len(payload)}, payload
