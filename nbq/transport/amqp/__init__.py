"""The amqp:// transport: RabbitMQ is the broker; no nbq broker process runs.

Names of queues and exchanges: names.py.  A client publishes tasks (one persistent message
each, priorities 0-9 on classic queues with x-max-priority) in one AMQP transaction per
batch, so a submit whose batch is committed is stored; a worker process consumes its queues
with manual acks and prefetch matched to its measured batch, and acks a task in the same
transaction that publishes its result to the submitting client's queue.  RabbitMQ delivers
the unacked tasks of a worker whose connection dropped (a killed process) again at once.

Requests the ZeroMQ broker answers are answered by the client's sender thread: info and
control through the nbq.ctl fanout exchange (supervisors answer on the asker's queue), and
cancel, watch (by id), join and claim from the result backend (backend.py), a Redis named
by ``?result_backend=redis://...`` in the URL, as Celery's setting; claim-once works without
one too (names.py).  Everything read is verified before it is unpickled.

The URL: ``amqp://user:password@host:port/vhost`` or ``amqps://`` (TLS); query options
``result_backend``, ``result_expires`` (seconds), ``max_message_size`` (bytes), and pika's
own connection options.
"""
from __future__ import annotations

from .client import AmqpClient
from .connection import AMQP_SCHEMES
from .supervisor import AmqpSupervisor
from .worker import AmqpWorker

__all__ = ["AMQP_SCHEMES", "AmqpClient", "AmqpSupervisor", "AmqpWorker"]
