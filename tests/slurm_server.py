"""A private Slurm for the tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in one directory (slurm.conf, munge key and socket, state, spool, logs);
slurmctld and slurmd listen on free loopback ports, and one node, ``localhost``, offers
CPUS CPUs in partition ``debug``.  Commands find it through ``SLURM_CONF`` (``env()``, or
os.environ while the server runs).  Each daemon runs in the foreground as a child of the
test process and is stopped by its handle.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ports import free_port

CPUS = 4  # more than this machine has (config_overrides): room for several small jobs
PARTITION = "debug"



class SlurmServer:
    """munged + slurmctld + slurmd in ``directory`` (munged's socket in a directory of its own);
    the node is idle when __init__ returns."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.procs: list[subprocess.Popen] = []
        self._saved_conf = os.environ.get("SLURM_CONF")
        # munged refuses a socket in a directory others cannot traverse, up to the root (the
        # tests' temp dirs are 0700): its socket gets a 0755 directory of its own in /tmp
        self.sock_dir = Path(tempfile.mkdtemp(prefix="nbq-munge-"))
        self.sock_dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict:
        """os.environ with SLURM_CONF naming this server's slurm.conf."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _start(self) -> None:
        munge = self.dir / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        sock = self.sock_dir / "munge.sock"
        self._daemon("munged", ["munged", "-F", f"--key-file={key}", f"--socket={sock}",
                                f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                                f"--seed-file={munge / 'munged.seed'}"])
        self._wait(sock.exists, "munged's socket", munge / "munged.log")
        self._write_conf(sock)
        os.environ["SLURM_CONF"] = str(self.conf)
        self._daemon("slurmctld", ["slurmctld", "-D", "-i"])
        self._daemon("slurmd", ["slurmd", "-D", "-N", "localhost"])
        self._wait(self._node_idle, "the node to be idle in sinfo", self.dir / "slurmctld.log")

    def _write_conf(self, munge_socket: Path) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        (d / "plugstack.conf").write_text("")
        self.conf.write_text("\n".join([
            "ClusterName=nbqtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d / 'jobcomp.txt'}",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=300",
            f"PlugStackConfig={d / 'plugstack.conf'}",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=4000 State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "ab")
        with log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=self.env()))

    def _wait(self, ready, what: str, log: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"no answer after {timeout:g} s"
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"waiting for {what}: {why}; {log}:\n{text[-3000:]}")
            time.sleep(0.1)

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return out.strip() == "idle"

    def run(self, *cmd: str, check: bool = True) -> str:
        """A Slurm command's standard output (sinfo, squeue, scontrol, ...)."""
        p = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
        return p.stdout

    def jobs(self) -> list[str]:
        """Ids of the jobs squeue lists (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def stop(self) -> None:
        """Cancel the jobs left (their slurmstepd would outlive slurmd), then slurmd,
        slurmctld and munged: TERM each, KILL what does not exit."""
        if len(self.procs) == 3 and all(p.poll() is None for p in self.procs):
            try:
                if self.jobs():
                    self.run("scancel", "--partition", PARTITION)
                    deadline = time.monotonic() + 20
                    while self.jobs() and time.monotonic() < deadline:
                        time.sleep(0.2)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the daemons are stopped all the same
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if self._saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_conf
