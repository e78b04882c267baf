"""A supervisor's connection to Redis: heartbeats, its processes' deaths, control commands."""
from __future__ import annotations

import json
import logging
import select
import time

import redis

from ... import policy
from ...errors import NbqError
from ..base import SupervisorConnection
from . import events as stored_events
from .connection import Backoff, check, claim_key, compare_key, nbq_error, unreachable
from .frames import pack
from .keys import CTL, P, stream_keys
from .recovery import recover
from .status import queued
from .store import Store

log = logging.getLogger("nbq.transport.redis")

CONTROL_BLOCK_MS = 5000   # a supervisor's outstanding XREAD on nbq:ctl is renewed this often


class ControlReader:
    """The control stream, read with one XREAD BLOCK always outstanding on a connection of
    its own, so a supervisor's select() waits on that socket together with its other fds
    (no thread: the supervisor forks)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._conn = None
        self._retry_at = 0.0
        try:
            last = store.retry("reading the control stream", lambda: store.r.xrevrange(CTL, count=1))
        except NbqError as e:  # not a stream: read() says so until it is one
            log.warning("control commands: %s is not a stream (%s)", CTL, e)
            last = []
        self._last = last[0][0] if last else b"0-0"  # commands sent before this worker are not its

    def fileno(self) -> int | None:
        """The socket to wait on, with a read sent; None while Redis is unreachable."""
        if self._conn is None:
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._conn = self.store.r.connection_pool.get_connection()
                self._conn.send_command("XREAD", "BLOCK", CONTROL_BLOCK_MS, "STREAMS", CTL, self._last)
            except redis.RedisError as e:
                self._drop(e)
                return None
        return self._conn._sock.fileno()  # redis-py keeps the socket private; nothing else waits on it

    def read(self) -> list[dict]:
        """The control commands that arrived (verified); call when fileno() is readable."""
        try:
            got = self._conn.read_response()
        except redis.RedisError as e:  # unreachable, or nbq:ctl is not a stream: no control now
            self._drop(e)
            return []
        self.store.r.connection_pool.release(self._conn)
        self._conn = None
        out = []
        # the raw reply, no redis-py callback parsed it: a map under RESP3, pairs under RESP2
        for _, entries in (got.items() if isinstance(got, dict) else got or ()):
            for eid, flat in entries:
                self._last = eid
                fields = dict(zip(flat[::2], flat[1::2]))
                decoded = self.store.decode(fields.get(b"m", b""), f"control entry {eid!r}")
                if decoded is not None and decoded[0].get("k") == "ctl":
                    out.append(decoded[0])
        return out

    def _drop(self, e: Exception) -> None:
        log.warning("control commands: Redis at %s unavailable (%s)", self.store.safe, e)
        if self._conn is not None:
            self._conn.disconnect()
            self.store.r.connection_pool.release(self._conn)
            self._conn = None
        self._retry_at = time.monotonic() + 1.0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None


class RedisSupervisor(SupervisorConnection):
    """Heartbeats as a key with expiry; a dead process's entries re-queued by deaths.py's rules."""

    def __init__(self, address: str, key: bytes, sid: str) -> None:
        self.store = Store(address, key)
        self.key = key
        self.sid = sid
        self.queues: list[str] = []
        self._messages: list[dict] = []
        self._ever = False
        self._backoff = Backoff()
        self._events = stored_events.SupervisorEvents(stored_events.EventWriter(self.store), sid)
        check(self.store.r, self.store.safe)
        self.store.check_key(key)  # before any process is started
        self._control = ControlReader(self.store)

    def heartbeat(self, info: dict) -> None:
        # every queue ever consumed: a dead process's entries are looked for in each
        self.queues = list(dict.fromkeys([*self.queues, *info.get("queues", ())]))
        if self._backoff.waiting():  # Redis is away: keep waiting, keep the processes
            self._messages.append({"k": "hb"})
            return
        try:
            pipe = self.store.r.pipeline(transaction=False)
            pipe.set(P + "hb:" + self.sid, json.dumps(info), px=int(policy.HEARTBEAT_TIMEOUT * 1000))
            pipe.sadd(P + "sups", self.sid)
            pipe.expire(P + "procs:" + self.sid, int(policy.HEARTBEAT_TIMEOUT * 3))
            counts = self._events.heartbeat(pipe, info, [int(p) for p in self._pids()])
            claim_key(pipe, self.key)  # the cluster's key may have changed: stop if so
            got = pipe.execute()
            compare_key(self.key, got[-1], self.store.safe)
            self._events.written(got, counts)
            answer = {"k": "hb"}
            if info.get("autoscale"):  # an autoscaling worker: how many tasks wait (as the ZeroMQ broker's)
                answer["queued"] = queued(self.store.r, info["queues"])
        except redis.RedisError as e:
            if not unreachable(e):
                raise nbq_error("heartbeat", self.store.safe, e) from None
            log.warning("heartbeat: Redis at %s unavailable (%s); retrying in %.1f s",
                        self.store.safe, e, self._backoff.failed())
            if not self._ever:
                return  # never reached: the supervisor gives up after its connect timeout
        else:
            self._ever = True
            self._backoff.reset()
            self._messages.append(answer)
            return
        self._messages.append({"k": "hb"})

    def _pids(self) -> list:
        try:
            return list(self.store.r.hvals(P + "procs:" + self.sid))
        except redis.RedisError:
            return []

    def lost(self, wid: str, how: str, at, end: dict | None = None,
             leaving: bool = False) -> None:
        st = self.store

        def handle():
            pid = st.r.hget(P + "procs:" + self.sid, wid)
            why = f"worker process {pid.decode() if pid else wid} {how}"
            for qk in stream_keys(st.r, self.queues):
                recover(st, qk, wid, self.sid, why, at, died=True, end=end)
            st.r.hdel(P + "procs:" + self.sid, wid)

        try:
            st.retry("re-queueing a dead process's tasks", handle, give_up=lambda: leaving)
        except NbqError as e:  # live workers claim them once this one's heartbeat expires
            log.warning("left worker process %s's tasks to live workers: Redis at %s is "
                        "unavailable (%s)", wid, st.safe, e)

    def answer(self, request: dict, name: str, reply) -> None:
        st = self.store
        rs = P + "rs:" + request["c"]
        blob = pack(st.signer.encode({"k": "ctlr", "ci": request["ci"], "name": name, "r": reply}))

        def send():
            pipe = st.r.pipeline(transaction=False)
            pipe.xadd(rs, {"m": blob})
            pipe.expire(rs, st.ttl_s)
            pipe.execute()

        st.retry("answering a control command", send)

    def poll(self, timeout: float, fds: list[int]) -> tuple[list[dict], list[int]]:
        if self._messages:
            timeout = 0
        control = self._control.fileno()
        try:
            ready, _, _ = select.select(fds + ([control] if control is not None else []),
                                        [], [], timeout)
        except InterruptedError:
            ready = []
        messages, self._messages = self._messages, []
        if control is not None and control in ready:
            messages.extend(self._control.read())
        return messages, [fd for fd in ready if fd != control]

    def close(self, goodbye: bool) -> None:
        st = self.store
        if goodbye:
            def leave():
                consumers = [w.decode() for w in st.r.hkeys(P + "procs:" + self.sid)] + [self.sid]
                for qk in stream_keys(st.r, self.queues):
                    for wid in consumers:
                        recover(st, qk, wid, self.sid)
                st.r.delete(P + "hb:" + self.sid, P + "procs:" + self.sid,
                            stored_events.counts_key(self.sid))
                st.r.srem(P + "sups", self.sid)
                self._events.offline("left")
            try:
                st.retry("leaving", leave, give_up=lambda: True)
            except NbqError as e:
                log.warning("could not leave Redis at %s in good order: %s", st.safe, e)
        self._control.close()
        st.close()
