"""The ZeroMQ broker: in-memory queues between clients and worker processes.

loop.py serves its socket (the message kinds are listed there); queues.py,
dispatch.py, results.py, members.py and outbox.py hold its state and work by job.
"""
from .loop import Broker

__all__ = ["Broker"]
