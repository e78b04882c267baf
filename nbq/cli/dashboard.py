"""``nbq dashboard``: watch and steer a broker's workers, queues, tasks and maps in a browser."""
from __future__ import annotations

import os
import sys

from .options import add_key_file, address


def add_parser(sub) -> None:
    """Add ``dashboard`` to ``sub`` (argparse subparsers)."""
    d = sub.add_parser("dashboard", help="serve a live web page of a broker's workers, queues, "
                       "tasks and maps, with control (as Celery's Flower)")
    d.add_argument("--broker", default=None, help="broker address (default: $NBQ_BROKER)")
    d.add_argument("--bind", default="127.0.0.1:8787",
                   help="HOST:PORT to listen on (default 127.0.0.1:8787; port 0: any free one)")
    d.add_argument("--password", default=None, help="password asked by the browser (HTTP Basic "
                   "auth, any user name); required when HOST is not loopback (default: "
                   "$NBQ_DASHBOARD_PASSWORD)")
    add_key_file(d)
    d.set_defaults(run=_run)


def _run(args) -> None:
    from ..dashboard.server import serve
    password = args.password or os.environ.get("NBQ_DASHBOARD_PASSWORD") or None
    serve(address(args.broker), args.bind, password,
          ready=lambda url: print(f"nbq dashboard of {address(args.broker)}: open\n    {url}",
                                  file=sys.stderr, flush=True))
