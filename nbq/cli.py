"""The ``nbq`` command: broker, worker, beat, status, inspect, control, multi, demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import NbqError, VersionMismatch
from .transport import across_processes

DEFAULT_BIND = "tcp://127.0.0.1:5555"
BROKER_HELP = f"broker address (default: the -A app's broker_url, else $NBQ_BROKER or {DEFAULT_BIND})"

#: ``nbq control`` commands sent to workers, and the names of their arguments in order.
CONTROL_ARGS = {"rate_limit": ("task_name", "rate_limit"), "shutdown": (), "pool_grow": ("n",),
                "pool_shrink": ("n",), "add_consumer": ("queue",), "cancel_consumer": ("queue",)}


def main(argv: list[str] | None = None) -> None:
    """Entry point; errors are one readable line and exit code 1, not a traceback."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "multi":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.worker_args = extra
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if hasattr(args, "key_file"):  # every client and broker this command makes uses it
            from . import keys
            keys.use(keys.read_handshake(sys.stdin.buffer) if getattr(args, "handshake", False)
                     else keys.load_key(args.key_file, "--key-file"))
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (NbqError, OSError, TimeoutError, ValueError) as e:
        print(f"nbq {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbq", description="Run Python work on many processes and machines.")
    p.add_argument("--log-level", default="warning", help="debug, info, warning (default), error")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run a ZeroMQ broker")
    b.add_argument("--bind", action="append", help=f"address to listen on (default {DEFAULT_BIND}); "
                   "repeat for several")
    b.add_argument("--result-expires", type=float, default=86400.0, help="seconds results are kept")
    b.add_argument("--result-budget", type=_size, default=None, help="bytes of results kept "
                   "after delivery for AsyncResult and MapResult.from_id, oldest dropped first "
                   "(default 256M; K, M, G suffixes)")
    b.add_argument("--max-message-size", type=_size, default=None, help="largest message "
                   "accepted, in bytes (default 512M; K, M, G suffixes)")
    b.add_argument("--heartbeat-timeout", type=float, default=None, metavar="SECONDS",
                   help="silence after which a worker counts as lost whole and its tasks run "
                   "elsewhere (default 4; longer for hosts that stall)")
    b.add_argument("--curve", action=argparse.BooleanOptionalAction, default=None,
                   help="encrypt and authenticate with CURVE, keys derived from the signing key "
                   "(default: on when binding a non-loopback address, or as $NBQ_CURVE says)")
    b.set_defaults(run=_broker)

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
    w.set_defaults(run=_worker)

    bt = sub.add_parser("beat", help="send an app's beat_schedule entries when they are due")
    bt.add_argument("-A", "--app", required=True, help="the app: module or module:attribute, "
                    "as Celery's -A")
    bt.add_argument("--broker", default=None, help=BROKER_HELP)
    bt.set_defaults(run=_beat)

    from .tasks.control import INSPECT_COMMANDS
    i = sub.add_parser("inspect", help="ask workers what they run and know (as `celery inspect`)")
    i.add_argument("what", choices=INSPECT_COMMANDS)
    i.set_defaults(run=_inspect)

    c = sub.add_parser("control", help="change what workers do (as `celery control`)")
    c.add_argument("what", choices=sorted([*CONTROL_ARGS, "revoke", "terminate"]),
                   help="; ".join(f"{k} {' '.join(v).upper()}".strip()
                                  for k, v in sorted(CONTROL_ARGS.items()))
                   + "; revoke TASK_ID...; terminate SIGNAL TASK_ID...")
    c.add_argument("arguments", nargs="*", help="the command's arguments")
    c.set_defaults(run=_control)

    s = sub.add_parser("status", help="show workers and queues of a broker")
    s.add_argument("--broker", default=None, help="broker address (default: $NBQ_BROKER)")
    s.set_defaults(run=_status)

    m = sub.add_parser("multi", help="start, stop, restart, kill or show named worker daemons (as celery multi)",
                       description="Any option not listed here is passed to `nbq worker`.")
    m.add_argument("action", choices=["start", "stop", "stopwait", "restart", "kill", "show"])
    m.add_argument("names", nargs="+", help="node names, or a number N for nbq1..nbqN")
    m.add_argument("--pidfile", default="%n.pid", help="pid file per node (default %%n.pid)")
    m.add_argument("--logfile", default="%n%I.log", help="log file per node (default %%n%%I.log)")
    m.set_defaults(run=_multi)

    la = sub.add_parser("launch", help="start workers on other machines and serve them until "
                        "stopped (nbq launch ssh HOST... -n N)")
    from .clusters.launch import add_launchers
    add_launchers(la.add_subparsers(dest="launcher", required=True))
    la.set_defaults(run=_launch)

    d = sub.add_parser("demo", help="run a map on an embedded cluster: progress, DataFrame, speed")
    d.add_argument("--items", type=int, default=300_000, help="items to map (default 300,000)")
    d.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs)")
    d.set_defaults(run=_demo)

    for parser in (w, bt):
        parser.add_argument("-s", "--schedule", default=None, help="beat's file of when each entry "
                            "was last sent, read when it restarts (beats share ticks through the broker, "
                            "not this file; default: nbq-beat-schedule, here)")
        parser.add_argument("-l", "--loglevel", dest="log_level", default=argparse.SUPPRESS,
                            help="as --log-level (info logs each beat send)")
    for parser in (i, c):
        parser.add_argument("--broker", default=None, help=BROKER_HELP)
        parser.add_argument("-A", "--app", default=None, help="module (or module:attribute) of an "
                            "nbq.App whose broker to use")
        parser.add_argument("-d", "--destination", default=None,
                            help="comma-separated worker names to ask (default: all)")
        parser.add_argument("-t", "--timeout", type=float, default=1.0,
                            help="seconds to wait for replies (default 1)")
        parser.add_argument("-j", "--json", action="store_true", help="print the replies as JSON")
    for parser in (b, w):
        parser.add_argument("--max-message-age", type=float, default=None, help="seconds after "
                            "which a message (on a worker: a control command) is refused as a "
                            "possible replay; also the clock difference tolerated between hosts "
                            "(default 300)")
    for parser in (b, w, bt, s, i, c, la):
        parser.add_argument("--key-file", default=None, help="signing key file, - for standard input "
                            "(default: $NBQ_KEY, $NBQ_KEY_FILE or ~/.config/nbq/key)")
    return p


