"""The queue and exchange names of the amqp:// transport (all in the URL's vhost).

  nbq.q.{queue}      classic durable queue of a queue's tasks, ``x-max-priority`` 9 (the
                     header's pr 0-9; quorum queues take priorities only from RabbitMQ 4.0,
                     and Debian 12 ships 3.10).  One persistent message per task: the signed
                     message of protocol.py, packed (redis/frames.py's layout).  A worker
                     process consumes it with manual acks and prefetch; the ack goes in the
                     same transaction as its result's publish, so delivery is at-least-once,
                     and a worker whose connection drops has its unacked tasks redelivered
                     by RabbitMQ at once.
  nbq.c.{client id}  durable queue of one client's messages (results, started and state
                     notices, streamed output, control answers), ``x-expires``
                     result_expires: it outlives a client's short outage, not its absence.
  nbq.fn.{hash}      durable queue holding one message: a function's signed message
                     (``x-max-length`` 1, drop-head: a re-ship replaces it), read by workers
                     with basic.get and put back (nack, requeue); ``x-expires`` result_expires.
  nbq.keyfp          durable queue holding one message: the fingerprint of the cluster's
                     signing key (keys.py), published (confirmed; ``x-overflow``
                     reject-publish, so the first one wins) by the first party to connect;
                     each later one compares its own and refuses to start when it differs.
  nbq.ctl            fanout exchange of control commands and info requests (signed); each
                     supervisor binds its exclusive queue nbq.sup.{sid} to it.
  nbq.sup.{sid}      a supervisor's queue (exclusive, auto-delete): control commands, info
                     requests, and its worker processes' "joined" notes (worker id, pid).
  nbq.claim.{key}    claim-once without a result backend: a queue of at most one message
                     (reject-publish, ``x-expires`` the claim's ttl): the one confirmed
                     publish wins the claim.

With ``?result_backend=redis://...`` (as Celery's setting), the state that by-id lookups,
cancel, watch and chords need lives in that Redis under redis/keys.py's names (r:, st:, rv:,
wt:, m:, mc:, jn:, jf:, claim:, done): see backend.py.  So do the events: redis/events.py's
capped streams nbq:ev and nbq:evh and the counts nbq:wc:{sid}, written as the Redis transport
writes them, with the results, map chunks and heartbeats the parties send the backend anyway
(eventing.py).  Without a backend there are no events: subscribing raises NbqError naming
the setting (RabbitMQ keeps no history one could read from a time).  Large frames (1 MiB or
more) of tasks and results go there too, under redis/frames.py's nbq:b:{uuid} (messages.py).
"""
from __future__ import annotations

P = "nbq."
CTL = P + "ctl"
KEYFP = P + "keyfp"
MAX_PRIORITY = 9


def queue(name: str) -> str:
    """The queue of a nbq queue's tasks."""
    return P + "q." + name


def client(cid: str) -> str:
    """A client's own queue."""
    return P + "c." + cid


def function(h: str) -> str:
    """The queue that holds a function's message."""
    return P + "fn." + h


def supervisor(sid: str) -> str:
    return P + "sup." + sid


def claim(key: str) -> str:
    return P + "claim." + key
