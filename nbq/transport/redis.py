"""The Redis transport: Redis is the broker; no nbq broker process runs.

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
                      one SET (expiry result_expires): the message holds its key (pack's
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
                      256 MiB) the oldest lose their r: and b: keys (KEEP); smaller results
                      are kept for result_expires
  nbq:bad             Hash reason -> count of queue entries dropped (signature, invalid,
                      replay, size): status's "dropped", as the ZeroMQ broker's
  nbq:jn:{key}        Set of the members of a join (a chord's header task ids), and
  nbq:jf:{key}        its "fired" flag: set once, by the member that completed it
  nbq:beat:last:{entry}  when a beat last sent that beat_schedule entry (ms since the
                      epoch), claimed by compare-and-set so each tick is sent once (tasks/beat.py)
  nbq:keyfp           the fingerprint of the cluster's signing key (keys.py), SET NX by the
                      first client, supervisor or worker process to connect; each later one
                      compares its own and refuses to start when it differs (transport/base.py)
  nbq:ctl             Stream of control commands (field m: a packed signed ``ctl`` message,
                      as broker.py describes), MAXLEN ~CONTROL_KEEP: a broadcast, read
                      by every supervisor with XREAD (no group) from where it joined;
                      each answers (``ctlr``) on the client's rs:.  The client expects
                      one answer from each live supervisor (hb: present) the command names

Requests that the ZeroMQ broker answers (cancel, watch, info, join, ctl) are answered
by the client's own sender thread from Redis state, and delivered as
``reply`` messages through receive(), so client.py does not know the
difference.  A supervisor's ``lost`` report and the entries of workers whose
heartbeat expired (claimed by live workers within a few seconds) follow the
same rules as the ZeroMQ broker (deaths.py): only the report counts a death
against the task its process was running; a worker gone whole re-queues its
entries as they were.

Every message read from Redis is verified before anything in it is
unpickled; a bad entry is logged, acknowledged and deleted.  Scripts touch
keys they compute from a prefix, so this needs a standalone Redis (not Cluster).

Dispatch: an idle worker process waits for one entry (XREADGROUP COUNT 1
BLOCK) from its queues' streams, each queue's most urgent first (an entry of each stream
that had one comes back: the first runs, the others are held and run next; a priority's
first stream is seen by an idle worker within RECLAIM_EVERY or so); the START script marks it started unless revoked, atomically, so
cancel() returning True means the task never runs, and when its function is
known to be quick (its measured cost, as broker.py's) takes up to a ~2 ms
batch more of it in the same call.  When a batch ends, the REPORT script that
stores its last results also takes and starts the next batch (as the ZeroMQ
broker hands out the next task with "ready"), so a client that sees a result
and cancels the rest finds the next task started on both transports, and a
busy worker makes one round trip per batch.  As from the ZeroMQ broker, a
submitted task still running STARTED_DELAY after it started is reported
"started" (by a thread of the worker process): a quick task's result is its
only message.

Connection trouble: every call retries with backoff and a log line (redis-py's
own retries are off, so none is hidden).  An XREADGROUP whose reply was lost
with the connection leaves entries pending on the consumer, unseen: after any
connection error an idle worker re-reads its own pending entries (id 0).  A
supervisor keeps its processes through an outage (it answers its own
heartbeats while it retries), once it has reached Redis at least once.  A
client's hellos are answered with Redis's run_id: one that changed means Redis
restarted, and the client sends again the tasks it lost (no o: and no r: key:
it came back empty) with their functions; a worker process waits FUNCTION_WAIT
for a function not stored yet, a process that finds its group gone (NOGROUP)
is replaced and joins again, and a supervisor finds nothing of a dead process there.

The URL may carry ``?result_expires=SECONDS`` (default one day); the
client and its workers must agree on it (local workers get the same URL).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import random
import select
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from .. import deaths, protocol
from ..broker import DEFAULT_RESULT_EXPIRES, HEARTBEAT_TIMEOUT, STARTED_DELAY
from ..errors import BrokerUnavailable, FunctionRefused, MessageTooLarge, NbqError, SignatureError
from ..keys import fingerprint
from . import unsplit
from .base import ClientConnection, SupervisorConnection, WorkerConnection, check_key

log = logging.getLogger("nbq.transport.redis")

P = "nbq:"
GROUP = "nbq"
BLOCK_MS = 1000           # a worker's XREADGROUP wait; reclaim checks run between waits
RECLAIM_EVERY = 1.0       # seconds between a worker's looks for dead workers' entries
BATCH_SECONDS = 0.002     # a batch of short tasks lasts about this long (as in broker.py)
BATCH_MAX = 256
TRIM_AFTER = 4 << 20      # a client trims what it has read of its rs: after 4 MiB or 64 messages
BIG = 1 << 20             # a frame this large is stored under its own key (one SET), not in a message
READ_CHUNK = 4 << 20      # and read back in GETRANGE pieces of this size into one buffer
SPILLED = 1 << 63         # pack's flag on the length of a frame stored apart
CONNECT_TIMEOUT = 10.0
BACKOFF_MAX = 5.0
CTL = P + "ctl"
CONTROL_KEEP = 1000       # control commands kept in nbq:ctl (approximately)
CONTROL_BLOCK_MS = 5000   # a supervisor's outstanding XREAD on nbq:ctl is renewed this often
MAX_MESSAGE_SIZE = 512 << 20  # default ?max_message_size=: Redis's largest value, as the ZeroMQ broker's
RESULT_BUDGET = 256 << 20     # default ?result_budget=: delivered results kept, as the ZeroMQ broker's
DROP_LOG_EVERY = 1.0          # seconds between log lines about dropped messages
FUNCTION_WAIT = 10.0      # a function not stored is waited for this long: a Redis that came back
                          # empty gets it again from its client (the tasks may come first)


# -- addresses, connections, retries ------------------------------------------

class Settings(NamedTuple):
    """nbq's own settings in a Redis address's query (``?result_expires=...``): every
    client and worker of one Redis must agree on them (local workers get the same URL)."""
    result_expires: float = DEFAULT_RESULT_EXPIRES
    max_message_size: int = MAX_MESSAGE_SIZE  # bytes: larger tasks refused by the sender,
    #                                           larger messages dropped by the reader
    result_budget: int = RESULT_BUDGET  # bytes of delivered results kept for by-id lookups


def _settings(address: str) -> tuple[Settings, list]:
    """nbq's settings in an address, and the rest of its query (redis-py's options)."""
    kept, given = [], {}
    for k, v in parse_qsl(urlsplit(address).query):
        if k in Settings._fields:
            try:
                given[k] = type(Settings._field_defaults[k])(float(v))
            except ValueError:
                raise NbqError(f"bad {k}={v!r} in the Redis address: give a number") from None
        else:
            kept.append((k, v))
    if given.get("max_message_size", MAX_MESSAGE_SIZE) < 1 << 16:
        raise NbqError("max_message_size in the Redis address must be at least 65536 bytes "
                       "(a client sends tasks below 64 KiB in batches)")
    return Settings(**given), kept


def settings(address: str) -> Settings:
    """The nbq settings an address carries (defaults for the others)."""
    return _settings(address)[0]


def parse_address(address: str) -> tuple[str, str, float]:
    """(URL for redis-py, URL safe to print (no password), result_expires) of an address.

    ``redis+unix:///path`` is taken as redis-py's ``unix:///path``.
    """
    if address.startswith("redis+unix://"):
        address = address[len("redis+"):]
    parts = urlsplit(address)
    conf, kept = _settings(address)
    url = unsplit(parts._replace(query=urlencode(kept)))
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    safe = unsplit(parts._replace(netloc=netloc, query=""))
    return url, safe, conf.result_expires


# Commands packed in Python even with hiredis: it sends a large argument as it is, where
# hiredis's packer copies it (a 100 MB SET took ~4x as long); replies are still parsed by hiredis.
_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def connect(url: str, safe: str) -> redis.Redis:
    """A redis-py client (hiredis when installed) that keeps sockets alive and never times out reads."""
    try:
        # no retries inside redis-py: every connection error reaches retrying(), which
        # logs it and lets a worker look for deliveries whose reply was lost with it
        tcp = {} if url.startswith("unix://") else {"socket_keepalive": True}  # TCP only
        return redis.Redis.from_url(url, socket_connect_timeout=5.0,
                                    socket_timeout=None, health_check_interval=30,
                                    retry=Retry(NoBackoff(), 0), command_packer=_PACKER, **tcp)
    except ValueError as e:
        raise NbqError(f"bad Redis address {safe}: {e}") from None


def _auth_error(safe: str, e: Exception) -> NbqError:
    return NbqError(f"Redis at {safe} refused the credentials (wrong password or user): "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")


def retrying(what: str, safe: str, fn, give_up=lambda: False, on_error=None):
    """fn() until it works, waiting with backoff and saying so while Redis is unreachable."""
    delay = 0.05
    logged = False
    while True:
        try:
            result = fn()
            if logged:
                log.warning("%s: Redis at %s is back", what, safe)
            return result
        except redis.AuthenticationError as e:
            raise _auth_error(safe, e) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if on_error is not None:
                on_error()
            if give_up():
                raise
            if not logged or delay >= BACKOFF_MAX:
                log.warning("%s: Redis at %s unavailable (%s); retrying in %.1f s",
                            what, safe, e, delay)
                logged = True
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        except redis.ResponseError as e:
            if "LOADING" in str(e) or "MASTERDOWN" in str(e):
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            raise


KEYFP = P + "keyfp"
REKEY = f"; if the whole cluster changed its key, delete {KEYFP} in this Redis database"


def claim_key(pipe, key: bytes) -> None:
    """Queue on pipe: record key's fingerprint as the cluster's unless one is; read the cluster's."""
    pipe.set(KEYFP, fingerprint(key), nx=True)
    pipe.get(KEYFP)


def compare_key(key: bytes, theirs: bytes | None, safe: str) -> None:
    """KeyMismatch when the fingerprint read by claim_key is not key's."""
    text = None if theirs is None else theirs.decode("ascii", "replace")
    if text is not None and not (text.isalnum() and len(text) <= 16):
        text = repr(theirs[:16])  # not nbq's: shown on one line, whatever it holds
    check_key(key, text, safe, REKEY)


