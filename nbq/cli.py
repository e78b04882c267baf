"""The ``nbq`` command: broker, worker, beat, status, demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import NbqError

DEFAULT_BIND = "tcp://127.0.0.1:5555"
BROKER_HELP = f"broker address (default: the -A app's broker_url, else $NBQ_BROKER or {DEFAULT_BIND})"


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
    b.set_defaults(run=_broker)

    w = sub.add_parser("worker", help="run worker processes for a broker")
    w.add_argument("--broker", default=None, help=BROKER_HELP)
    w.add_argument("-c", "--concurrency", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: number of CPUs)")
    w.add_argument("-Q", "--queues", default=None, help="comma-separated queues to consume "
                   "(default: the app's task_default_queue, else \"default\")")
    w.add_argument("-A", "--app", default=None, help="module (or module:attribute) of an nbq.App "
                   "whose tasks this worker registers by name")
    w.add_argument("-B", "--beat", action="store_true", help="also run beat (as `nbq beat`) on a "
                   "thread of this worker's supervisor; needs -A")
    w.add_argument("--lifeline", type=int, default=None, help=argparse.SUPPRESS)
    w.set_defaults(run=_worker)

    bt = sub.add_parser("beat", help="send an app's beat_schedule entries when they are due")
    bt.add_argument("-A", "--app", required=True, help="the app: module or module:attribute, "
                    "as Celery's -A")
    bt.add_argument("--broker", default=None, help=BROKER_HELP)
    bt.set_defaults(run=_beat)

    s = sub.add_parser("status", help="show workers and queues of a broker")
    s.add_argument("--broker", default=None, help="broker address (default: $NBQ_BROKER)")
    s.set_defaults(run=_status)

    m = sub.add_parser("multi", help="start, stop or restart named worker daemons (as celery multi)",
                       description="Any option not listed here is passed to `nbq worker`.")
    m.add_argument("action", choices=["start", "stop", "stopwait", "restart"])
    m.add_argument("names", nargs="+", help="node names, or a number N for nbq1..nbqN")
    m.add_argument("--pidfile", default="%n.pid", help="pid file per node (default %%n.pid)")
    m.add_argument("--logfile", default="%n%I.log", help="log file per node (default %%n%%I.log)")
    m.set_defaults(run=_multi)

    d = sub.add_parser("demo", help="run a map on an embedded cluster: progress, DataFrame, speed")
    d.add_argument("--items", type=int, default=300_000, help="items to map (default 300,000)")
    d.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs)")
    d.set_defaults(run=_demo)

    for parser in (w, bt):
        parser.add_argument("-s", "--schedule", default=None, help="beat's file of when each entry "
                            "was last sent, when the broker is not Redis (default: nbq-beat-schedule, "
                            "here)")
        parser.add_argument("-l", "--loglevel", dest="log_level", default=argparse.SUPPRESS,
                            help="as --log-level (info logs each beat send)")
    for parser in (b, w, bt, s):
        parser.add_argument("--key-file", default=None, help="signing key file (default: $NBQ_KEY, "
                            "$NBQ_KEY_FILE or ~/.config/nbq/key)")
    return p


def _address(given: str | None) -> str:
    return given or os.environ.get("NBQ_BROKER") or DEFAULT_BIND


def _app_broker(given: str | None, app) -> str:
    """The broker of a command that may have an app (-A): --broker, else the app's broker_url,
    else $NBQ_BROKER or the default."""
    return given or (app and app.conf.broker_url) or _address(None)


def _broker(args) -> None:
    import signal

    from . import keys
    from .broker import Broker
    broker = Broker(keys.load_key(args.key_file), args.bind or [DEFAULT_BIND],
                    result_expires=args.result_expires)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    print(f"nbq broker listening on {', '.join(broker.addresses)}", flush=True)
    broker.run()


def _worker(args) -> None:
    from . import keys, transport
    from .worker.supervisor import Supervisor
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if args.beat and not args.app:
        raise ValueError("-B needs -A: the app whose beat_schedule beat sends")
    key = keys.load_key(args.key_file)
    app = _load_app(args.app) if args.app else None
    address = _app_broker(args.broker, app)
    queues = args.queues or (app.conf.task_default_queue if app else "default")
    # tasks that send tasks (a chain's next step, a chord's body) use a client of this broker
    os.environ.update(NBQ_BROKER=address, NBQ_KEY=key.decode())
    sup = Supervisor(transport.supervisor_connector(address, key),
                     transport.worker_connector(address, key), args.concurrency,
                     [q for q in queues.split(",") if q], args.lifeline)
    beat = _start_beat(app, address, args.schedule) if args.beat else None
    try:
        why = sup.run()
    finally:
        if beat is not None:
            beat.stop()
    if why in ("the broker never answered", "the broker stopped answering"):
        raise NbqError(f"{why} at {address}: is `nbq broker` running there with the same key?")
    if why == "the broker is shutting down":  # not asked to stop: say so, exit non-zero
        raise NbqError(f"the broker at {address} shut down; this worker stops with it")
    logging.getLogger("nbq.worker").info("stopping: %s", why)


def _load_app(spec: str):
    """The app of ``-A spec``, imported from the current directory as Celery does."""
    from .tasks import load_app, runner
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    app = load_app(spec)
    runner.accept = set(app.conf.accept_content)
    return app


def _beat(args) -> None:
    from . import keys
    os.environ["NBQ_KEY"] = keys.load_key(args.key_file).decode()  # the app's client signs with it
    app = _load_app(args.app)
    _make_beat(app, _app_broker(args.broker, app), args.schedule).run()
    # a signal may end it at any time: every claim is already stored


def _make_beat(app, address: str, schedule: str | None):
    """The beat of `nbq beat` and `nbq worker -B`: the app's entries, sent to `address`."""
    from .tasks.beat import Beat
    app.conf.broker_url = address
    beat = Beat(app, schedule)
    print(f"nbq beat: {len(beat.entries)} entries of {app.main}, marks in {beat.marks.where}",
          flush=True)
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
    with Client(address, key_file=args.key_file, timeout=5.0) as client:
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
    if args.action in ("stop", "stopwait", "restart"):
        failed += multi.stop(args.names, args.pidfile, wait=args.action != "stop")
    if args.action in ("start", "restart"):
        failed += multi.start(args.names, args.worker_args, args.pidfile, args.logfile)
    if failed:
        sys.exit(1)


def _demo(args) -> None:
    from .demo import run
    run(args.items, args.workers)