def _size(text: str) -> int:
    """A byte count with an optional K, M or G suffix (powers of 1024)."""
    text = text.strip().upper().removesuffix("B")
    scale = 1 << (10 * "KMG".index(text[-1]) + 10) if text and text[-1] in "KMG" else 1
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number "
                                         "with K, M or G") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a size must be positive")
    return value


def _given(**options) -> dict:
    """The options given on the command line (the others keep their defaults)."""
    return {k: v for k, v in options.items() if v is not None}


def _address(given: str | None) -> str:
    """The broker of a command: given, else $NBQ_BROKER, else the default; never a memory://
    one (it lives inside another process)."""
    address = given or os.environ.get("NBQ_BROKER") or DEFAULT_BIND
    across_processes(address, "this command")
    return address


def _app_broker(given: str | None, app) -> str:
    """The broker of a command that may have an app (-A): --broker, else the app's broker_url,
    else $NBQ_BROKER or the default."""
    return _address(given or (app and app.conf.broker_url) or None)


def _broker(args) -> None:
    import signal

    from . import keys
    from .broker import Broker
    for bind in args.bind or ():
        across_processes(bind, "nbq broker")
    broker = Broker(keys.load_key(), args.bind or [DEFAULT_BIND],
                    result_expires=args.result_expires, curve=args.curve,
                    **_given(max_message_size=args.max_message_size,
                             result_budget=args.result_budget, max_age=args.max_message_age,
                             heartbeat_timeout=args.heartbeat_timeout))
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    print(f"nbq broker listening on {', '.join(broker.addresses)}"
          f"{' (CURVE: encrypted)' if broker.curve else ''}", flush=True)
    broker.run()


