"""Workers as Slurm batch jobs: one ``nbq worker`` of ``cores`` processes per job.

Each unit of the cluster is a job submitted with ``sbatch``: its script holds the
``#SBATCH`` lines (cores, memory, walltime, partition, account, extra lines) and runs
``python -m nbq worker`` for the cluster's broker.  The signing key travels in a file
of mode 0600 in the cluster's private directory (mode 0700, under the home directory,
which compute nodes share with the login node): the job opens it, deletes it, and hands
it to the worker on its standard input, so no key is in a script, on a command line or
in an environment.  The job's output goes to a log file in the same directory.

Nothing is left behind: close() cancels the jobs (``scancel``); a worker whose broker
stops answering (the client died, even by SIGKILL, taking its embedded broker) exits
within seconds, ending its job; with a broker that outlives the client (Redis, ``nbq
broker``) the cluster renews a lease file in its directory, and a job whose lease stops
changing stops its worker (LEASE_TIMEOUT); a job ended by its walltime or by preemption takes its worker with it, and the
broker re-queues what it was running (the death rules of deaths.py: a lost worker's
tasks run again elsewhere, without counting as deaths of those tasks).
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import LaunchError
from .base import STOP_WAIT, Cluster

log = logging.getLogger("nbq.cluster")

#: job states before a job's end is final (squeue's %T; COMPLETING: its processes are being
#: killed, and the state it ends in, TIMEOUT or CANCELLED or ..., comes next); any other
#: state, or a job squeue no longer knows, means the job has ended
LIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                         "RESIZING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING",
                         "STAGE_OUT"})
STATE_POLL = 1.0  # seconds a squeue answer stands for every job of the cluster
#: with a broker that outlives the notebook (Redis, `nbq broker`), the cluster renews a lease
#: file every LEASE_INTERVAL seconds, and a job whose lease has not changed for
#: LEASE_TIMEOUT seconds stops its worker (generous: a shared filesystem may lag)
LEASE_INTERVAL = 1.0
LEASE_TIMEOUT = 30.0

_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNIT_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}


def memory_mb(memory: str | int) -> int:
    """Megabytes of a memory size as Slurm reads it: ``"16GB"``, ``"16G"``, ``"500M"``,
    ``"1.5GiB"`` (K, M, G, T are powers of 1024; a trailing B or iB is allowed); an int is
    megabytes, Slurm's default unit."""
    if isinstance(memory, bool) or not isinstance(memory, (int, str)):
        raise TypeError(f"memory must be a size such as '16GB' or megabytes as an int, "
                        f"not {type(memory).__name__}")
    if isinstance(memory, int):
        mb = memory
    else:
        m = _MEMORY.match(memory)
        if not m:
            raise ValueError(f"memory {memory!r} is not a size: write it as '16GB', '16G' or "
                             f"'500MB' (K, M, G, T; 1G = 1024M, as Slurm reads them)")
        mb = int(float(m.group(1)) * _UNIT_MB[m.group(2).upper()])
    if mb < 1:
        raise ValueError(f"memory {memory!r} is less than a megabyte: give at least '1M'")
    return mb


def job_script(*, name: str, command: list[str], key_file: Path, log_file: Path, cores: int,
               memory: str | int | None = None, walltime: str | None = None,
               partition: str | None = None, account: str | None = None,
               job_extra: Iterable[str] = (), prologue: Iterable[str] = (),
               lease: Path | None = None) -> str:
    """The batch script of one job: ``#SBATCH`` lines, then ``command`` with the key from
    key_file (removed as the job starts) on its standard input.

    ``job_extra``: more sbatch options, one per line (``"--qos=high"``); ``prologue``:
    shell lines run before the worker starts (``"module load python"``); ``lease``: a file
    the cluster rewrites every LEASE_INTERVAL seconds while it is open: when it has not
    changed for LEASE_TIMEOUT seconds, the job stops its worker (SIGTERM, a second one 5 s
    later: cold).
    """
    options = [f"--job-name={name}", f"--output={log_file}", "--nodes=1", "--ntasks=1",
               f"--cpus-per-task={cores}",
               "--no-requeue"]  # the key is read once: a rerun would have none
    if memory is not None:
        options.append(f"--mem={memory_mb(memory)}M")
    if walltime is not None:
        if not isinstance(walltime, str) or not _WALLTIME.match(walltime):
            raise ValueError(f"walltime {walltime!r} is not a Slurm time: write it as "
                             f"'HH:MM:SS', 'MM' or 'D-HH:MM:SS'")
        options.append(f"--time={walltime}")
    if partition is not None:
        options.append(f"--partition={partition}")
    if account is not None:
        options.append(f"--account={account}")
    if isinstance(job_extra, str) or isinstance(prologue, str):
        raise TypeError("job_extra and prologue are lists of lines, not one string")
    options += list(job_extra)
    for line in [*options, *prologue]:
        if "\n" in line or "\r" in line:  # a line break would smuggle a command into the script
            raise ValueError(f"a job option or prologue line holds a line break: {line!r}")
    key = shlex.quote(str(key_file))
    return "\n".join([
        "#!/bin/sh",
        *(f"#SBATCH {o}" for o in options),
        "# the signing key: opened, then removed, before anything else runs",
        f"exec 3<{key} && rm -f {key} || exit 1",
        *prologue,
        *(_watchdog(lease) if lease is not None else []),
        f"exec {shlex.join(command)} <&3 3<&-",
        "",
    ])


