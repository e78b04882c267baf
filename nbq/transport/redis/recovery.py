"""Recovering the tasks of worker processes that are gone, by deaths.py's rules (as the ZeroMQ broker).

Three cases take a consumer's pending entries with the one loop here (recover): a
supervisor's report that one of its processes died (the death counts against the task it
was running), a supervisor leaving in good order (its processes' entries re-queued as they
were), and a live worker finding consumers whose supervisor's heartbeat expired (a worker
gone whole: re-queued as they were, once idle HEARTBEAT_TIMEOUT / 4).
"""
from __future__ import annotations

import logging

import redis

import time

from ... import deaths, events, policy
from . import events as stored_events
from .frames import BadMessage, entry_fields, pack
from .keys import GROUP, P, group, text
from .store import Store

log = logging.getLogger("nbq.transport.redis")

CLAIM_MAX = 10_000        # entries of one consumer claimed at once


def recover(st: Store, qk: str, consumer: str, to: str, why: str = "", at=None,
            died: bool = False, end: dict | None = None, min_idle_ms: int = 0) -> None:
    """Claim consumer's pending entries of stream qk (idle at least min_idle_ms) for consumer
    `to`, re-queue or end each (after_death), and delete consumer once it holds none.  A
    stream with no group (a Redis that restarted empty) holds nothing of anyone's."""
    r = st.r
    try:
        pending = r.xpending_range(qk, GROUP, "-", "+", CLAIM_MAX, consumername=consumer)
        ids = [p["message_id"] for p in pending]
        if ids:
            for eid, fields in r.xclaim(qk, GROUP, to, min_idle_ms, ids):
                after_death(st, qk, eid, fields, why, at, died, end)
            if r.xpending_range(qk, GROUP, "-", "+", 1, consumername=consumer):
                return  # some not idle long enough (or more than CLAIM_MAX): later
        r.xgroup_delconsumer(qk, GROUP, consumer)
    except redis.ResponseError as e:
        if "NOGROUP" not in str(e):
            raise


def reclaim(st: Store, keys: list[str], sid: str, wid: str) -> None:
    """A live worker process's look for dead workers: supervisors whose heartbeat expired
    are forgotten, and their processes' entries in streams `keys` claimed for wid and
    re-queued as they were (a worker gone whole says nothing about its tasks)."""
    r = st.r
    for dead in [s.decode() for s in r.smembers(P + "sups")]:
        if not r.exists(P + "hb:" + dead):
            if r.srem(P + "sups", dead):  # the one that removed it tells (worker-offline)
                stored_events.write(st, [events.worker_event(events.WORKER_OFFLINE, time.time(),
                                                             dead, {"how": "lost"})])
            r.delete(P + "procs:" + dead, stored_events.counts_key(dead))
    for qk in keys:
        summary = r.xpending(qk, GROUP)
        for c in summary.get("consumers") or ():
            name = text(c["name"])
            owner = name.split("/")[0]
            if owner == sid or r.exists(P + "hb:" + owner):
                continue
            recover(st, qk, name, wid, min_idle_ms=int(policy.HEARTBEAT_TIMEOUT * 250))


def after_death(st: Store, qk: str, eid, fields: dict | None, why: str, at, died: bool = True,
                end: dict | None = None) -> None:
    """Re-queue or fail a claimed entry whose worker process is gone (rules: deaths.py)."""
    if not fields:
        st.retry("acking", lambda: (st.r.xack(qk, GROUP, eid), st.r.xdel(qk, eid)))
        return
    try:
        task, payload = st.task(qk, fields)
    except BadMessage as e:
        st.bad(e, f"entry {eid!r} of {qk}")
        st.drop([(qk, eid, fields, e)])
        return
    # first among its priority: the lane of re-queued tasks, read before the others
    rk = st.retry("re-queueing", lambda: group(st.r, task.get("q", "default"),
                                               task.get("pr", 0), requeued=True))
    fail, retry = ([], task) if not died else deaths.after_death(
        task, st.delivered(task["id"], task.get("n", 1)), at, end)
    if retry is task:  # its worker left in good order, or the death does not count against
        # it (deaths.py): the same entry, queued again
        st.store([], adds=[(rk, fields)], acks=[(qk, eid, "")])
        _retry_lost(st, task["id"])
        return
    parts = [(task, *deaths.ending(task, pos, why, end)) for pos in fail]
    adds = []
    if retry is not None:
        spill = st.frames.spiller(payload)
        adds.append((rk, entry_fields(st.signer.encode({"k": "tasks", "t": [retry]}, payload),
                                      spill)))
        log.warning("re-queued task %s: %s", task["id"], why)
    writer = stored_events.EventWriter(st)
    if writer.on:  # the failures a death makes (WorkerLost), as a worker's results would
        writer.add([e for t, item, _ in parts
                    for e in events.result_events(time.time(), t, item, None, None)])
    st.store(parts, adds=adds, acks=[(qk, eid, task["id"] if retry is None else "")],
             extra=writer.commands if writer else None)
    if retry is not None:
        _retry_lost(st, task["id"])


def _retry_lost(st: Store, tid: str) -> None:
    """A re-queued task that waited for a retry runs again from the start: its clients
    see it STARTED (not RETRY) from now on."""
    msg = pack(st.signer.encode({"k": "state", "ids": [tid], "state": "STARTED"}))
    st.retry("telling a retry's clients", lambda: st.notice(
        args=[P, st.ttl_s, tid, "STARTED", msg, "if"]))
