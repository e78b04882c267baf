"""What happens to a task whose worker process died: shared by the ZeroMQ broker and the Redis transport.

Pure functions over a task's header item; the caller stores and sends.

Only a death of the process while it was running the task, its worker alive,
counts against the task.  The supervisor that reaps a dead process reports
what it was running (``at`` = [task id, item position or None], read from the
process's marker).  A task the process only held (the rest of its batch, one
waiting for its eta, one whose result was not sent yet), every task of a process
stopped on purpose (pool_shrink), and every task of a worker that vanished whole
(supervisor or host gone: nobody reports, ``at`` is None) runs again as it was:
bad luck says nothing about a task.

A death that counts is noted in the task's header: ``dp`` {position: deaths}
when the item is known (a task of one item, or a chunk re-run item by item),
else ``a`` (a chunk's first run: its items are not marked, to keep that path
cheap), which counts against every item of the chunk.  Either way the task runs
again item by item (``st``), skipping the items that failed (``ex``).  An item
whose deaths (a + its own) reach the task's limit fails with WorkerLost, and
the rest run; when ``a`` reaches it, every undelivered item fails.

The limit is the header's ``md`` (``Client(max_task_deaths=...)``; absent:
MAX_DEATHS, as Dask's ``allowed-failures``).  It travels with the task, signed,
so the rule holds wherever it is applied (the ZeroMQ broker; on Redis, the
supervisor or worker that claims the dead process's entries) with no setting there.

A process its supervisor killed on purpose (a hard time limit, a revoke with
terminate, memory past twice ``--max-memory-per-child``) is reported with ``end`` =
{"id": task id, "how": "time_limit", "revoked" or "memory", "text": why}: that task is
not re-run (it would do the same again); its undelivered positions fail with
TimeLimitExceeded, are revoked, or fail with WorkerLost saying why.

A process that left on purpose (retired by a warm shutdown, a shrinking pool,
``--max-tasks-per-child``) is reported running nothing, so what it held runs again
as it was.
"""
from __future__ import annotations

from . import protocol
from .errors import TimeLimitExceeded, WorkerLost

ID_MAX = 200  # bytes of a task id a process's marker keeps (worker/marker.py)


def clip_id(task_id: str) -> str:
    """A task id as a process's marker gives it back: its first ID_MAX bytes."""
    return task_id.encode()[:ID_MAX].decode(errors="replace")


MAX_DEATHS = 3  # deaths of a task's own process before it fails with WorkerLost (default)


def limit(item: dict) -> int:
    """How many deaths of its own process fail a task with WorkerLost (header ``md``)."""
    md = item.get("md", MAX_DEATHS)
    return md if type(md) is int and md >= 1 else MAX_DEATHS


def after_death(item: dict, undelivered: list[int], at,
                end: dict | None = None) -> tuple[list[int], dict | None]:
    """(positions to end with ``ending``, the item to run again or None) for a task whose process died.

    undelivered: positions of the task with no result yet; at: [task id, item
    position or None] the dead process was running, if known; end: why its
    supervisor killed it, if it did.  The item to run again is ``item`` itself
    when nothing about it changed (the death does not count against it), so the
    caller may queue the message it came in again, as it came.
    """
    if end is not None and end.get("id") == item["id"]:
        return list(undelivered), None
    exclude = set(item.get("ex", ()))
    todo = [p for p in undelivered if p not in exclude]
    if not todo:
        return [], None
    counts, pos = _blamed(item, todo, at)
    if not counts:  # not its fault: it runs again as it was (from its first undelivered item)
        return [], item if todo[0] == item.get("skip", 0) else dict(item, skip=todo[0])
    item = dict(item, st=1)
    fail: list[int] = []
    if pos is None:
        item["a"] = item.get("a", 0) + 1
        if item["a"] >= limit(item):
            return todo, None
    else:
        dp = item["dp"] = dict(item.get("dp", {}))
        dp[str(pos)] = dp.get(str(pos), 0) + 1
        if item.get("a", 0) + dp[str(pos)] >= limit(item):
            fail.append(pos)
            exclude.add(pos)
            todo.remove(pos)
            if not todo:
                return fail, None
    item.update(skip=todo[0], ex=sorted(exclude))
    return fail, item


def _blamed(item: dict, todo: list[int], at) -> tuple[bool, int | None]:
    """(whether the death counts against this task, the position it counts against: None
    when the item is not known)."""
    if not at or at[0] not in (item["id"], clip_id(item["id"])):
        return False, None
    pos = at[1] if len(at) > 1 else None
    if pos is None:
        return True, todo[0] if len(todo) == 1 else None
    # a position already delivered (or failed): it died between items, none to blame
    return pos in todo, pos


def ending(item: dict, pos: int, why: str, end: dict | None) -> tuple[dict, list]:
    """The result part of a position after_death ended: revoked, TimeLimitExceeded, or WorkerLost.

    item is the task's header as it was before after_death counted this death.
    """
    if end is not None and end.get("id") == item["id"]:
        if end["how"] == "revoked":
            return {"id": item["id"], "rv": 1, "s": pos, "n": 1, "nf": 0}, []
        exc = WorkerLost if end["how"] == "memory" else TimeLimitExceeded
        return failure(item, pos, 1, exc(end["text"]))
    return failure(item, pos, 1, _lost_error(item, pos, why))


def _lost_error(item: dict, pos: int, why: str) -> WorkerLost:
    """The error of an item whose runs killed their process max_task_deaths times."""
    deaths = item.get("a", 0) + item.get("dp", {}).get(str(pos), 0) + 1
    what = f"task {item['id']}" + (f" (item {item.get('s0', 0) + pos})" if item.get("n", 1) > 1 else "")
    return WorkerLost(f"{what}: its worker process died {deaths} time{'s' * (deaths > 1)} while "
                      f"running it (max_task_deaths={limit(item)}); the last time, {why}")


def failure(item: dict, start: int, n: int, exc: BaseException) -> tuple[dict, list]:
    """A result part (header item, payload) failing items start..start+n of a task with exc."""
    record = protocol.error_record(exc)
    if item.get("m", "call") == "call":
        payload = protocol.dumps(record)
    else:
        payload = protocol.dumps(([None] * n, dict.fromkeys(range(n), record)))
    return {"id": item["id"], "s": start, "n": n, "ok": 0, "nf": len(payload)}, payload
