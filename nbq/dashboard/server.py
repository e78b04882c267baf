"""``nbq dashboard``: the dashboard's handlers on a tornado server of their own, guarded by
a token (and a password beyond loopback, auth.py)."""
from __future__ import annotations

import asyncio
import signal
from typing import Callable
from urllib.parse import urlsplit

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .auth import Guard
from .handlers import routes
from .live import Hub
from .source import Sources


class GuardedHandler(tornado.web.RequestHandler):
    """Lets through only requests with the server's token or password (auth.Guard)."""

    def prepare(self) -> None:
        guard: Guard = self.settings["nbq_guard"]
        header = self.request.headers.get("Authorization")
        if self.request.method == "POST" and not self._same_origin():
            raise tornado.web.HTTPError(403)   # a browser's stored password, sent by another site
        if guard.allows(self.get_query_argument("token", None), header):
            return
        if guard.challenge(header):
            self.set_header("WWW-Authenticate", 'Basic realm="nbq dashboard"')
            raise tornado.web.HTTPError(401)
        raise tornado.web.HTTPError(403)

    def _same_origin(self) -> bool:
        """Whether the request comes from this server's own page (or from no page at all)."""
        origin = self.request.headers.get("Origin")
        return origin is None or urlsplit(origin).netloc == self.request.host

    def write_error(self, status_code: int, **kwargs) -> None:
        """No page, no data: a line saying what to do."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code}: open the URL `nbq dashboard` printed (it has the token)"
                    if status_code in (401, 403) else f"{status_code}: {self._reason}")


def parse_bind(bind: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' (host 127.0.0.1); '[::1]:PORT' for IPv6."""
    host, sep, port = bind.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", bind
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"--bind {bind!r}: give HOST:PORT, such as 127.0.0.1:8787") from None


def serve(broker: str, bind: str = "127.0.0.1:8787", password: str | None = None,
          token: str | None = None, ready: Callable[[str], None] = print) -> None:
    """Serve the dashboard of broker until SIGINT/SIGTERM; ready(url) once it listens."""
    host, port = parse_bind(bind)
    guard = Guard(host, password, token)
    asyncio.run(_serve(broker, host, port, guard, ready))


async def _serve(broker: str, host: str, port: int, guard: Guard,
                 ready: Callable[[str], None]) -> None:
    sources, hub = Sources(broker), Hub()
    app = tornado.web.Application(routes("/", GuardedHandler, sources, hub), nbq_guard=guard)
    sockets = bind_sockets(port, host or None)
    server = HTTPServer(app)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = sockets[0].getsockname()[1]
    shown = host if host and ":" not in host else f"[{host}]" if host else "127.0.0.1"
    ready(f"http://{shown}:{bound}/?token={guard.token}")
    try:
        await loop.run_in_executor(None, sources.get, broker)   # connect now: fail early
        await stop.wait()
    finally:
        server.stop()
        hub.stop()
        await loop.run_in_executor(None, sources.close)