def _worker(args) -> None:
    from . import keys, transport
    from .tasks import runner
    from .worker import initializer
    from .worker.supervisor import Supervisor
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if args.beat and not args.app:
        raise ValueError("-B needs -A: the app whose beat_schedule beat sends")
    if args.init and args.init_fd is not None:
        raise ValueError("give --init or an initializer on a pipe, not both")
    from .worker import daemon
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
    _cwd_on_path()
    init = (initializer.decode(key, _read_all(args.init_fd)) if args.init_fd is not None
            else initializer.from_spec(args.init) if args.init else None)
    app = _load_app(args.app) if args.app else None
    address = _app_broker(args.broker, app)
    queues = args.queues or (app.conf.task_default_queue if app else "default")
    os.environ["NBQ_BROKER"] = address  # the broker of those clients
    sup = Supervisor(transport.supervisor_connector(address, key),
                     transport.worker_connector(address, key),
                     autoscale[1] if autoscale else args.concurrency,
                     [q for q in queues.split(",") if q], args.lifeline,
                     **_given(name=args.hostname or None, max_age=args.max_message_age,
                              broker_grace=args.broker_grace),
                     initializer=init,
                     max_tasks=args.max_tasks_per_child, max_memory=max_memory,
                     autoscale=autoscale, registered=runner.registry.keys)
    beat = _start_beat(app, address, args.schedule) if args.beat else None
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
    from .clusters.base import versions
    mine = versions()
    if theirs != mine:
        (nbq_c, py_c), (nbq_w, py_w) = theirs.split("/", 1), mine.split("/", 1)
        raise VersionMismatch(f"this worker has nbq {nbq_w} on Python {py_w}, its client nbq "
                              f"{nbq_c} on Python {py_c}: install the same versions on both sides")


def _load_app(spec: str):
    """The app of ``-A spec``, imported from the current directory as Celery does."""
    from .tasks import load_app
    _cwd_on_path()
    return load_app(spec)


def _read_all(fd: int) -> bytes:
    with open(fd, "rb") as f:
        return f.read()


def _cwd_on_path() -> None:
    """Modules in the current directory import, as they do for ``python -m`` and Celery."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _beat(args) -> None:
    app = _load_app(args.app)  # its client signs with this command's key (main)
    _make_beat(app, _app_broker(args.broker, app), args.schedule).run()
    # a signal may end it at any time: every claim is already stored


def _make_beat(app, address: str, schedule: str | None):
    """The beat of `nbq beat` and `nbq worker -B`: the app's entries, sent to `address`."""
    from .tasks.beat import Beat
    app.conf.broker_url = address
    beat = Beat(app, schedule)
    print(f"nbq beat: {len(beat.entries)} entries of {app.main}, marks in {beat.marks.where}, "
          "each tick claimed on the broker", flush=True)
    return beat


def _start_beat(app, address: str, schedule: str | None):
    """`nbq worker -B`: beat on a daemon thread of the supervisor, started before it forks.

    The app's client is made here, on the main thread, so no fork happens while the beat
    thread holds the app's lock making it; a forked worker process never uses that client
    (current_client and App.client check the process id) but makes its own.
    """
    import threading
    beat = _make_beat(app, address, schedule)
    app.client  # noqa: B018 (connects now, before any worker process is forked)

    def run() -> None:
        try:
            beat.run()
        except Exception:
            logging.getLogger("nbq.beat").exception("beat stopped: no more periodic tasks are sent")

    threading.Thread(target=run, name="nbq-beat", daemon=True).start()
    return beat


