"""A client's connection to RabbitMQ: a sender thread publishes (one transaction per batch, so
a submit that returns has been accepted) and answers requests; receive() consumes its queue."""
from __future__ import annotations

import logging
import time
from collections import deque

import pika

from ... import protocol
from ...errors import BrokerUnavailable, NbqError
from ..base import MessageClient
from ..sendthread import SendThread
from ..redis import answers
from ..redis import events as stored_events
from ..redis.frames import stored_apart
from . import names
from .backend import Backend
from .connection import Link, check_cluster_key
from .eventing import Feed
from .messages import Codec, props
from .status import ask_supervisors, queue_lengths

log = logging.getLogger("nbq.transport.amqp")

NO_BACKEND = ("needs a result backend on amqp://: add ?result_backend=redis://HOST:PORT/DB "
              "(URL-encoded) to the RabbitMQ address of the client and every worker, as "
              "Celery's result_backend setting")
BATCH = 2000            # messages published in one transaction at most


class AmqpClient(MessageClient):
    """A client: a sender thread publishes tasks and answers requests from RabbitMQ (and the
    result backend); receive() reads the client's own queue nbq.c.{id}."""

    durable = True  # durable queues, persistent messages: queued work survives a restart

    def __init__(self, address: str, key: bytes, client_id: str, context=None) -> None:
        self.cid = client_id
        self.codec = Codec(key)
        self._queue = names.client(client_id)
        self._declared: set[str] = set()
        self._tx = Link(address, self._on_connect)
        self.settings = self._tx.settings
        self.max_message_size = self.settings.max_message_size - 4096
        self.raise_limit = ("raise RabbitMQ's max_message_size and ?max_message_size=BYTES in the "
                            "RabbitMQ address of the client and every worker")
        self._tx.call("connecting", lambda: None)
        check_cluster_key(self._tx, key)
        self.backend = (Backend(self.settings.result_backend, key, self.settings.result_expires)
                        if self.settings.result_backend else None)
        if self.backend is not None:
            self.codec.frames = self.backend.store.frames  # large frames stored apart there
        self._sent = stored_events.SentEvents(self.backend.events) if self.backend else None
        self._feed = Feed(self.backend.store, self._deliver) if self.backend else None
        self._got: list = []        # (header, frames) consumed, not yet returned
        self._last_tag = None       # the last delivery consumed, acked on the next receive
        self._rx = Link(address, self._on_receiver_connect, transactional=False)
        self._rx.call("connecting", lambda: None)  # now: wake() needs its connection
        self._inbox: deque = deque()
        self._sender = SendThread(f"nbq-amqp-sender-{client_id}", self._handle, BATCH,
                                  f"RabbitMQ at {self._tx.safe}")

    def _on_connect(self, link: Link) -> None:
        self._declared.clear()
        self._declare(link.ch, self._queue)

    def _declare(self, ch, queue: str) -> None:
        ms = int(self.settings.result_expires * 1000)
        ch.queue_declare(queue, durable=True, arguments={"x-expires": ms})

    def _on_receiver_connect(self, link: Link) -> None:
        self._declare(link.ch, self._queue)
        link.ch.basic_qos(prefetch_count=1000)
        link.ch.basic_consume(self._queue, self._on_message)

    def _on_message(self, ch, method, properties, body) -> None:
        self._last_tag = method.delivery_tag
        decoded = self.codec.decode(body, f"a message on {self._queue}")
        if decoded is not None:
            self._got.append(decoded)
            if self.codec.frames is not None and decoded[0].get("k") == "res":
                large = stored_apart(decoded[0], body)
                if large:  # kept for by-id lookups within result_budget (as on Redis)
                    self.backend.store.keep(large)

    def hello(self, rq: int | None) -> None:
        self._put({"k": "hello", "rq": rq}, [])

    def _put(self, header: dict, frames: list) -> None:
        self._sender.put(header, frames)

    def receive(self, timeout: float | None) -> list[tuple[dict, list]]:
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        wait = 0 if out else (1.0 if timeout is None else timeout)
        until = time.monotonic() + wait

        def read():
            if self._last_tag is not None:
                self._rx.ch.basic_ack(self._last_tag, multiple=True)
                self._last_tag = None
            if not self._got:
                self._rx.conn.process_data_events(time_limit=wait)
        try:
            self._rx.call("receiving", read,
                          give_up=lambda: self._sender.closing or time.monotonic() > until)
        except NbqError as e:
            if not isinstance(e, BrokerUnavailable):
                log.error("%s", e)
            self._last_tag = None  # unacked deliveries come again on the new connection
        out += self._got
        self._got = []
        while self._inbox:
            out.append(self._inbox.popleft())
        return out

    def wake(self) -> None:
        conn = self._rx.conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(lambda: None)
            except Exception:  # closed meanwhile: receive() returns on its own
                pass

    def close(self) -> None:
        self._sender.close()
        if self._feed is not None:
            self._feed.close()
        self._rx.close()
        self._tx.close()
        if self.backend is not None:
            self.backend.close()

    def events(self, sub: str, since: float | None, live: bool) -> None:
        if self._feed is None and live:
            raise NbqError(f"events {NO_BACKEND} (they are kept there)")
        super().events(sub, since, live)

    def _deliver(self, messages: list) -> None:
        """Messages for receive() from another thread (event subscriptions)."""
        self._inbox.extend(messages)
        self.wake()

    def watch(self, rq: int | None, ids=(), maps=()) -> None:
        if self.backend is None:
            raise NbqError(f"finding tasks or maps by id {NO_BACKEND}")
        super().watch(rq, ids, maps)

    # -- the sender thread -------------------------------------------------------

    def _reply(self, header: dict, messages: list = ()) -> None:
        self._inbox.append(({"k": "reply", "rq": header.get("rq"), "r": header["r"]}, []))
        self._inbox.extend(messages)
        self.wake()

    def _handle(self, batch: list) -> None:
        simple: list = []
        for header, frames in batch:
            k = header["k"]
            if k in ("fn", "tasks", "mapend"):
                simple.append((header, frames))
                continue
            self._publish(simple)
            simple = []
            if k == "events":
                if self._feed is not None:
                    self._feed.subscribe(header["sub"], header.get("since"), bool(header["live"]))
                continue
            if k == "hello":
                try:
                    self._tx.call("hello", lambda: self._tx.conn.process_data_events(0),
                                  timeout=0.5)
                except NbqError:
                    continue  # silence: the client notices it
                self._inbox.append(({"k": "welcome", "rq": header["rq"], "b": None}, []))
                self.wake()
            else:
                self._answer(header)
        self._publish(simple)

    def _answer(self, header: dict) -> None:
        k = header["k"]
        try:
            r, messages = getattr(self, "_" + k)(header)
        except Exception as e:  # the request must still be answered, or the caller waits
            log.error("answering %r failed: %s", k, e)
            r, messages = dict(answers.FALLBACK[k], error=str(e)), []
        self._reply(dict(header, r=r), messages)

    def _cancel(self, header: dict):
        if self.backend is None:
            return dict.fromkeys(header["ids"], False), []
        blobs = [(tid, self.codec.encode({"k": "res", "t": [{"id": tid, "rv": 1, "s": 0, "n": 1,
                                                              "nf": 0}]}))
                 for tid in header["ids"]]
        got = self.backend.cancel(blobs)
        stored_events.revoked(self.backend.store, [tid for (tid, _), (ok, _) in zip(blobs, got) if ok])
        tell = [(w, blob) for (tid, blob), (_, ws) in zip(blobs, got) for w in ws if w != self.cid]
        if tell:
            self._tx.call("telling watchers", lambda: self._send_to(tell))
        return {tid: ok for (tid, _), (ok, _) in zip(blobs, got)}, []

    def _send_to(self, messages: list[tuple[str, bytes]]) -> None:
        for cid, blob in messages:
            self._tx.ch.basic_publish("", names.client(cid), blob, props())
        self._tx.ch.tx_commit()

    def _watch(self, header: dict):
        return answers.watch(self.backend.store, self.cid, header)

    def _join(self, header: dict):
        if self.backend is None:
            return {"error": f"a chord {NO_BACKEND}"}, []
        return answers.join(self.backend.store, self.cid, header)

    def _claim(self, header: dict):
        if self.backend is not None:
            return answers.claim(self.backend.store, self.cid, header)
        return {"won": self._tx.call("claiming", lambda: self._claim_queue(header))}, []

    def _claim_queue(self, header: dict) -> bool:
        """Claim-once in RabbitMQ: the one confirmed publish to a queue of one message."""
        ch = self._tx.conn.channel()
        try:
            q = names.claim(header["key"])
            ch.queue_declare(q, durable=True, arguments={
                "x-max-length": 1, "x-overflow": "reject-publish",
                "x-expires": max(1, int(header["ttl"] * 1000))})
            ch.confirm_delivery()
            try:
                ch.basic_publish("", q, self.cid.encode(), props())
                return True
            except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
                return False
        finally:
            ch.close()

    def _info(self, header: dict):
        sups = self._tx.call("asking for info", lambda: ask_supervisors(self._tx, self.codec))
        queues = {q for s in sups for q in s["queues"]} | {"default"}
        lengths = self._tx.call("counting queues", lambda: queue_lengths(self._tx, sorted(queues)))
        workers = [{"id": s["sup"], "name": s.get("name", s["sup"]), "host": s["host"],
                    "pid": s["spid"], "concurrency": s["conc"], "queues": list(s["queues"]),
                    "active": s.get("active", 0), "processes": s.get("procs", []),
                    "memory": s.get("mem")} for s in sups]
        return {"workers": workers, "queues": lengths, "tasks": sum(lengths.values()),
                "results": 0, "dropped": {"signature": self.codec.dropped}}, []

    def _ctl(self, header: dict):
        dest = header.get("dest")
        sups = self._tx.call("asking for info", lambda: ask_supervisors(self._tx, self.codec))
        n = sum(1 for s in sups if dest is None or s.get("name") in dest or s["sup"] in dest)
        blob = self.codec.encode(header)

        def send():
            self._tx.ch.basic_publish(names.CTL, "", blob)
            self._tx.ch.tx_commit()
        self._tx.call("sending a control command", send)
        return {"n": n}, []

    def _publish(self, messages: list) -> None:
        if not messages:
            return
        chunks, ends, out = [], [], []
        now = time.time()
        for header, frames in messages:
            k = header["k"]
            if k == "fn":
                name = header.get("name", "")
                if name and self._sent is not None:
                    self._sent.names[header["h"]] = name
                out.append((names.function(header["h"]), self.codec.encode(
                    {"k": "fn", "h": header["h"], "name": name}, frames), 0))
            elif k == "tasks":
                for item, payload in protocol.split(header["t"], frames):
                    item["c"] = self.cid
                    if self._sent is not None:
                        self._sent.task(now, item)
                    q = item.get("q", "default")
                    out.append((names.queue(q), self.codec.encode(
                        {"k": "tasks", "t": [item]}, payload, self.codec.spiller(payload)),
                        item.get("pr", 0)))
                    if item.get("mp") is not None:
                        chunks.append((item["mp"], item["id"], item.get("s0", 0), item.get("n", 1),
                                       item.get("m") == "star"))
            elif k == "mapend":
                ends.append((header["mp"], header["total"]))
                if self._sent is not None:
                    self._sent.map_sent(header["mp"], None, header["total"])
        if self.backend is not None and (chunks or ends):
            self.backend.chunks(self.cid, chunks, ends)  # with the pending events
        ms = int(self.settings.result_expires * 1000)

        def send():
            ch = self._tx.ch
            for q, blob, pr in out:
                if q not in self._declared:
                    if q.startswith(names.P + "fn."):
                        ch.queue_declare(q, durable=True, arguments={
                            "x-max-length": 1, "x-overflow": "drop-head", "x-expires": ms})
                    else:
                        declare_task_queue(ch, q)
                    self._declared.add(q)
                ch.basic_publish("", q, blob, props(pr))
            ch.tx_commit()

        # through any outage, as Redis's client does: what the client submitted is kept until
        # RabbitMQ takes it (waits say BrokerUnavailable after broker_grace meanwhile)
        self._tx.call("sending", send, give_up=lambda: self._sender.closing)
        if self.backend is not None and self.backend.events:  # task-sent, map-sent: after the
            self.backend.write_events()                       # tasks, off a submit's path


def declare_task_queue(ch, q: str) -> None:
    """A task queue: classic, durable, priorities 0-9."""
    ch.queue_declare(q, durable=True, arguments={"x-max-priority": names.MAX_PRIORITY})
