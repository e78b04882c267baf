"""``nbq multi``: named ``nbq worker`` daemons with pid and log files, as ``celery multi``.

``%n`` in --pidfile/--logfile is the node name, ``%h`` name@host, ``%I`` empty
(nbq writes one log per node, not one per process).  A node runs as a new
session, detached from the terminal; its pid file is how stop, kill and show find it.
stop sends SIGTERM (a warm shutdown: running tasks finish), kill SIGKILL.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .utils.processes import alive

STOP_WAIT = 30.0


def node_names(names: list[str]) -> list[str]:
    """Names as given; a lone number N means nbq1 .. nbqN, as in celery multi."""
    if len(names) == 1 and names[0].isdigit():
        return [f"nbq{i}" for i in range(1, int(names[0]) + 1)]
    return names


def _expand(template: str, name: str) -> Path:
    host = socket.gethostname()
    return Path(template.replace("%n", name).replace("%h", f"{name}@{host}").replace("%I", ""))


def _running(pidfile: Path) -> int | None:
    """The pid in pidfile if that process is alive; a stale file is removed."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if alive(pid):
        return pid
    pidfile.unlink(missing_ok=True)
    return None


def start(names: list[str], worker_args: list[str], pidfile: str, logfile: str) -> int:
    """Start each node not running yet; returns how many failed to start."""
    print("> Starting nodes...")
    failed = 0
    for name in node_names(names):
        pid_path, log_path = _expand(pidfile, name), _expand(logfile, name)
        label = f"{name}@{socket.gethostname()}"
        if _running(pid_path) is not None:
            print(f"    > {label}: already running")
            continue
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command(name, worker_args), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{proc.pid}\n")
        try:  # a worker that cannot start (bad options, no broker) exits at once
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            print(f"    > {label}: OK")
        else:
            pid_path.unlink(missing_ok=True)
            failed += 1
            print(f"    > {label}: FAILED (exit code {proc.returncode}; see {log_path})")
    return failed


def command(name: str, worker_args: list[str]) -> list[str]:
    """The command that runs node name: ``nbq worker`` named name@%h, unless -n is given."""
    named = any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in worker_args)
    node = [] if named else ["-n", f"{name}@%h"]  # each node answers control as itself
    return [sys.executable, "-m", "nbq", "worker", *node, *worker_args]


def show(names: list[str], worker_args: list[str], pidfile: str, logfile: str) -> int:
    """Print each node's command, pid file, log file and pid (or "not running"); returns 0."""
    for name in node_names(names):
        pid_path, log_path = _expand(pidfile, name), _expand(logfile, name)
        pid = _running(pid_path)
        print(f"{name}@{socket.gethostname()}: {shlex.join(command(name, worker_args))}")
        print(f"    pidfile {pid_path}, logfile {log_path}, "
              + (f"running as pid {pid}" if pid is not None else "not running"))
    return 0


def kill(names: list[str], pidfile: str) -> int:
    """SIGKILL each running node (its worker processes die with it; the broker re-runs their
    tasks) and remove its pid file; returns how many were still alive after 5 s."""
    print("> Killing nodes...")
    return sum(not _gone(label, pid, pid_path, 5.0, quiet=True)
               for label, pid, pid_path in _signal(names, pidfile, signal.SIGKILL, "KILL"))


def stop(names: list[str], pidfile: str, wait: bool) -> int:
    """SIGTERM each running node; with wait, until it has exited. Returns how many would not stop."""
    print("> Stopping nodes...")
    stopping = _signal(names, pidfile, signal.SIGTERM, "TERM")
    if not wait:
        return 0
    return sum(not _gone(label, pid, pid_path, STOP_WAIT) for label, pid, pid_path in stopping)


def _signal(names: list[str], pidfile: str, signum: int, verb: str) -> list[tuple[str, int, Path]]:
    """Send signum to each running node; (label, pid, pid file) of each one signalled."""
    sent = []
    for name in node_names(names):
        pid_path = _expand(pidfile, name)
        pid = _running(pid_path)
        label = f"{name}@{socket.gethostname()}"
        if pid is None:
            print(f"    > {label}: not running")
            continue
        os.kill(pid, signum)
        print(f"    > {label}: {verb} -> {pid}")
        sent.append((label, pid, pid_path))
    return sent


def _gone(label: str, pid: int, pid_path: Path, timeout: float, quiet: bool = False) -> bool:
    """Wait up to timeout seconds for pid to exit; then remove its pid file.  False if it lives."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if alive(pid):
        if not quiet:
            print(f"    > {label}: still running after {timeout:g} s")
        return False
    pid_path.unlink(missing_ok=True)
    if not quiet:
        print(f"    > {label}: stopped")
    return True
