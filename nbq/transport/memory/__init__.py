"""memory://: an in-process transport, for debugging, tests and Celery's task_always_eager.

state.py is the broker (one per address per process; records.py what it holds),
connections.py the client, pool and worker-thread connections over it, mailbox.py a
client's incoming messages.
Tasks run in threads of the process (nbq/worker/threads.py, started by
nbq/clusters/memory.py) or, inline, in the thread that submits them; the transport
itself runs nothing.  Nothing outside the process can reach it.
"""
from .connections import MemoryClient, MemorySupervisor, MemoryWorker, Stopped
from .registry import broker
from .state import MemoryBroker

__all__ = ["MemoryBroker", "MemoryClient", "MemorySupervisor", "MemoryWorker", "Stopped", "broker"]
