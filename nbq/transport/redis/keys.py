"""The Redis key schema, and the names of the keys the transport computes.

Key schema (prefix ``nbq:``, in the database the URL names)::

  nbq:q:{queue}       Stream of tasks, one entry per task, consumer group ``nbq``.
                      Fields: h (header JSON), s (HMAC signature), 0..n (payload
                      frames): the signed message of protocol.py, as is.  Each
                      worker process is a consumer (its worker id); an entry is
                      XACKed and XDELed (trimmed) in the same Lua call that
                      stores its last result, so delivery is at-least-once and
                      the stream holds only queued and running tasks.  Tasks of
                      priority 0 or none (header pr absent) go here; see q:{queue}:p{N}.
  nbq:q:{queue}:p{N}  Stream of the queue's tasks of priority N (1-9, 9 most urgent), as
                      q:{queue}; made by the first client to send one (group first, then
                      qp:).  A worker reads a queue's streams most urgent first.
  nbq:q:{queue}:p{N}r Stream of the queue's tasks of priority N (0-9) re-queued after their
                      worker died or left: read just before q:{queue}:p{N} (q:{queue} for 0),
                      so such a task goes first among its priority
  nbq:qp:{queue}      Set of the queue's lanes with a stream q:{queue}:p{lane}: N or Nr,
                      read in descending text order (9r, 9, 8r, ..., 0r, then q:{queue})
  nbq:fn:{hash}       a function's signed message, packed (SET by each client that ships it,
                      expiry result_expires); a worker checks its kind, signed hash and the
                      payload's own hash, and refuses it otherwise (FunctionRefused)
  nbq:b:{uuid}        one large frame (BIG bytes or more) of a task or result, stored apart by
                      one SET (expiry result_expires): the message holds its key (frames.py's
                      SPILLED form; an entry lists such fields in field b), so Lua scripts,
                      result lists and streams never copy it.  A task's are deleted when it
                      is done; a reader GETRANGEs it in pieces into one buffer.
  nbq:o:{task id}     the submitting client's id, SET with the task's entry (SUBMIT)
                      and deleted when it is done or revoked: whom a cancel by another
                      client tells (expiry result_expires)
  nbq:st:{task id}    "queue key entry id" of the entry that started the task, set by a worker
                      atomically with the revoke and replay checks (START refuses another
                      entry of the task while that one exists); removed if that entry is
                      then dropped as bad, so unverified bytes leave no state
  nbq:rt:{task id}    "1" while a started task waits for a retry (a worker's RETRY notice,
                      deleted by its STARTED notice when it runs again): watch reads it as
                      RETRY.  The same NOTICE script adds a ``state`` message to the rs: of
                      the owner (o:) and of the watchers (wt:); nothing goes to r:
  nbq:rv:{task id}    "revoked": set by cancel only when st: and r: are absent
  nbq:r:{task id}     List of the task's result parts (packed signed messages),
                      expiry result_expires: fetched by id from any client
  nbq:rs:{client id}  Stream of messages for one client (field m: a packed
                      signed message): results, started notices; the client
                      XREADs it and XTRIMs what it has read (every 64 messages or 4 MiB)
  nbq:wk:{client id}  Stream the client's wake() adds to (MAXLEN 1), read with rs:
  nbq:wt:{task id}    Set of client ids watching a task (results copied to their rs:)
  nbq:m:{map id}      Hash: star, c (client), total (at mapend)
  nbq:mc:{map id}     List of "chunk-task-id start n" of a map
  nbq:hb:{sid}        a supervisor's heartbeat (its info as JSON), expiry HEARTBEAT_TIMEOUT
  nbq:procs:{sid}     Hash worker id -> pid of the supervisor's processes
  nbq:sups            Set of supervisor ids (dead ones removed when noticed)
  nbq:queues          Set of queue names that have a stream
  nbq:done            Sorted set task id -> time finished (counts stored results); START
                      refuses the entries of a task in it (a replay)
  nbq:kept            Sorted set task id -> when a result with frames stored apart was first
  nbq:kept:sz         read from a result stream (delivered), with its bytes and frame keys
  nbq:kept:bytes      ("bytes key key ...") and their total: past ?result_budget= (default
                      policy.RESULT_BUDGET) the oldest lose their r: and b: keys (KEEP);
                      smaller results are kept for result_expires
  nbq:bad             Hash reason -> count of queue entries dropped (signature, invalid,
                      replay, size): status's "dropped", as the ZeroMQ broker's
  nbq:jn:{key}        Set of the members of a join (a chord's header task ids), and
  nbq:jf:{key}        its "fired" flag: set once, by the member that completed it
  nbq:claim:{key}     a client's claim-once (SET NX PX ttl): the client id that won it
                      (beat ticks: beat:{entry}:{tick ms}, tasks/beat.py)
  nbq:keyfp           the fingerprint of the cluster's signing key (nbq/keys.py), SET NX by
                      the first client, supervisor or worker process to connect; each later one
                      compares its own and refuses to start when it differs (transport/base.py)
  nbq:ev, nbq:evh     Streams of events (signed batches) and of worker heartbeat events;
  nbq:wc:{sid}        a supervisor's processed/failed counts: see events.py here
  nbq:ctl             Stream of control commands (field m: a packed signed ``ctl`` message,
                      as the ZeroMQ broker's), MAXLEN ~CONTROL_KEEP: a broadcast, read
                      by every supervisor with XREAD (no group) from where it joined;
                      each answers (``ctlr``) on the client's rs:.  The client expects
                      one answer from each live supervisor (hb: present) the command names

Scripts (scripts.py) touch keys they compute from the prefix, so this needs a standalone
Redis (not Cluster).
"""
from __future__ import annotations

