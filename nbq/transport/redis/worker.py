"""A worker process's connection to Redis: take batches, store results and take the next
batch in one step, "started" and retry notices, output streaming, dead workers' tasks."""
from __future__ import annotations

import json
import logging
import random
import time
from collections import deque

import redis

from ... import policy, protocol
from ...errors import FunctionRefused, MessageTooLarge, NbqError
from ..base import WorkerConnection
from ..notices import StartedNotices
from . import events as stored_events
from . import scripts
from .frames import BadMessage, Spilled, entry_frames, pack
from .keys import GROUP, P, group, stream_keys, text
from .recovery import reclaim
from .store import Store

log = logging.getLogger("nbq.transport.redis")

BLOCK_MS = 1000           # a worker's XREADGROUP wait; reclaim checks run between waits
RECLAIM_EVERY = 1.0       # seconds between a worker's looks for dead workers' entries
EVENTS_EVERY = 0.1        # a busy worker process writes its events at most this often
FUNCTION_WAIT = 10.0      # a function not stored is waited for this long: a Redis that came back
                          # empty gets it again from its client (the tasks may come first)


def started_notices(st: Store, writer: stored_events.EventWriter) -> StartedNotices:
    """A worker process's "started" notices, each batch XADDed to its clients' result streams
    with the process's events (live) in one pipeline."""
    def tell(due: dict[str, list[str]]) -> None:
        def send():
            pipe = st.r.pipeline(transaction=False)
            for c, ids in due.items():
                pipe.xadd(P + "rs:" + c, {"m": pack(st.signer.encode({"k": "started", "ids": ids}))})
                pipe.expire(P + "rs:" + c, st.ttl_s)
            writer.commands(pipe)
            pipe.execute()

        try:
            st.retry("telling submitters", send)
        except NbqError as e:
            log.warning("could not send started notices: %s", e)

    return StartedNotices(tell)


def _too_large(item: dict, size: int, limit: int) -> tuple[dict, list]:
    """A result part too large to store, as the error saying so (for each item of a chunk)."""
    err = protocol.error_record(MessageTooLarge(
        f"the result of task {item['id']} is {size:,} bytes, more than max_message_size "
        f"({limit:,} bytes): return less (write large outputs to a file or a shared path), or "
        "raise the limit with ?max_message_size=BYTES in the Redis address of the client "
        "and every worker"))
    if "ok" in item:  # a call's result
        payload = protocol.dumps(err)
        return dict(item, ok=0, nf=len(payload)), payload
    n = item.get("n", 1)
    payload = protocol.dumps(([None] * n, dict.fromkeys(range(n), err)))
    return dict(item, nf=len(payload)), payload


