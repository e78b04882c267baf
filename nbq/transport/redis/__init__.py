"""The Redis transport: Redis is the broker; no nbq broker process runs.

Requests that the ZeroMQ broker answers (cancel, watch, info, join, claim, ctl) are
answered by the client's own sender thread from Redis state (answers.py), and delivered as
``reply`` messages through receive(), so client.py does not know the
difference.  A supervisor's ``lost`` report and the entries of workers whose
heartbeat expired (claimed by live workers within a few seconds) follow the
same rules as the ZeroMQ broker (deaths.py): only the report counts a death
against the task its process was running; a worker gone whole re-queues its
entries as they were (recovery.py).

Every message read from Redis is verified before anything in it is
unpickled; a bad entry is logged, acknowledged and deleted.  Scripts touch
keys they compute from a prefix, so this needs a standalone Redis (not Cluster).
The keys are described in keys.py, the scripts in scripts.py.

Dispatch: an idle worker process waits for one entry (XREADGROUP COUNT 1
BLOCK) from its queues' streams, each queue's most urgent first (an entry of each stream
that had one comes back: the first runs, the others are held and run next; a priority's
first stream is seen by an idle worker within RECLAIM_EVERY or so); the START
script marks it started unless revoked, atomically, so cancel() returning True
means the task never runs, and when its function is known to be quick (its
measured cost: policy.Costs, as the ZeroMQ broker's) takes up to a ~2 ms batch
more of it in the same call.  When a batch ends, the REPORT script that
stores its last results also takes and starts the next batch (as the ZeroMQ
broker hands out the next task with "ready"), so a client that sees a result
and cancels the rest finds the next task started on both transports, and a
busy worker makes one round trip per batch.  As from the ZeroMQ broker, a
submitted task still running STARTED_DELAY after it started is reported
"started" (by a thread of the worker process): a quick task's result is its
only message.

Connection trouble: every call retries with backoff (policy.backoff) and a log line
(redis-py's own retries are off, so none is hidden); a call that gives up raises
BrokerUnavailable, and no redis-py exception leaves the transport (connection.py).
An XREADGROUP whose reply was lost with the connection leaves entries pending on
the consumer, unseen: after any connection error an idle worker re-reads its own pending entries (id 0).  A
supervisor keeps its processes through an outage (it answers its own
heartbeats while it retries), once it has reached Redis at least once.  A
client's hellos are answered with Redis's run_id: one that changed means Redis
restarted, and the client sends again the tasks it lost (no o: and no r: key:
it came back empty) with their functions; a worker process waits FUNCTION_WAIT
for a function not stored yet, a process that finds its group gone (NOGROUP)
is replaced and joins again, and a supervisor finds nothing of a dead process there.

The URL may carry ``?result_expires=SECONDS`` (default policy.RESULT_EXPIRES, a
day), ``?max_message_size=BYTES`` and ``?result_budget=BYTES`` (policy.py's defaults);
the client and its workers must agree on them (local workers get the same URL).
"""
from __future__ import annotations

from .client import RedisClient
from .connection import retrying
from .supervisor import RedisSupervisor
from .worker import RedisWorker

__all__ = ["RedisClient", "RedisSupervisor", "RedisWorker", "retrying"]
