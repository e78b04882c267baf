"""A worker process's connection to RabbitMQ: consume its queues with manual acks, verify and
start each task (the backend refuses revoked and finished ones), publish results and ack
them in one transaction, stream output, send "started" and retry notices."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ... import deaths, policy, protocol
from ...errors import FunctionRefused, NbqError, WorkerLost
from ..base import WorkerConnection
from ..notices import StartedNotices
from ..redis.events import ProcessEvents
from . import names
from .backend import Backend
from .client import declare_task_queue
from .connection import Link, check_cluster_key
from .messages import Codec, props

log = logging.getLogger("nbq.transport.amqp")

FUNCTION_WAIT = 10.0      # a function not stored yet is waited for this long
DEATH_WAIT = 0.3          # a task started before and delivered again: its supervisor's count
                          # of a death is waited for this long (once per batch)
RESULT_HEADROOM = 1 << 16


class Outbox:
    """A second link for what other threads send while a task runs: streamed output and
    "started" notices (for tasks still running STARTED_DELAY after they started)."""

    def __init__(self, address: str, codec: Codec, backend: Backend | None) -> None:
        self._address = address
        self._codec = codec
        self._backend = backend  # its events (the process's received ones) go with the notices
        self._link: Link | None = None
        self._lock = threading.Lock()
        self.notices = StartedNotices(self._tell)

    def send(self, cid: str, header: dict, frames=()) -> None:
        """Best effort: dropped if RabbitMQ cannot take it now."""
        blob = self._codec.encode(header, frames)
        with self._lock:
            try:
                if self._link is None:
                    self._link = Link(self._address, transactional=False)
                self._link.call("sending output", lambda: self._link.ch.basic_publish(
                    "", names.client(cid), blob, props()), give_up=lambda: True)
            except NbqError:
                pass

    def _tell(self, due: dict[str, list[str]]) -> None:
        """Send the due "started" notices, with the process's events when there is a backend."""
        for c, ids in due.items():
            self.send(c, {"k": "started", "ids": ids})
        if self._backend is not None:
            try:
                self._backend.events.flush()
            except NbqError as e:
                log.warning("could not write events: %s", e)

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._link.close()


