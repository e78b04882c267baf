"""Watching work this client did not submit: Futures for task ids (AsyncResult, a chord's
header) and a MapResult found by id (MapResult.from_id), filled from the broker's stored
and later results."""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterable

from ..errors import NbqError
from ..policy import CONNECT_TIMEOUT
from .future import Future
from .mapresult import MapResult


class Watches:
    """Adds watched tasks and maps to one client's tables of unfinished work (``futures``,
    ``chunks``), which the receiver thread completes."""

    def __init__(self, conn, futures: dict, chunks: dict) -> None:
        self._conn = conn
        self._futures = futures
        self._chunks = chunks

    def tasks(self, client, request: Callable, tids: Iterable[str]) -> list[Future]:
        """Client.watch: a Future of client's for each id; one request (request:
        Client._request) for the ids it has no Future of."""
        futs, new = [], []
        for tid in tids:
            fut = self._futures.get(tid)
            if fut is None:
                fut = Future(tid, client)
                fut._foreign = True  # not this client's work: shutdown does not wait for it
                self._futures[tid] = fut
                new.append(fut)
            futs.append(fut)

        finished = []

        def known(reply: dict) -> None:  # receiver thread, before any resent result
            for fut in new:
                state = reply["known"].get(fut.id)
                if state == "DONE":
                    finished.append(fut)
                elif state == "STARTED" and fut._state == "PENDING":
                    fut.set_running_or_notify_cancel()
                elif state == "RETRY":
                    fut._notice(state)

        if new:
            ids = [fut.id for fut in new]
            request("watch", lambda rq: self._conn.watch(rq, ids=ids), on_reply=known)
            # a stored result travels just behind the reply: wait for it, so that a task the
            # broker holds as done never reads PENDING here
            concurrent.futures.wait(finished, CONNECT_TIMEOUT)
        return futs

    def find_map(self, client, request: Callable, map_id: str) -> MapResult:
        """MapResult.from_id: client's MapResult of the map map_id, from what the broker holds."""
        holder: dict = {}

        def register(reply: dict) -> None:  # runs on the receiver thread, before the results
            meta = reply["maps"].get(map_id)
            if meta is None:
                return
            chunks = meta["chunks"]
            total = meta["total"]
            if total is None:
                total = max((s + n for _, (s, n) in chunks), default=0)
            res = MapResult(client, map_id, star=meta["star"], total=total)
            for tid, (start, n) in chunks:
                res._chunks[tid] = (start, n)
                self._chunks[tid] = (res, start, n)
            holder["res"] = res

        request("watch", lambda rq: self._conn.watch(rq, maps=[map_id]), on_reply=register)
        if "res" not in holder:
            raise NbqError(f"no map with id {map_id!r} is known to the broker at {client.address} "
                           "(its results may have expired)")
        return holder["res"]
