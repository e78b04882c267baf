"""The private RabbitMQ node of the tests: its own ports and epmd, fresh vhosts, a restart."""
from __future__ import annotations

import pika

from conftest import pid_alive, rabbit_server, rabbit_url


def test_private_node_serves_fresh_vhosts_and_keeps_durable_queues_through_a_restart():
    server = rabbit_server()
    assert server.port != 5672 and server.epmd_port != 4369
    url = rabbit_url(backend=False)
    assert url != rabbit_url(backend=False)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_declare("kept", durable=True)
    conn.close()
    server.restart()
    assert pid_alive(server.epmd.pid)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_declare("kept", passive=True)  # raises if the queue is gone
    conn.close()