def check(r: redis.Redis, safe: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Ping Redis: a wrong password is a one-line NbqError, no answer a BrokerUnavailable."""
    deadline = time.monotonic() + timeout
    try:
        retrying("connecting", safe, r.ping, give_up=lambda: time.monotonic() > deadline)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise BrokerUnavailable(f"no Redis answered at {safe} within {timeout:g} s: {e}") from None


class Spilled(NamedTuple):
    """A frame of `size` bytes stored under a key of its own (Store.spiller); Store.resolve reads it."""
    key: bytes
    size: int


def pack(frames, spill: Callable[[Any], bytes] | None = None) -> bytes:
    """Frames as one string (8-byte little-endian length before each).

    With spill, a frame of BIG bytes or more is stored apart (spill returns its key) and
    written as its size with the SPILLED bit set, the key's length and the key.
    """
    out = []
    for f in frames:
        n = memoryview(f).nbytes
        if spill is not None and n >= BIG:
            key = spill(f)
            out += [(SPILLED | n).to_bytes(8, "little"), len(key).to_bytes(8, "little"), key]
        else:
            out += [n.to_bytes(8, "little"), f]
    return b"".join(out)


def unpack(blob: bytes) -> list:
    """The frames of pack's string: memoryviews of it, and Spilled for frames stored apart;
    ValueError if it is not pack's layout (a length past its end)."""
    mv = memoryview(blob)
    out, i = [], 0
    while i < len(mv):
        n = int.from_bytes(mv[i:i + 8], "little")
        if n & SPILLED:
            k = int.from_bytes(mv[i + 8:i + 16], "little")
            out.append(Spilled(bytes(mv[i + 16:i + 16 + k]), n & ~SPILLED))
            i += 16 + k
        else:
            out.append(mv[i + 8:i + 8 + n])
            i += 8 + n
    if i != len(mv):
        raise ValueError("a packed frame's length runs past the end")
    return out


def entry_fields(msg: list, spill: Callable[[Any], bytes] | None = None) -> dict:
    """A signed message as stream fields: h, s, 0..n; with spill, large frames are stored
    apart (the field holds pack's reference) and listed in field b."""
    fields = {"h": msg[0], "s": msg[1]}
    spilled = []
    for i, f in enumerate(msg[2:]):
        if spill is not None and memoryview(f).nbytes >= BIG:
            fields[str(i)] = pack([f], spill)
            spilled.append(str(i))
        else:
            fields[str(i)] = f
    if spilled:
        fields["b"] = ",".join(spilled)
    return fields


def entry_frames(fields: dict) -> list:
    """The signed message of an entry's fields (Spilled where a frame is stored apart);
    ValueError if the fields are not entry_fields' layout."""
    try:
        spilled = fields[b"b"].decode("ascii").split(",") if b"b" in fields else []
        frames = [fields[b"h"], fields[b"s"]]
        for i in range(len(fields) - 2 - (b"b" in fields)):
            f = fields[str(i).encode()]
            if str(i) in spilled:
                (f,) = unpack(f)
                if not isinstance(f, Spilled):
                    raise ValueError(f"field {i} is listed in b but not stored apart")
            frames.append(f)
    except KeyError as e:
        raise ValueError(f"field {e} is missing") from None
    return frames


def _s(b) -> str:
    return b.decode() if isinstance(b, bytes) else b


def _claimed(fields: dict | None) -> tuple[str, str]:
    """(task id, client id) an entry's header claims, unverified ("" where it names none)."""
    try:
        item = json.loads(fields[b"h"])["t"][0]
        tid, c = item["id"], item["c"]
        if isinstance(tid, str) and isinstance(c, str):
            return tid, c
    except Exception:  # any bytes at all: they claim nothing
        pass
    return "", ""


def _entry(taken: list) -> tuple:
    """(queue key, entry id, fields) of an entry a script took: [key, id, [name, value, ...]]."""
    qk, eid, flat = taken
    return qk.decode(), eid, dict(zip(flat[::2], flat[1::2]))


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


# -- Lua scripts (atomic steps) ---------------------------------------------

# Shared by the scripts below: messages to clients, starting entries, taking more for a worker.
SHARED = """
local function send(p, ttl, c, blob)  -- a packed message to client c's result stream
  local sk = p .. 'rs:' .. c
  redis.call('XADD', sk, '*', 'm', blob); redis.call('EXPIRE', sk, ttl)
end

-- XADD of ARGV[i] (queue key), ARGV[i + 1] (n), n names and values; -> next i, and the entry's
-- id if it has frames stored apart (field b), else nil
local function add(i)
  local nf = tonumber(ARGV[i + 1])
  local args = {'XADD', ARGV[i], '*'}
  local big = false
  for k = 1, nf do
    args[#args + 1] = ARGV[i + 1 + k]
    big = big or (k % 2 == 1 and ARGV[i + 1 + k] == 'b')
  end
  local eid = redis.call(unpack(args))
  return i + 2 + nf, big and eid or nil
end

-- false: revoked, or refused as a replay (acked, deleted, counted), never run.  A replay is
-- an entry of a task that is done, or started by another entry that still exists (st: names
-- the entry that started it: "queue key entry id"); an entry re-queued after a death or a
-- goodbye replaces one that is deleted, so it starts.
local function start(p, ttl, qk, eid, tid)
  local sk, mark = p .. 'st:' .. tid, qk .. ' ' .. eid
  local replay = redis.call('ZSCORE', p .. 'done', tid)
  if not replay then
    local was = redis.call('GET', sk)
    if was and was ~= mark then
      local wq, we = string.match(was, '^(.*) (%S+)$')
      local got = wq and redis.pcall('XRANGE', wq, we, we)
      replay = type(got) == 'table' and got.err == nil and #got > 0
    end
  end
  if replay or redis.call('EXISTS', p .. 'rv:' .. tid) == 1 then
    redis.call('XACK', qk, 'nbq', eid); redis.call('XDEL', qk, eid)
    if replay then redis.call('HINCRBY', p .. 'bad', 'replay', 1) end
    return false
  end
  redis.call('SET', sk, mark, 'EX', ttl)
  return true
end

local function task_item(fields)  -- the header's task, unverified: it only guides batching
  for k = 1, #fields, 2 do
    if fields[k] == 'h' then
      local ok, header = pcall(cjson.decode, fields[k + 1])
      if ok and type(header) == 'table' and type(header.t) == 'table'
          and type(header.t[1]) == 'table' and type(header.t[1].id) == 'string' then
        return header.t[1]
      end
    end
  end
  return nil
end

local function routed(p, qk, item)  -- whether the header's queue and priority name stream qk
  local q, pr = item.q or 'default', item.pr or 0
  if type(q) ~= 'string' or type(pr) ~= 'number' then return false end
  local base = p .. 'q:' .. q
  return qk == (pr == 0 and base or base .. ':p' .. pr) or qk == base .. ':p' .. pr .. 'r'
end

-- Up to n entries for consumer wid from the first of the queues qks that has any, read
-- one at a time and started unless revoked, stopping after one whose function is not h
-- (so a batch of quick tasks ends with at most one other).  -> {{queue key, id, fields}*}
-- An entry whose header does not parse, or names another stream than its own, is returned
-- unstarted, for the worker to drop.
local function take(p, ttl, wid, qks, n, h)
  local out = {}
  for _, qk in ipairs(qks) do
    while n > 0 do
      local got = redis.call('XREADGROUP', 'GROUP', 'nbq', wid, 'COUNT', 1, 'STREAMS', qk, '>')
      if not got then break end
      local eid, fields = got[1][2][1][1], got[1][2][1][2]
      local item = task_item(fields)
      if item ~= nil and not routed(p, qk, item) then item = nil end
      n = n - 1
      if item == nil or start(p, ttl, qk, eid, item.id) then out[#out + 1] = {qk, eid, fields} end
      if item == nil or item.h ~= h then n = 0 end
    end
    if #out > 0 then break end
  end
  return out
end
"""

# ARGV: prefix, ttl, now, nparts, [task id, owner client, to owner (0/1), packed part]*,
#       nmsg, [client, packed]*, nadd, [queue key, 2 x nfields, (name, value)*]*,
#       nack, [queue key, entry id, task id]*, worker id, ntake, function hash, nqueues, queue*
# -> the entries taken for the worker's next batch (SHARED's take), from the queues' streams
# in the worker's order, each queue's most urgent first (as queue_streams)
REPORT = SHARED + """
local function streams(p, queues)
  local out = {}
  for _, q in ipairs(queues) do
    local lanes = redis.call('SMEMBERS', p .. 'qp:' .. q)
    table.sort(lanes, function(a, b) return a > b end)
    for _, lane in ipairs(lanes) do out[#out + 1] = p .. 'q:' .. q .. ':p' .. lane end
    out[#out + 1] = p .. 'q:' .. q
  end
  return out
end

local p, ttl, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local tid, owner, tell, blob = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]; i = i + 4
  local rk = p .. 'r:' .. tid
  redis.call('RPUSH', rk, blob); redis.call('EXPIRE', rk, ttl)
  for _, w in ipairs(redis.call('SMEMBERS', p .. 'wt:' .. tid)) do
    if w ~= owner then send(p, ttl, w, blob) end
  end
  if tell == '1' then send(p, ttl, owner, blob) end
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do send(p, ttl, ARGV[i], ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do i = add(i) end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local qk, eid, tid = ARGV[i], ARGV[i + 1], ARGV[i + 2]; i = i + 3
  redis.call('XACK', qk, 'nbq', eid); redis.call('XDEL', qk, eid)
  if tid ~= '' then redis.call('ZADD', p .. 'done', now, tid); redis.call('DEL', p .. 'o:' .. tid) end
end
if n > 0 then redis.call('ZREMRANGEBYSCORE', p .. 'done', '-inf', now - ttl) end
local wid, ntake, h = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
local queues = {}
for k = 1, tonumber(ARGV[i + 3]) do queues[k] = ARGV[i + 3 + k] end
return take(p, ttl, wid, streams(p, queues), ntake, h)
"""

# ARGV: prefix, ttl, worker id, queue key, entry id, task id, nmore, function hash
# -> {1 (run it) or 0 (revoked: acked and deleted, never run), taken entries...}: when it
# runs, up to nmore entries more of its queue join its batch (SHARED's take)
START = SHARED + """
local p, ttl, wid, qk = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if not start(p, ttl, qk, ARGV[5], ARGV[6]) then return {0} end
local out = take(p, ttl, wid, {qk}, tonumber(ARGV[7]), ARGV[8])
table.insert(out, 1, 1)
return out
"""

# ARGV: prefix, ttl, client, nfn, function hash*, ntask, [task id, queue key, 2 x nfields,
#       (name, value)*]*: a client's tasks added with their owner (o:), their functions kept
# -> {task id, entry id}* of the tasks with frames stored apart (the client keeps them: see
# RedisClient._dropped)
SUBMIT = SHARED + """
local p, ttl, c = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local i = 5
for _ = 1, tonumber(ARGV[4]) do redis.call('EXPIRE', p .. 'fn:' .. ARGV[i], ttl); i = i + 1 end
local n = tonumber(ARGV[i]); i = i + 1
local out = {}
for _ = 1, n do
  local tid = ARGV[i]
  redis.call('SET', p .. 'o:' .. tid, c, 'EX', ttl)
  local eid
  i, eid = add(i + 1)
  if eid then out[#out + 1] = tid; out[#out + 1] = eid end
end
return out
"""

# ARGV: prefix, ttl, cancelling client, n, [task id, packed revoked part]*
# -> per task 1 (cancelled) or 0.  The owner (o:) and watchers other than the
# cancelling client get the revoked part on their result streams, as from the ZeroMQ broker.
CANCEL = SHARED + """
local p, ttl, by = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local i = 5
local out = {}
for k = 1, tonumber(ARGV[4]) do
  local tid, blob = ARGV[i], ARGV[i + 1]; i = i + 2
  if redis.call('EXISTS', p .. 'st:' .. tid) == 1 or redis.call('EXISTS', p .. 'r:' .. tid) == 1 then
    out[k] = 0
  else
    redis.call('SET', p .. 'rv:' .. tid, '1', 'EX', ttl)
    redis.call('RPUSH', p .. 'r:' .. tid, blob); redis.call('EXPIRE', p .. 'r:' .. tid, ttl)
    local tell = redis.call('SMEMBERS', p .. 'wt:' .. tid)
    tell[#tell + 1] = redis.call('GET', p .. 'o:' .. tid)
    redis.call('DEL', p .. 'o:' .. tid)
    for _, c in ipairs(tell) do
      if c and c ~= by then send(p, ttl, c, blob) end
    end
    out[k] = 1
  end
end
return out
"""

# ARGV: prefix, ttl, key, member, total -> 1 for the one call that completed the join, else 0
JOIN = """
local p, ttl, key = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local members = p .. 'jn:' .. key
redis.call('SADD', members, ARGV[4]); redis.call('EXPIRE', members, ttl)
if redis.call('SCARD', members) >= tonumber(ARGV[5])
   and redis.call('SET', p .. 'jf:' .. key, '1', 'NX', 'EX', ttl) then
  return 1
end
return 0
"""

# ARGV: prefix, ttl, task id, state (RETRY or STARTED), packed ``state`` message[, "if": only
# if the task waits for a retry]: a worker's notice for a retry; rt: marks the task RETRY for later watchers (or no more), and the owner
# (o:) and watchers (wt:) get the message on their result streams, once each.  Retries only.
NOTICE = SHARED + """
local p, ttl, tid, state, msg = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
if state == 'RETRY' then
  redis.call('SET', p .. 'rt:' .. tid, '1', 'EX', ttl)
elseif redis.call('DEL', p .. 'rt:' .. tid) == 0 and ARGV[6] == 'if' then
  return 0  -- only if it was waiting for a retry: a task re-queued after its worker died
end
local to = {}
local owner = redis.call('GET', p .. 'o:' .. tid)
if owner then to[owner] = true end
for _, c in ipairs(redis.call('SMEMBERS', p .. 'wt:' .. tid)) do to[c] = true end
for c in pairs(to) do send(p, ttl, c, msg) end
return 1
"""

# ARGV: prefix, ttl, n, [queue key, entry id, reason, client, packed ``dropped`` notice]*:
# entries dropped as bad (they failed to parse, read or verify; or named another stream):
# acknowledged, deleted, counted in bad by reason.  A started mark (st:) the entry set itself
# (take starts entries before the worker verifies them) is removed: an unverified entry leaves
# no state behind.  The notice goes to the client its header names, if that client is connected
# (wk:): it acts on it only if the entry was its own (RedisClient._dropped).
DROP = SHARED + """
local p, ttl = ARGV[1], tonumber(ARGV[2])
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local qk, eid, why, c, notice = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  local got = redis.call('XRANGE', qk, eid, eid)
  local item = #got > 0 and task_item(got[1][2])
  if item and redis.call('GET', p .. 'st:' .. item.id) == qk .. ' ' .. eid then
    redis.call('DEL', p .. 'st:' .. item.id)
  end
  redis.call('XACK', qk, 'nbq', eid); redis.call('XDEL', qk, eid)
  redis.call('HINCRBY', p .. 'bad', why, 1)
  if c ~= '' and redis.call('EXISTS', p .. 'wk:' .. c) == 1 then send(p, ttl, c, notice) end
end
"""

# ARGV: prefix, budget, now, ttl, n, [task id, bytes, keys (space-separated)]*: results with
# frames stored apart, read from a result stream (the first reader registers each part once),
# kept for by-id lookups: while the kept bytes pass the budget, the result kept first loses its
# result list (r:) and its stored-apart frames.  Entries older than ttl (gone by expiry) are
# forgotten, so kept: holds no more than a day of large results.
KEEP = """
local p, budget, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local kept, sizes, total = p .. 'kept', p .. 'kept:sz', p .. 'kept:bytes'
local function forget(tid, evict)
  local v = redis.call('HGET', sizes, tid)
  redis.call('ZREM', kept, tid); redis.call('HDEL', sizes, tid)
  if not v then return end
  local first = true
  for w in string.gmatch(v, '%S+') do
    if first then redis.call('DECRBY', total, tonumber(w)); first = false
    elseif evict then redis.call('DEL', w) end
  end
  if evict then redis.call('DEL', p .. 'r:' .. tid) end
end
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  local tid, n, keys = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]; i = i + 3
  local v = redis.call('HGET', sizes, tid) or '0'
  if not string.find(v, keys, 1, true) then  -- a part registered once, by its first reader
    local size = tonumber(string.match(v, '^%d+')) + n
    redis.call('HSET', sizes, tid, size .. string.sub(v, #string.match(v, '^%d+') + 1) .. ' ' .. keys)
    redis.call('ZADD', kept, 'NX', now, tid); redis.call('INCRBY', total, n)
  end
end
for _, tid in ipairs(redis.call('ZRANGEBYSCORE', kept, '-inf', now - ttl, 'LIMIT', 0, 100)) do
  forget(tid, false)
end
while tonumber(redis.call('GET', total) or '0') > budget do
  local oldest = redis.call('ZRANGE', kept, 0, 0)
  if #oldest == 0 then redis.call('DEL', total); break end
  forget(oldest[1], true)
end
for _, k in ipairs({kept, sizes, total}) do redis.call('EXPIRE', k, math.ceil(ttl)) end
"""

#: Requests answered from Redis state, with the answer given when Redis fails them.
FALLBACK = {"cancel": {}, "watch": {"maps": {}, "known": {}},
            "info": {"workers": [], "queues": {}, "tasks": 0, "results": 0},
            "join": {"error": "Redis failed the join"}, "ctl": {"n": 0}, "claim": {"won": False}}


class BadMessage(Exception):
    """A message read from Redis that failed to parse, read or verify: dropped, never acted on."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason  # "signature", "invalid", "replay" or "size" (as the ZeroMQ broker's)


class Store:
    """What clients, supervisors and workers share: a connection, the key, scripts, result storage."""

    def __init__(self, address: str, key: bytes) -> None:
        self.url, self.safe, self.ttl = parse_address(address)
        self.settings = settings(address)
        self.ttl_s = max(1, int(round(self.ttl)))
        self.r = connect(self.url, self.safe)
        self.signer = protocol.Signer(key)
        self.troubles = 0  # connection errors so far: a reply lost with one may hide a delivery
        self.dropped = dict.fromkeys(("signature", "invalid", "replay", "size"), 0)
        self._drop_log_at = 0.0
        self._spill_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._report = self.r.register_script(REPORT)
        self._start = self.r.register_script(START)
        self._cancel = self.r.register_script(CANCEL)
        self._join = self.r.register_script(JOIN)
        self._notice = self.r.register_script(NOTICE)
        self._drop = self.r.register_script(DROP)
        self._keep = self.r.register_script(KEEP)

    def retry(self, what: str, fn, give_up=lambda: False):
        return retrying(what, self.safe, fn, give_up, self._trouble)

    def check_key(self, key: bytes) -> None:
        """Refuse to go on (KeyMismatch) when key is not the cluster's (see nbq:keyfp)."""
        def read():
            pipe = self.r.pipeline(transaction=False)
            claim_key(pipe, key)
            return pipe.execute()[-1]

        compare_key(key, self.retry("checking the signing key", read), self.safe)

    def _trouble(self) -> None:
        self.troubles += 1

    def close(self) -> None:
        """Release the connections and the spill thread."""
        if self._spill_thread is not None:
            self._spill_thread.shutdown()
        self.r.close()

    def verify(self, raw, split: Callable[[Any], list] = unpack) -> tuple[dict, list]:
        """The verified (header, payload) of a message read from Redis: split(raw) gives its
        frames (unpack for a packed string, entry_frames for a stream entry's fields); frames
        stored apart are read first (the signature covers them too).  Any failure to parse,
        read or verify raises BadMessage, never anything else."""
        try:
            return self.signer.decode(self.resolve(split(raw)))
        except BadMessage:
            raise
        except SignatureError as e:
            raise BadMessage("signature", str(e)) from None
        except Exception as e:  # whatever bytes came: any failure is the message's, not ours
            raise BadMessage("invalid", f"{type(e).__name__}: {e}") from None

    def decode(self, raw, where: str, split: Callable[[Any], list] = unpack):
        """verify's (header, payload), or None when the message is bad (counted, logged)."""
        try:
            return self.verify(raw, split)
        except BadMessage as e:
            self.bad(e, where)
            return None

    def bad(self, e: BadMessage, where: str) -> None:
        """Count a dropped message; log it unless another was logged within DROP_LOG_EVERY."""
        self.dropped[e.reason] += 1
        now = time.monotonic()
        if now >= self._drop_log_at:
            self._drop_log_at = now + DROP_LOG_EVERY
            log.warning("dropped %s: %s (dropped here so far: %s)", where, e,
                        ", ".join(f"{n} {k}" for k, n in self.dropped.items() if n))

    def keep(self, parts: list[tuple[str, int, list[bytes]]]) -> None:
        """Results read from a result stream whose frames are stored apart [(task id, bytes,
        keys)]: kept for by-id lookups within result_budget, oldest evicted first (KEEP)."""
        args: list = [P, self.settings.result_budget, time.time(), self.ttl, len(parts)]
        for tid, size, keys in parts:
            args += [tid, size, b" ".join(keys)]
        try:
            self.retry("keeping results", lambda: self._keep(args=args))
        except redis.RedisError as e:  # they expire with result_expires anyway
            log.warning("could not count delivered results against result_budget: %s", e)

    def drop(self, entries: list) -> None:
        """Acknowledge, delete and count bad entries [(queue key, entry id, fields, BadMessage)]
        (DROP), telling the client an entry's header names (unverified) which entry was dropped
        and why: a ``dropped`` notice that client acts on only for an entry it knows as its own."""
        args: list = [P, self.ttl_s, len(entries)]
        for qk, eid, fields, e in entries:
            tid, c = _claimed(fields)
            notice = pack(self.signer.encode({"k": "dropped", "id": tid, "e": f"{qk} {_s(eid)}",
                                              "why": str(e)[:500]})) if c else b""
            args += [qk, eid, e.reason, c, notice]
        self.retry("dropping bad entries", lambda: self._drop(args=args))

    def _spill(self, frame) -> bytes:
        """Store a large frame under a key of its own (one SET, expiry result_expires); its key."""
        key = (P + "b:" + uuid.uuid4().hex).encode()
        self.retry("storing a large frame", lambda: self.r.set(key, frame, ex=self.ttl_s))
        return key

    def spiller(self, frames) -> Callable[[Any], bytes]:
        """Start storing the large ones of frames apart, each once, on a thread of this Store,
        and return the spill function for pack and entry_fields: it waits for a frame's SET.

        Started before the message is signed, so hashing and sending overlap (hashlib and
        the socket both let go of the GIL).
        """
        big = {id(f): f for f in frames if memoryview(f).nbytes >= BIG}
        if not big:
            return self._spill
        if self._spill_thread is None:
            self._spill_thread = concurrent.futures.ThreadPoolExecutor(1, "nbq-spill")
        keys = {i: self._spill_thread.submit(self._spill, f) for i, f in big.items()}
        return lambda f: keys[id(f)].result() if id(f) in keys else self._spill(f)

    def resolve(self, frames: list) -> list:
        """frames, each Spilled one read into a buffer of its own; LookupError if one is gone
        or has another size than its reference says, BadMessage("size") if together they
        pass max_message_size: checked before anything is allocated."""
        spilled = [f for f in frames if isinstance(f, Spilled)]
        if not spilled:
            return frames
        size = sum(f.size for f in spilled)
        if size > self.settings.max_message_size:
            raise BadMessage("size", f"its frames stored apart claim {size:,} bytes, more than "
                             f"max_message_size ({self.settings.max_message_size:,})")
        for f in spilled:
            if not f.key.startswith(P.encode() + b"b:"):
                raise LookupError(f"{f.key[:60]!r} is not a stored-apart frame's key")
        def strlen():
            pipe = self.r.pipeline(transaction=False)
            for f in spilled:
                pipe.strlen(f.key)
            return pipe.execute()

        lengths = self.retry("reading large frames' sizes", strlen)
        for f, n in zip(spilled, lengths):
            if n != f.size:
                raise LookupError(f"its large frame {f.key.decode(errors='replace')} is gone "
                                  f"(expired?) or is not the {f.size:,} bytes it was")
        return [self._read(f) if isinstance(f, Spilled) else f for f in frames]

    def _read(self, ref: Spilled) -> bytearray:
        # GETRANGE pieces copied into place: about twice as fast as one GET here, and the
        # buffer is writable, so arrays rebuilt on it are too
        buf = bytearray(ref.size)
        mv = memoryview(buf)
        for at in range(0, ref.size, READ_CHUNK):
            piece = self.retry("reading a large frame",
                               lambda: self.r.getrange(ref.key, at, at + READ_CHUNK - 1))
            if len(piece) != min(READ_CHUNK, ref.size - at):
                raise LookupError(f"its large frame {ref.key.decode()} is gone (expired?)")
            mv[at:at + len(piece)] = piece
        return buf

    def store(self, parts: list[tuple[dict, dict, list]], adds=(), acks=(),
              take: tuple = ("", 0, "", ())) -> list:
        """Store result parts [(task item, result item, payload)], add entries [(queue key,
        fields)], ack entries [(queue key, entry id, task id or "")]: atomically.

        Each part goes to the task's result list and watchers; the parts of one
        client travel to its result stream as one message (the part's own when
        it is the only one); large frames are stored apart, once.
        take = (worker id, n, function hash, queue names) takes and starts up to
        n entries for that worker in the same step, most urgent first; they are returned as
        [(queue key, entry id, fields)].
        """
        spill = self.spiller([f for _, _, payload in parts for f in payload])
        by_client: dict[str, list] = {}
        for task, item, payload in parts:
            by_client.setdefault(task.get("c", ""), []).append(
                (dict(item, s0=task.get("s0", 0)), payload))
        args: list = [P, self.ttl_s, time.time(), len(parts)]
        msgs = []
        for c, mine in by_client.items():
            for item, payload in mine:
                args += [item["id"], c, int(bool(c) and len(mine) == 1),
                         pack(self.signer.encode({"k": "res", "t": [item]}, payload), spill)]
            if c and len(mine) > 1:
                msgs.append((c, pack(self.signer.encode(
                    {"k": "res", "t": [item for item, _ in mine]},
                    [f for _, payload in mine for f in payload]), spill)))
        args.append(len(msgs))
        for c, blob in msgs:
            args += [c, blob]
        args.append(len(adds))
        for qk, fields in adds:
            args += [qk, 2 * len(fields), *(x for kv in fields.items() for x in kv)]
        args.append(len(acks))
        for qk, eid, tid in acks:
            args += [qk, eid, tid]
        wid, n, h, queues = take
        args += [wid, n, h, len(queues), *queues]
        got = self.retry("storing results", lambda: self._report(args=args))
        return [_entry(e) for e in got]

    def delivered(self, tid: str, n: int) -> list[int]:
        """Positions of a task with no stored result yet (from the headers: nothing is unpickled)."""
        done = bytearray(n)
        for blob in self.retry("reading results", lambda: self.r.lrange(P + "r:" + tid, 0, -1)):
            try:
                for item in protocol.loads_header(unpack(blob)[0])["t"]:
                    s, k = item.get("s", 0), item.get("n", 1)
                    done[s:s + k] = b"\x01" * len(done[s:s + k])
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        return [i for i, d in enumerate(done) if not d]

    def after_death(self, qk: str, eid, fields: dict | None, why: str, at, died: bool = True,
                    end: dict | None = None) -> None:
        """Re-queue or fail a claimed entry whose worker process is gone (rules: deaths.py)."""
        if not fields:
            self.retry("acking", lambda: (self.r.xack(qk, GROUP, eid), self.r.xdel(qk, eid)))
            return
        try:
            task, payload = self.task(qk, fields)
        except BadMessage as e:
            self.bad(e, f"entry {eid!r} of {qk}")
            self.drop([(qk, eid, fields, e)])
            return
        # first among its priority: the lane of re-queued tasks, read before the others
        rk = self.retry("re-queueing", lambda: group(self.r, task.get("q", "default"),
                                                     task.get("pr", 0), requeued=True))
        fail, retry = ([], task) if not died else deaths.after_death(
            task, self.delivered(task["id"], task.get("n", 1)), at, end)
        if retry is task:  # its worker left in good order, or the death does not count against
            # it (deaths.py): the same entry, queued again
            self.store([], adds=[(rk, fields)], acks=[(qk, eid, "")])
            self._retry_lost(task["id"])
            return
        parts = [(task, *deaths.ending(task, pos, why, end)) for pos in fail]
        adds = []
        if retry is not None:
            spill = self.spiller(payload)
            adds.append((rk, entry_fields(self.signer.encode({"k": "tasks", "t": [retry]}, payload),
                                          spill)))
            log.warning("re-queued task %s: %s", task["id"], why)
        self.store(parts, adds=adds, acks=[(qk, eid, task["id"] if retry is None else "")])
        if retry is not None:
            self._retry_lost(task["id"])

    def task(self, qk: str, fields: dict) -> tuple[dict, list]:
        """The verified (task item, payload) of an entry of stream qk; BadMessage if it is not
        one task whose signed queue and priority name qk (an entry copied into another
        queue's stream is refused there: "replay")."""
        header, payload = self.verify(fields, entry_frames)
        items = header.get("t")
        if header.get("k") != "tasks" or not isinstance(items, list) or len(items) != 1:
            raise BadMessage("invalid", "it is not one task")
        item = items[0]
        q, pr = item.get("q", "default"), item.get("pr", 0)
        if qk not in (queue_key(q, pr), queue_key(q, pr, requeued=True)):
            raise BadMessage("replay", f"it is a task of queue {q!r} priority {pr}, not of {qk}")
        return item, payload

    def _retry_lost(self, tid: str) -> None:
        """A re-queued task that waited for a retry runs again from the start: its clients
        see it STARTED (not RETRY) from now on."""
        msg = pack(self.signer.encode({"k": "state", "ids": [tid], "s": "STARTED"}))
        self.retry("telling a retry's clients", lambda: self._notice(
            args=[P, self.ttl_s, tid, "STARTED", msg, "if"]))

    def claim(self, qk: str, consumer: str, to: str, min_idle_ms: int) -> list:
        """Claim the pending entries of consumer (idle at least min_idle_ms) for consumer `to`."""
        pending = self.r.xpending_range(qk, GROUP, "-", "+", 10_000, consumername=consumer)
        ids = [p["message_id"] for p in pending]
        if not ids:
            return []
        return self.r.xclaim(qk, GROUP, to, min_idle_ms, ids)


# -- client -----------------------------------------------------------------

class RedisClient(ClientConnection):
    """A client: a sender thread plays the broker's part for this client; receive() reads rs:.

    hello (the client's heartbeat too) is answered at once with Redis's run_id (the boot
    id), not behind this client's sends: a Redis that stops answering leaves the client's
    hellos unanswered, and one that restarted says so: the client then sends again the
    tasks lost() names, those Redis no longer knows (it came back empty).
    """

    durable = True  # queued work is in Redis (with AOF or RDB, through a restart too)

    def __init__(self, address: str, key: bytes, client_id: str, context=None) -> None:
        self.store = Store(address, key)
        self.signer = self.store.signer
        self.cid = client_id
        try:
            check(self.store.r, self.store.safe)
            self.store.check_key(key)
        except NbqError:
            self.store.close()
            raise
        self._rx = connect(self.store.url, self.store.safe)  # the receiver's blocking reads
        self._rs, self._wk = P + "rs:" + client_id, P + "wk:" + client_id
        self._last = {self._rs: "0-0", self._wk: "0-0"}
        self._untrimmed = 0  # bytes read from rs: since it was last trimmed (64 KiB at least each)
        self._inbox: deque = deque()
        self._outbox: deque = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._queues: set[tuple[str, int]] = set()  # (queue, priority) with a stream made sure of
        self._maps: set[str] = set()
        # task id -> (its entry "queue key entry id", mode, items) for unfinished tasks with
        # frames stored apart: the only entries of this client a worker may drop (_dropped)
        self._own: dict[str, tuple[str, str, int]] = {}
        self._sender = threading.Thread(target=self._send_loop, name=f"nbq-redis-sender-{client_id}",
                                        daemon=True)
        self._sender.start()

    def hello(self, rq: int | None) -> None:
        try:
            try:
                boot = self.store.r.info("server").get("run_id")
            except redis.ResponseError:  # INFO not allowed to this user: restarts are not seen
                self.store.r.ping()
                boot = None
        except (redis.ConnectionError, redis.TimeoutError):
            return  # no answer: the client notices the silence
        self._reply_local({"k": "welcome", "rq": rq, "b": boot})

    def ship(self, h: str, frames: list) -> None:
        self._send({"k": "fn", "h": h}, frames)

    def submit(self, tasks: list[dict], frames: list) -> None:
        self._send({"k": "tasks", "t": tasks}, frames)

    def end_map(self, map_id: str, total: int) -> None:
        self._send({"k": "mapend", "mp": map_id, "total": total})

    def cancel(self, rq: int, ids: list[str]) -> None:
        self._send({"k": "cancel", "rq": rq, "ids": ids})

    def watch(self, rq: int | None, ids: list[str] = (), maps: list[str] = ()) -> None:
        self._send({"k": "watch", "rq": rq, "ids": list(ids), "maps": list(maps)})

    def info(self, rq: int) -> None:
        self._send({"k": "info", "rq": rq})

    def join(self, rq: int, key: str, member: str, total: int) -> None:
        self._send({"k": "join", "rq": rq, "key": key, "member": member, "total": total})

    def claim(self, rq: int, key: str, ttl: float) -> None:
        self._send({"k": "claim", "rq": rq, "key": key, "ttl": ttl})

    def control(self, rq: int, command: str, arguments: dict, destination: list[str] | None,
                ci: str) -> None:
        self._send({"k": "ctl", "rq": rq, "cmd": command, "a": arguments, "d": destination,
                    "ci": ci})

    def _send(self, header: dict, frames: list = ()) -> None:
        limit = self.store.settings.max_message_size
        if frames and protocol.frame_size(frames) > limit:
            items = header.get("t")
            if header.get("k") == "tasks" and len(items) > 1:  # a batch: each task is one entry
                for item, payload in protocol.split(items, frames):
                    self._send({"k": "tasks", "t": [item]}, payload)
                return
            raise MessageTooLarge(
                f"this {header.get('k')!r} message is {protocol.frame_size(frames):,} bytes, more "
                f"than max_message_size ({limit:,} bytes) at Redis {self.store.safe}: send less "
                "at once (a large input as a file or a shared path), or raise the limit with "
                "?max_message_size=BYTES in the Redis address of the client and every worker")
        header["c"] = self.cid
        with self._cv:
            self._outbox.append((header, list(frames)))
            self._cv.notify()

    def receive(self, timeout: float | None) -> list[tuple[dict, list]]:
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        if out:
            block = None
        else:
            block = 0 if timeout is None else max(1, int(timeout * 1000))
        trim = self._last[self._rs] if self._untrimmed >= TRIM_AFTER else None

        def read():
            if trim is None:
                return self._rx.xread(dict(self._last), block=block)
            pipe = self._rx.pipeline(transaction=False)
            pipe.xtrim(self._rs, minid=trim)
            pipe.xread(dict(self._last), block=block)
            return pipe.execute()[-1]

        # an outage returns after about timeout, so that the client's heartbeat goes on
        until = time.monotonic() + (1.0 if timeout is None else timeout)
        try:
            got = self.store.retry("receiving", read,
                                   give_up=lambda: self._closing or time.monotonic() > until)
        except (redis.ConnectionError, redis.TimeoutError):
            return out
        if trim is not None:
            self._untrimmed = 0
        large: list = []  # (task id, bytes, keys) of results read with frames stored apart
        for stream, entries in got or ():
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for eid, fields in entries:
                self._last[stream] = eid.decode() if isinstance(eid, bytes) else eid
                if stream == self._rs and fields and b"m" in fields:
                    self._untrimmed += max(len(fields[b"m"]), TRIM_AFTER // 64)
                    decoded = self.store.decode(fields[b"m"], f"entry {eid!r} of {stream}")
                    if decoded is not None and decoded[0].get("k") == "dropped":
                        decoded = self._dropped(decoded[0])
                    elif decoded is not None and decoded[0].get("k") == "res":
                        large += _stored_apart(decoded[0], fields[b"m"])
                        if self._own:
                            for item in decoded[0]["t"]:
                                self._own.pop(item["id"], None)
                    if decoded is not None:
                        out.append(decoded)
        if large:
            self.store.keep(large)
        while self._inbox:
            out.append(self._inbox.popleft())
        return out

    def _dropped(self, header: dict) -> tuple[dict, list] | None:
        """A worker's (signed) notice that it dropped a bad entry whose header names one of this
        client's tasks.  If that entry is the one this client added for the task (its frames
        stored apart are gone or changed, or pass the worker's max_message_size), the task
        fails here with SignatureError; else (a forged entry or a copy naming the task) nothing
        changes: unverified bytes never fail anyone's task, and the task's own entry still runs.
        Only entries with frames stored apart are known (_own): no other entry of a client
        with the right key fails to verify at a worker with the right key."""
        tid, why = header.get("id"), header.get("why")
        own = self._own.get(tid)
        if own is None or own[0] != header.get("e"):
            log.warning("a worker dropped an entry naming task %s that is not this client's own "
                        "(%s): ignored", tid, why)
            return None
        del self._own[tid]
        _, mode, n = own
        err = protocol.error_record(SignatureError(
            f"task {tid} was dropped by a worker, unrun: {why}"))
        if mode == "call":
            item, payload = {"id": tid, "s": 0, "n": 1, "ok": 0}, protocol.dumps(err)
        else:
            item = {"id": tid, "s": 0, "n": n}
            payload = protocol.dumps(([None] * n, dict.fromkeys(range(n), err)))
        item["nf"] = len(payload)
        return {"k": "res", "t": [item]}, payload

    def wake(self) -> None:
        try:
            self.store.r.xadd(self._wk, {"w": b""}, maxlen=1, approximate=False)
        except redis.RedisError:
            pass

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._sender.join(10.0)
        try:
            self.store.r.delete(self._rs, self._wk)
        except redis.RedisError:
            pass
        self.store.close()
        self._rx.close()

    # -- the sender thread: the broker's part for this client ------------------

    def _reply_local(self, header: dict, frames: list = ()) -> None:
        self._inbox.append((header, list(frames)))
        self.wake()

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._outbox and not self._closing:
                    self._cv.wait()
                if not self._outbox:
                    return
                batch = []
                while self._outbox and len(batch) < 2000:
                    batch.append(self._outbox.popleft())
            try:
                self._handle(batch)
            except NbqError as e:
                log.error("%s", e)
            except Exception:
                log.exception("error sending to Redis at %s", self.store.safe)

    def _handle(self, batch: list) -> None:
        simple: list = []
        for header, frames in batch:
            if header["k"] in FALLBACK:
                self._flush(simple)
                simple = []
                answer, messages = self._answer(header)
                self._inbox.append(({"k": "reply", "rq": header.get("rq"), "r": answer}, []))
                self._inbox.extend(messages)
                self.wake()
            else:
                simple.append((header, frames))
        self._flush(simple)

    def _answer(self, header: dict) -> tuple[dict, list]:
        """A request's answer from Redis state, and the messages it brings (stored results)."""
        handler = getattr(self, "_on_" + header["k"])
        try:
            return self.store.retry(header["k"], lambda: handler(header))
        except Exception:  # the request must still be answered, or the caller waits
            log.exception("error answering %r from Redis state", header["k"])
            return FALLBACK[header["k"]], []

    def _flush(self, messages: list) -> None:
        if not messages:
            return
        st = self.store
        for header, _ in messages:
            if header["k"] == "tasks":
                for item in header["t"]:
                    lane = (item.get("q", "default"), item.get("pr", 0))
                    if lane not in self._queues:
                        st.retry("creating a queue", lambda: group(st.r, *lane))
                        self._queues.add(lane)
        cmds: list = []  # (method, args, kwargs): a pipeline is rebuilt for each attempt
        hashes = set()
        tasks: list = []  # SUBMIT's arguments for each task
        big: dict = {}  # task id -> (queue key, mode, items) of tasks with frames stored apart
        ntasks = 0
        chunked: set[str] = set()  # maps given chunks here: their chunk lists' expiry renewed once
        for header, frames in messages:
            k = header["k"]
            if k == "fn":
                fk = P + "fn:" + header["h"]
                blob = pack(self.signer.encode({"k": "fn", "h": header["h"]}, frames))
                # SET, not SET NX: whatever is stored under the key (a blob a worker refused)
                # is replaced; once per client and function (and again after a refusal)
                cmds.append(("set", (fk, blob), {"ex": st.ttl_s}))
            elif k == "tasks":
                for item, payload in protocol.split(header["t"], frames):
                    item["c"] = self.cid
                    spill = st.spiller(payload)
                    fields = entry_fields(self.signer.encode({"k": "tasks", "t": [item]}, payload),
                                          spill)
                    qk = queue_key(item.get("q", "default"), item.get("pr", 0))
                    tasks += [item["id"], qk, 2 * len(fields),
                              *(x for kv in fields.items() for x in kv)]
                    if "b" in fields:
                        big[item["id"]] = (qk, item.get("m", "call"), item.get("n", 1))
                    ntasks += 1
                    hashes.add(item.get("h"))
                    mp = item.get("mp")
                    if mp is not None:
                        if mp not in self._maps:
                            self._maps.add(mp)
                            cmds.append(("hset", (P + "m:" + mp,), {"mapping": {
                                "star": int(item.get("m") == "star"), "c": self.cid}}))
                            cmds.append(("expire", (P + "m:" + mp, st.ttl_s), {}))
                        cmds.append(("rpush", (P + "mc:" + mp,
                                               f"{item['id']} {item.get('s0', 0)} {item.get('n', 1)}"), {}))
                        chunked.add(mp)
            elif k == "mapend":
                cmds.append(("hset", (P + "m:" + header["mp"], "total", header["total"]), {}))
                cmds.append(("expire", (P + "m:" + header["mp"], st.ttl_s), {}))
        cmds += [("expire", (P + "mc:" + mp, st.ttl_s), {}) for mp in chunked]
        if tasks:  # after the functions they name, in one step with their owners (EVAL: no
            # script cache to reload after a Redis restart; Redis compiles it once)
            hashes.discard(None)
            cmds.append(("eval", (SUBMIT, 0, P, st.ttl_s, self.cid, len(hashes), *hashes,
                                  ntasks, *tasks), {}))

        def execute():
            if len(cmds) == 1:  # a lone task: no pipeline's cost
                name, args, kwargs = cmds[0]
                return getattr(st.r, name)(*args, **kwargs)
            pipe = st.r.pipeline(transaction=False)
            for name, args, kwargs in cmds:
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute()

        if cmds:
            got = st.retry("sending", execute)
            if big:
                added = got if len(cmds) == 1 else got[-1]
                for tid, eid in zip(added[::2], added[1::2]):
                    qk, mode, n = big[_s(tid)]
                    self._own[_s(tid)] = (f"{qk} {_s(eid)}", mode, n)

    def _on_cancel(self, header: dict):
        ids = list(header["ids"])
        for tid in ids:
            self._own.pop(tid, None)
        args: list = [P, self.store.ttl_s, self.cid, len(ids)]
        for tid in ids:
            args += [tid, pack(self.signer.encode({"k": "res", "t": [
                {"id": tid, "rv": 1, "s": 0, "n": 1, "nf": 0}]}))]
        flags = self.store._cancel(args=args)
        return {tid: bool(f) for tid, f in zip(ids, flags)}, []

    def _on_watch(self, header: dict):
        r = self.store.r
        ids = list(header.get("ids", ()))
        maps = {}
        for mp in header.get("maps", ()):
            meta = r.hgetall(P + "m:" + mp)
            if not meta:
                continue
            chunks = []
            for line in r.lrange(P + "mc:" + mp, 0, -1):
                tid, s0, n = line.decode().split()
                chunks.append((tid, (int(s0), int(n))))
            total = meta.get(b"total")
            maps[mp] = {"total": int(total) if total is not None else None,
                        "star": bool(int(meta.get(b"star", 0))), "chunks": chunks}
            ids.extend(t for t, _ in chunks)
        pipe = r.pipeline(transaction=False)
        for tid in ids:  # subscribe first, then read: nothing falls between
            pipe.sadd(P + "wt:" + tid, self.cid)
            pipe.expire(P + "wt:" + tid, self.store.ttl_s)
        pipe.execute()
        pipe = r.pipeline(transaction=False)
        for tid in ids:
            pipe.lrange(P + "r:" + tid, 0, -1)
            pipe.exists(P + "st:" + tid)
            pipe.exists(P + "rt:" + tid)
        got = pipe.execute() if ids else []
        known, messages = {}, []
        for i, tid in enumerate(ids):
            parts, started, retrying = got[3 * i:3 * i + 3]
            known[tid] = ("DONE" if parts else "RETRY" if retrying else
                          "STARTED" if started else "PENDING")
            for blob in parts:
                decoded = self.store.decode(blob, f"a stored result of {tid}")
                if decoded is not None:
                    messages.append(decoded)
        return {"maps": maps, "known": known}, messages

    def lost(self, ids: list[str]) -> list[str]:
        """Tasks with neither an owner (o:, from SUBMIT until done) nor a result (r:): those
        a Redis that restarted without its data lost.  Its queues and maps are made again."""
        self._queues.clear()
        self._maps.clear()

        def ask():
            pipe = self.store.r.pipeline(transaction=False)
            for tid in ids:
                pipe.exists(P + "o:" + tid, P + "r:" + tid)
            return pipe.execute()
        return [tid for tid, n in zip(ids, self.store.retry("looking for lost tasks", ask)) if not n]

    def _on_info(self, header: dict):
        return info(self.store), []

    def _on_ctl(self, header: dict):
        dest = header.get("d")
        n = sum(1 for sid, meta, _ in live_supervisors(self.store.r)
                if dest is None or meta.get("n", sid) in dest or sid in dest)
        self.store.r.xadd(CTL, {"m": pack(self.signer.encode(header))},
                          maxlen=CONTROL_KEEP, approximate=True)
        return {"n": n}, []

    def _on_claim(self, header: dict):
        won = self.store.r.set(P + "claim:" + header["key"], self.cid, nx=True,
                               px=max(1, int(header["ttl"] * 1000)))
        return {"won": bool(won)}, []

    def _on_join(self, header: dict):
        fired = self.store._join(args=[P, self.store.ttl_s, header["key"], header["member"],
                                       header["total"]])
        return {"fire": bool(fired)}, []


def _stored_apart(header: dict, raw: bytes) -> list[tuple[str, int, list[bytes]]]:
    """(task id, bytes, keys) of the parts of a verified result message with frames stored apart."""
    out = []
    for item, frames in protocol.split(header["t"], unpack(raw)[2:]):
        refs = [f for f in frames if isinstance(f, Spilled)]
        if refs:
            out.append((item["id"], sum(f.size for f in refs), [f.key for f in refs]))
    return out


def live_supervisors(r: redis.Redis) -> list[tuple[str, dict, dict]]:
    """(id, heartbeat info, processes) of each supervisor whose heartbeat has not expired."""
    sids = sorted(s.decode() for s in r.smembers(P + "sups"))
    pipe = r.pipeline(transaction=False)
    for sid in sids:
        pipe.get(P + "hb:" + sid)
        pipe.hgetall(P + "procs:" + sid)
    got = pipe.execute()
    return [(sid, json.loads(got[2 * i]), got[2 * i + 1]) for i, sid in enumerate(sids)
            if got[2 * i] is not None]


def queued(r: redis.Redis, queues: list[str]) -> int:
    """How many tasks wait in queues' streams, taken by no worker process yet."""
    keys = stream_keys(r, queues)
    pipe = r.pipeline(transaction=False)
    for qk in keys:
        pipe.xlen(qk)
        pipe.xpending(qk, GROUP)
    got = pipe.execute(raise_on_error=False)
    return sum(n - p["pending"] for n, p in zip(got[::2], got[1::2]) if isinstance(p, dict))


def info(store: Store) -> dict:
    """Workers (live supervisors) and queue lengths, as the ZeroMQ broker's info reply."""
    r = store.r
    sups = live_supervisors(r)
    queues = {q.decode() for q in r.smembers(P + "queues")}
    for _, meta, _ in sups:
        queues.update(meta["q"])
    active: dict[str, int] = {}
    lengths, tasks = {}, 0
    for q, keys in queue_streams(r, sorted(queues)).items():
        lengths[q] = 0
        for qk in keys:
            try:
                summary = r.xpending(qk, GROUP)
            except redis.ResponseError:  # no stream or group yet
                continue
            n = r.xlen(qk)
            tasks += n
            lengths[q] += n - summary["pending"]
            for c in summary.get("consumers") or ():
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                sid = name.split("/")[0]
                active[sid] = active.get(sid, 0) + int(c["pending"])
    workers = [{"id": sid, "name": meta.get("n", sid), "host": meta["host"], "pid": meta["spid"],
                "concurrency": meta["conc"], "queues": list(meta["q"]), "active": active.get(sid, 0),
                "processes": sorted(int(p) for p in procs.values()), "memory": meta.get("mem")}
               for sid, meta, procs in sups]
    results = r.zcount(P + "done", time.time() - store.ttl, "+inf")
    dropped = {k.decode(): int(v) for k, v in r.hgetall(P + "bad").items()}
    return {"workers": workers, "queues": lengths, "tasks": tasks, "results": results,
            "dropped": dropped}


# -- supervisor ---------------------------------------------------------------

class _ControlReader:
    """The control stream, read with one XREAD BLOCK always outstanding on a connection of
    its own, so a supervisor's select() waits on that socket together with its other fds
    (no thread: the supervisor forks)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._conn = None
        self._retry_at = 0.0
        try:
            last = store.retry("reading the control stream", lambda: store.r.xrevrange(CTL, count=1))
        except redis.ResponseError as e:  # not a stream: read() says so until it is one
            log.warning("control commands: %s is not a stream (%s)", CTL, e)
            last = []
        self._last = last[0][0] if last else b"0-0"  # commands sent before this worker are not its

    def fileno(self) -> int | None:
        """The socket to wait on, with a read sent; None while Redis is unreachable."""
        if self._conn is None:
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._conn = self.store.r.connection_pool.get_connection()
                self._conn.send_command("XREAD", "BLOCK", CONTROL_BLOCK_MS, "STREAMS", CTL, self._last)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self._drop(e)
                return None
        return self._conn._sock.fileno()  # redis-py keeps the socket private; nothing else waits on it

    def read(self) -> list[dict]:
        """The control commands that arrived (verified); call when fileno() is readable."""
        try:
            got = self._conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._drop(e)
            return []
        except redis.ResponseError as e:  # nbq:ctl is not a stream: no control until it is
            self._drop(e)
            return []
        self.store.r.connection_pool.release(self._conn)
        self._conn = None
        out = []
        # the raw reply, no redis-py callback parsed it: a map under RESP3, pairs under RESP2
        for _, entries in (got.items() if isinstance(got, dict) else got or ()):
            for eid, flat in entries:
                self._last = eid
                fields = dict(zip(flat[::2], flat[1::2]))
                decoded = self.store.decode(fields.get(b"m", b""), f"control entry {eid!r}")
                if decoded is not None and decoded[0].get("k") == "ctl":
                    out.append(decoded[0])
        return out

    def _drop(self, e: Exception) -> None:
        log.warning("control commands: Redis at %s unavailable (%s)", self.store.safe, e)
        if self._conn is not None:
            self._conn.disconnect()
            self.store.r.connection_pool.release(self._conn)
            self._conn = None
        self._retry_at = time.monotonic() + 1.0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None


class RedisSupervisor(SupervisorConnection):
    """Heartbeats as a key with expiry; a dead process's entries re-queued by deaths.py's rules."""

    def __init__(self, address: str, key: bytes, sid: str) -> None:
        self.store = Store(address, key)
        self.key = key
        self.sid = sid
        self.queues: list[str] = []
        self._messages: list[dict] = []
        self._ever = False
        self._next_try = 0.0
        self._delay = 0.05
        check(self.store.r, self.store.safe)
        self.store.check_key(key)  # before any process is started
        self._control = _ControlReader(self.store)

    def heartbeat(self, info: dict) -> None:
        # every queue ever consumed: a dead process's entries are looked for in each
        self.queues = list(dict.fromkeys([*self.queues, *info.get("q", ())]))
        now = time.monotonic()
        if now < self._next_try:  # Redis is away: keep waiting, keep the processes
            self._messages.append({"k": "hb"})
            return
        try:
            pipe = self.store.r.pipeline(transaction=False)
            pipe.set(P + "hb:" + self.sid, json.dumps(info), px=int(HEARTBEAT_TIMEOUT * 1000))
            pipe.sadd(P + "sups", self.sid)
            pipe.expire(P + "procs:" + self.sid, int(HEARTBEAT_TIMEOUT * 3))
            claim_key(pipe, self.key)  # the cluster's key may have changed: stop if so
            compare_key(self.key, pipe.execute()[-1], self.store.safe)
            answer = {"k": "hb"}
            if info.get("as"):  # an autoscaling worker: how many tasks wait (as broker.py's)
                answer["ql"] = queued(self.store.r, info["q"])
        except redis.AuthenticationError as e:
            raise _auth_error(self.store.safe, e) from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("heartbeat: Redis at %s unavailable (%s); retrying in %.1f s",
                        self.store.safe, e, self._delay)
            self._next_try = now + self._delay
            self._delay = min(self._delay * 2, BACKOFF_MAX)
            if not self._ever:
                return  # never reached: the supervisor gives up after its connect timeout
        else:
            self._ever = True
            self._delay = 0.05
            self._next_try = 0.0
            self._messages.append(answer)
            return
        self._messages.append({"k": "hb"})

    def lost(self, wid: str, how: str, at, end: dict | None = None,
             leaving: bool = False) -> None:
        st = self.store

        def handle():
            pid = st.r.hget(P + "procs:" + self.sid, wid)
            why = f"worker process {pid.decode() if pid else wid} {how}"
            for qk in stream_keys(st.r, self.queues):
                try:
                    for eid, fields in st.claim(qk, wid, self.sid, 0):
                        st.after_death(qk, eid, fields, why, at, end=end)
                    st.r.xgroup_delconsumer(qk, GROUP, wid)
                except redis.ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise  # else a Redis restarted empty: nothing of wid's is there
            st.r.hdel(P + "procs:" + self.sid, wid)

        try:
            st.retry("re-queueing a dead process's tasks", handle, give_up=lambda: leaving)
        except redis.RedisError as e:  # live workers claim them once this one's heartbeat expires
            log.warning("left worker process %s's tasks to live workers: Redis at %s is "
                        "unavailable (%s)", wid, st.safe, e)

    def answer(self, request: dict, name: str, reply) -> None:
        st = self.store
        rs = P + "rs:" + request["c"]
        blob = pack(st.signer.encode({"k": "ctlr", "ci": request["ci"], "n": name, "r": reply}))

        def send():
            pipe = st.r.pipeline(transaction=False)
            pipe.xadd(rs, {"m": blob})
            pipe.expire(rs, st.ttl_s)
            pipe.execute()

        st.retry("answering a control command", send)

    def poll(self, timeout: float, fds: list[int]) -> tuple[list[dict], list[int]]:
        if self._messages:
            timeout = 0
        control = self._control.fileno()
        try:
            ready, _, _ = select.select(fds + ([control] if control is not None else []),
                                        [], [], timeout)
        except InterruptedError:
            ready = []
        messages, self._messages = self._messages, []
        if control is not None and control in ready:
            messages.extend(self._control.read())
        return messages, [fd for fd in ready if fd != control]

    def close(self, goodbye: bool) -> None:
        st = self.store
        if goodbye:
            def leave():
                consumers = [w.decode() for w in st.r.hkeys(P + "procs:" + self.sid)] + [self.sid]
                for qk in stream_keys(st.r, self.queues):
                    for wid in consumers:
                        for eid, fields in st.claim(qk, wid, self.sid, 0):
                            st.after_death(qk, eid, fields, "", None, died=False)
                        st.r.xgroup_delconsumer(qk, GROUP, wid)
                st.r.delete(P + "hb:" + self.sid, P + "procs:" + self.sid)
                st.r.srem(P + "sups", self.sid)
            try:
                st.retry("leaving", leave, give_up=lambda: True)
            except redis.RedisError as e:
                log.warning("could not leave Redis at %s in good order: %s", st.safe, e)
        self._control.close()
        st.close()


# -- worker process ------------------------------------------------------------

class _Notices:
    """A worker process's "started" notices: for submitted tasks still running STARTED_DELAY
    after they started, sent by a thread of their own."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cv = threading.Condition()
        self._due: dict[str, tuple[float, str]] = {}  # task id -> (when, submitting client)
        threading.Thread(target=self._run, name="nbq-started", daemon=True).start()

    def running(self, items: list[dict]) -> None:
        """Tasks that start now."""
        when = time.monotonic() + STARTED_DELAY
        with self._cv:
            idle = not self._due  # else the thread already waits for an earlier time
            for item in items:
                if item.get("f") and item.get("c"):
                    self._due[item["id"]] = (when, item["c"])
            if idle and self._due:
                self._cv.notify()

    def done(self, ids) -> None:
        """Tasks that need no notice any more."""
        with self._cv:
            for tid in ids:
                self._due.pop(tid, None)

    def _run(self) -> None:
        st = self._store
        while True:
            with self._cv:
                while not self._due:
                    self._cv.wait()
                wait = min(when for when, _ in self._due.values()) - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                now = time.monotonic()
                due: dict[str, list] = {}
                for tid, (when, c) in list(self._due.items()):
                    if when <= now:
                        due.setdefault(c, []).append(tid)
                        del self._due[tid]

            def tell():
                pipe = st.r.pipeline(transaction=False)
                for c, ids in due.items():
                    pipe.xadd(P + "rs:" + c, {"m": pack(st.signer.encode({"k": "started", "ids": ids}))})
                    pipe.expire(P + "rs:" + c, st.ttl_s)
                pipe.execute()

            try:
                st.retry("telling submitters", tell)
            except redis.RedisError as e:
                log.warning("could not send started notices: %s", e)


def _too_large(item: dict, size: int, limit: int) -> tuple[dict, list]:
    """A result part too large to store, as the error saying so (for each item of a chunk)."""
    err = protocol.error_record(MessageTooLarge(
        f"the result of task {item['id']} is {size:,} bytes, more than max_message_size "
        f"({limit:,} bytes): return less (write large outputs to a file or a shared path), or "
        "raise the limit with ?max_message_size=BYTES in the Redis address of the client "
        "and every worker"))
    if "ok" in item:  # a call's result
        payload = protocol.dumps(err)
        return dict(item, ok=0, nf=len(payload)), payload
    n = item.get("n", 1)
    payload = protocol.dumps(([None] * n, dict.fromkeys(range(n), err)))
    return dict(item, nf=len(payload)), payload


class RedisWorker(WorkerConnection):
    """One consumer of the queues' groups: XREADGROUP, run, store results and XACK atomically."""

    def __init__(self, address: str, key: bytes, wid: str, hello: dict) -> None:
        self.store = Store(address, key)
        self.wid = wid
        self.sid = hello["s"]
        st = self.store
        st.check_key(key)  # before reading any entry: a process with another key takes none

        def join():
            for q in hello["q"]:
                group(st.r, q)
            st.r.hset(P + "procs:" + self.sid, wid, hello["pid"])
            st.r.expire(P + "procs:" + self.sid, int(HEARTBEAT_TIMEOUT * 3))
            return stream_keys(st.r, hello["q"])

        self.queues: list[str] = list(hello["q"])
        self.keys = st.retry("joining", join)  # its queues' streams, read in this order
        # task id -> (queue key, entry id, item, keys of its frames stored apart)
        self._batch: dict[str, tuple[str, str, dict, list]] = {}
        self._reported: set[str] = set()  # tasks of the batch with a result sent before "ready"
        self._carried: set[str] = set()   # tasks held past their batch (due later): acked when done
        # entries found again after a connection error, or read with a more urgent one: run
        # one by one before any new ones are taken
        self._held: deque = deque()
        self._prefetched: list = []  # the next batch, taken (and started) when the last one ended
        self._troubles_seen = self.store.troubles
        self._notices = _Notices(self.store)
        self._cost: dict[str, float] = {}
        self._next_reclaim = time.monotonic() + random.random() * RECLAIM_EVERY

    def fetch(self, timeout: float | None = None) -> list[tuple[dict, list]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        batch, self._prefetched = self._prefetched, []
        while True:
            if time.monotonic() >= self._next_reclaim:  # busy or idle, every RECLAIM_EVERY
                self._next_reclaim = time.monotonic() + RECLAIM_EVERY
                try:
                    self._reclaim()
                except redis.RedisError as e:
                    log.warning("looking for dead workers' tasks failed: %s", e)
            if batch:
                return batch
            left = BLOCK_MS if deadline is None else int(1000 * (deadline - time.monotonic()))
            if left <= 0:
                return []
            batch = self._next_batch(min(BLOCK_MS, left))

    def _next_batch(self, block_ms: int) -> list[tuple[dict, list]]:
        """The next batch, started; [] when none came within block_ms."""
        st = self.store
        if st.troubles != self._troubles_seen:
            # An XREADGROUP whose reply was lost with a connection left its entries
            # pending on this consumer, unseen: read this consumer's own history (id 0).
            self._troubles_seen = st.troubles
            held = {eid for _, eid, _ in self._held}
            got = st.retry("recovering tasks", lambda: st.r.xreadgroup(
                GROUP, self.wid, dict.fromkeys(self.keys, "0"), count=BATCH_MAX))
            self._held.extend((s.decode(), eid, f) for s, es in got or () for eid, f in es
                              if eid not in held)
        held = bool(self._held)
        if held:
            entries = [self._held.popleft()]
        else:
            if len(self.keys) > len(self.queues):
                # priority streams: a backlog is taken most urgent first, as REPORT does
                # (XREADGROUP would return an entry of each stream that has any)
                taken = self._verify(st.store([], take=(self.wid, 1, "", self.queues)))
                if taken:
                    return self._begin(taken)
            got = st.retry("fetching tasks", lambda: st.r.xreadgroup(
                GROUP, self.wid, dict.fromkeys(self.keys, ">"), count=1, block=block_ms))
            # one entry of each stream that had any: the most urgent runs, the rest (pending
            # on this consumer now) are held to run next, one by one
            entries = sorted(((s.decode(), eid, f) for s, es in got or () for eid, f in es),
                             key=lambda e: self.keys.index(e[0]))
            self._held.extend(entries[1:])
            entries = entries[:1]
        first = self._verify(entries)
        if not first:
            return []
        qk, eid, item, _, _ = first[0]
        h = item.get("h") or ""
        more = 0 if held else self._batch_size(h) - 1
        got = st.retry("starting tasks", lambda: st._start(
            args=[P, st.ttl_s, self.wid, qk, eid, item["id"], more, h]))
        if not got[0]:
            return []  # revoked: acknowledged and deleted by the script, never run
        return self._begin(first + self._verify([_entry(e) for e in got[1:]]))

    def _batch_size(self, h: str) -> int:
        """How many tasks of function h make a batch: ~BATCH_SECONDS of measured work, else 1."""
        cost = self._cost.get(h)
        if cost is None or cost > BATCH_SECONDS / 2:
            return 1
        return max(1, min(BATCH_MAX, int(BATCH_SECONDS / max(cost, 1e-6))))

    def _verify(self, entries: list) -> list:
        """(queue key, entry id, item, payload, fields) of entries that are verified tasks of
        the stream they came from; the others are dropped (Store.drop), never run."""
        out, bad = [], []
        for qk, eid, fields in entries:
            try:
                if not fields:
                    raise BadMessage("invalid", "it has no fields (deleted?)")
                item, payload = self.store.task(qk, fields)
            except BadMessage as e:
                self.store.bad(e, f"entry {eid!r} of {qk}")
                bad.append((qk, eid, fields, e))
                continue
            out.append((qk, eid, item, payload, fields))
        if bad:
            self.store.drop(bad)
        return out

    def _begin(self, batch: list) -> list[tuple[dict, list]]:
        """The batch of started entries, noted for report() and for "started" notices."""
        out = []
        for qk, eid, item, payload, fields in batch:
            spilled = ([f.key for f in entry_frames(fields) if isinstance(f, Spilled)]
                       if b"b" in fields else [])  # only an entry with frames stored apart has any
            self._batch[item["id"]] = (qk, eid, item, spilled)
            out.append((item, payload))
        self._notices.running([item for item, _ in out])
        return out

    def function(self, h: str) -> list:
        """The payload of the function stored under fn:{h}, if it is a signed function message
        whose signed hash and whose payload's own hash are h; else FunctionRefused (the client
        that sees it ships the function again: SET, replacing what is stored)."""
        deadline = time.monotonic() + FUNCTION_WAIT
        while True:
            blob = self.store.retry("fetching a function",
                                    lambda: self.store.r.get(P + "fn:" + h))
            if blob is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if blob is None:
            raise NbqError(f"function {h} is not stored at {self.store.safe} (expired?)")
        try:
            header, payload = self.store.verify(blob)
        except BadMessage as e:
            self.store.bad(e, f"function {h}")
            raise FunctionRefused(h, f"what is stored under its key is not signed under the "
                                     f"shared key ({e})") from None
        if header.get("k") != "fn" or header.get("h") != h:
            raise FunctionRefused(h, f"what is stored under its key is another message "
                                     f"({header.get('k')!r} for {header.get('h')!r})")
        if protocol.function_hash(b"".join(payload)) != h:
            raise FunctionRefused(h, "the stored payload's hash is not the function's")
        return payload

    def report(self, results: list[tuple[dict, list]], ready: bool) -> None:
        self._notices.done(item["id"] for item, _ in results)
        parts = []
        limit = self.store.settings.max_message_size
        for item, payload in results:
            if payload and protocol.frame_size(payload) > limit:
                item, payload = _too_large(item, protocol.frame_size(payload), limit)
            entry = self._batch.get(item["id"])
            task = entry[2] if entry else {"id": item["id"]}
            d = item.get("d")
            h = task.get("h")
            if d is not None and h is not None:
                old = self._cost.get(h)
                self._cost[h] = d if old is None else 0.8 * old + 0.2 * d
            parts.append((task, item, payload))
            self._reported.add(item["id"])
        acks, spilled = [], []
        for tid in self._carried & {item["id"] for item, _ in results}:
            self._carried.discard(tid)  # held past its batch (due later), now done
            qk, eid, _, keys = self._batch.pop(tid)
            acks.append((qk, eid, tid))
            spilled += keys
        if not ready:
            self._finish(parts, acks, spilled)
            return
        reported, self._reported = self._reported, set()
        last = ""  # the function of the batch's last task: the next batch may be more of it
        for tid, (qk, eid, task, keys) in list(self._batch.items()):
            if tid in reported:
                acks.append((qk, eid, tid))
                spilled += keys
                last = task.get("h") or ""
                del self._batch[tid]
            else:
                self._carried.add(tid)
        # The next batch is taken and started in the same step that stores these results,
        # as the ZeroMQ broker hands a worker its next task with its "ready": so a client
        # that sees a result and cancels what follows finds the next task started.
        ntake = 0 if self._held else self._batch_size(last)  # held entries go first
        taken = self._finish(parts, acks, spilled, take=(self.wid, ntake, last, self.queues))
        self._prefetched = self._begin(self._verify(taken))

    def notice(self, ids: list[str], state: str) -> None:
        st = self.store
        if state == "RETRY":
            self._notices.done(ids)  # no "started" notice after this one
        msgs = [(tid, pack(st.signer.encode({"k": "state", "ids": [tid], "s": state})))
                for tid in ids]

        def tell():
            for tid, msg in msgs:
                st._notice(args=[P, st.ttl_s, tid, state, msg])

        try:
            st.retry("telling a retry's clients", tell)
        except redis.RedisError as e:
            log.warning("could not send %s notices: %s", state, e)

    def output(self, task: dict, frames: list) -> None:
        cid = task.get("c")
        if cid is None:
            return
        entry = {"m": pack(self.store.signer.encode({"k": "out", "id": task["id"]}, frames))}
        try:  # redis-py's pool is thread-safe: a task's threads print too
            pipe = self.store.r.pipeline(transaction=False)
            pipe.xadd(P + "rs:" + cid, entry)
            pipe.expire(P + "rs:" + cid, self.store.ttl_s)
            pipe.execute()
        except redis.RedisError:
            pass  # best effort: the output travels with the result too

    def _finish(self, parts: list, acks: list, spilled: list, take: tuple = ("", 0, "", ())) -> list:
        """Store results, acknowledge finished entries, drop their large inputs (no re-run needs them)."""
        taken = self.store.store(parts, acks=acks, take=take)
        if spilled:
            self.store.retry("deleting large inputs", lambda: self.store.r.delete(*spilled))
        return taken

    def _reclaim(self) -> None:
        """Follow the supervisor's queue list (add_consumer, cancel_consumer); claim and
        re-queue the entries of consumers whose supervisor's heartbeat expired."""
        st = self.store
        r = st.r
        hb = r.get(P + "hb:" + self.sid)
        try:  # unsigned: this process's supervisor rewrites it every heartbeat
            queues = json.loads(hb)["q"] if hb is not None else None
            queues = queues if isinstance(queues, list) and all(isinstance(q, str) for q in queues) else None
        except (ValueError, TypeError, KeyError):
            queues = None
        if queues is not None:
            for q in set(queues) - set(self.queues):
                group(r, q)
            self.queues = queues
        self.keys = stream_keys(r, self.queues)  # and the priorities given streams since
        for sid in [s.decode() for s in r.smembers(P + "sups")]:
            if not r.exists(P + "hb:" + sid):
                r.srem(P + "sups", sid)
                r.delete(P + "procs:" + sid)
        for qk in self.keys:
            summary = r.xpending(qk, GROUP)
            for c in summary.get("consumers") or ():
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                sid = name.split("/")[0]
                if sid == self.sid or r.exists(P + "hb:" + sid):
                    continue
                # a worker gone whole says nothing about its tasks: re-queued as they were
                for eid, fields in st.claim(qk, name, self.wid, int(HEARTBEAT_TIMEOUT * 250)):
                    st.after_death(qk, eid, fields, "", None, died=False)
                if not r.xpending_range(qk, GROUP, "-", "+", 1, consumername=name):
                    r.xgroup_delconsumer(qk, GROUP, name)

    def close(self) -> None:
        self.store.close()
