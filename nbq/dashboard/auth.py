"""Who may see the standalone dashboard: a token in the URL (printed at start, as Jupyter
prints its own), and a password when the server listens beyond loopback.

A request passes with the token (``?token=``, or the header ``Authorization: token T``) or,
when a password is set, with it by HTTP Basic auth (any user name). A request without
either gets 403 and no data; with a password set, a browser is asked for it (401) first.
Inside Jupyter none of this applies: Jupyter's own auth guards the same handlers
(nbq/jupyter_ext/).
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import secrets
import socket

from ..errors import NbqError


class DashboardAuthError(NbqError):
    """The dashboard cannot listen as asked without exposing it."""


def is_loopback(host: str) -> bool:
    """Whether host (a name or an address) is this machine's loopback only."""
    if not host:   # every address
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


class Guard:
    """The token and the optional password of one standalone server."""

    def __init__(self, host: str, password: str | None = None, token: str | None = None) -> None:
        if not is_loopback(host) and not password:
            raise DashboardAuthError(
                f"the dashboard would listen on {host or 'every address'}, beyond this "
                "machine: give it a password (--password, or NBQ_DASHBOARD_PASSWORD), or "
                "bind it to 127.0.0.1 and reach it through an SSH tunnel")
        self.token = token or secrets.token_urlsafe(24)
        self.password = password

    def allows(self, query_token: str | None, authorization: str | None) -> bool:
        """Whether a request with this ?token= and Authorization header may pass."""
        if query_token is not None and hmac.compare_digest(query_token, self.token):
            return True
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() == "token":
            return hmac.compare_digest(value.strip(), self.token)
        if scheme.lower() == "basic" and self.password:
            try:
                _, _, given = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(given.encode(), self.password.encode())
        return False

    def challenge(self, authorization: str | None) -> bool:
        """Whether to answer 401 and ask a browser for the password (set, none given)."""
        return bool(self.password) and not authorization
