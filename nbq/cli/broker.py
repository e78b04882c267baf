"""``nbq broker``: run a ZeroMQ broker until SIGTERM."""
from __future__ import annotations

import argparse

from ..policy import EVENTS_KEEP, EVENTS_MAX, RESULT_EXPIRES
from .options import DEFAULT_BIND, add_key_file, add_max_message_age, given


def add_parser(sub) -> None:
    """Add ``broker`` to ``sub`` (argparse subparsers)."""
    b = sub.add_parser("broker", help="run a ZeroMQ broker")
    b.add_argument("--bind", action="append", help=f"address to listen on (default {DEFAULT_BIND}); "
                   "repeat for several")
    b.add_argument("--result-expires", type=float, default=RESULT_EXPIRES,
                   help="seconds results are kept")
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
    b.add_argument("--events", action=argparse.BooleanOptionalAction, default=True,
                   help="keep and send task and worker events (nbq events, Client.events(), "
                   "the dashboard; default: on)")
    b.add_argument("--events-keep", type=float, default=EVENTS_KEEP, metavar="SECONDS",
                   help=f"seconds of events kept for readers that start later (default {EVENTS_KEEP:g})")
    b.add_argument("--events-max", type=int, default=EVENTS_MAX, metavar="N",
                   help=f"events kept at most (default {EVENTS_MAX:,}; worker heartbeats: "
                   "each worker's last)")
    add_max_message_age(b)
    add_key_file(b)
    b.set_defaults(run=_broker)


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


def _broker(args) -> None:
    import signal

    from .. import keys
    from ..broker import Broker
    from ..transport import across_processes
    for bind in args.bind or ():
        across_processes(bind, "nbq broker")
    broker = Broker(keys.load_key(), args.bind or [DEFAULT_BIND],
                    result_expires=args.result_expires, curve=args.curve,
                    events_on=args.events, events_keep=args.events_keep,
                    events_max=args.events_max,
                    **given(max_message_size=args.max_message_size,
                            result_budget=args.result_budget, max_age=args.max_message_age,
                            heartbeat_timeout=args.heartbeat_timeout))
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    print(f"nbq broker listening on {', '.join(broker.addresses)}"
          f"{' (CURVE: encrypted)' if broker.curve else ''}", flush=True)
    broker.run()
