"""A supervisor's connection to RabbitMQ: control commands and info requests from the nbq.ctl
fanout exchange; heartbeats are kept here and given to whoever asks (info)."""
from __future__ import annotations

import logging
import select
import time

from ... import deaths
from ...errors import NbqError
from ..base import SupervisorConnection
from ..redis.events import SupervisorEvents
from . import names
from .backend import Backend
from .connection import Link, check_cluster_key
from .messages import Codec, props
from .status import queue_lengths

log = logging.getLogger("nbq.transport.amqp")

POLL_SLICE = 0.05   # seconds between looks at RabbitMQ while waiting on the processes' fds


class AmqpSupervisor(SupervisorConnection):
    """Dead processes' tasks need no report: RabbitMQ delivers a closed connection's unacked
    tasks again at once.  A process killed on purpose (end) has its task ended in the backend,
    so its redelivery is refused."""

    def __init__(self, address: str, key: bytes, sid: str) -> None:
        self.sid = sid
        self.codec = Codec(key)
        self._messages: list[dict] = []
        self._procs: dict[str, int] = {}  # worker id -> pid of processes that joined
        self._info: dict = {"sup": sid, "host": "", "spid": 0, "conc": 0, "queues": []}
        self._link = Link(address, self._on_connect, transactional=False)
        self._link.call("connecting", lambda: None)
        check_cluster_key(self._link, key)
        settings = self._link.settings
        self.backend = (Backend(settings.result_backend, key, settings.result_expires)
                        if settings.result_backend else None)
        self._events = SupervisorEvents(self.backend.events, sid) if self.backend else None

    def _on_connect(self, link: Link) -> None:
        link.ch.exchange_declare(names.CTL, "fanout", durable=True)
        q = link.ch.queue_declare(names.supervisor(self.sid), exclusive=True,
                                  auto_delete=True).method.queue
        link.ch.queue_bind(q, names.CTL)
        link.ch.basic_consume(q, self._on_message, auto_ack=True)

    def _on_message(self, ch, method, properties, body) -> None:
        decoded = self.codec.decode(body, "a control message")
        if decoded is None:
            return
        header = decoded[0]
        if header.get("k") == "ctl":
            self._messages.append(header)
        elif header.get("k") == "joined" and isinstance(header.get("pid"), int):
            self._procs[header["w"]] = header["pid"]
        elif header.get("k") == "info" and isinstance(header.get("to"), str):
            info = dict(self._info, procs=sorted(self._procs.values()))
            ch.basic_publish("", header["to"], self.codec.encode({"k": "infor", "r": info}))

    def heartbeat(self, info: dict) -> None:
        self._info = dict(info)
        if self._events is not None:
            self._heartbeat_events(info)
        answer = {"k": "hb"}
        if info.get("autoscale"):
            try:
                answer["queued"] = sum(self._link.call(
                    "counting queued tasks", lambda: queue_lengths(self._link, info["queues"]),
                    give_up=lambda: True).values())
            except NbqError as e:
                log.warning("heartbeat: %s", e)
        self._messages.append(answer)

    def _heartbeat_events(self, info: dict) -> None:
        """worker-online (once) and worker-heartbeat, written to the backend (best effort)."""
        st = self.backend.store

        def write():
            pipe = st.r.pipeline(transaction=False)
            at = self._events.heartbeat(pipe, info, list(self._procs.values()))
            if at is not None:
                self._events.written(pipe.execute(), at)
        try:
            st.retry("writing heartbeat events", write, give_up=lambda: True)
        except NbqError as e:
            log.warning("heartbeat: %s", e)

    def lost(self, wid: str, how: str, at, end: dict | None = None, leaving: bool = False) -> None:
        self._procs.pop(wid, None)
        if self.backend is not None and end is None and at:
            try:  # the death counts against the task (deaths.py), read at its redelivery
                self.backend.died(at[0], at[1] if len(at) > 1 else None)
            except NbqError as e:
                log.warning("could not count the death of %s's task: %s", wid, e)
        if end is None or self.backend is None:
            return  # RabbitMQ delivers the process's unacked tasks again
        # the task its supervisor killed on purpose: ended, not re-run (deaths.py)
        task = {"id": end["id"], "n": 1}
        item, payload = deaths.ending(task, 0, f"worker process {wid} {how}", end)
        blob = self.codec.encode({"k": "res", "t": [item]}, payload)
        try:
            watchers = self.backend.results([(end["id"], blob)], [end["id"]])[0]
            for w in watchers:
                self._link.call("telling watchers", lambda: self._link.ch.basic_publish(
                    "", names.client(w), blob, props()), give_up=lambda: leaving)
        except NbqError as e:
            log.warning("could not end task %s: %s", end["id"], e)

    def poll(self, timeout: float, fds: list[int]) -> tuple[list[dict], list[int]]:
        deadline = time.monotonic() + timeout
        ready: list[int] = []
        while True:
            try:
                self._link.call("reading control commands",
                                lambda: self._link.conn.process_data_events(0),
                                give_up=lambda: True)
            except NbqError:
                pass  # retried at the next poll; the processes go on meanwhile
            left = deadline - time.monotonic()
            if self._messages or left <= 0:
                break
            try:
                ready = select.select(fds, [], [], min(left, POLL_SLICE))[0] if fds else []
            except InterruptedError:
                ready = []
            if not fds:
                time.sleep(min(left, POLL_SLICE))
            if ready:
                break
        messages, self._messages = self._messages, []
        return messages, ready

    def answer(self, request: dict, name: str, reply) -> None:
        blob = self.codec.encode({"k": "ctlr", "ci": request["ci"], "name": name, "r": reply})
        self._link.call("answering a control command", lambda: self._link.ch.basic_publish(
            "", names.client(request["c"]), blob, props()))

    def close(self, goodbye: bool) -> None:
        if goodbye and self._events is not None:
            try:
                self._events.offline("left")
            except NbqError as e:
                log.warning("could not write worker-offline: %s", e)
        self._link.close()
        if self.backend is not None:
            self.backend.close()
