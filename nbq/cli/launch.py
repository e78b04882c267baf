"""``nbq launch ssh|slurm``: start workers on other machines and serve them until stopped."""
from __future__ import annotations

from .options import add_key_file


def add_parser(sub) -> None:
    """Add ``launch`` and its launchers (clusters/launch.py) to ``sub`` (argparse subparsers)."""
    from ..clusters.launch import add_launchers
    la = sub.add_parser("launch", help="start workers on other machines and serve them until "
                        "stopped (nbq launch ssh HOST... -n N)")
    add_launchers(la.add_subparsers(dest="launcher", required=True))
    la.set_defaults(run=_launch)
    add_key_file(la)


def _launch(args) -> None:
    from ..clusters.launch import serve
    serve(args.make(args))
