"""What makes ``nbq worker`` a daemon: --detach with a pid file and a log file, and the
sizes and pool bounds of its options (--max-memory-per-child, --autoscale)."""
from __future__ import annotations

import atexit
import os
import re
import sys

_UNITS = {"": 1024, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """Bytes of a size such as 200MB, 1GiB or 1.5G; a bare number is KiB, as Celery's
    --max-memory-per-child."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--max-memory-per-child {text!r}: give a size such as 200MB, 1GiB, "
                         "or a number of KiB (as Celery's)")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_autoscale(text: str) -> tuple[int, int]:
    """(max, min) processes of --autoscale MAX,MIN (MIN defaults to 1, as ``--autoscale 8``)."""
    try:
        high, _, low = text.partition(",")
        bounds = int(high), int(low or 1)
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[1] <= bounds[0]:
        raise ValueError(f"--autoscale {text!r}: give MAX,MIN processes with 1 <= MIN <= MAX, "
                         "such as 8,2")
    return bounds


def running_pid(pidfile: str) -> int | None:
    """The pid in pidfile when that process is alive (a stale file says nothing)."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def detach(pidfile: str | None, logfile: str | None) -> None:
    """Become a daemon: fork twice around setsid (no controlling terminal, not a session
    leader), standard input from /dev/null, output to logfile (else /dev/null); the pid
    file is written atomically (a temporary file renamed) and removed at exit.

    Called before any thread or socket exists; the caller's process exits at once.
    """
    if pidfile:
        pidfile = os.path.abspath(pidfile)
        pid = running_pid(pidfile)
        if pid is not None:
            raise ValueError(f"--pidfile {pidfile}: worker {pid} is running with it; stop it "
                             f"first (kill -TERM {pid}) or give another pid file")
    log = os.open(os.path.abspath(logfile) if logfile else os.devnull,
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # its errors come here, at once
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    if pidfile:
        tmp = f"{pidfile}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, pidfile)
        atexit.register(_remove_pidfile, pidfile, os.getpid())


def _remove_pidfile(pidfile: str, pid: int) -> None:
    """Remove the pid file if it is still this process's (not a forked child's or a successor's)."""
    if os.getpid() != pid:
        return
    try:
        with open(pidfile) as f:
            if f.read().strip() == str(pid):
                os.unlink(pidfile)
    except OSError:
        pass
