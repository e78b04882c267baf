"""The ``nbq`` command's entry point: the parser of every command, and running the one given.

Commands: broker, worker, beat, inspect, control, status, events, dashboard, multi, launch,
demo; each group's parser and code are in its own module here.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import NbqError
from . import beat, broker, control, dashboard, events, launch, worker
from .options import log_level


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
            from .. import keys
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
    p.add_argument("--log-level", default="warning", type=log_level, help="debug, info, warning (default), error")
    sub = p.add_subparsers(dest="command", required=True)
    broker.add_parser(sub)
    worker.add_worker_parser(sub)
    beat.add_parser(sub)
    control.add_inspect_parser(sub)
    control.add_control_parser(sub)
    control.add_status_parser(sub)
    events.add_parser(sub)
    dashboard.add_parser(sub)
    worker.add_multi_parser(sub)
    launch.add_parser(sub)
    d = sub.add_parser("demo", help="run a map on an embedded cluster: progress, DataFrame, speed")
    d.add_argument("--items", type=int, default=300_000, help="items to map (default 300,000)")
    d.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs)")
    d.set_defaults(run=_demo)
    return p


def _demo(args) -> None:
    if args.items < 1:  # an empty map has no rows to show, nor a rate
        raise ValueError(f"--items must be at least 1, not {args.items}")
    from ..demo import run
    run(args.items, args.workers)
