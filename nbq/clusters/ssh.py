"""SSHCluster: workers on lab machines, each unit an ``nbq worker`` in one SSH session.

The system ``ssh`` client starts them, so hosts are named as the user's ``ssh``
names them: ~/.ssh/config (Host aliases, HostName, Port, User, IdentityFile,
ProxyJump) and the agent work with no setup here.  ``BatchMode`` is on: a host
that would ask for a password fails at once, naming itself, instead of waiting
on a prompt nobody sees.  Workers dial out to the cluster's broker, so lab
machines need no open port.  The signing key is the first line written on the
session's standard input, which then stays open as the worker's lifeline: when
the cluster closes, its process dies (SIGKILL too) or the connection drops, the
input closes and the worker stops, with its processes.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections import Counter
from typing import Sequence

from .base import STOP_WAIT, Cluster

SSH_OPTIONS = ("-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


class _Session:
    """One unit: the ``ssh`` process, its host and the file its output goes to."""

    def __init__(self, host: str, proc: subprocess.Popen, log: str) -> None:
        self.host, self.proc, self.log = host, proc, log


class SSHCluster(Cluster):
    """Worker processes on hosts reached with ``ssh``, serving this cluster's broker.

    ``hosts``: names as ``ssh`` takes them (aliases of ~/.ssh/config, user@host);
    ``workers_per_host`` processes start on each; ``python``: the interpreter on the
    hosts, with the same nbq and Python versions as here; ``ssh_config``: an ssh
    config file to use instead of ~/.ssh/config; ``ssh_options``: more ``ssh``
    arguments.  ``broker`` and ``listen`` as for nbq.Cluster: for hosts other than
    this machine, ``listen`` on an address they reach (``tcp://10.0.0.5:0``), or give
    a ``broker`` they reach.  Waits up to ``timeout`` seconds for the workers to
    join; a host that fails is named in a LaunchWarning while the others serve
    (LaunchError when none does).
    """

    def __init__(self, hosts: Sequence[str], workers_per_host: int = 4, *,
                 python: str = "python3", broker: str | None = None,
                 listen: str = "tcp://127.0.0.1:0", ssh_config: str | os.PathLike | None = None,
                 ssh_options: Sequence[str] = (), key_file: str | None = None,
                 result_expires: float | None = None, timeout: float = 30.0) -> None:
        if isinstance(hosts, str) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise ValueError(f"hosts must be a list of host names as ssh takes them, not {hosts!r}")
        if (not isinstance(workers_per_host, int) or isinstance(workers_per_host, bool)
                or workers_per_host < 1):
            raise ValueError(f"workers_per_host must be a positive number of processes, "
                             f"not {workers_per_host!r}")
        if shutil.which("ssh") is None:
            raise FileNotFoundError("SSHCluster starts workers with the `ssh` command, which is "
                                    "not on PATH: install OpenSSH's client")
        self.hosts = list(hosts)
        self.unit_size = workers_per_host
        self.python = python
        self._ssh = ["ssh", *SSH_OPTIONS, *(["-F", os.fspath(ssh_config)] if ssh_config else []),
                     *ssh_options]
        super().__init__(broker, listen=listen, key_file=key_file, result_expires=result_expires)
        self._dir = tempfile.mkdtemp(prefix="nbq-ssh-")  # mode 0700: the units' logs
        try:
            self._scale(len(self.hosts) * workers_per_host)
            self.wait_for_workers(timeout=timeout)
        except BaseException:
            self.close()
            raise

    def _place(self) -> str:
        """The host with the fewest processes, among those where no unit has failed."""
        load = Counter({h: 0 for h in self.hosts})
        load.update({u.host: u.processes for u in self._units.values()})
        failed = {u.host for u in self._failed.values()}
        usable = [h for h in self.hosts if h not in failed] or self.hosts
        return min(usable, key=lambda h: load[h])

    def _start(self, name: str, n: int) -> _Session:
        host = name.split("@", 1)[1]
        remote = "exec " + shlex.join(self.worker_command(name, n, self.python))
        log = os.path.join(self._dir, name.replace("/", "_") + ".log")
        with open(log, "wb") as out:
            proc = subprocess.Popen([*self._ssh, "--", host, remote], stdin=subprocess.PIPE,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # a Ctrl-C here is the cluster's
        try:
            proc.stdin.write(self.handshake())
            proc.stdin.flush()
        except BrokenPipeError:  # ssh failed at once: its output says why
            pass
        return _Session(host, proc, log)

    def _stop(self, s: _Session) -> None:
        """Close the session's input (the worker's lifeline); kill ssh if it lingers."""
        try:
            s.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            s.proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            s.proc.kill()  # the connection drops: the remote side closes the worker's input
            s.proc.wait()

    def _ended(self, s: _Session) -> str | None:
        code = s.proc.poll()
        if code is None:
            return None
        lines = [ln for ln in self._log(s).splitlines()
                 if ln.strip() and not ln.startswith("Warning: Permanently added")]
        return (f"ssh {s.host} exited with code {code}"
                + (f": {lines[-1].strip()}" if lines else ""))

    def _log(self, s: _Session) -> str:
        try:
            with open(s.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop every worker (closing their sessions), the broker, and remove the logs."""
        try:
            super().close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
