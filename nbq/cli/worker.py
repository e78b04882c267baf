"""``nbq worker`` (a supervisor and its worker processes, here) and ``nbq multi`` (named worker
daemons)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import NbqError, VersionMismatch
from .beat import add_beat_options, start_beat
from .options import (BROKER_HELP, add_key_file, add_max_message_age, app_broker, cwd_on_path,
                      given, load_app)


def add_worker_parser(sub) -> None:
    """Add ``worker`` to ``sub`` (argparse subparsers)."""
    w = sub.add_parser("worker", help="run worker processes for a broker",
                       description="Run worker processes for a broker.  The current directory is "
                       "put first on sys.path (as `python -m` and `celery worker` do), so tasks "
                       "can use modules in the folder the worker is started in.")
    w.add_argument("--broker", default=None, help=BROKER_HELP)
    w.add_argument("-c", "--concurrency", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: number of CPUs)")
    w.add_argument("-Q", "--queues", default=None, help="comma-separated queues to consume "
                   "(default: the app's task_default_queue, else \"default\")")
    w.add_argument("-A", "--app", default=None, help="module (or module:attribute) of an nbq.App "
                   "whose tasks this worker registers by name")
    w.add_argument("-B", "--beat", action="store_true", help="also run beat (as `nbq beat`) on a "
                   "thread of this worker's supervisor; needs -A")
    w.add_argument("-n", "--hostname", default=None, help="this worker's name in control "
                   "replies (default nbq@%%h); %%h is the host name, %%n its first label, %%d the rest")
    w.add_argument("--init", default=None, metavar="MODULE:FUNC", help="call FUNC() once in "
                   "each worker process before its first task, and in each process started to "
                   "replace one (as a concurrent.futures initializer): to load a model or data")
    w.add_argument("--max-tasks-per-child", type=int, default=0, metavar="N",
                   help="replace a worker process after it ran N tasks")
    w.add_argument("--max-memory-per-child", default=None, metavar="SIZE", help="replace a "
                   "worker process after a task that took it above SIZE of resident memory "
                   "(200MB, 1GiB, or KiB as Celery's); a task that takes it past twice SIZE "
                   "is stopped and fails with WorkerLost")
    w.add_argument("--autoscale", default=None, metavar="MAX,MIN", help="between MIN and MAX "
                   "worker processes: grown with the queued tasks, idle ones stopped after "
                   "$NBQ_AUTOSCALE_KEEPALIVE seconds (default 30); replaces -c")
    w.add_argument("--detach", action="store_true", help="run in the background as a daemon "
                   "(with --pidfile and --logfile); SIGTERM stops it warm, a second cold")
    w.add_argument("--pidfile", default=None, help="with --detach: file holding its pid while "
                   "it runs")
    w.add_argument("--logfile", default=None, help="with --detach: file its output goes to "
                   "(default: none)")
    w.add_argument("--broker-grace", type=float, default=None, metavar="SECONDS",
                   help="how long a broker that stopped answering is waited for (it may be "
                        "restarted at the same address) before this worker exits (default 300)")
    w.add_argument("--lifeline", type=int, default=None, help=argparse.SUPPRESS)
    w.add_argument("--versions", default=None, help=argparse.SUPPRESS)  # a cluster's: NBQ/PYTHON
    # a cluster's: the key on stdin's first line (keys.handshake), stdin then the lifeline
    w.add_argument("--handshake", action="store_true", help=argparse.SUPPRESS)
    w.add_argument("--init-fd", type=int, default=None, help=argparse.SUPPRESS)  # a Client's
    add_beat_options(w)
    add_max_message_age(w)
    add_key_file(w)
    w.set_defaults(run=_worker)


def add_multi_parser(sub) -> None:
    """Add ``multi`` to ``sub``; the options it does not know are passed to ``nbq worker``."""
    m = sub.add_parser("multi", help="start, stop, restart, kill or show named worker daemons (as celery multi)",
                       description="Any option not listed here is passed to `nbq worker`.")
    m.add_argument("action", choices=["start", "stop", "stopwait", "restart", "kill", "show"])
    m.add_argument("names", nargs="+", help="node names, or a number N for nbq1..nbqN")
    m.add_argument("--pidfile", default="%n.pid", help="pid file per node (default %%n.pid)")
    m.add_argument("--logfile", default="%n%I.log", help="log file per node (default %%n%%I.log)")
    m.set_defaults(run=_multi)


def _worker(args) -> None:
    from .. import keys, transport
    from ..tasks import runner
    from ..worker import daemon, initializer
    from ..worker.supervisor import Supervisor
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if args.beat and not args.app:
        raise ValueError("-B needs -A: the app whose beat_schedule beat sends")
    if args.init and args.init_fd is not None:
        raise ValueError("give --init or an initializer on a pipe, not both")
    if args.max_tasks_per_child < 0:
        raise ValueError("--max-tasks-per-child must be at least 1 (0: no limit)")
    max_memory = daemon.parse_size(args.max_memory_per_child) if args.max_memory_per_child else 0
    autoscale = daemon.parse_autoscale(args.autoscale) if args.autoscale else None
    if (args.pidfile or args.logfile) and not args.detach:
        raise ValueError("--pidfile and --logfile go with --detach")
    if args.versions:
        _check_versions(args.versions)
    if args.handshake:
        args.lifeline = sys.stdin.fileno()
    key = keys.load_key()
    if args.detach:
        daemon.detach(args.pidfile, args.logfile)
    # no task finds the key in its environment; the clients that tasks make (a chain's next
    # step, a chord's body) find it with keys.load_key(), as this process's own (main)
    os.environ.pop("NBQ_KEY", None)
    cwd_on_path()
    init = (initializer.decode(key, _read_all(args.init_fd)) if args.init_fd is not None
            else initializer.from_spec(args.init) if args.init else None)
    app = load_app(args.app) if args.app else None
    address = app_broker(args.broker, app)
    queues = args.queues or (app.conf.task_default_queue if app else "default")
    os.environ["NBQ_BROKER"] = address  # the broker of those clients
    sup = Supervisor(transport.supervisor_connector(address, key),
                     transport.worker_connector(address, key),
                     autoscale[1] if autoscale else args.concurrency,
                     [q for q in queues.split(",") if q], args.lifeline,
                     **given(name=args.hostname or None, max_age=args.max_message_age,
                             broker_grace=args.broker_grace),
                     initializer=init,
                     max_tasks=args.max_tasks_per_child, max_memory=max_memory,
                     autoscale=autoscale, registered=runner.registry.keys)
    beat = start_beat(app, address, args.schedule) if args.beat else None
    try:
        why = sup.run()
    finally:
        if beat is not None:
            beat.stop()
    if why == "the broker never answered":
        raise NbqError(f"{why} at {address}: is `nbq broker` running there with the same key?")
    if why == "the broker is shutting down":  # not asked to stop: say so, exit non-zero
        raise NbqError(f"the broker at {address} shut down; this worker stops with it")
    if why.startswith("the broker did not answer"):
        raise NbqError(f"{why} at {address}: this worker stops (--broker-grace)")
    logging.getLogger("nbq.worker").info("stopping: %s", why)


def _check_versions(theirs: str) -> None:
    """Refuse to serve a cluster whose nbq or Python version differs from this worker's."""
    from ..clusters.base import versions
    mine = versions()
    if theirs != mine:
        (nbq_c, py_c), (nbq_w, py_w) = theirs.split("/", 1), mine.split("/", 1)
        raise VersionMismatch(f"this worker has nbq {nbq_w} on Python {py_w}, its client nbq "
                              f"{nbq_c} on Python {py_c}: install the same versions on both sides")


def _read_all(fd: int) -> bytes:
    with open(fd, "rb") as f:
        return f.read()


def _multi(args) -> None:
    from .. import multi
    failed = 0
    if args.action == "show":
        multi.show(args.names, args.worker_args, args.pidfile, args.logfile)
    if args.action == "kill":
        failed += multi.kill(args.names, args.pidfile)
    if args.action in ("stop", "stopwait", "restart"):
        failed += multi.stop(args.names, args.pidfile, wait=args.action != "stop")
    if args.action in ("start", "restart"):
        failed += multi.start(args.names, args.worker_args, args.pidfile, args.logfile)
    if failed:
        sys.exit(1)
