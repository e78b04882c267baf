"""The ZeroMQ broker: in-memory queues between clients and worker processes.

loop.py serves its socket (the message kinds are listed there); queues.py,
dispatch.py, results.py, members.py and outbox.py hold its state and work by job.
"""
from ..policy import HEARTBEAT_TIMEOUT, STARTED_DELAY
from ..policy import RESULT_EXPIRES as DEFAULT_RESULT_EXPIRES
from .loop import Broker

# HEARTBEAT_TIMEOUT, STARTED_DELAY, DEFAULT_RESULT_EXPIRES: still imported from here by
# nbq/transport/redis.py until it takes them from nbq.policy (changed on another branch).
__all__ = ["Broker", "DEFAULT_RESULT_EXPIRES", "HEARTBEAT_TIMEOUT", "STARTED_DELAY"]
