"""A client's connection to Redis: a sender thread plays the broker's part; receive() reads rs:."""
from __future__ import annotations

import logging
import time
from collections import deque

import redis

from ... import events, protocol
from ...errors import BrokerUnavailable, NbqError, SignatureError
from ..base import MessageClient
from ..sendthread import SendThread
from .answers import ANSWERS, FALLBACK
from . import events as stored_events
from .connection import Batch, check, connect, raise_errors, send_batch
from .frames import entry_fields, pack, stored_apart
from .keys import P, group, queue_key, text
from .store import Store

log = logging.getLogger("nbq.transport.redis")

WAKE = {"k": "wake"}  # put to the sender thread by wake(): it adds an entry to wk:
TRIM_AFTER = 4 << 20      # a client trims what it has read of its rs: after 4 MiB or 64 messages


class RedisClient(MessageClient):
    """A client: a sender thread plays the broker's part for this client; receive() reads rs:.

    hello (the client's heartbeat too) is answered at once with Redis's run_id (the boot
    id), not behind this client's sends: a Redis that stops answering leaves the client's
    hellos unanswered, and one that restarted says so: the client then sends again the
    tasks lost() names, those Redis no longer knows (it came back empty).
    """

    durable = True  # queued work is in Redis (with AOF or RDB, through a restart too)

    def __init__(self, address: str, key: bytes, client_id: str, context=None) -> None:
        self.store = Store(address, key)
        self.max_message_size = self.store.settings.max_message_size
        self.raise_limit = ("raise the limit with ?max_message_size=BYTES in the Redis address "
                            "of the client and every worker")
        self.signer = self.store.signer
        self.cid = client_id
        try:
            check(self.store.r, self.store.safe)
            self.store.check_key(key)
        except NbqError:
            self.store.close()
            raise
        self._rx = connect(self.store.url, self.store.safe)  # the receiver's blocking reads
        self._rs, self._wk = P + "rs:" + client_id, P + "wk:" + client_id
        self._last = {self._rs: "0-0", self._wk: "0-0"}
        self._untrimmed = 0  # bytes read from rs: since it was last trimmed (64 KiB at least each)
        self._inbox: deque = deque()
        self._queues: set[tuple[str, int]] = set()  # (queue, priority) with a stream made sure of
        self._maps: set[str] = set()
        self._events = stored_events.EventWriter(self.store)
        self._sent = stored_events.SentEvents(self._events)  # task-sent, map-sent
        self._subs: dict[str, str] = {}  # event subscription -> the last nbq:ev entry it saw
        # task id -> (its entry "queue key entry id", mode, items) for unfinished tasks with
        # frames stored apart: the only entries of this client a worker may drop (_dropped)
        self._own: dict[str, tuple[str, str, int]] = {}
        self._sender = SendThread(f"nbq-redis-sender-{client_id}", self._handle, 2000,
                                  f"Redis at {self.store.safe}")

    def hello(self, rq: int | None) -> None:
        try:
            try:
                boot = self.store.r.info("server").get("run_id")
            except redis.ResponseError:  # INFO not allowed to this user: restarts are not seen
                self.store.r.ping()
                boot = None
        except redis.RedisError:
            return  # no answer: the client notices the silence
        self._reply_local({"k": "welcome", "rq": rq, "b": boot})

    def _put(self, header: dict, frames: list) -> None:
        self._sender.put(header, frames)

    def receive(self, timeout: float | None) -> list[tuple[dict, list]]:
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        if out:
            block = None
        else:
            block = 0 if timeout is None else max(1, int(timeout * 1000))
        trim = self._last[self._rs] if self._untrimmed >= TRIM_AFTER else None

        def read():  # a Batch: none of redis-py's per-command bookkeeping, raw replies
            batch = Batch()
            if trim is not None:
                batch.xtrim(self._rs, minid=trim)
            batch.commands.append(("XREAD", *(() if block is None else ("BLOCK", block)),
                                   "STREAMS", *self._last, *self._last.values()))
            return raise_errors(send_batch(self._rx, batch.commands))[-1]

        # an outage returns after about timeout, so that the client's heartbeat goes on
        until = time.monotonic() + (1.0 if timeout is None else timeout)
        try:
            got = self.store.retry("receiving", read,
                                   give_up=lambda: self._sender.closing or time.monotonic() > until)
        except BrokerUnavailable:
            return out
        if trim is not None:
            self._untrimmed = 0
        large: list = []  # (task id, bytes, keys) of results read with frames stored apart
        for stream, entries in got.items() if isinstance(got, dict) else got or ():  # RESP3, 2
            stream = text(stream)
            for eid, flat in entries:
                fields = dict(zip(flat[::2], flat[1::2]))
                self._last[stream] = eid.decode() if isinstance(eid, bytes) else eid
                if stream in (stored_events.STREAM, stored_events.BEATS):
                    out += self._live(stream, self._last[stream], fields)
                elif stream == self._rs and fields and b"m" in fields:
                    self._untrimmed += max(len(fields[b"m"]), TRIM_AFTER // 64)
                    decoded = self.store.decode(fields[b"m"], f"entry {eid!r} of {stream}")
                    if decoded is not None and decoded[0].get("k") == "dropped":
                        decoded = self._dropped(decoded[0])
                    elif decoded is not None and decoded[0].get("k") == "res":
                        large += stored_apart(decoded[0], fields[b"m"])
                        if self._own:
                            for item in decoded[0]["t"]:
                                self._own.pop(item["id"], None)
                    if decoded is not None:
                        out.append(decoded)
        if large:
            self.store.keep(large)
        while self._inbox:
            out.append(self._inbox.popleft())
        return out

    def _dropped(self, header: dict) -> tuple[dict, list] | None:
        """A worker's (signed) notice that it dropped a bad entry whose header names one of this
        client's tasks.  If that entry is the one this client added for the task (its frames
        stored apart are gone or changed, or pass the worker's max_message_size), the task
        fails here with SignatureError; else (a forged entry or a copy naming the task) nothing
        changes: unverified bytes never fail anyone's task, and the task's own entry still runs.
        Only entries with frames stored apart are known (_own): no other entry of a client
        with the right key fails to verify at a worker with the right key."""
        tid, why = header.get("id"), header.get("why")
        own = self._own.get(tid)
        if own is None or own[0] != header.get("e"):
            log.warning("a worker dropped an entry naming task %s that is not this client's own "
                        "(%s): ignored", tid, why)
            return None
        del self._own[tid]
        _, mode, n = own
        err = protocol.error_record(SignatureError(
            f"task {tid} was dropped by a worker, unrun: {why}"))
        if mode == "call":
            item, payload = {"id": tid, "s": 0, "n": 1, "ok": 0}, protocol.dumps(err)
        else:
            item = {"id": tid, "s": 0, "n": n}
            payload = protocol.dumps(([None] * n, dict.fromkeys(range(n), err)))
        item["nf"] = len(payload)
        return {"k": "res", "t": [item]}, payload

    def wake(self) -> None:
        """The receiver's XREAD returns when an entry reaches wk:, which the sender thread adds
        with what it sends next: the caller (a submit in a burst) does not wait for Redis."""
        self._sender.put(WAKE, ())

    def _wake_now(self, batch: Batch | None = None) -> None:
        """Add the entry to wk: that makes the receiver's XREAD return (to batch, if given)."""
        try:
            (batch or self.store.r).xadd(self._wk, {"w": b""}, maxlen=1, approximate=False)
        except redis.RedisError:
            pass

    def close(self) -> None:
        self._sender.close()
        try:
            self.store.r.delete(self._rs, self._wk)
        except redis.RedisError:
            pass
        self.store.close()
        self._rx.close()

    # -- the sender thread: the broker's part for this client ------------------

    def _reply_local(self, header: dict, frames: list = ()) -> None:
        self._inbox.append((header, list(frames)))
        self._wake_now()

    def _handle(self, batch: list) -> None:
        simple: list = []
        wake = False
        for header, frames in batch:
            if header is WAKE:
                wake = True
            elif header["k"] == "events":
                self._flush(simple)
                simple = []
                self._subscribe(header)
            elif header["k"] in FALLBACK:
                self._flush(simple)
                simple = []
                if header["k"] == "cancel":  # no more this client's own to fail (_dropped)
                    for tid in header["ids"]:
                        self._own.pop(tid, None)
                answer, messages = self._answer(header)
                self._inbox.append(({"k": "reply", "rq": header.get("rq"), "r": answer}, []))
                self._inbox.extend(messages)
                self._wake_now()
            else:
                simple.append((header, frames))
        self._flush(simple, wake)

    def _answer(self, header: dict) -> tuple[dict, list]:
        """A request's answer from Redis state, and the messages it brings (stored results)."""
        answer = ANSWERS[header["k"]]
        try:
            return self.store.retry(header["k"], lambda: answer(self.store, self.cid, header),
                                    give_up=lambda: self._sender.closing)
        except Exception:  # the request must still be answered, or the caller waits
            if not self._sender.closing:  # closing: a dead Redis is not retried, nor an error
                log.exception("error answering %r from Redis state", header["k"])
            return FALLBACK[header["k"]], []

    def _flush(self, messages: list, wake: bool = False) -> None:
        """Send tasks, functions and map records (one round trip), then wake the receiver if asked."""
        if not messages:
            if wake:
                self._wake_now()
            return
        st = self.store
        for header, _ in messages:
            if header["k"] == "tasks":
                for item in header["t"]:
                    lane = (item.get("q", "default"), item.get("pr", 0))
                    if lane not in self._queues:
                        st.retry("creating a queue", lambda: group(st.r, *lane))
                        self._queues.add(lane)
        cmds: list = []  # (method, args, kwargs): a pipeline is rebuilt for each attempt
        hashes = set()
        tasks: list = []  # SUBMIT's arguments for each task
        big: dict = {}  # task id -> (queue key, mode, items) of tasks with frames stored apart
        ntasks = 0
        chunked: set[str] = set()  # maps given chunks here: their chunk lists' expiry renewed once
        now = time.time()
        for header, frames in messages:
            k = header["k"]
            if k == "fn":
                fk = P + "fn:" + header["h"]
                if header.get("name"):
                    self._sent.names[header["h"]] = header["name"]
                blob = pack(self.signer.encode({"k": "fn", "h": header["h"],
                                                "name": header.get("name", "")}, frames))
                # SET, not SET NX: whatever is stored under the key (a blob a worker refused)
                # is replaced; once per client and function (and again after a refusal)
                cmds.append(("set", (fk, blob), {"ex": st.ttl_s}))
            elif k == "tasks":
                for item, payload in protocol.split(header["t"], frames):
                    item["c"] = self.cid
                    spill = st.frames.spiller(payload)
                    fields = entry_fields(self.signer.encode({"k": "tasks", "t": [item]}, payload),
                                          spill)
                    qk = queue_key(item.get("q", "default"), item.get("pr", 0))
                    tasks += [item["id"], qk, 2 * len(fields),
                              *(x for kv in fields.items() for x in kv)]
                    if "b" in fields:
                        big[item["id"]] = (qk, item.get("m", "call"), item.get("n", 1))
                    ntasks += 1
                    hashes.add(item.get("h"))
                    mp = item.get("mp")
                    self._sent.task(now, item)
                    if mp is not None:
                        if mp not in self._maps:
                            self._maps.add(mp)
                            cmds.append(("hset", (P + "m:" + mp,), {"mapping": {
                                "star": int(item.get("m") == "star"), "c": self.cid}}))
                            cmds.append(("expire", (P + "m:" + mp, st.ttl_s), {}))
                        cmds.append(("rpush", (P + "mc:" + mp,
                                               f"{item['id']} {item.get('s0', 0)} {item.get('n', 1)}"), {}))
                        chunked.add(mp)
            elif k == "mapend":
                self._sent.map_sent(header["mp"], None, header["total"])
                cmds.append(("hset", (P + "m:" + header["mp"], "total", header["total"]), {}))
                cmds.append(("expire", (P + "m:" + header["mp"], st.ttl_s), {}))
        cmds += [("expire", (P + "mc:" + mp, st.ttl_s), {}) for mp in chunked]
        hashes.discard(None)
        events = self._events.commands if self._events else None  # after the tasks (best effort)

        def before(batch: Batch) -> None:
            for name, args, kwargs in cmds:
                getattr(batch, name)(*args, **kwargs)

        def after(batch: Batch) -> None:
            if events:
                events(batch)
            if wake:
                self._wake_now(batch)

        def execute():
            if tasks:  # after the functions they name, in one step with their owners
                return st.run_script(st.submit, [P, st.ttl_s, self.cid, len(hashes), *hashes,
                                                 ntasks, *tasks], before if cmds else None,
                                     after if events or wake else None)
            batch = Batch()
            before(batch)
            after(batch)
            raise_errors(send_batch(st.r, batch.commands))
            return []

        if cmds or tasks:
            added = st.retry("sending", execute)
            for tid, eid in zip(added[::2], added[1::2]) if big else ():
                qk, mode, n = big[text(tid)]
                self._own[text(tid)] = (f"{qk} {text(eid)}", mode, n)
        elif wake:
            self._wake_now()

    def _subscribe(self, header: dict) -> None:
        """An events subscription (sender thread): the stored events, then live ones (receive)."""
        sub = header["sub"]
        if not header["live"]:
            self._subs.pop(sub, None)
            if not self._subs:
                self._last.pop(stored_events.STREAM, None)
                self._last.pop(stored_events.BEATS, None)
            return
        since = header.get("since")
        past, last, last_beat = self.store.retry("reading events", lambda: stored_events.history(
            self.store, time.time() if since is None else since))
        for batch in events.batches(past):
            self._inbox.append(({"k": "ev", "sub": sub, "ev": batch}, []))
        self._last.setdefault(stored_events.STREAM, last)
        self._last.setdefault(stored_events.BEATS, last_beat)
        self._subs[sub] = last
        self._wake_now()

    def _live(self, stream: str, eid: str, fields: dict) -> list:
        """ev messages of a live event entry, for each subscription that has not seen it."""
        new = stored_events.decode(self.store, fields, f"event entry {eid}")
        out = []
        for sub, seen in list(self._subs.items()):
            if stream == stored_events.BEATS or stored_events.after(eid, seen):
                out.append(({"k": "ev", "sub": sub, "ev": new}, []))
        return out if new else []

    def lost(self, ids: list[str]) -> list[str]:
        """Tasks with neither an owner (o:, from SUBMIT until done) nor a result (r:): those
        a Redis that restarted without its data lost.  Its queues and maps are made again."""
        self._queues.clear()
        self._maps.clear()

        def ask():
            pipe = self.store.r.pipeline(transaction=False)
            for tid in ids:
                pipe.exists(P + "o:" + tid, P + "r:" + tid)
            return pipe.execute()
        return [tid for tid, n in zip(ids, self.store.retry("looking for lost tasks", ask)) if not n]
