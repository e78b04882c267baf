"""Free 127.0.0.1 ports for the servers the tests start, chosen below the kernel's ephemeral
range.

A port from bind(0) lies in the range connect() draws its source ports from.  While a server
is down on such a port (restarted by a test), a client retrying connect() to it can be given
that very port as its source and connect to itself (TCP simultaneous open); the server's
listen() then fails with EADDRINUSE.  A port below the range is never handed to connect().
"""
from __future__ import annotations

import random
import socket

LOWEST = 10000  # above the well-known and most registered service ports
_pick = random.Random()  # its own seed (from os.urandom): a test seeding random changes nothing here


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port nothing on 127.0.0.1 is bound to now, outside the ephemeral range."""
    high = _ephemeral_start()
    for _ in range(1000):
        port = _pick.randrange(LOWEST, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free 127.0.0.1 port between {LOWEST} and {high}")
