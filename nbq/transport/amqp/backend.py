"""The result backend of the amqp:// transport: a Redis (``?result_backend=redis://...``,
Celery's setting) that keeps what RabbitMQ cannot look up by key.

Keys (redis/keys.py's names and forms, so redis/answers.py's watch, claim and join serve
here unchanged): r:{task id} (result parts, packed signed messages), st: (started: set by
START before a task runs), rv: (revoked by cancel while not started), done (sorted set of
finished tasks: START refuses them, so a redelivered finished task never runs twice),
wt: (watchers: the worker sends them copies of results on their RabbitMQ queues), m: and
mc: (a map's chunks, for MapResult.from_id), jn:/jf: (chords), claim: (claim-once), and
dd:{task id} (a hash "a" or item position -> deaths of the process running it, counted by
its supervisor: a redelivered task that reached max_task_deaths fails with WorkerLost),
and the events (redis/events.py's streams and counts: see eventing.py), written with the
results, the chunks and the heartbeats.

Without a backend, results reach only the client that submitted them; a by-id lookup
(AsyncResult, MapResult.from_id, watch) raises NbqError naming the setting, a cancel
revokes nothing (it answers False: the task runs), and chords cannot be counted.
"""
from __future__ import annotations

import time
from urllib.parse import quote

import redis

from ...errors import NbqError
from ..redis.events import EventWriter, ProcessEvents
from ..redis.keys import P
from ..redis.store import Store

# ARGV: prefix, ttl, n, task id* -> per task 1 (run it; st: set), 3 (run it again: it was
# started before), 0 (revoked) or 2 (done: a redelivery of a task whose result is stored)
START = """
local p, ttl = ARGV[1], tonumber(ARGV[2])
local out = {}
for k = 1, tonumber(ARGV[3]) do
  local tid = ARGV[3 + k]
  if redis.call('ZSCORE', p .. 'done', tid) then
    out[k] = 2
  elseif redis.call('EXISTS', p .. 'rv:' .. tid) == 1 then
    out[k] = 0
  elseif redis.call('SET', p .. 'st:' .. tid, '1', 'EX', ttl, 'GET') then
    out[k] = 3
  else
    out[k] = 1
  end
end
return out
"""

# ARGV: prefix, ttl, now, nparts, [task id, packed part]*, ndone, task id*
# -> per part the list of its watchers (their copies go on their RabbitMQ queues)
STORE = """
local p, ttl, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 5
local out = {}
for k = 1, tonumber(ARGV[4]) do
  local rk = p .. 'r:' .. ARGV[i]
  redis.call('RPUSH', rk, ARGV[i + 1]); redis.call('EXPIRE', rk, ttl)
  out[k] = redis.call('SMEMBERS', p .. 'wt:' .. ARGV[i]); i = i + 2
end
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do redis.call('ZADD', p .. 'done', now, ARGV[i]); i = i + 1 end
if n > 0 then redis.call('ZREMRANGEBYSCORE', p .. 'done', '-inf', now - ttl) end
return out
"""

# ARGV: prefix, ttl, n, [task id, packed revoked part]* -> per task {1 or 0, watchers...}
CANCEL = """
local p, ttl = ARGV[1], tonumber(ARGV[2])
local i = 4
local out = {}
for k = 1, tonumber(ARGV[3]) do
  local tid, blob = ARGV[i], ARGV[i + 1]; i = i + 2
  if redis.call('EXISTS', p .. 'st:' .. tid) == 1 or redis.call('EXISTS', p .. 'r:' .. tid) == 1 then
    out[k] = {0}
  else
    redis.call('SET', p .. 'rv:' .. tid, '1', 'EX', ttl)
    redis.call('RPUSH', p .. 'r:' .. tid, blob); redis.call('EXPIRE', p .. 'r:' .. tid, ttl)
    local got = {1}
    for _, w in ipairs(redis.call('SMEMBERS', p .. 'wt:' .. tid)) do got[#got + 1] = w end
    out[k] = got
  end
end
return out
"""


def text(b) -> str:
    return b.decode() if isinstance(b, bytes) else b