class AmqpWorker(WorkerConnection):
    """One consumer of its queues: prefetch = the batch its measured costs allow (1 at first)."""

    def __init__(self, address: str, key: bytes, wid: str, hello: dict) -> None:
        self.wid = wid
        self.queues: list[str] = list(hello["queues"])
        self.codec = Codec(key)
        self._deliveries: deque = deque()   # (generation, tag, routing key, body)
        self._batch: dict[str, tuple[int, int, dict]] = {}  # task id -> (generation, tag, item)
        self._reported: set[str] = set()
        self._apart: dict[str, list] = {}  # task id -> keys of its large frames stored apart
        self._functions: dict[str, list] = {}
        self._costs = policy.Costs()
        self._prefetch = 0   # the batch size (power of two, from measured costs)
        self._prefetched: list = []  # the next batch, taken (started) when the last one ended
        self._link = Link(address, self._on_connect)
        self.settings = self._link.settings
        # With a result backend, RabbitMQ delivers one task more than the batch: report() takes
        # it (marked started in the backend) before the batch's results are published, as the
        # ZeroMQ broker hands a worker its next task with its "ready" -- so a client that sees
        # a result and cancels what follows finds the next task started, not revoked.
        self._extra = 1 if self.settings.result_backend else 0
        self._link.call("connecting", lambda: None)
        check_cluster_key(self._link, key)  # before any task is taken: KeyMismatch
        self.max_result = self.settings.max_message_size - RESULT_HEADROOM
        self.backend = (Backend(self.settings.result_backend, key, self.settings.result_expires)
                        if self.settings.result_backend else None)
        if self.backend is not None:
            self.codec.frames = self.backend.store.frames  # large frames stored apart there
        # its events and counts (redis/events.py), written with its results
        self._seen = ProcessEvents(self.backend.events, wid, hello["sup"]) if self.backend else None
        self._outbox = Outbox(address, self.codec, self.backend)
        joined = self.codec.encode({"k": "joined", "w": wid, "pid": hello["pid"]})
        self._link.call("joining", lambda: self._commit_publish(names.supervisor(hello["sup"]), joined))

    def _commit_publish(self, queue: str, blob: bytes) -> None:
        self._link.ch.basic_publish("", queue, blob, props())
        self._link.ch.tx_commit()

    def _on_connect(self, link: Link) -> None:
        self._deliveries.clear()  # unacked ones come again, on the new connection
        self._prefetched = []
        self._prefetch = 1
        link.ch.basic_qos(prefetch_count=1 + self._extra, global_qos=True)  # channel-wide:
        # changes apply at once
        for q in self.queues:
            declare_task_queue(link.ch, names.queue(q))
            link.ch.basic_consume(names.queue(q), self._on_message)
        link.ch.tx_commit()

    def _on_message(self, ch, method, properties, body) -> None:
        self._deliveries.append((self._link.generation, method.delivery_tag, method.routing_key, body))

    def fetch(self, timeout: float | None = None) -> list[tuple[dict, list]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        batch, self._prefetched = self._prefetched, []
        if batch:
            return batch
        while True:
            if self._deliveries:
                # what else has arrived: a batch is every delivery buffered (up to prefetch)
                self._link.call("fetching tasks", lambda: self._link.conn.process_data_events(0))
                batch = self._take()
                if batch:
                    return batch
                continue
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return []
            if self._seen:  # about to wait: what it saw goes now
                self._write_events()
            self._link.call("fetching tasks",
                            lambda: self._link.conn.process_data_events(time_limit=left),
                            give_up=lambda: False)

    def _take(self) -> list[tuple[dict, list]]:
        """The deliveries received (a batch at most), verified and started; bad and revoked
        ones acked, unrun."""
        good, drop = [], []
        while self._deliveries and len(good) + len(drop) < max(1, self._prefetch):
            gen, tag, rk, body = self._deliveries.popleft()
            item = self._verify(rk, body)
            if item is None:
                drop.append((gen, tag))
            else:
                good.append((gen, tag, *item))
        if good and self.backend is not None:
            flags = self.backend.start([item["id"] for _, _, item, _ in good])
            skipped = [(g, f) for g, f in zip(good, flags) if f in ("revoked", "done")]
            again = [g for g, f in zip(good, flags) if f == "again"]
            good = [g for g, f in zip(good, flags) if f in ("run", "again")]
            if again:
                good = self._after_deaths(good, again, drop)
            for (gen, tag, item, _), flag in skipped:
                drop.append((gen, tag))
                if flag == "revoked" and item.get("c"):
                    self._outbox.send(item["c"], {"k": "res", "t": [
                        {"id": item["id"], "rv": 1, "s": 0, "n": 1, "nf": 0}]})
        if drop:
            self._commit([], drop)
        for gen, tag, item, _ in good:
            self._batch[item["id"]] = (gen, tag, item)
        self._outbox.notices.running([item for _, _, item, _ in good])
        if self._seen is not None:
            self._seen.received([item for _, _, item, _ in good])
        return [(item, payload) for _, _, item, payload in good]

    def _after_deaths(self, good: list, again: list, drop: list) -> list:
        """Tasks run again after their process died: those whose deaths (counted by its
        supervisor, which may lag RabbitMQ's redelivery by a poll: waited for DEATH_WAIT)
        reached max_task_deaths fail with WorkerLost, item by item (deaths.py); the rest run
        item by item, skipping the failed ones."""
        ids = [item["id"] for _, _, item, _ in again]
        counted = self.backend.deaths(ids)
        if len(counted) < len(ids):
            time.sleep(DEATH_WAIT)
            counted = self.backend.deaths(ids)
        ended, parts = set(), []
        for gen, tag, item, payload in again:
            dd = counted.get(item["id"])
            if not dd:
                continue  # its connection dropped, or it was only held: not its fault
            n = item.get("n", 1)
            todo = [p for p in self.backend.store.delivered(item["id"], n)
                    if p not in set(item.get("ex", ()))]
            fail = [p for p in todo if dd.get("a", 0) + dd.get(str(p), 0) >= deaths.limit(item)]
            for p in fail:
                parts.append(deaths.failure(item, p, 1, WorkerLost(
                    f"task {item['id']}" + (f" (item {item.get('s0', 0) + p})" if n > 1 else "")
                    + f": its worker process died {dd.get('a', 0) + dd.get(str(p), 0)} times while "
                    f"running it (max_task_deaths={deaths.limit(item)})")))
            rest = [p for p in todo if p not in fail]
            if not rest:
                ended.add(item["id"])
                drop.append((gen, tag))
            elif fail:
                item.update(st=1, skip=rest[0], ex=sorted(set(item.get("ex", ())) | set(fail)))
            if parts:
                self._send_parts(item, parts, done=not rest)
                parts = []
        return [g for g in good if g[2]["id"] not in ended]

    def _send_parts(self, task: dict, parts: list, done: bool) -> None:
        """Result parts of a task decided here (not run): stored, sent to its owner and watchers."""
        stored = [(i["id"], self.codec.encode({"k": "res", "t": [dict(i, s0=task.get("s0", 0))]}, p))
                  for i, p in parts]
        watchers = self.backend.results(stored, [task["id"]] if done else [])
        sends = [(w, blob) for (_, blob), ws in zip(stored, watchers) for w in ws]
        if task.get("c"):
            sends += [(task["c"], blob) for _, blob in stored]
        self._commit(sends, [])

    def _verify(self, rk: str, body: bytes) -> tuple[dict, list] | None:
        apart: list = []
        decoded = self.codec.decode(body, f"a task on {rk}", apart)
        if decoded is None:
            return None
        header, payload = decoded
        items = header.get("t")
        if header.get("k") != "tasks" or not isinstance(items, list) or len(items) != 1 \
                or not isinstance(items[0], dict) or not isinstance(items[0].get("id"), str):
            log.warning("dropped a message on %s: it is not one task", rk)
            return None
        if names.queue(items[0].get("q", "default")) != rk:
            log.warning("dropped task %s on %s: it was signed for queue %r", items[0]["id"], rk,
                        items[0].get("q", "default"))
            return None
        if apart:  # deleted once the task is acked (a redelivery needs them until then)
            self._apart[items[0]["id"]] = apart
        return items[0], payload

    def function(self, h: str) -> list:
        if h in self._functions:
            return self._functions[h]
        deadline = time.monotonic() + FUNCTION_WAIT

        def get():
            ch = self._link.conn.channel()
            try:
                ch.queue_declare(names.function(h), passive=True)
            except Exception:  # not shipped yet (or expired)
                return None
            method, _, body = ch.basic_get(names.function(h), auto_ack=False)
            if method is not None:
                ch.basic_nack(method.delivery_tag, requeue=True)
            ch.close()
            return body

        while True:
            body = self._link.call("fetching a function", get)
            if body is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if body is None:
            raise NbqError(f"function {h} is not stored at {self._link.safe} (expired?)")
        decoded = self.codec.decode(body, f"function {h}")
        if decoded is None:
            raise FunctionRefused(h, "what is stored under its name is not signed under the shared key")
        header, payload = decoded
        if header.get("k") != "fn" or header.get("h") != h:
            raise FunctionRefused(h, "what is stored under its name is another message")
        if self._seen is not None and isinstance(header.get("name"), str) and header["name"]:
            self._seen.names[h] = header["name"]
        if protocol.function_hash(b"".join(bytes(memoryview(f)) for f in payload)) != h:
            raise FunctionRefused(h, "the stored payload's hash is not the function's")
        self._functions[h] = payload
        return payload

    def report(self, results: list[tuple[dict, list]], ready: bool) -> None:
        self._outbox.notices.done(item["id"] for item, _ in results)
        by_client: dict[str, list] = {}
        stored, parts = [], []
        last = None
        spill = self.codec.spiller([f for _, payload in results for f in payload])
        for item, payload in results:
            entry = self._batch.get(item["id"])
            task = entry[2] if entry else {"id": item["id"]}
            last = task.get("h")
            self._costs.add(last, item.get("d"))
            item = dict(item, s0=task.get("s0", 0))
            by_client.setdefault(task.get("c", ""), []).append((item, payload))
            parts.append((task, item, payload))
            self._reported.add(item["id"])
            if self.backend is not None:
                stored.append((item["id"], self.codec.encode({"k": "res", "t": [item]}, payload,
                                                             spill)))
        acks, done = [], []
        if ready:
            for tid in list(self._batch):
                if tid in self._reported:
                    gen, tag, _ = self._batch.pop(tid)
                    acks.append((gen, tag))
                    done.append(tid)
            self._reported -= set(done)
        sends = []
        if ready and self._extra:  # the next batch, started before these results are seen
            # (its deliveries came while this batch ran: read without waiting)
            self._link.call("fetching tasks", lambda: self._link.conn.process_data_events(0))
            if self._deliveries:
                self._prefetched = self._take()
        if self._seen is not None:
            self._seen.results(parts)
        if self.backend is not None and (stored or done):
            watchers = self.backend.results(stored, done, self._seen)
            for (tid, blob), ws in zip(stored, watchers):
                sends += [(w, blob) for w in ws]
        for c, mine in by_client.items():
            if c:
                sends.append((c, self.codec.encode({"k": "res", "t": [i for i, _ in mine]},
                                                   [f for _, p in mine for f in p], spill)))
        self._commit(sends, acks)
        apart = [k for tid in done for k in self._apart.pop(tid, ())]
        if apart:
            self.backend.forget(apart)
        if ready:
            want = 1 << (self._costs.batch(last).bit_length() - 1)  # a power of two: few changes
            if want != self._prefetch:
                self._prefetch = want
                self._link.call("setting prefetch", lambda: self._link.ch.basic_qos(
                    prefetch_count=want + self._extra, global_qos=True))

    def _commit(self, sends: list[tuple[str, bytes]], acks: list[tuple[int, int]]) -> None:
        """Publish and ack in one transaction (acks of a lost connection are skipped: RabbitMQ
        delivers those tasks again, and the backend or the client keeps one result)."""
        def commit():
            ch = self._link.ch
            for cid, blob in sends:
                ch.basic_publish("", names.client(cid), blob, props())
            for gen, tag in acks:
                if gen == self._link.generation:
                    ch.basic_ack(tag)
            ch.tx_commit()
        self._link.call("reporting results", commit, give_up=lambda: False)

    def _write_events(self) -> None:
        try:
            self.backend.write_events(self._seen)
        except NbqError as e:
            log.warning("could not write events: %s", e)

    def notice(self, ids: list[str], state: str) -> None:
        if state == "RETRY":
            self._outbox.notices.done(ids)
        if self._seen is not None:
            self._seen.notice([e[2] for e in map(self._batch.get, ids) if e is not None], state)
            self._write_events()
        for tid in ids:
            entry = self._batch.get(tid)
            if entry and entry[2].get("c"):
                self._outbox.send(entry[2]["c"], {"k": "state", "ids": [tid], "state": state})

    def output(self, task: dict, frames: list) -> None:
        if task.get("c"):
            self._outbox.send(task["c"], {"k": "out", "id": task["id"]}, frames)

    def close(self) -> None:
        self._outbox.close()
        self._link.close()
        if self.backend is not None:
            self.backend.close()
