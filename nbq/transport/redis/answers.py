"""The requests a ZeroMQ broker answers, answered from Redis state by a client's sender thread.

Each answer function takes (store, client id, request header) and returns the reply and
the messages it brings (stored results), delivered through the client's receive() as the
ZeroMQ broker's are, so client.py does not know the difference.
"""
from __future__ import annotations

from typing import Callable

from . import events as stored_events
from .frames import pack
from .keys import CONTROL_KEEP, CTL, P
from .status import info, live_supervisors
from .store import Store

Answer = tuple[dict, list]

#: Requests answered from Redis state, with the answer given when Redis fails them.
FALLBACK = {"cancel": {}, "watch": {"maps": {}, "known": {}},
            "info": {"workers": [], "queues": {}, "tasks": 0, "results": 0},
            "join": {"error": "Redis failed the join"}, "ctl": {"n": 0}, "claim": {"won": False}}


def cancel(st: Store, cid: str, header: dict) -> Answer:
    """{task id: revoked?}; a revoked task's result goes to its owner and watchers (CANCEL)."""
    ids = list(header["ids"])
    args: list = [P, st.ttl_s, cid, len(ids)]
    for tid in ids:
        args += [tid, pack(st.signer.encode({"k": "res", "t": [
            {"id": tid, "rv": 1, "s": 0, "n": 1, "nf": 0}]}))]
    flags = st.cancel(args=args)
    stored_events.revoked(st, [tid for tid, f in zip(ids, flags) if f])
    return {tid: bool(f) for tid, f in zip(ids, flags)}, []


def watch(st: Store, cid: str, header: dict) -> Answer:
    """Subscribe cid to tasks (and maps' chunks), then read their states and stored results."""
    r = st.r
    ids = list(header.get("ids", ()))
    maps = {}
    for mp in header.get("maps", ()):
        meta = r.hgetall(P + "m:" + mp)
        if not meta:
            continue
        chunks = []
        for line in r.lrange(P + "mc:" + mp, 0, -1):
            tid, s0, n = line.decode().split()
            chunks.append((tid, (int(s0), int(n))))
        total = meta.get(b"total")
        maps[mp] = {"total": int(total) if total is not None else None,
                    "star": bool(int(meta.get(b"star", 0))), "chunks": chunks}
        ids.extend(t for t, _ in chunks)
    pipe = r.pipeline(transaction=False)
    for tid in ids:  # subscribe first, then read: nothing falls between
        pipe.sadd(P + "wt:" + tid, cid)
        pipe.expire(P + "wt:" + tid, st.ttl_s)
    pipe.execute()
    pipe = r.pipeline(transaction=False)
    for tid in ids:
        pipe.lrange(P + "r:" + tid, 0, -1)
        pipe.exists(P + "st:" + tid)
        pipe.exists(P + "rt:" + tid)
    got = pipe.execute() if ids else []
    known, messages = {}, []
    for i, tid in enumerate(ids):
        parts, started, retrying = got[3 * i:3 * i + 3]
        known[tid] = ("DONE" if parts else "RETRY" if retrying else
                      "STARTED" if started else "PENDING")
        for blob in parts:
            decoded = st.decode(blob, f"a stored result of {tid}")
            if decoded is not None:
                messages.append(decoded)
    return {"maps": maps, "known": known}, messages


def info_(st: Store, cid: str, header: dict) -> Answer:
    """The cluster's state (status.info)."""
    return info(st), []


def ctl(st: Store, cid: str, header: dict) -> Answer:
    """Broadcast a control command on nbq:ctl; {"n": the live supervisors it names}."""
    dest = header.get("dest")
    n = sum(1 for sid, meta, _ in live_supervisors(st.r)
            if dest is None or meta.get("name", sid) in dest or sid in dest)
    st.r.xadd(CTL, {"m": pack(st.signer.encode(header))}, maxlen=CONTROL_KEEP, approximate=True)
    return {"n": n}, []


def claim(st: Store, cid: str, header: dict) -> Answer:
    """Claim-once: {"won": True} to the first claim of the key for its ttl."""
    won = st.r.set(P + "claim:" + header["key"], cid, nx=True,
                   px=max(1, int(header["ttl"] * 1000)))
    return {"won": bool(won)}, []


def join(st: Store, cid: str, header: dict) -> Answer:
    """{"fire": True} to the one call that completes the join (JOIN)."""
    fired = st.join(args=[P, st.ttl_s, header["key"], header["member"], header["total"]])
    return {"fire": bool(fired)}, []


ANSWERS: dict[str, Callable[[Store, str, dict], Answer]] = {
    "cancel": cancel, "watch": watch, "info": info_, "ctl": ctl, "claim": claim, "join": join}
