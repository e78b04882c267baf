"""What Redis holds about the cluster: live supervisors, queue lengths, the info reply."""
from __future__ import annotations

import json
import time

import redis

from .keys import GROUP, P, queue_streams, stream_keys, text
from .store import Store


def live_supervisors(r: redis.Redis) -> list[tuple[str, dict, dict]]:
    """(id, heartbeat info, processes) of each supervisor whose heartbeat has not expired."""
    sids = sorted(s.decode() for s in r.smembers(P + "sups"))
    pipe = r.pipeline(transaction=False)
    for sid in sids:
        pipe.get(P + "hb:" + sid)
        pipe.hgetall(P + "procs:" + sid)
    got = pipe.execute()
    return [(sid, json.loads(got[2 * i]), got[2 * i + 1]) for i, sid in enumerate(sids)
            if got[2 * i] is not None]


def queued(r: redis.Redis, queues: list[str]) -> int:
    """How many tasks wait in queues' streams, taken by no worker process yet."""
    keys = stream_keys(r, queues)
    pipe = r.pipeline(transaction=False)
    for qk in keys:
        pipe.xlen(qk)
        pipe.xpending(qk, GROUP)
    got = pipe.execute(raise_on_error=False)
    return sum(n - p["pending"] for n, p in zip(got[::2], got[1::2]) if isinstance(p, dict))


def info(store: Store) -> dict:
    """Workers (live supervisors) and queue lengths, as the ZeroMQ broker's info reply."""
    r = store.r
    sups = live_supervisors(r)
    queues = {q.decode() for q in r.smembers(P + "queues")}
    for _, meta, _ in sups:
        queues.update(meta["queues"])
    active: dict[str, int] = {}
    lengths, tasks = {}, 0
    for q, keys in queue_streams(r, sorted(queues)).items():
        lengths[q] = 0
        for qk in keys:
            try:
                summary = r.xpending(qk, GROUP)
            except redis.ResponseError:  # no stream or group yet
                continue
            n = r.xlen(qk)
            tasks += n
            lengths[q] += n - summary["pending"]
            for c in summary.get("consumers") or ():
                sid = text(c["name"]).split("/")[0]
                active[sid] = active.get(sid, 0) + int(c["pending"])
    workers = [{"id": sid, "name": meta.get("name", sid), "host": meta["host"], "pid": meta["spid"],
                "concurrency": meta["conc"], "queues": list(meta["queues"]), "active": active.get(sid, 0),
                "processes": sorted(int(p) for p in procs.values()), "memory": meta.get("mem")}
               for sid, meta, procs in sups]
    results = r.zcount(P + "done", time.time() - store.ttl, "+inf")
    dropped = {k.decode(): int(v) for k, v in r.hgetall(P + "bad").items()}
    return {"workers": workers, "queues": lengths, "tasks": tasks, "results": results,
            "dropped": dropped}