def _watchdog(lease: Path) -> list[str]:
    """Shell lines: a background loop that stops the worker ($$, after exec) once the lease
    stops changing.  It compares the file's content (read afresh at each open, even over
    NFS), never clocks, so the two machines' clocks need not agree."""
    every = max(1, round(LEASE_TIMEOUT / 3))
    checks = -(-LEASE_TIMEOUT // every)
    return ["# the notebook renews the lease while the cluster is open; when it stops, so does this",
            f"(last=; same=0; while sleep {every}; do now=$(cat {shlex.quote(str(lease))} "
            f'2>/dev/null); if [ "$now" = "$last" ]; then same=$((same+1)); else same=0; '
            f'last=$now; fi; if [ $same -ge {checks:.0f} ]; then echo "nbq: the cluster\'s lease '
            f'ended: stopping the worker" >&2; kill -TERM $$; sleep 5; kill -TERM $$; exit; fi; '
            f"done) 3<&- &"]


@dataclass
class Job:
    """A submitted job: its id, the unit name its worker uses, its log file."""
    id: str
    name: str
    log: Path


class SlurmCluster(Cluster):
    """Workers in Slurm jobs: ``jobs`` jobs of ``cores`` worker processes each.

    ``scale(n)`` submits jobs of ``cores`` processes (the last one smaller when n is not a
    multiple) or cancels jobs, idle ones first; ``close()`` cancels every job.  ``memory``,
    ``walltime``, ``partition``, ``account``: per job, as sbatch reads them; ``job_extra``: more sbatch options; ``prologue``: shell
    lines the job runs first; ``python``: the interpreter on the compute nodes (default
    this one); ``directory``: the cluster's private folder, which compute nodes must
    see (default a new one under ~/.cache/nbq/slurm, removed on close).  The embedded
    broker listens on ``listen``, which the compute nodes must reach.
    """

    def __init__(self, jobs: int = 0, cores: int = 1, memory: str | int | None = None,
                 walltime: str | None = None, partition: str | None = None,
                 account: str | None = None, job_extra: Iterable[str] = (),
                 prologue: Iterable[str] = (), python: str = sys.executable,
                 directory: str | os.PathLike | None = None, **cluster) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
            raise ValueError(f"jobs must be a number of jobs >= 0, not {jobs!r}")
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ValueError(f"cores must be a number of worker processes per job >= 1, "
                             f"not {cores!r}")
        self.options = dict(memory=memory, walltime=walltime, partition=partition,
                            account=account, job_extra=list(job_extra), prologue=list(prologue))
        # bad options fail here, not at the first submit
        job_script(name="check", command=[], key_file=Path("k"), log_file=Path("l"),
                   cores=cores, **self.options)
        if shutil.which("sbatch") is None:
            raise LaunchError("sbatch is not on PATH: SlurmCluster runs on a machine that "
                              "submits Slurm jobs (a login node)")
        self.unit_size = cores
        self.python = python
        self._states: dict[str, str] = {}
        self._states_at = -STATE_POLL
        self._states_lock = threading.Lock()
        self._own_dir = directory is None
        self.directory = None if directory is None else Path(directory)
        self._lease: _Lease | None = None
        super().__init__(**cluster)
        try:
            if self.directory is None:
                base = Path.home() / ".cache" / "nbq" / "slurm"
                base.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.directory = Path(tempfile.mkdtemp(prefix="cluster-", dir=base))  # 0700
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.broker is None:  # a broker of its own dies with this process: no lease
                self._lease = _Lease(self.directory / "lease")
            self.scale(jobs * cores)
        except BaseException:
            self.close()
            raise

    def _place(self) -> str:
        return "slurm"

    def _start(self, name: str, n: int) -> Job:
        stem = name.split("@", 1)[0]
        key_file = self.directory / f"{stem}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(self.key))
        log_file = self.directory / f"{stem}.log"
        script = job_script(name=stem, command=self.job_command(name, n), key_file=key_file,
                            log_file=log_file, cores=n, **self.options,
                            lease=self._lease and self._lease.path)
        env = dict(os.environ)
        env.pop("NBQ_KEY", None)  # sbatch exports its environment into the job
        p = _run(["sbatch", "--parsable"], input=script, env=env)
        if p.returncode:
            key_file.unlink(missing_ok=True)
            raise LaunchError(f"sbatch refused job {stem}: {p.stderr.strip() or p.stdout.strip()}")
        job_id = p.stdout.strip().split(";")[0]
        with self._states_lock:
            self._states[job_id] = "PENDING"
        return Job(job_id, name, log_file)

    def job_command(self, name: str, n: int) -> list[str]:
        """The worker a job runs: the key on its standard input, which the script opened on the
        key file before deleting it (no lifeline: the job ends when its broker stops answering,
        or by scancel)."""
        return self.worker_command(name, n, self.python, key_file="-")

    def _stop(self, job: Job) -> None:
        _run(["scancel", job.id])
        deadline = time.monotonic() + STOP_WAIT
        while self._state(job, fresh=True) in LIVE_STATES:
            if time.monotonic() > deadline:
                _run(["scancel", "--signal=KILL", job.id])
                break
            time.sleep(0.25)
        (self.directory / f"{job.name.split('@', 1)[0]}.key").unlink(missing_ok=True)

    def _ended(self, job: Job) -> str | None:
        state = self._state(job)
        if state in LIVE_STATES:
            return None
        tail = self._log(job).strip().splitlines()[-3:]
        return f"job {job.id} {state.lower()}" + (f": {' / '.join(tail)}" if tail else "")

    def _log(self, job: Job) -> str:
        try:
            return job.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _state(self, job: Job, fresh: bool = False) -> str:
        """The job's state in squeue (%T), "GONE" once squeue no longer lists it.  One squeue
        call answers for every job of the cluster for STATE_POLL seconds."""
        with self._states_lock:
            if fresh or time.monotonic() - self._states_at > STATE_POLL:
                ids = ",".join(self._states) or job.id
                p = _run(["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ids])
                if p.returncode and "Invalid job id" not in p.stderr:
                    # a busy or restarting slurmctld: the states known stand until it answers
                    log.warning("squeue failed (%s); asking again", p.stderr.strip())
                    return self._states.get(job.id, "PENDING")
                known = dict(line.split(None, 1) for line in p.stdout.splitlines() if line.strip())
                # a job squeue forgot stays forgotten: drop it from later calls
                self._states = {i: known[i] for i in self._states if i in known}
                self._states_at = time.monotonic()
            return self._states.get(job.id, "GONE")

    def close(self) -> None:
        """Cancel every job, stop the broker, and remove the private directory (if made here)."""
        try:
            super().close()
        finally:
            if self._lease is not None:
                self._lease.stop()
            if self._own_dir and self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)


class _Lease:
    """A thread writing a new number into a file every LEASE_INTERVAL seconds until stop()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stopped = threading.Event()
        self._renew(0)
        self._thread = threading.Thread(target=self._run, name="nbq-slurm-lease", daemon=True)
        self._thread.start()

    def _renew(self, n: int) -> None:
        with open(self.path, "w") as f:
            f.write(f"{n}\n")

    def _run(self) -> None:
        n = 0
        while not self._stopped.wait(LEASE_INTERVAL):
            n += 1
            try:
                self._renew(n)
            except OSError as e:  # a full or unmounted filesystem: jobs stop; say why here
                log.warning("could not renew the Slurm jobs' lease %s: %s", self.path, e)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5.0)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    except FileNotFoundError:
        raise LaunchError(f"{cmd[0]} is not on PATH: is Slurm's client installed here?") from None
