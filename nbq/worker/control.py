"""A supervisor's answers to control commands (``nbq inspect``, ``nbq control``, ``app.control``).

Each command is a function of the supervisor and the command's arguments
(a JSON object) returning the JSON reply, as Celery's workers reply: a
dict, or a list for the inspect commands that list tasks.
"""
from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

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
                     "processes": sorted(sup.pool.children)},
            "queues": list(sup.queues)}


def registered(sup: "Supervisor", args: dict) -> list[str]:
    """Names of the tasks this worker knows by name (its ``-A`` app's, imported before fork)."""
    return sorted(sup.registered()) if sup.registered is not None else []


def active(sup: "Supervisor", args: dict) -> list[dict]:
    """The task each worker process is running now, read from its shared marker."""
    out = []
    for pid, (_, marker) in sorted(sup.pool.children.items()):
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
    sig = signal_named(args.get("signal") or "SIGTERM")
    done = [tid for tid in ids if sup.terminate(tid, sig)]
    return {"ok": f"terminated {', '.join(done)}" if done else "none of these tasks runs here",
            "terminated": done}


def signal_named(name: str) -> signal.Signals:
    """The signal of a name such as SIGKILL, KILL or kill."""
    name = name.upper()
    try:
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}: name one such as SIGTERM or SIGKILL") from None


def shutdown(sup: "Supervisor", args: dict) -> dict:
    """Stop this worker warm, as SIGTERM does: running tasks finish, held ones are re-queued."""
    sup.stop()
    return {"ok": "shutting down"}


def pool_grow(sup: "Supervisor", args: dict) -> dict:
    sup.grow(int(args.get("n", 1)))
    return {"ok": "pool will grow"}


def pool_shrink(sup: "Supervisor", args: dict) -> dict:
    sup.shrink(int(args.get("n", 1)))
    return {"ok": "pool will shrink"}


def add_consumer(sup: "Supervisor", args: dict) -> dict:
    """Consume one more queue (the broker, or each Redis process within a second, learns it)."""
    queue = args["queue"]
    if queue in sup.queues:
        return {"ok": f"already consuming from {queue!r}"}
    sup.queues.append(queue)
    return {"ok": f"add consumer {queue}"}


def cancel_consumer(sup: "Supervisor", args: dict) -> dict:
    queue = args["queue"]
    if queue not in sup.queues:
        return {"error": f"not consuming from {queue!r}: this worker consumes "
                         f"{', '.join(sup.queues)}"}
    if len(sup.queues) == 1:
        return {"error": f"{queue!r} is this worker's only queue: use shutdown to stop it"}
    sup.queues.remove(queue)
    return {"ok": f"no longer consuming from {queue}"}


def scheduled(sup: "Supervisor", args: dict) -> list[dict]:
    """Tasks each process holds until their ETA (countdowns, retries), read from its marker."""
    out = []
    for pid, (_, marker) in sorted(sup.pool.children.items()):
        for tid, name, eta in marker.scheduled():
            out.append({"eta": datetime.fromtimestamp(eta, timezone.utc).isoformat(),
                        "request": {"id": tid, "name": name, "worker_pid": pid,
                                    "hostname": sup.name}})
    return out


def reserved(sup: "Supervisor", args: dict) -> list[dict]:
    """Always empty: a process holds only the batch it runs (dispatch is by credit)."""
    return []


COMMANDS: dict[str, Callable[["Supervisor", dict], Any]] = {
    "ping": ping, "stats": stats, "registered": registered, "active": active,
    "reserved": reserved, "scheduled": scheduled, "rate_limit": rate_limit,
    "revoke": revoke, "shutdown": shutdown, "pool_grow": pool_grow, "pool_shrink": pool_shrink,
    "add_consumer": add_consumer, "cancel_consumer": cancel_consumer,
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
