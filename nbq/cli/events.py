"""``nbq events``: print a broker's task and worker events as they happen (Client.events)."""
from __future__ import annotations

import json
import sys
import time

from .options import BROKER_HELP, add_key_file, address, app_broker, load_app


def add_parser(sub) -> None:
    """Add ``events`` to ``sub`` (argparse subparsers)."""
    e = sub.add_parser("events", help="print task and worker events live (one line each)")
    e.add_argument("--broker", default=None, help=BROKER_HELP)
    e.add_argument("-A", "--app", default=None, help="module (or module:attribute) of an "
                   "nbq.App whose broker to use")
    e.add_argument("--json", action="store_true", help="one JSON object per line")
    e.add_argument("--since", type=float, default=None, metavar="SECONDS_AGO",
                   help="first the events the broker kept from this many seconds ago")
    e.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop after this long with no event (default: run until Ctrl-C)")
    add_key_file(e)
    e.set_defaults(run=_events)


def line(event: dict) -> str:
    """One event as a line of text: time, type, then its fields."""
    ts = event.get("ts", 0.0)
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"
    rest = " ".join(f"{k}={_short(v)}" for k, v in event.items()
                    if k not in ("type", "ts", "traceback") and v is not None)
    return f"{stamp} {event.get('type', '?'):<16} {rest}"


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _events(args) -> None:
    from ..client import Client
    where = app_broker(args.broker, load_app(args.app)) if args.app else address(args.broker)
    since = None if args.since is None else time.time() - args.since
    with Client(where, timeout=5.0) as client:
        client.wait_at_exit = False
        try:
            for event in client.events(since=since, timeout=args.timeout):
                sys.stdout.write((json.dumps(event) if args.json else line(event)) + "\n")
                sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped (| head)
            sys.stderr.close()
