"""Whether a process runs, by its pid (for pid files and for what dead processes left behind)."""
from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether pid runs: a process of another user counts, a zombie nobody reaped yet does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][:1] != "Z"
    except OSError:
        return True