class RedisWorker(WorkerConnection):
    """One consumer of the queues' groups: XREADGROUP, run, store results and XACK atomically."""

    def __init__(self, address: str, key: bytes, wid: str, hello: dict) -> None:
        self.store = Store(address, key)
        self.wid = wid
        self.sid = hello["sup"]
        st = self.store
        st.check_key(key)  # before reading any entry: a process with another key takes none

        def join():
            for q in hello["queues"]:
                group(st.r, q)
            st.r.hset(P + "procs:" + self.sid, wid, hello["pid"])
            st.r.expire(P + "procs:" + self.sid, int(policy.HEARTBEAT_TIMEOUT * 3))
            return stream_keys(st.r, hello["queues"])

        self.queues: list[str] = list(hello["queues"])
        self.keys = st.retry("joining", join)  # its queues' streams, read in this order
        # task id -> (queue key, entry id, item, keys of its frames stored apart)
        self._batch: dict[str, tuple[str, str, dict, list]] = {}
        self._reported: set[str] = set()  # tasks of the batch with a result sent before "ready"
        self._carried: set[str] = set()   # tasks held past their batch (due later): acked when done
        # entries found again after a connection error, or read with a more urgent one: run
        # one by one before any new ones are taken
        self._held: deque = deque()
        self._prefetched: list = []  # the next batch, taken (and started) when the last one ended
        self._after: dict[str, tuple[int, int]] = {}  # stream -> its last entry delivered here
        self._troubles_seen = self.store.troubles
        self._events = stored_events.EventWriter(self.store)
        self._names = self._events.names  # function hash -> name (signed in its fn message)
        self._seen = stored_events.ProcessEvents(self._events, wid, self.sid)
        self._events_due = 0.0  # when pending events go with the next results
        self._notices = started_notices(self.store, self._events)
        self._costs = policy.Costs()
        self._next_reclaim = time.monotonic() + random.random() * RECLAIM_EVERY

    def fetch(self, timeout: float | None = None) -> list[tuple[dict, list]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        batch, self._prefetched = self._prefetched, []
        while True:
            if time.monotonic() >= self._next_reclaim:  # busy or idle, every RECLAIM_EVERY
                self._next_reclaim = time.monotonic() + RECLAIM_EVERY
                try:
                    self._reclaim()
                except (redis.RedisError, NbqError) as e:
                    log.warning("looking for dead workers' tasks failed: %s", e)
            if batch:
                return batch
            left = BLOCK_MS if deadline is None else int(1000 * (deadline - time.monotonic()))
            if left <= 0:
                return []
            wait = BLOCK_MS
            if self._seen:  # about to wait: what it saw goes when due
                due = self._events_due - time.monotonic()
                if due <= 0:
                    self._write_pending()
                else:
                    wait = max(1, int(due * 1000))
            batch = self._next_batch(min(wait, left))

    def _next_batch(self, block_ms: int) -> list[tuple[dict, list]]:
        """The next batch, started; [] when none came within block_ms."""
        st = self.store
        if st.troubles != self._troubles_seen:
            # An XREADGROUP whose reply was lost with a connection left its entries
            # pending on this consumer, unseen: read this consumer's own history (id 0).
            self._troubles_seen = st.troubles
            held = {eid for _, eid, _ in self._held}
            got = st.retry("recovering tasks", lambda: st.r.xreadgroup(
                GROUP, self.wid, dict.fromkeys(self.keys, "0"), count=policy.BATCH_MAX))
            self._held.extend(self._delivered([(s.decode(), eid, f) for s, es in got or ()
                                               for eid, f in es if eid not in held]))
        held = bool(self._held)
        if held:
            entries = [self._held.popleft()]
        else:
            if len(self.keys) > len(self.queues):
                # priority streams: a backlog is taken most urgent first, as REPORT does
                # (XREADGROUP would return an entry of each stream that has any)
                taken = self._verify(st.store([], take=(self.wid, 1, "", self.queues)))
                if taken:
                    return self._begin(taken)
            flag, entries, taken = self._read(block_ms)
            # one entry of each stream that had any: the most urgent runs, the rest (pending
            # on this consumer now) are held to run next, one by one
            self._held.extend(entries[1:])
            entries = entries[:1]
            if flag == 0:
                return []  # revoked: acknowledged and deleted by the script, never run
            if flag == 1:
                return self._begin(self._verify(entries + taken))
        first = self._verify(entries)
        if not first:
            return []
        qk, eid, item, _, _ = first[0]
        h = item.get("h") or ""
        more = 0 if held else self._costs.batch(h) - 1
        got = st.retry("starting tasks", lambda: st.run_script(
            st.start, [P, st.ttl_s, self.wid, qk, eid, item["id"], more, h]))
        if not got[0]:
            return []  # revoked: acknowledged and deleted by the script, never run
        return self._begin(first + self._verify([scripts.taken(e) for e in got[1:]]))

    def _read(self, block_ms: int) -> tuple[int, list, list]:
        """A blocking XREADGROUP of an entry of each stream, and PICKUP sent behind it in the
        same write: (flag, the entries delivered, most urgent first, those taken with the
        first).  flag 1: the first is started; 0: it was revoked (acked and deleted); 2: it
        is to be verified and STARTed (PICKUP did not start it, or did not see it)."""
        st = self.store
        args: list = [P, st.ttl_s, self.wid, len(self.keys)]
        for k in self.keys:
            args += [k, "%d-%d" % self._after.get(k, (0, 0))]
        batch = self._costs.batches()
        args += [len(batch), *(x for hn in batch.items() for x in hn)]
        wait = ("XREADGROUP", "GROUP", GROUP, self.wid, "COUNT", 1, "BLOCK", block_ms,
                "STREAMS", *self.keys, *[">"] * len(self.keys))
        read, picked = st.retry("fetching tasks", lambda: st.run_script(
            st.pickup, args, whole=True, before=lambda b: b.commands.append(wait)))
        read = read.items() if isinstance(read, dict) else read or ()  # RESP3 or RESP2
        entries = self._delivered(sorted(
            ((text(s), eid, dict(zip(f[::2], f[1::2]))) for s, es in read for eid, f in es),
            key=lambda e: self.keys.index(e[0])))
        if not picked:
            return 2, entries, []
        flag, got, taken = picked
        return flag, self._delivered([scripts.taken(e) for e in got]), [
            scripts.taken(e) for e in taken]

    def _delivered(self, entries: list) -> list:
        """entries, noted as delivered to this consumer: PICKUP looks only past the last of
        each stream, so that it never starts an entry again that this worker already has."""
        for qk, eid, _ in entries:
            ms, _, seq = text(eid).partition("-")
            at = (int(ms), int(seq))
            if at > self._after.get(qk, (0, 0)):
                self._after[qk] = at
        return entries

    def _verify(self, entries: list) -> list:
        """(queue key, entry id, item, payload, fields) of entries that are verified tasks of
        the stream they came from; the others are dropped (Store.drop), never run."""
        self._delivered(entries)
        out, bad = [], []
        for qk, eid, fields in entries:
            try:
                if not fields:
                    raise BadMessage("invalid", "it has no fields (deleted?)")
                item, payload = self.store.task(qk, fields)
            except BadMessage as e:
                self.store.bad(e, f"entry {eid!r} of {qk}")
                bad.append((qk, eid, fields, e))
                continue
            out.append((qk, eid, item, payload, fields))
        if bad:
            self.store.drop(bad)
        return out

    def _begin(self, batch: list) -> list[tuple[dict, list]]:
        """The batch of started entries, noted for report() and for "started" notices."""
        if not batch:
            return []
        out = []
        for qk, eid, item, payload, fields in batch:
            spilled = ([f.key for f in entry_frames(fields) if isinstance(f, Spilled)]
                       if b"b" in fields else [])  # only an entry with frames stored apart has any
            self._batch[item["id"]] = (qk, eid, item, spilled)
            out.append((item, payload))
        self._seen.received([item for item, _ in out])
        self._notices.running([item for item, _ in out])
        return out

    def function(self, h: str) -> list:
        """The payload of the function stored under fn:{h}, if it is a signed function message
        whose signed hash and whose payload's own hash are h; else FunctionRefused (the client
        that sees it ships the function again: SET, replacing what is stored)."""
        deadline = time.monotonic() + FUNCTION_WAIT
        while True:
            blob = self.store.retry("fetching a function",
                                    lambda: self.store.r.get(P + "fn:" + h))
            if blob is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if blob is None:
            raise NbqError(f"function {h} is not stored at {self.store.safe} (expired?)")
        try:
            header, payload = self.store.verify(blob)
        except BadMessage as e:
            self.store.bad(e, f"function {h}")
            raise FunctionRefused(h, f"what is stored under its key is not signed under the "
                                     f"shared key ({e})") from None
        if header.get("k") != "fn" or header.get("h") != h:
            raise FunctionRefused(h, f"what is stored under its key is another message "
                                     f"({header.get('k')!r} for {header.get('h')!r})")
        if isinstance(header.get("name"), str) and header["name"]:
            self._names[h] = header["name"]
        if protocol.function_hash(b"".join(payload)) != h:
            raise FunctionRefused(h, "the stored payload's hash is not the function's")
        return payload

    def report(self, results: list[tuple[dict, list]], ready: bool) -> None:
        self._notices.done(item["id"] for item, _ in results)
        parts = []
        limit = self.store.settings.max_message_size
        for item, payload in results:
            if payload and protocol.frame_size(payload) > limit:
                item, payload = _too_large(item, protocol.frame_size(payload), limit)
            entry = self._batch.get(item["id"])
            task = entry[2] if entry else {"id": item["id"]}
            self._costs.add(task.get("h"), item.get("d"))
            parts.append((task, item, payload))
            self._reported.add(item["id"])
        self._seen.results(parts)
        acks, spilled = [], []
        for tid in self._carried & {item["id"] for item, _ in results}:
            self._carried.discard(tid)  # held past its batch (due later), now done
            qk, eid, _, keys = self._batch.pop(tid)
            acks.append((qk, eid, tid))
            spilled += keys
        if not ready:
            self._finish(parts, acks, spilled)
            return
        reported, self._reported = self._reported, set()
        last = ""  # the function of the batch's last task: the next batch may be more of it
        for tid, (qk, eid, task, keys) in list(self._batch.items()):
            if tid in reported:
                acks.append((qk, eid, tid))
                spilled += keys
                last = task.get("h") or ""
                del self._batch[tid]
            else:
                self._carried.add(tid)
        # The next batch is taken and started in the same step that stores these results,
        # as the ZeroMQ broker hands a worker its next task with its "ready": so a client
        # that sees a result and cancels what follows finds the next task started.
        ntake = 0 if self._held else self._costs.batch(last)  # held entries go first
        taken = self._finish(parts, acks, spilled, take=(self.wid, ntake, last, self.queues))
        self._prefetched = self._begin(self._verify(taken))

    def _write_pending(self) -> None:
        """Write the pending events and counts now (a round trip of their own)."""
        def write():
            pipe = self.store.r.pipeline(transaction=False)
            self._write_events(pipe)
            pipe.execute()
        try:
            self.store.retry("writing events", write)
        except NbqError as e:
            log.warning("could not write events: %s", e)

    def _write_events(self, pipe) -> None:
        """Add this process's pending events and counts to pipe (with its results): at most
        every EVENTS_EVERY seconds, with results or on their own once the process waits."""
        self._events_due = time.monotonic() + EVENTS_EVERY
        self._seen.commands(pipe, self.store.ttl_s)

    def notice(self, ids: list[str], state: str) -> None:
        st = self.store
        self._seen.notice([entry[2] for entry in map(self._batch.get, ids) if entry is not None],
                          state)
        if state == "RETRY":
            self._notices.done(ids)  # no "started" notice after this one
        msgs = [(tid, pack(st.signer.encode({"k": "state", "ids": [tid], "state": state})))
                for tid in ids]

        def tell():
            for tid, msg in msgs:
                st.notice(args=[P, st.ttl_s, tid, state, msg])
            self._events.flush()

        try:
            st.retry("telling a retry's clients", tell)
        except NbqError as e:
            log.warning("could not send %s notices: %s", state, e)

    def output(self, task: dict, frames: list) -> None:
        cid = task.get("c")
        if cid is None:
            return
        entry = {"m": pack(self.store.signer.encode({"k": "out", "id": task["id"]}, frames))}
        try:  # redis-py's pool is thread-safe: a task's threads print too
            pipe = self.store.r.pipeline(transaction=False)
            pipe.xadd(P + "rs:" + cid, entry)
            pipe.expire(P + "rs:" + cid, self.store.ttl_s)
            pipe.execute()
        except redis.RedisError:
            pass  # best effort: the output travels with the result too

    def _finish(self, parts: list, acks: list, spilled: list, take: tuple = ("", 0, "", ())) -> list:
        """Store results, acknowledge finished entries, drop their large inputs (no re-run needs them)."""
        due = self._seen and time.monotonic() >= self._events_due
        taken = self.store.store(parts, acks=acks, take=take,
                                 extra=self._write_events if due else None)
        if spilled:
            self.store.retry("deleting large inputs", lambda: self.store.r.delete(*spilled))
        return taken

    def _reclaim(self) -> None:
        """Follow the supervisor's queue list (add_consumer, cancel_consumer); claim and
        re-queue the entries of consumers whose supervisor's heartbeat expired (recovery.py)."""
        st = self.store
        hb = st.r.get(P + "hb:" + self.sid)
        try:  # unsigned: this process's supervisor rewrites it every heartbeat
            queues = json.loads(hb)["queues"] if hb is not None else None
            queues = queues if isinstance(queues, list) and all(isinstance(q, str) for q in queues) else None
        except (ValueError, TypeError, KeyError):
            queues = None
        if queues is not None:
            for q in set(queues) - set(self.queues):
                group(st.r, q)
            self.queues = queues
        self.keys = stream_keys(st.r, self.queues)  # and the priorities given streams since
        reclaim(st, self.keys, self.sid, self.wid)

    def close(self) -> None:
        self.store.close()