import redis

P = "nbq:"
GROUP = "nbq"             # every queue stream's consumer group
CTL = P + "ctl"
CONTROL_KEEP = 1000       # control commands kept in nbq:ctl (approximately)
KEYFP = P + "keyfp"


def queue_key(queue: str, priority: int = 0, requeued: bool = False) -> str:
    """The stream of a queue's tasks of one priority (0: the queue's own stream), or of
    those re-queued after a death (read before the others of their priority)."""
    if requeued:
        return f"{P}q:{queue}:p{priority}r"
    return f"{P}q:{queue}:p{priority}" if priority else P + "q:" + queue


def group(r: redis.Redis, queue: str, priority: int = 0, requeued: bool = False) -> str:
    """The stream key of a queue's priority, its consumer group made sure of (from the
    start: id 0) before its lane is listed in qp:, where workers look for it."""
    key = queue_key(queue, priority, requeued)
    try:
        r.xgroup_create(key, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    r.sadd(P + "queues", queue)
    if priority or requeued:
        r.sadd(P + "qp:" + queue, key.rsplit(":p", 1)[1])
    return key


def queue_streams(r: redis.Redis, queues: list[str]) -> dict[str, list[str]]:
    """The stream keys of each queue, most urgent first (the queue's own stream last): its
    lanes N or Nr sort as text, "9r" before "9" before "8r"."""
    pipe = r.pipeline(transaction=False)
    for q in queues:
        pipe.smembers(P + "qp:" + q)
    return {q: [f"{P}q:{q}:p{lane.decode()}" for lane in sorted(lanes, reverse=True)]
            + [queue_key(q)] for q, lanes in zip(queues, pipe.execute())}


def stream_keys(r: redis.Redis, queues: list[str]) -> list[str]:
    """The stream keys of queues, in the order a worker reads them."""
    return [k for keys in queue_streams(r, queues).values() for k in keys]


def text(b) -> str:
    """A name Redis returned (bytes) as str."""
    return b.decode() if isinstance(b, bytes) else b
