"""Which AMQP client library the amqp:// transport uses: pika's BlockingConnection against
aiormq on an asyncio thread, on one RabbitMQ (default the machine's, amqp://guest:guest@127.0.0.1:5672/).

R: round trip, publish with confirm then consume the same message (median ms of 300).
B: 20,000 persistent 100-byte messages published with confirms, then consumed (msg/s).
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
import uuid

import aiormq
import pika

URL = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1:5672/%2F"
N, RT = 20_000, 300
BODY = b"x" * 100


def bench_pika() -> tuple[float, float, float]:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.confirm_delivery()
    q = "bench-" + uuid.uuid4().hex
    ch.queue_declare(q, auto_delete=True)
    props = pika.BasicProperties(delivery_mode=2)
    times = []
    for _ in range(RT):
        t = time.perf_counter()
        ch.basic_publish("", q, BODY, props)
        while True:
            m, _, _ = ch.basic_get(q, auto_ack=True)
            if m is not None:
                break
        times.append(time.perf_counter() - t)
    # bulk: confirms per message are synchronous in BlockingChannel; batch with a 2nd channel off
    ch2 = conn.channel()
    t = time.perf_counter()
    ch2.confirm_delivery()
    for _ in range(N):
        ch2.basic_publish("", q, BODY, props)
    pub = N / (time.perf_counter() - t)
    got = 0
    t = time.perf_counter()
    ch.basic_qos(prefetch_count=1000)
    for m, _, _ in ch.consume(q, auto_ack=False):
        got += 1
        if got % 500 == 0 or got == N:
            ch.basic_ack(m.delivery_tag, multiple=True)
        if got == N:
            break
    con = N / (time.perf_counter() - t)
    conn.close()
    return statistics.median(times) * 1000, pub, con


def bench_aiormq() -> tuple[float, float, float]:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def setup():
        conn = await aiormq.connect(URL)
        ch = await conn.channel(publisher_confirms=True)
        q = "bench-" + uuid.uuid4().hex
        await ch.queue_declare(q, auto_delete=True)
        return conn, ch, q

    conn, ch, q = run(setup())
    props = aiormq.spec.Basic.Properties(delivery_mode=2)
    inbox: asyncio.Queue = None

    async def start_consume():
        nonlocal inbox
        inbox = asyncio.Queue()
        await ch.basic_qos(prefetch_count=1000)
        await ch.basic_consume(q, lambda m: inbox.put_nowait(m), no_ack=False)

    run(start_consume())
    times = []

    async def one():
        await ch.basic_publish(BODY, routing_key=q, properties=props)
        m = await inbox.get()
        await ch.basic_ack(m.delivery.delivery_tag)

    for _ in range(RT):  # the caller's thread hands each round trip to the loop, as a client would
        t = time.perf_counter()
        run(one())
        times.append(time.perf_counter() - t)

    async def bulk():
        t = time.perf_counter()
        await asyncio.gather(*(ch.basic_publish(BODY, routing_key=q, properties=props)
                               for _ in range(N)))
        pub = N / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(N):
            m = await inbox.get()
            if (i + 1) % 500 == 0 or i + 1 == N:
                await ch.basic_ack(m.delivery.delivery_tag, multiple=True)
        return pub, N / (time.perf_counter() - t)

    pub, con = run(bulk())
    run(conn.close())
    loop.call_soon_threadsafe(loop.stop)
    return statistics.median(times) * 1000, pub, con


if __name__ == "__main__":
    print(f"{'client':<22}{'round trip ms':>14}{'publish+confirm/s':>19}{'consume/s':>11}")
    for name, fn in (("pika BlockingConn", bench_pika), ("aiormq on a thread", bench_aiormq)):
        rt, pub, con = fn()
        print(f"{name:<22}{rt:>14.3f}{pub:>19,.0f}{con:>11,.0f}")