class Backend:
    """One party's link to the result backend (a Redis Store: retries, verification)."""

    def __init__(self, url: str, key: bytes, ttl: float) -> None:
        sep = "&" if "?" in url else "?"
        self.store = Store(f"{url}{sep}result_expires={quote(f'{ttl:g}')}", key)
        r = self.store.r
        self._start = r.register_script(START)
        self._store = r.register_script(STORE)
        self._cancel = r.register_script(CANCEL)
        self.events = EventWriter(self.store)  # this party's events (redis/events.py)

    def start(self, ids: list[str]) -> list[str]:
        """Mark tasks started: for each "run", "revoked" or "done" (never run those)."""
        st = self.store
        flags = st.retry("starting tasks", lambda: self._start(args=[P, st.ttl_s, len(ids), *ids]))
        return [("revoked", "run", "done", "again")[f] for f in flags]

    def died(self, tid: str, pos: int | None) -> None:
        """Count a death of the process running task tid (at item pos, if known): dd:{tid}."""
        st = self.store
        key = P + "dd:" + tid

        def count():
            pipe = st.r.pipeline(transaction=False)
            pipe.hincrby(key, "a" if pos is None else str(pos), 1)
            pipe.expire(key, st.ttl_s)
            pipe.execute()
        st.retry("counting a death", count)

    def deaths(self, ids: list[str]) -> dict[str, dict[str, int]]:
        """The deaths counted against each task: {task id: {"a" or position: count}}."""
        st = self.store

        def read():
            pipe = st.r.pipeline(transaction=False)
            for tid in ids:
                pipe.hgetall(P + "dd:" + tid)
            return pipe.execute()
        got = st.retry("reading deaths", read)
        return {tid: {text(k): int(v) for k, v in d.items()} for tid, d in zip(ids, got) if d}

    def results(self, parts: list[tuple[str, bytes]], done: list[str],
                seen: ProcessEvents | None = None) -> list[list[str]]:
        """Store result parts [(task id, packed signed message)], mark tasks done, and write
        seen's pending events and counts, in one round trip; returns each part's watchers."""
        st = self.store
        args: list = [P, st.ttl_s, time.time(), len(parts)]
        for tid, blob in parts:
            args += [tid, blob]
        args += [len(done), *done]

        def write():
            if not seen:
                return self._store(args=args)
            # EVALSHA itself: a Script in a pipeline costs a SCRIPT EXISTS round trip each time
            pipe = st.r.pipeline(transaction=False)
            pipe.evalsha(self._store.sha, 0, *args)
            seen.commands(pipe, st.ttl_s)
            try:
                return pipe.execute()[0]
            except redis.exceptions.NoScriptError:  # a Redis that restarted: load it, once
                return self._store(args=args)
        got = st.retry("storing results", write)
        return [[text(w) for w in ws] for ws in got]

    def forget(self, keys: list[bytes]) -> None:
        """Delete large frames stored apart that nothing reads any more (an acked task's)."""
        try:
            self.store.retry("deleting large frames", lambda: self.store.r.delete(*keys),
                             give_up=lambda: True)
        except NbqError:
            pass  # they expire with result_expires

    def write_events(self, seen: ProcessEvents | None = None) -> None:
        """Write the pending events (and seen's, with its counts) now: a round trip of their
        own, for a party about to wait or one that sends the backend nothing else."""
        st = self.store

        def write():
            pipe = st.r.pipeline(transaction=False)
            self.events.commands(pipe)
            if seen is not None:
                seen.commands(pipe, st.ttl_s)
            if len(pipe):
                pipe.execute()
        st.retry("writing events", write)

    def cancel(self, blobs: list[tuple[str, bytes]]) -> list[tuple[bool, list[str]]]:
        """Revoke tasks not started: [(revoked?, watchers to tell)]."""
        st = self.store
        args: list = [P, st.ttl_s, len(blobs)]
        for tid, blob in blobs:
            args += [tid, blob]
        got = st.retry("cancelling", lambda: self._cancel(args=args))
        return [(bool(g[0]), [text(w) for w in g[1:]]) for g in got]

    def chunks(self, cid: str, chunks: list[tuple[str, str, int, int, bool]],
               ends: list[tuple[str, int]]) -> None:
        """Note maps' chunks [(map id, task id, start, n, star)] and totals [(map id, total)],
        and write the pending events (a client's task-sent and map-sent)."""
        st = self.store

        def write():
            pipe = st.r.pipeline(transaction=False)
            for mp, tid, s0, n, star in chunks:
                pipe.hsetnx(P + "m:" + mp, "star", int(star))
                pipe.hsetnx(P + "m:" + mp, "c", cid)
                pipe.rpush(P + "mc:" + mp, f"{tid} {s0} {n}")
                pipe.expire(P + "m:" + mp, st.ttl_s)
                pipe.expire(P + "mc:" + mp, st.ttl_s)
            for mp, total in ends:
                pipe.hset(P + "m:" + mp, "total", total)
                pipe.expire(P + "m:" + mp, st.ttl_s)
            self.events.commands(pipe)  # task-sent, map-sent
            if len(pipe):
                pipe.execute()

        st.retry("noting a map's chunks", write)

    def close(self) -> None:
        self.store.close()
