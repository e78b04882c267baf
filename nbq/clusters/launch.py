"""``nbq launch`` and ``%nbq launch``: one parser per launcher, making its cluster from options."""
from __future__ import annotations

import argparse
import sys


def add_launchers(sub) -> None:
    """Add a parser per launcher to ``sub`` (argparse subparsers); each sets ``make``."""
    s = sub.add_parser("ssh", help="workers on hosts reached with ssh (~/.ssh/config honoured)")
    s.add_argument("hosts", nargs="+", help="host names as ssh takes them")
    s.add_argument("-n", "--workers-per-host", type=int, default=4,
                   help="worker processes per host (default 4)")
    s.add_argument("--python", default="python3",
                   help="the Python on the hosts, with nbq installed (default python3)")
    s.add_argument("--ssh-config", default=None, help="ssh config file (default ~/.ssh/config)")
    _broker_options(s)
    s.set_defaults(make=_ssh)

    j = sub.add_parser("slurm", help="workers in Slurm batch jobs (sbatch; scancel when stopped)")
    j.add_argument("-j", "--jobs", type=int, default=1, help="jobs to submit (default 1)")
    j.add_argument("-c", "--cores", type=int, default=1,
                   help="CPUs per job, one worker process each (default 1)")
    j.add_argument("--memory", default=None, help="memory per job, as 16GB (default: Slurm's)")
    j.add_argument("--walltime", default=None, help="time limit per job, as 01:00:00")
    j.add_argument("--partition", default=None, help="the partition (default: Slurm's)")
    j.add_argument("--account", default=None, help="the account to charge")
    j.add_argument("--job-extra", action="append", default=[], metavar="OPTION",
                   help="one more sbatch option, as --job-extra=--qos=high; repeat for several")
    j.add_argument("--prologue", action="append", default=[], metavar="LINE",
                   help="a shell line the job runs first (module load ...); repeat for several")
    j.add_argument("--python", default=sys.executable,
                   help="the Python on the compute nodes, with nbq installed (default this one)")
    j.add_argument("--directory", default=None, help="the cluster's private folder, seen by the "
                   "compute nodes (default: a new one under ~/.cache/nbq/slurm)")
    _broker_options(j)
    j.set_defaults(make=_slurm)


def _broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=None, help="a running broker the workers and clients use "
                   "(default: one embedded here)")
    p.add_argument("--listen", default="tcp://127.0.0.1:0", help="where the embedded broker "
                   "listens: an address the workers reach (default tcp://127.0.0.1:0)")


def _ssh(args):
    from .ssh import SSHCluster
    return SSHCluster(args.hosts, args.workers_per_host, python=args.python, broker=args.broker,
                      listen=args.listen, ssh_config=args.ssh_config,
                      key_file=getattr(args, "key_file", None))


def _slurm(args):
    from .slurm import SlurmCluster
    return SlurmCluster(args.jobs, args.cores, memory=args.memory, walltime=args.walltime,
                        partition=args.partition, account=args.account, job_extra=args.job_extra,
                        prologue=args.prologue, python=args.python, directory=args.directory,
                        broker=args.broker, listen=args.listen,
                        key_file=getattr(args, "key_file", None))


def serve(cluster) -> None:
    """``nbq launch``: say where the broker is, then keep the cluster until SIGTERM or Ctrl-C."""
    import signal
    import threading
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with cluster:
        hosts = ", ".join(sorted({w["host"] for w in cluster.workers}))
        print(f"nbq launch: {cluster.processes} worker processes on {hosts} serving "
              f"{cluster.address}; connect with nbq.Client({cluster.address!r}); "
              "Ctrl-C or SIGTERM stops them", flush=True)
        try:
            while not done.wait(1.0):
                pass
        except KeyboardInterrupt:
            print("nbq launch: stopping", file=sys.stderr)
