"""``nbq status``, ``nbq inspect`` and ``nbq control``: look at a broker's workers, ask them what
they run and know, change what they do (as ``celery inspect`` and ``celery control``)."""
from __future__ import annotations

import argparse

from ..errors import NbqError
from .options import BROKER_HELP, add_key_file, address, app_broker, load_app

#: ``nbq control`` commands sent to workers, and the names of their arguments in order.
CONTROL_ARGS = {"rate_limit": ("task_name", "rate_limit"), "shutdown": (), "pool_grow": ("n",),
                "pool_shrink": ("n",), "add_consumer": ("queue",), "cancel_consumer": ("queue",)}


def add_inspect_parser(sub) -> None:
    """Add ``inspect`` to ``sub`` (argparse subparsers)."""
    from ..tasks.control import INSPECT_COMMANDS
    i = sub.add_parser("inspect", help="ask workers what they run and know (as `celery inspect`)")
    i.add_argument("what", choices=INSPECT_COMMANDS)
    _ask_options(i)
    i.set_defaults(run=_inspect)


def add_control_parser(sub) -> None:
    """Add ``control`` to ``sub``."""
    c = sub.add_parser("control", help="change what workers do (as `celery control`)")
    c.add_argument("what", choices=sorted([*CONTROL_ARGS, "revoke", "terminate"]),
                   help="; ".join(f"{k} {' '.join(v).upper()}".strip()
                                  for k, v in sorted(CONTROL_ARGS.items()))
                   + "; revoke TASK_ID...; terminate SIGNAL TASK_ID...")
    c.add_argument("arguments", nargs="*", help="the command's arguments")
    _ask_options(c)
    c.set_defaults(run=_control)


def add_status_parser(sub) -> None:
    """Add ``status`` to ``sub``."""
    s = sub.add_parser("status", help="show workers and queues of a broker")
    s.add_argument("--broker", default=None, help="broker address (default: $NBQ_BROKER)")
    add_key_file(s)
    s.set_defaults(run=_status)


def _ask_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that ask workers (inspect, control)."""
    parser.add_argument("--broker", default=None, help=BROKER_HELP)
    parser.add_argument("-A", "--app", default=None, help="module (or module:attribute) of an "
                        "nbq.App whose broker to use")
    parser.add_argument("-d", "--destination", default=None,
                        help="comma-separated worker names to ask (default: all)")
    parser.add_argument("-t", "--timeout", type=float, default=1.0,
                        help="seconds to wait for replies (default 1)")
    parser.add_argument("-j", "--json", action="store_true", help="print the replies as JSON")
    add_key_file(parser)


def _status(args) -> None:
    from ..client import Client
    where = address(args.broker)
    with Client(where, timeout=5.0) as client:
        st = client.status()
    print(f"broker {where}: {st['tasks']} tasks in progress, {st['results']} results stored")
    print(f"{'worker':<40} {'host':<20} {'pid':>7} {'procs':>5} {'active':>6}  queues")
    for w in st["workers"]:
        print(f"{w['id']:<40} {w['host']:<20} {w['pid']:>7} {w['concurrency']:>5} "
              f"{w['active']:>6}  {','.join(w['queues'])}")
    if not st["workers"]:
        print("(no workers)")
    print("queue lengths: " + (", ".join(f"{q}={n}" for q, n in sorted(st["queues"].items()))
                               or "(no queues yet)"))


def _control_address(args) -> str:
    """The broker of ``nbq inspect|control``: --broker, else the -A app's, else the default."""
    return app_broker(args.broker, load_app(args.app) if args.app else None)


def _ask_workers(args, command: str, arguments: dict) -> None:
    """Send a control command, print each worker's reply as Celery does; no reply is an error."""
    import json

    from ..client import Client
    where = _control_address(args)
    dest = [d for d in args.destination.split(",") if d] if args.destination else None
    with Client(where, timeout=5.0) as client:
        replies = client.control(command, arguments, dest, args.timeout)
    if not replies:
        raise NbqError(f"no worker replied within {args.timeout:g} s at {where}"
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
    from ..client import Client
    from ..tasks.asyncresult import AsyncResult
    terminate = args.what == "terminate"
    if len(args.arguments) < 1 + terminate:
        raise ValueError("nbq control " + ("terminate SIGNAL TASK_ID..." if terminate
                                           else "revoke TASK_ID...") + ": give the task ids")
    sig, ids = (args.arguments[0], args.arguments[1:]) if terminate else ("SIGTERM", args.arguments)
    if terminate:
        from ..worker.control import signal_named
        signal_named(sig)  # a bad name is one error here
    where = _control_address(args)
    missed = []
    with Client(where, timeout=5.0) as client:
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
        from ..worker.context import interval
        interval(arguments["rate_limit"])  # a bad rate is one error here, not one per worker
    _ask_workers(args, args.what, arguments)
