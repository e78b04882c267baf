"""Driver errors stop at the Redis transport: a stopped Redis is an nbq error (BrokerUnavailable
naming the Redis without its password), or silence where the contract says so, never a
redis-py exception reaching the client, supervisor or worker code above."""
from __future__ import annotations

import time

import pytest
import redis
from redis_server import RedisServer

import nbq
from nbq.transport.redis import RedisClient, RedisSupervisor, retrying

PASSWORD = "s3cret-redis-pw"


def test_a_stopped_redis_is_an_nbq_error_never_a_redis_py_one(tmp_path):
    server = RedisServer(tmp_path / "redis", password=PASSWORD)  # this test's own: it stops it
    try:
        url = server.url()
        with nbq.Client(url, broker_grace=1) as client:
            conn = RedisClient(url, client.key, "raw-client")
            sup = RedisSupervisor(url, client.key, "sup-1")
            sup.heartbeat({"queues": ["default"], "name": "w", "host": "h", "spid": 1, "conc": 1})
            server.stop()

            # the client's operations: a wait raises BrokerUnavailable after the grace period
            with pytest.raises(nbq.BrokerUnavailable) as raised:
                client.workers()
            assert not isinstance(raised.value, redis.RedisError)

            # the transport's own calls: silence (the contract), never a driver exception
            conn.hello(None)
            assert conn.receive(0.2) == []
            conn.wake()
            conn.close()

            # a call that gives up says which Redis (no password) and what to do
            with pytest.raises(nbq.BrokerUnavailable) as raised:
                retrying("reading", conn.store.safe, conn.store.r.ping, give_up=lambda: True)
            message = str(raised.value)
            assert f"127.0.0.1:{server.port}" in message and "start it" in message
            assert PASSWORD not in message
            assert not isinstance(raised.value, redis.RedisError)

            # a supervisor through the outage: heartbeats answered locally, a dead process's
            # tasks left to live workers when leaving, goodbye logged, never raised
            sup.heartbeat({"queues": ["default"], "name": "w", "host": "h", "spid": 1, "conc": 1})
            sup.lost("sup-1/1", "was killed", None, leaving=True)
            sup.close(goodbye=True)
            closing = time.monotonic()
        # a closing client stops retrying its unanswered requests: its sender thread ends
        # (it used to retry the dead Redis until the process ended, close() waiting 10 s on it)
        assert time.monotonic() - closing < 8
        with pytest.raises(nbq.BrokerUnavailable, match=f"127.0.0.1:{server.port}") as raised:
            RedisClient(url, client.key, "late-client")  # no Redis to connect to at all
        assert PASSWORD not in str(raised.value)
    finally:
        server.stop()
