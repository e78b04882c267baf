"""Limits the supervisor enforces by killing a worker process: a task's hard time limit, and
twice --max-memory-per-child.

The process is killed (SIGKILL) and replaced, and its task fails with WorkerLost saying
why (the pool's ``end``, deaths.py).  A process merely past --max-memory-per-child
retires itself after its task instead (process.serve).
"""
from __future__ import annotations

import signal

from . import process
from .pool import Pool, megabytes

MEMORY_EVERY = 0.1  # seconds between looks at the processes' memory (--max-memory-per-child)


def next_deadline(pool: Pool) -> float:
    """The nearest hard time limit of a running task (epoch seconds; inf when none)."""
    return min((d for d, _ in (m.deadline() for _, m in pool.children.values()) if d),
               default=float("inf"))


def enforce_deadlines(pool: Pool, now: float) -> None:
    """Kill each process whose task passed its hard time limit; the pool's reap replaces it."""
    for pid, (wid, marker) in pool.children.items():
        running = marker.current()  # read before the deadline: see deaths.py's end
        deadline, limit = marker.deadline()
        if not deadline or deadline > now or pid in pool.ending:
            continue
        tid, name = running[:2] if running else (None, "?")
        pool.end(pid, {"id": tid, "how": "time_limit", "text": (
            f"task {name} ({tid}) ran past its time limit of {limit:g} s: its worker "
            f"process {pid} was killed and replaced")})


def check_memory(pool: Pool, max_memory: int) -> None:
    """--max-memory-per-child: kill a process whose resident memory passed twice the
    limit while it runs a task (that task fails with WorkerLost saying so, deaths.py);
    one merely past the limit retires itself after its task (process.serve)."""
    for pid, (_, marker) in pool.children.items():
        rss = pool.memory[pid] = process.resident(pid)
        running = marker.current()
        if rss <= 2 * max_memory or running is None or pid in pool.ending:
            continue
        tid, name = running[:2]
        pool.end(pid, {"id": tid, "how": "memory", "text": (
            f"task {name} ({tid}) was stopped: its worker process {pid} used {megabytes(rss)} "
            f"of memory, past twice --max-memory-per-child ({megabytes(max_memory)}); "
            "the process was killed and replaced")}, signal.SIGKILL)
