"""What several ``nbq`` commands share: the broker address, the ``-A`` app, common options."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import NbqError
from ..transport import across_processes

DEFAULT_BIND = "tcp://127.0.0.1:5555"
BROKER_HELP = f"broker address (default: the -A app's broker_url, else $NBQ_BROKER or {DEFAULT_BIND})"


def add_key_file(parser: argparse.ArgumentParser) -> None:
    """--key-file: every client and broker the command makes signs with it (main)."""
    parser.add_argument("--key-file", default=None, help="signing key file, - for standard input "
                        "(default: $NBQ_KEY, $NBQ_KEY_FILE or ~/.config/nbq/key)")


def add_max_message_age(parser: argparse.ArgumentParser) -> None:
    """--max-message-age, of the broker and of a worker (its control commands)."""
    parser.add_argument("--max-message-age", type=float, default=None, help="seconds after "
                        "which a message (on a worker: a control command) is refused as a "
                        "possible replay; also the clock difference tolerated between hosts "
                        "(default 300)")


def log_level(name: str) -> str:
    """--log-level's (and -l's) value: a logging level's name, any case (as Celery's -l INFO)."""
    if not isinstance(logging.getLevelName(name.upper()), int):
        raise argparse.ArgumentTypeError(f"{name!r}: use debug, info, warning or error")
    return name


def given(**options) -> dict:
    """The options given on the command line (the others keep their defaults)."""
    return {k: v for k, v in options.items() if v is not None}


def address(given: str | None) -> str:
    """--broker, else $NBQ_BROKER, else the default address; never a memory:// one (it lives
    inside another process)."""
    found = given or os.environ.get("NBQ_BROKER") or DEFAULT_BIND
    across_processes(found, "this command")
    return found


def app_broker(given: str | None, app) -> str:
    """The broker of a command that may have an app (-A): --broker, else the app's broker_url,
    else $NBQ_BROKER or the default."""
    return address(given or (app and app.conf.broker_url) or None)


def load_app(spec: str):
    """The app of ``-A spec``, imported from the current directory as Celery does."""
    from ..tasks import load_app as load
    cwd_on_path()
    module = spec.partition(":")[0]
    try:
        return load(spec)
    except ModuleNotFoundError as e:  # only -A's own module: a missing import inside it keeps
        if e.name is None or not f"{module}.".startswith(f"{e.name}."):  # its traceback
            raise
        raise NbqError(f"-A {spec}: no module named {e.name!r} in {os.getcwd()} or on "
                       "sys.path: start the command in the folder of the app's module, or "
                       "install it") from None


def cwd_on_path() -> None:
    """Modules in the current directory import, as they do for ``python -m`` and Celery."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
