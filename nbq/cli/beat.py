"""``nbq beat`` and ``nbq worker -B``: send an app's beat_schedule entries when they are due."""
from __future__ import annotations

import argparse
import logging

from .options import BROKER_HELP, add_key_file, app_broker, load_app, log_level


def add_parser(sub) -> None:
    """Add ``beat`` to ``sub`` (argparse subparsers)."""
    bt = sub.add_parser("beat", help="send an app's beat_schedule entries when they are due")
    bt.add_argument("-A", "--app", required=True, help="the app: module or module:attribute, "
                    "as Celery's -A")
    bt.add_argument("--broker", default=None, help=BROKER_HELP)
    add_beat_options(bt)
    add_key_file(bt)
    bt.set_defaults(run=_beat)


def add_beat_options(parser: argparse.ArgumentParser) -> None:
    """The options of beat, ``nbq beat``'s and ``nbq worker -B``'s."""
    parser.add_argument("-s", "--schedule", default=None, help="beat's file of when each entry "
                        "was last sent, read when it restarts (beats share ticks through the broker, "
                        "not this file; default: nbq-beat-schedule, here)")
    parser.add_argument("-l", "--loglevel", dest="log_level", default=argparse.SUPPRESS,
                        type=log_level, help="as --log-level (info logs each beat send)")


def _beat(args) -> None:
    app = load_app(args.app)  # its client signs with this command's key (main)
    _make_beat(app, app_broker(args.broker, app), args.schedule).run()
    # a signal may end it at any time: every claim is already stored


def _make_beat(app, address: str, schedule: str | None):
    """The beat of `nbq beat` and `nbq worker -B`: the app's entries, sent to `address`."""
    from ..tasks.beat import Beat
    app.conf.broker_url = address
    beat = Beat(app, schedule)
    print(f"nbq beat: {len(beat.entries)} entries of {app.main}, marks in {beat.marks.where}, "
          "each tick claimed on the broker", flush=True)
    return beat


def start_beat(app, address: str, schedule: str | None):
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
