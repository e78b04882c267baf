"""What RabbitMQ can say about the cluster: live supervisors (asked on nbq.ctl, answering on a
reply queue of the asker's own) and queue lengths (a passive declare's message count)."""
from __future__ import annotations

import time

import pika.exceptions

from . import names
from .messages import Codec

ASK_WAIT = 0.3    # seconds an info request waits for supervisors' answers (after the last one)
ASK_MAX = 1.0     # and at most


def ask_supervisors(link, codec: Codec) -> list[dict]:
    """The heartbeat info of every supervisor that answers an info request in time."""
    ch = link.conn.channel()
    try:
        ch.exchange_declare(names.CTL, "fanout", durable=True)
        reply = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        got: dict[str, dict] = {}
        last = [time.monotonic()]

        def on_message(_ch, method, _props, body) -> None:
            decoded = codec.decode(body, "an info answer")
            if decoded is not None and decoded[0].get("k") == "infor":
                got[decoded[0]["r"]["sup"]] = decoded[0]["r"]
                last[0] = time.monotonic()

        ch.basic_consume(reply, on_message, auto_ack=True)
        ch.basic_publish(names.CTL, "", codec.encode({"k": "info", "to": reply}))
        start = time.monotonic()
        while True:
            now = time.monotonic()
            left = min(last[0] + ASK_WAIT, start + ASK_MAX) - now
            if left <= 0:
                break
            link.conn.process_data_events(time_limit=left)
        return sorted(got.values(), key=lambda s: s["sup"])
    finally:
        ch.close()


def queue_lengths(link, queues: list[str]) -> dict[str, int]:
    """Tasks waiting in each queue (0 for one not made yet)."""
    out = {}
    for q in queues:
        ch = link.conn.channel()
        try:
            out[q] = ch.queue_declare(names.queue(q), passive=True).method.message_count
            ch.close()
        except pika.exceptions.ChannelClosedByBroker:  # no such queue yet
            out[q] = 0
    return out