def _status(args) -> None:
    from .client import Client
    address = _address(args.broker)
    with Client(address, timeout=5.0) as client:
        st = client.status()
    print(f"broker {address}: {st['tasks']} tasks in progress, {st['results']} results stored")
    print(f"{'worker':<40} {'host':<20} {'pid':>7} {'procs':>5} {'active':>6}  queues")
    for w in st["workers"]:
        print(f"{w['id']:<40} {w['host']:<20} {w['pid']:>7} {w['concurrency']:>5} "
              f"{w['active']:>6}  {','.join(w['queues'])}")
    if not st["workers"]:
        print("(no workers)")
    print("queue lengths: " + (", ".join(f"{q}={n}" for q, n in sorted(st["queues"].items()))
                               or "(no queues yet)"))


def _multi(args) -> None:
    from . import multi
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


def _control_address(args) -> str:
    """The broker of ``nbq inspect|control``: --broker, else the -A app's, else the default."""
    return _app_broker(args.broker, _load_app(args.app) if args.app else None)


def _ask_workers(args, command: str, arguments: dict) -> None:
    """Send a control command, print each worker's reply as Celery does; no reply is an error."""
    import json

    from .client import Client
    address = _control_address(args)
    dest = [d for d in args.destination.split(",") if d] if args.destination else None
    with Client(address, timeout=5.0) as client:
        replies = client.control(command, arguments, dest, args.timeout)
    if not replies:
        raise NbqError(f"no worker replied within {args.timeout:g} s at {address}"
                       + (f" (asked: {', '.join(dest)})" if dest else ""))
    if args.json:
        print(json.dumps(replies, indent=2, sort_keys=True))
        return
    for name, reply in sorted(replies.items()):
        failed = isinstance(reply, dict) and "error" in reply
        print(f"->  {name}: {'ERROR' if failed else 'OK'}")
        if failed:
            text = reply["error"]
        elif isinstance(reply, dict) and set(reply) == {"ok"}:
            text = reply["ok"]
        elif isinstance(reply, list) and not reply:
            text = "- empty -"
        else:
            text = json.dumps(reply, indent=4, sort_keys=True)
        print("\n".join("        " + line for line in str(text).splitlines()))


def _revoke(args) -> None:
    """Revoke tasks by id (queued ones at the broker); terminate also kills running ones."""
    from .tasks.asyncresult import AsyncResult
    from .client import Client
    terminate = args.what == "terminate"
    if len(args.arguments) < 1 + terminate:
        raise ValueError("nbq control " + ("terminate SIGNAL TASK_ID..." if terminate
                                           else "revoke TASK_ID...") + ": give the task ids")
    sig, ids = (args.arguments[0], args.arguments[1:]) if terminate else ("SIGTERM", args.arguments)
    if terminate:
        from .worker.control import signal_named
        signal_named(sig)  # a bad name is one error here
    address = _control_address(args)
    missed = []
    with Client(address, timeout=5.0) as client:
        for tid in ids:
            done = AsyncResult(tid, client=client).revoke(terminate=terminate, signal=sig)
            print(f"->  {tid}: {'revoked' if done else 'not revoked'}")
            if not done:
                missed.append(tid)
    if missed:
        raise NbqError(f"{len(missed)} task(s) not revoked: finished, unknown, or started"
                       + ("" if terminate else " (nbq control terminate SIGTERM ID stops a "
                          "running one)"))


def _inspect(args) -> None:
    _ask_workers(args, args.what, {})


def _control(args) -> None:
    if args.what in ("revoke", "terminate"):
        _revoke(args)
        return
    names = CONTROL_ARGS[args.what]
    if len(args.arguments) != len(names):
        raise ValueError(f"nbq control {args.what} takes {len(names)} argument(s): "
                         f"{' '.join(n.upper() for n in names)}")
    arguments = dict(zip(names, args.arguments))
    if args.what == "rate_limit":
        from .worker.context import interval
        interval(arguments["rate_limit"])  # a bad rate is one error here, not one per worker
    _ask_workers(args, args.what, arguments)


def _launch(args) -> None:
    from .clusters.launch import serve
    serve(args.make(args))


def _demo(args) -> None:
    from .demo import run
    run(args.items, args.workers)
