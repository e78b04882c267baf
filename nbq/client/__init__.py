"""The client layer: nbq.Client (a concurrent.futures.Executor) and what its work returns.

executor.py is the Client, owning small collaborators, each in a module named after its
job: sending.py (tasks, at once or batched), shipping.py (function pickles, once each),
feeding.py (a map's lazy chunked input), requests.py (request/reply), control.py
(control commands), watching.py (work submitted elsewhere), link.py (heartbeats, a
silent or restarted broker), receiver.py (the receiver thread), shutdown.py (its
shutdown sequence), registry.py (the current client, shutdown at exit).  future.py,
mapresult.py, waiting.py, progress.py, frames.py and status.py are what users hold and see.
"""
from .executor import Client
from .future import Future
from .mapresult import MapResult
from .registry import current_client
from .shipping import fingerprint, ship_modules
from .waiting import as_completed, wait

__all__ = ["Client", "Future", "MapResult", "as_completed", "current_client", "fingerprint",
           "ship_modules", "wait"]
