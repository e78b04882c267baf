"""The dashboard's HTTP handlers, one set for both places it runs.

Each handler here is a mixin: ``routes(prefix, guard_base)`` joins it to the base class that
guards the place (standalone: server.GuardedHandler, the token or password; in Jupyter:
jupyter_ext's handler on JupyterHandler, Jupyter's own auth), so the pages, the API, the live
stream and /metrics are the same code under ``nbq dashboard`` and at ``/nbq/`` in Jupyter.

Routes under prefix: ``""`` the page; ``static/…`` its script and style (no data, unguarded);
``api/snapshot``, ``api/tasks``, ``api/task/ID``, ``api/control`` (POST), ``api/live``
(server-sent events of deltas), ``metrics``.  Every data route takes ``?broker=`` (default:
the server's broker).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.web import RedirectHandler, StaticFileHandler

from ..errors import NbqError
from . import actions, metrics
from .live import Hub
from .source import Source, Sources

STATIC = Path(__file__).parent / "static"
FILTERS = ("state", "name", "worker", "q")


class DashboardHandler:
    """What every data handler shares: the Sources, the Hub, JSON out, errors as JSON."""

    def initialize(self, sources: Sources, hub: Hub) -> None:
        self.sources = sources
        self.hub = hub

    async def source(self) -> Source | None:
        """The broker asked for (?broker=), connected off the event loop; None after
        answering 503 when it cannot be reached."""
        try:
            return await IOLoop.current().run_in_executor(
                None, self.sources.get, self.get_argument("broker", None))
        except (NbqError, TimeoutError) as e:
            self.fail(503, str(e))
            return None

    def send_json(self, obj: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(obj, default=str))

    def fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.send_json({"error": message})

    def filters(self) -> dict:
        return {k: self.get_argument(k, "") for k in FILTERS}


class PageHandler(DashboardHandler):
    """The one page; its script reads the data from the API."""

    def get(self) -> None:
        self.xsrf_token  # sets the _xsrf cookie the page's POSTs send back (Jupyter checks it)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish((STATIC / "index.html").read_bytes())


class SnapshotHandler(DashboardHandler):
    async def get(self) -> None:
        src = await self.source()
        if src is not None:
            snap = src.state.snapshot(self.filters())
            self.send_json({**snap, "broker": src.address, "error": src.error})


class TasksHandler(DashboardHandler):
    """The newest tasks matching ?state= &name= &worker= &q= (a part of the id)."""

    async def get(self) -> None:
        src = await self.source()
        if src is not None:
            try:
                limit = min(int(self.get_argument("limit", "200")), 5000)
            except ValueError:
                self.fail(400, "limit must be a whole number of rows")
                return
            self.send_json({"tasks": src.state.find(self.filters(), limit)})


class TaskHandler(DashboardHandler):
    async def get(self, tid: str) -> None:
        src = await self.source()
        if src is None:
            return
        task = src.state.task(tid)
        if task is None:
            self.fail(404, f"no task {tid} in the dashboard's history")
        else:
            self.send_json(task)


class ControlHandler(DashboardHandler):
    """POST a JSON action (actions.py); the answer is the workers' replies."""

    async def post(self) -> None:
        try:
            request = json.loads(self.request.body or b"{}")
        except ValueError:
            self.fail(400, "the body must be a JSON object with an action")
            return
        src = await self.source()
        if src is None:
            return
        try:
            answer = await IOLoop.current().run_in_executor(None, actions.run, src.client,
                                                            request)
        except actions.ActionError as e:
            self.fail(400, str(e))
            return
        except (NbqError, TimeoutError, ValueError) as e:
            self.fail(502, str(e))
            return
        self.send_json({"ok": True, "answer": answer})


class LiveHandler(DashboardHandler):
    """Server-sent events: a JSON delta each TICK, until the page leaves."""

    async def get(self) -> None:
        src = await self.source()
        if src is None:
            return
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")   # proxies: pass each event on at once
        q = self.hub.follow(src)
        try:
            self.write(": following\n\n")
            await self.flush()
            while True:
                text = await q.get()
                if text is None:
                    break
                self.write(f"data: {text}\n\n")
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            self.hub.leave(src, q)


class MetricsHandler(DashboardHandler):
    async def get(self) -> None:
        src = await self.source()
        if src is not None:
            self.set_header("Content-Type", metrics.CONTENT_TYPE)
            self.finish(metrics.render(src.state.metrics(), src.address))


ROUTES = [("", PageHandler), ("api/snapshot", SnapshotHandler), ("api/tasks", TasksHandler),
          ("api/task/([^/]+)", TaskHandler), ("api/control", ControlHandler),
          ("api/live", LiveHandler), ("metrics", MetricsHandler)]


def routes(prefix: str, guard_base: type, sources: Sources, hub: Hub) -> list[tuple]:
    """Tornado routes of the dashboard under prefix (ending in /), each handler joined to
    guard_base, the class whose prepare() lets only allowed requests through."""
    kw = {"sources": sources, "hub": hub}
    out: list[tuple] = [(prefix + "static/(.*)", StaticFileHandler, {"path": str(STATIC)})]
    if prefix != "/":
        out.append((prefix.rstrip("/"), RedirectHandler, {"url": prefix}))
    for path, mixin in ROUTES:
        out.append((prefix + path, type(mixin.__name__, (mixin, guard_base), {}), kw))
    return out
