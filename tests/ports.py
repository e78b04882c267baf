"""Free 127.0.0.1 ports for the servers the tests start, chosen outside the kernel's ephemeral
range.

A port from bind(0) lies in the range connect() draws its source ports from, and so do other
processes' bind(0)s.  While a server is down on such a port (restarted by a test), another
process can be given it, and the server's listen() then fails with EADDRINUSE.  A port outside
the range is never handed out by the kernel.
"""
from __future__ import annotations

import random
import socket

LOWEST = 10000  # above the well-known and most registered service ports
ROOM = 1000     # the fewest ports a range outside the ephemeral one must offer
_pick = random.Random()  # its own seed (from os.urandom): a test seeding random changes nothing here
_given: set[int] = set()  # handed out by this process: never twice (servers take them later)


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _outside() -> tuple[int, int] | None:
    """Ports [low, high) outside the ephemeral range: below it, else above it, else None."""
    start, end = _ephemeral()
    if start - LOWEST >= ROOM:
        return LOWEST, start
    if 65536 - (end + 1) >= ROOM:
        return end + 1, 65536
    return None


def free_port() -> int:
    """A port nothing on 127.0.0.1 is bound to now, outside the ephemeral range if the
    machine leaves room for one (else the kernel's choice)."""
    span = _outside()
    for _ in range(1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", _pick.randrange(*span) if span else 0))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
    raise RuntimeError(f"no free 127.0.0.1 port in {span}")
