"""A supervisor's answers to control commands (``nbq inspect``, ``nbq control``, ``app.control``).

Each command is a function of the supervisor and the command's arguments
(a JSON object) returning the JSON reply, as Celery's workers reply: a
dict, or a list for the inspect commands that list tasks.
"""
from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable

from ..tasks import runner

if TYPE_CHECKING:
    from .supervisor import Supervisor


def ping(sup: "Supervisor", args: dict) -> dict:
    return {"ok": "pong"}


def stats(sup: "Supervisor", args: dict) -> dict:
    """The supervisor and its pool, as Celery's ``inspect stats`` (the parts nbq has)."""
    return {"pid": sup.pid, "hostname": sup.name, "id": sup.sid,
            "uptime": round(time.time() - sup.started, 3),
            "pool": {"implementation": "nbq.worker.supervisor (fork)",
                     "max-concurrency": sup.concurrency,
                     "processes": sorted(sup.children)},
            "queues": list(sup.queues)}


def registered(sup: "Supervisor", args: dict) -> list[str]:
    """Names of the tasks this worker's ``-A`` app registered (imported before fork)."""
    return sorted(runner.registry)


def active(sup: "Supervisor", args: dict) -> list[dict]:
    """The task each worker process is running now, read from its shared marker."""
    out = []
    for pid, (_, marker) in sorted(sup.children.items()):
        now = marker.current()
        if now is not None:
            tid, name, start = now
            out.append({"id": tid, "name": name, "time_start": start, "worker_pid": pid,
                        "hostname": sup.name, "acknowledged": True})
    return out


def rate_limit(sup: "Supervisor", args: dict) -> dict:
    """Change a task's rate limit on this worker's processes from now on (Celery's reply)."""
    sup.rates.set(args["task_name"], args.get("rate_limit"))
    return {"ok": "new rate limit set successfully"}


def revoke(sup: "Supervisor", args: dict) -> dict:
    """With terminate: signal (default SIGTERM, as Celery) the process running the task.

    A task not started yet is revoked by the broker (AsyncResult.revoke), not here.
    """
    ids = args["task_id"] if isinstance(args["task_id"], list) else [args["task_id"]]
    if not args.get("terminate"):
        return {"ok": "nothing to terminate: queued tasks are revoked at the broker"}
    sig = signal.Signals[_signal_name(args.get("signal") or "SIGTERM")]
    done = [tid for tid in ids if sup.terminate(tid, sig)]
    return {"ok": f"terminated {', '.join(done)}" if done else "none of these tasks runs here",
            "terminated": done}


def _signal_name(name: str) -> str:
    name = name.upper()
    return name if name.startswith("SIG") else "SIG" + name


def nothing_held(sup: "Supervisor", args: dict) -> list[dict]:
    """``reserved`` and ``scheduled``: a process holds only the batch it runs (dispatch is by
    credit), and a task due later (countdown, retry) waits inside its process, unseen here."""
    return []


COMMANDS: dict[str, Callable[["Supervisor", dict], Any]] = {
    "ping": ping, "stats": stats, "registered": registered, "active": active,
    "reserved": nothing_held, "scheduled": nothing_held, "rate_limit": rate_limit,
    "revoke": revoke,
}


def handle(sup: "Supervisor", command: str, args: dict) -> Any:
    """The reply to one command; an unknown one or a failure is an ``{"error": ...}`` reply."""
    fn = COMMANDS.get(command)
    if fn is None:
        return {"error": f"unknown control command {command!r}: this worker (nbq, pid "
                         f"{os.getpid()}) knows {', '.join(sorted(COMMANDS))}"}
    try:
        return fn(sup, args)
    except Exception as e:  # a bad argument must not stop the supervisor; the caller learns why
        return {"error": f"{command} failed: {type(e).__name__}: {e}"}
