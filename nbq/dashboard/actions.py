"""Control from the page: each action a Client operation the CLI's ``nbq control`` also uses.

An action is a dict from the page: ``{"action": NAME, ...arguments}``; ``run`` returns a
JSON-able answer or raises ActionError (a 400 with its message).
"""
from __future__ import annotations

from typing import Any, Callable

from ..client import Client
from ..errors import NbqError
from ..tasks.asyncresult import AsyncResult
from ..worker.context import interval

CONTROL_TIMEOUT = 2.0


class ActionError(NbqError):
    """A control request from the page that cannot be done as asked."""


def _workers(args: dict) -> list[str] | None:
    """The destination: the worker named in the request, or every worker."""
    w = args.get("worker")
    return [w] if w else None


def _count(args: dict) -> int:
    try:
        n = int(args.get("n", 1))
    except (TypeError, ValueError):
        raise ActionError(f"n must be a whole number, not {args.get('n')!r}") from None
    if n < 1:
        raise ActionError("n must be at least 1")
    return n


def _revoke(client: Client, args: dict) -> dict:
    tid = args.get("task_id")
    if not tid:
        raise ActionError("revoke needs the task's id (task_id)")
    terminate = bool(args.get("terminate"))
    done = AsyncResult(tid, client=client).revoke(terminate=terminate,
                                                  signal=args.get("signal") or "SIGTERM")
    return {"task_id": tid, "revoked": done}


def _rate_limit(client: Client, args: dict) -> dict:
    name, rate = args.get("task_name"), args.get("rate_limit") or None
    if not name:
        raise ActionError("rate_limit needs a task name (task_name)")
    try:
        interval(rate)
    except ValueError as e:
        raise ActionError(str(e)) from None
    return client.control("rate_limit", {"task_name": name, "rate_limit": rate},
                          _workers(args), CONTROL_TIMEOUT)


def _pool(command: str) -> Callable[[Client, dict], Any]:
    def run(client: Client, args: dict) -> dict:
        return client.control(command, {"n": _count(args)}, _workers(args), CONTROL_TIMEOUT)
    return run


def _shutdown(client: Client, args: dict) -> dict:
    if not args.get("worker"):
        raise ActionError("shutdown needs the worker's name (worker): the page stops one "
                          "worker at a time")
    return client.control("shutdown", None, _workers(args), CONTROL_TIMEOUT)


ACTIONS: dict[str, Callable[[Client, dict], Any]] = {
    "revoke": _revoke, "rate_limit": _rate_limit, "pool_grow": _pool("pool_grow"),
    "pool_shrink": _pool("pool_shrink"), "shutdown": _shutdown}


def run(client: Client, request: dict) -> Any:
    """Do the action the page asked for (blocking: call it off the server's event loop)."""
    action = ACTIONS.get(request.get("action", ""))
    if action is None:
        raise ActionError(f"unknown action {request.get('action')!r}: one of "
                          f"{', '.join(sorted(ACTIONS))}")
    return action(client, request)
