"""The ZeroMQ broker: in-memory queues between clients and worker processes.

One ROUTER socket serves everyone; the first byte of a peer's identity says
what it is: ``c`` a client's receiving socket, ``t`` a client's sending
socket, ``s`` a worker supervisor (``nbq worker``), ``w`` one worker process.

Message kinds (header ``k``), see protocol.py for the frame layout:

  from a client     hello (rx socket; also its heartbeat, every second) · fn · tasks · cancel
                    · watch · mapend · info · join
                    · ctl (a control command: cmd, a arguments, d destination names or
                      null for all, ci the client's collection id) · bye
  from a supervisor hb (heartbeat, answered; n its worker name) · lost (a worker process
                    died; run: the task it was running, at: [that task, item] when the item
                    is known; end: why the supervisor killed it, see deaths.py) · ctlr (its answer to a ctl: c, ci, n, r) · bye
  from a worker     hello (idle, ready for work) · res (results; the worker is idle again)
                    · rej (a message it got failed its signature check) · ntc (a state
                      notice: ids, s RETRY when a retry holds them, STARTED when they run again)
  to a client       welcome (b: this broker's boot id, new at each start) · res · started
                    · state (a worker's notice: ids, s) · reply
                    · ctlr (forwarded as it came)
  to a supervisor   hb (ql: tasks queued for it, when its hb has as, its --autoscale maximum)
                    · ctl (as the client sent it, with c) · stop
  to a worker       fn · tasks
  to the sender of a hello or hb whose signature failed: keyfp, unsigned (fp: the fingerprint
                    of the broker's key, so a peer with another key stops, saying so; keys.py)

Control: the broker sends a client's ctl to every supervisor whose name is in
``d`` (all when null) and replies {"n": how many}; each answers with ctlr, which
the broker forwards to the client, which collects n answers or stops at its
timeout.

Each queue serves its most urgent priority first (header ``pr``, 0-9, absent: 0; Lanes),
in order within one; a task re-queued after a death goes first among its priority.

Dispatch is by credit: a worker process holds at most one message of tasks
at a time, so a task handed to a worker is started (a batch of tasks measured
at under a millisecond each may share a message, lasting ~2 ms in all).
Sockets have no high-water mark and ROUTER_MANDATORY is set, so nothing is
dropped silently: a result for a client that is gone waits for it to come back,
and the result store keeps results (up to its byte budget, results.py) until
``result_expires``, where any client can fetch them by id.

A broker that restarts starts empty: each client re-sends what it has not
seen finish (a task id already held is not queued twice),
supervisors' heartbeats and worker processes' hellos (on reconnecting)
register them again, and a task whose function has not arrived yet waits
for it (``parked``) instead of failing on its worker.

A task whose process died while running it, its worker alive, runs again
until such deaths reach its limit (max_task_deaths), then fails with WorkerLost;
a chunk re-run after a death reports item by item, so the item that kills its
process fails alone.  The tasks a dead process only held, and every task of a
worker that stopped answering heartbeats, run again as they were (deaths.py).
"""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import zmq

from . import deaths, keys, protocol, replay, schema, secure
from .errors import SignatureError
from .results import ResultStore

log = logging.getLogger("nbq.broker")

#: The broker acts on a message only once it is verified (signature), well formed
#: (schema.py) and not a replay (replay.py); any other is dropped, counted in
#: ``info``'s "dropped" and logged at most every DROP_LOG_EVERY seconds, and its
#: sender gets nothing.  Verifying costs ~0.8 ms per MB, paid in the loop.
DROP_LOG_EVERY = 1.0
DEFAULT_MAX_MESSAGE_SIZE = 512 << 20  # bytes, as Redis's largest value
DEFAULT_RESULT_BUDGET = 256 << 20     # bytes of delivered results kept for AsyncResult/from_id
SMALL_FRAME = 512  # a batched task's payload frames this small are kept as bytes (less memory)
HEARTBEAT = 1.0          # seconds between supervisor heartbeats
HEARTBEAT_TIMEOUT = 4.0  # silence after which a supervisor and its processes are dead
BATCH_SECONDS = 0.002    # a batch of short tasks lasts about this long
STARTED_DELAY = 0.01     # a task still running this long after dispatch is reported STARTED
BATCH_MAX = 256
DEFAULT_RESULT_EXPIRES = 86400.0


@dataclass(eq=False, slots=True)
class Task:
    """A task as the broker sees it: its header item and payload, never unpickled."""
    item: dict
    frames: list
    original: list | None  # the message it came in, when it was alone: forwarded as is
    where: str = "queued"  # "queued", or the id of the worker process running it
    delivered: bytearray | None = None  # per item: has a result reached its client
    ndelivered: int = 0
    retrying: bool = False  # held by its worker until a retry's eta (a RETRY notice)

    def __post_init__(self) -> None:
        if self.delivered is None:
            self.delivered = bytearray(self.item.get("n", 1))

    @property
    def id(self) -> str:
        return self.item["id"]

    def undelivered(self) -> list[int]:
        return [i for i, d in enumerate(self.delivered) if not d]


class Lanes:
    """A queue's tasks in lanes by priority (header ``pr``, 0-9, absent: 0): the most
    urgent lane is served first, each lane in order (FIFO; a re-queued task goes first)."""

    __slots__ = ("_lanes", "_order")

    def __init__(self) -> None:
        self._lanes: dict[int, deque] = {}
        self._order: list[deque] = []  # the lanes, most urgent first

    def _lane(self, task: Task) -> deque:
        pr = task.item.get("pr", 0)
        lane = self._lanes.get(pr)
        if lane is None:
            lane = self._lanes[pr] = deque()
            self._order = [self._lanes[p] for p in sorted(self._lanes, reverse=True)]
        return lane

    def append(self, task: Task) -> None:
        self._lane(task).append(task)

    def appendleft(self, task: Task) -> None:
        self._lane(task).appendleft(task)

    def head(self) -> deque | None:
        """The most urgent lane with a queued task first (cancelled and taken ones dropped)."""
        for lane in self._order:
            while lane and lane[0].where != "queued":
                lane.popleft()
            if lane:
                return lane
        return None

    def __iter__(self):
        return itertools.chain.from_iterable(self._order)


@dataclass(eq=False)
class Proc:
    """One worker process (a child of a supervisor)."""
    wid: str
    sid: str
    pid: int
    queues: tuple
    running: list = field(default_factory=list)
    functions: set = field(default_factory=set)
    idle: bool = True
    away_until: float = 0.0  # unreachable at the last send: not tried again before then


@dataclass(eq=False)
class Supervisor:
    sid: str
    host: str
    pid: int
    concurrency: int
    queues: tuple
    seen: float
    name: str = ""
    procs: set = field(default_factory=set)
    memory: int | None = None  # resident bytes of it and its processes, as its heartbeat said


class Broker:
    """Routes tasks to worker processes and results back; run() until stop()."""

    def __init__(self, key: bytes, bind: str | list[str] = "tcp://127.0.0.1:5555",
                 context: zmq.Context | None = None,
                 result_expires: float = DEFAULT_RESULT_EXPIRES,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 result_budget: int = DEFAULT_RESULT_BUDGET,
                 max_age: float = replay.DEFAULT_MAX_AGE, curve: bool | None = None) -> None:
        self.signer = protocol.Signer(key)
        self.fingerprint = keys.fingerprint(key)
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)  # a larger frame: peer disconnected
        self.max_message_size = max_message_size
        binds = [bind] if isinstance(bind, str) else list(bind)
        self.curve = any(map(secure.needs_curve, binds)) if curve is None else curve
        self._zap = secure.CurveGate(self.sock, key) if self.curve else None
        self.addresses = []
        for addr in binds:
            if addr.startswith("tcp://") and addr.endswith(":0"):
                port = self.sock.bind_to_random_port(addr.rsplit(":", 1)[0])
                addr = f"{addr.rsplit(':', 1)[0]}:{port}"
            else:
                self.sock.bind(addr)
            self.addresses.append(addr)
        self._stop_r = self.ctx.socket(zmq.PAIR)
        self._stop_addr = f"inproc://nbq-broker-stop-{id(self)}"
        self._stop_r.bind(self._stop_addr)
        self.result_expires = result_expires
        self.heartbeat_timeout = heartbeat_timeout
        self.boot = uuid.uuid4().hex[:12]  # tells a client this is a broker it has not seen

        self.queues: dict[str, Lanes] = {}
        self.tasks: dict[str, Task] = {}
        self.functions: dict[str, list] = {}
        self.parked: dict[str, list] = {}            # function hash -> tasks waiting for it
        self.procs: dict[str, Proc] = {}
        self.supervisors: dict[str, Supervisor] = {}
        self.clients: dict[str, bytes] = {}          # client id -> routing id of its rx socket
        self.unsent: dict[str, list] = {}            # messages for a client not connected yet
        self._outgoing: list[tuple[str, list]] = []  # for clients, sent after dispatching
        self.results = ResultStore(result_budget)    # task id -> [(item, frames, raw)] parts
        self.watchers: dict[str, set] = {}           # task id -> client ids that asked for it
        self.maps: dict[str, dict] = {}              # map id -> {"total": n, "chunks": [ids]}
        self.joins: dict[str, dict] = {}             # join key -> {"m": member set, "fired": bool}
        self.claims: dict[str, float] = {}           # claim key -> when it may be claimed again
        self.expiry: deque = deque()                 # (time, kind, id) in time order
        self.cost: dict[str, float] = {}             # function hash -> seconds per task (EMA)
        self._names: dict[str, str] = {}             # one copy of each function hash and queue name
        self._started: list[tuple[float, Task]] = []  # dispatched, not yet reported STARTED
        self._timer = 0.0
        self.replays = replay.ReplayWindow(max_age)
        self.dropped = {"signature": 0, "invalid": 0, "replay": 0, "size": 0}
        self._drop_log_at = 0.0
        self._handlers = {
            "hello": self._on_hello, "fn": self._on_fn, "tasks": self._on_tasks,
            "cancel": self._on_cancel, "watch": self._on_watch, "mapend": self._on_mapend,
            "info": self._on_info, "join": self._on_join, "bye": self._on_bye, "hb": self._on_hb,
            "lost": self._on_lost, "res": self._on_res, "rej": self._on_rej,
            "ctl": self._on_ctl, "ctlr": self._on_ctlr, "ntc": self._on_ntc,
            "claim": self._on_claim, "out": self._on_out,
        }

    # -- loop -----------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() is called from any thread."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        zap = self._zap.sock if self._zap is not None else None
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        try:
            while True:
                wait = STARTED_DELAY if self._started else HEARTBEAT / 2
                events = dict(poller.poll(wait * 1000))
                if self._stop_r in events:
                    break
                if zap in events:
                    self._zap.answer()
                if self.sock in events:
                    self._drain()
                now = time.monotonic()
                self._flush_started(now)
                self._flush_clients()
                if now >= self._timer:
                    self._timer = now + HEARTBEAT / 2
                    self.check_heartbeats(now)
                    self.expire(time.time())
                    self.replays.forget(time.time())
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask run() to return; safe from another thread."""
        s = self.ctx.socket(zmq.PAIR)
        s.connect(self._stop_addr)
        s.send(b"")
        s.close(linger=1000)

    def _shutdown(self) -> None:
        for sup in self.supervisors.values():
            self._send(b"s" + sup.sid.encode(), {"k": "stop"})
        self.sock.close(linger=200)
        self._stop_r.close(linger=0)
        if self._zap is not None:
            self._zap.close()

    def _drain(self) -> None:
        for _ in range(10000):
            try:
                msg = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.handle(msg)
        try:
            self.dispatch()
        except Exception:  # a bug here must not take the broker down with every queued task
            log.exception("error dispatching tasks")

    def handle(self, msg: list) -> None:
        """Handle one message that is verified, well formed and new; drop any other, changing nothing."""
        peer = msg[0].bytes
        body = msg[1:]
        if protocol.frame_size(body) > self.max_message_size:
            self._drop(peer, "size", f"it is larger than max_message_size ({self.max_message_size})")
            return
        try:
            header, frames = self.signer.decode(body)
        except SignatureError as e:
            self._drop(peer, "signature", str(e))
            self._refuse(peer, body)
            return
        why = schema.refuse(peer, header, frames)
        if why is not None:
            self._drop(peer, "invalid", why)
            return
        why = self.replays.refuse(header, time.time())
        if why is not None:
            self._drop(peer, "replay", why)
            return
        try:
            self._handlers[header["k"]](peer, header, frames, body)
        except Exception:  # a bad but signed message must not stop the broker
            log.exception("error handling %r from %r", header.get("k"), peer[:40])

    def _drop(self, peer: bytes, what: str, why: str) -> None:
        """Count a dropped message; log it unless another was logged less than a second ago."""
        self.dropped[what] += 1
        now = time.monotonic()
        if now >= self._drop_log_at:
            self._drop_log_at = now + DROP_LOG_EVERY
            log.warning("dropped a message from %r: %s (dropped so far: %s)", peer[:40], why,
                        ", ".join(f"{n} {k}" for k, n in self.dropped.items() if n))

    def _refuse(self, peer: bytes, body: list) -> None:
        """Answer a hello or heartbeat whose signature failed with this broker's key fingerprint,
        unsigned: a client or worker with another key then stops with a clear error."""
        if len(body) != 2 or len(body[0]) > 1000:
            return
        try:
            kind = protocol.loads_header(body[0]).get("k")
        except (ValueError, AttributeError):
            return
        if kind in ("hello", "hb"):
            self._send_raw(peer, protocol.refusal(self.fingerprint))

    def _send(self, peer: bytes, header: dict, frames: list = ()) -> bool:
        return self._send_raw(peer, self.signer.encode(header, frames))

    def _send_raw(self, peer: bytes, msg: list) -> bool:
        try:
            self.sock.send_multipart([peer, *msg], copy=False)
            return True
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False

    def _to_client(self, cid: str, msg: list) -> None:
        """Queue a message for a client; sent once idle workers have their next tasks."""
        self._outgoing.append((cid, msg))

    def _flush_clients(self) -> None:
        out, self._outgoing = self._outgoing, []
        for cid, msg in out:
            peer = self.clients.get(cid)
            if peer is None or not self._send_raw(peer, msg):
                self.unsent.setdefault(cid, []).append(msg)

    # -- clients --------------------------------------------------------------

    def _on_hello(self, peer, header, frames, body):
        if peer[:1] == b"w":
            sup = self._supervisor(header)
            if header["w"] in self.procs:  # reconnected: what it ran was lost with the link
                self._proc_gone(header["w"], died=False)
            proc = Proc(header["w"], header["s"], header["pid"], tuple(sup.queues))
            self.procs[proc.wid] = proc
            sup.procs.add(proc.wid)
            self._send(peer, {"k": "welcome", "mx": self.max_message_size})
            return
        cid = header["c"]
        self.clients[cid] = peer
        self._send(peer, {"k": "welcome", "rq": header.get("rq"), "b": self.boot,
                          "mx": self.max_message_size})
        self._outgoing.extend((cid, msg) for msg in self.unsent.pop(cid, ()))

    def _on_bye(self, peer, header, frames, body):
        if peer[:1] == b"s":
            sup = self.supervisors.pop(header["s"], None)
            if sup:
                for wid in sup.procs:
                    self._proc_gone(wid, died=False)
            return
        cid = header["c"]
        self.clients.pop(cid, None)
        self.unsent.pop(cid, None)

    def _on_fn(self, peer, header, frames, body):
        self.functions[header["h"]] = frames
        for task in reversed(self.parked.pop(header["h"], ())):
            if task.where == "parked":
                task.where = "queued"
                self._queue(task.item).appendleft(task)

    def _on_tasks(self, peer, header, frames, body):
        items = header["t"]
        alone = len(items) == 1 and "a" not in items[0]
        names = self._names
        if len(names) > 10_000:
            names.clear()
        for item, payload in protocol.split(items, frames):
            item["c"] = header["c"]
            if item["id"] in self.tasks:  # sent again (after a restart, a silence): queued once
                continue
            item["h"] = names.setdefault(item["h"], item["h"])
            if "q" in item:
                item["q"] = names.setdefault(item["q"], item["q"])
            if not alone:  # a zmq.Frame costs ~180 bytes of memory beside its data
                payload = [f.bytes if len(f) < SMALL_FRAME else f for f in payload]
            task = Task(item, payload, body if alone else None)
            self.tasks[task.id] = task
            mp = item.get("mp")
            if mp is not None:
                meta = self.maps.get(mp)
                if meta is None:
                    meta = self.maps[mp] = {"total": None, "chunks": [], "c": item["c"],
                                            "star": item.get("m") == "star"}
                    self._expire_later("map", mp)
                meta["chunks"].append(task.id)
            self._queue(item).append(task)

    def _queue(self, item: dict) -> Lanes:
        """The lanes of a task's queue, made on first use."""
        q = item.get("q", "default")
        lanes = self.queues.get(q)
        if lanes is None:
            lanes = self.queues[q] = Lanes()
        return lanes

    def _on_mapend(self, peer, header, frames, body):
        meta = self.maps.get(header["mp"])
        if meta is not None:
            meta["total"] = header["total"]

    def _on_cancel(self, peer, header, frames, body):
        answer = {}
        for tid in header["ids"]:
            task = self.tasks.get(tid)
            if task is not None and task.where == "queued":
                task.where = "cancelled"  # skipped when its queue reaches it
                del self.tasks[tid]
                part = ({"id": tid, "rv": 1, "s": 0, "s0": task.item.get("s0", 0),
                         "n": task.item.get("n", 1), "nf": 0}, [], None)
                self._store_part(tid, part)
                # the owner learns it from the reply when it asked; otherwise from this
                for cid in {task.item["c"], *self.watchers.pop(tid, ())} - {header["c"]}:
                    self._to_client(cid, self._result_message(part))
                answer[tid] = True
            else:
                answer[tid] = False
        self._reply(header, answer)

    def _reply(self, header: dict, result) -> None:
        cid = header["c"]
        msg = self.signer.encode({"k": "reply", "rq": header["rq"], "r": result})
        self._to_client(cid, msg)

    def _on_watch(self, peer, header, frames, body):
        """Send a client what is stored for task ids and maps, and what comes later."""
        cid = header["c"]
        ids = list(header.get("ids", ()))
        maps = {}
        for mp in header.get("maps", ()):
            meta = self.maps.get(mp)
            if meta is not None:
                maps[mp] = {"total": meta["total"], "star": meta["star"],
                            "chunks": [(t, self._chunk_range(t)) for t in meta["chunks"]]}
                ids.extend(meta["chunks"])
        known = {}
        for tid in ids:
            parts = self.results.get(tid)
            task = self.tasks.get(tid)
            if task is not None:
                self.watchers.setdefault(tid, set()).add(cid)
                known[tid] = ("PENDING" if task.where == "queued" else
                              "RETRY" if task.retrying else "STARTED")
            elif parts is not None:
                known[tid] = "DONE"
            elif tid not in self.watchers:  # not submitted yet (a later step of a chain, say)
                self.watchers[tid] = {cid}
                self._expire_later("watch", tid)
            else:
                self.watchers[tid].add(cid)
        self._reply(header, {"maps": maps, "known": known})
        for tid in ids:
            for part in self.results.get(tid, ()):
                self._to_client(cid, self._result_message(part))

    def _on_ctl(self, peer, header, frames, body):
        """Send a client's control command to the supervisors it names; tell it how many."""
        dest = header.get("d")
        sups = [s for s in self.supervisors.values()
                if dest is None or s.name in dest or s.sid in dest]
        for sup in sups:
            self._send(b"s" + sup.sid.encode(), header)
        self._reply(header, {"n": len(sups)})

    def _on_ctlr(self, peer, header, frames, body):
        """A supervisor's answer to a control command: to its client, as it came."""
        self._to_client(header["c"], body)

    def _on_join(self, peer, header, frames, body):
        """Add a member to a join; answer fire=True once, to the first to complete it."""
        join = self.joins.get(header["key"])
        if join is None:
            join = self.joins[header["key"]] = {"m": set(), "fired": False}
            self._expire_later("join", header["key"])
        join["m"].add(header["member"])
        fire = not join["fired"] and len(join["m"]) >= header["total"]
        join["fired"] |= fire
        self._reply(header, {"fire": fire})

    def _on_claim(self, peer, header, frames, body):
        """Claim-once (beat ticks): won by the first claim of a key until its ttl passes."""
        now = time.time()
        if len(self.claims) > 1000:
            self.claims = {k: t for k, t in self.claims.items() if t > now}
        won = self.claims.get(header["key"], 0.0) <= now
        if won:
            self.claims[header["key"]] = now + header["ttl"]
        self._reply(header, {"won": won})

    def _on_out(self, peer, header, frames, body):
        """A running task's output: to its client, as it came, if that worker process runs it."""
        task = self.tasks.get(header["id"])
        if task is not None and task.where == header["w"] and peer[1:] == header["w"].encode():
            self._to_client(task.item["c"], body)

    def _chunk_range(self, tid: str) -> tuple:
        task = self.tasks.get(tid)
        if task is not None:
            return (task.item.get("s0", 0), task.item.get("n", 1))
        parts = self.results.get(tid) or [({"s0": 0, "n": 1}, None, None)]
        return (parts[0][0].get("s0", 0), parts[0][0].get("n", 1))

    def _on_info(self, peer, header, frames, body):
        workers = [{
            "id": s.sid, "name": s.name, "host": s.host, "pid": s.pid, "concurrency": s.concurrency,
            "queues": list(s.queues),
            "active": sum(len(self.procs[w].running) for w in s.procs if w in self.procs),
            "processes": sorted(self.procs[w].pid for w in s.procs if w in self.procs),
            "memory": s.memory,
        } for s in self.supervisors.values()]
        queues = {q: sum(1 for t in d if t.where == "queued") for q, d in self.queues.items()}
        self._reply(header, {"workers": workers, "queues": queues, "tasks": len(self.tasks),
                             "results": len(self.results), "dropped": dict(self.dropped)})

    # -- workers --------------------------------------------------------------

    def _supervisor(self, header: dict) -> Supervisor:
        """The supervisor a heartbeat or worker hello names, registered on first sight."""
        sid = header["s"]
        sup = self.supervisors.get(sid)
        if sup is None:
            sup = self.supervisors[sid] = Supervisor(
                sid, header["host"], header["spid"], header["conc"], tuple(header["q"]),
                time.monotonic(), header.get("n", sid))
            log.info("worker %s joined (%s pid %s, %s processes)", sid, sup.host, sup.pid,
                     sup.concurrency)
        return sup

    def _on_hb(self, peer, header, frames, body):
        sup = self._supervisor(header)
        sup.seen = time.monotonic()
        sup.concurrency = header["conc"]
        sup.memory = header.get("mem")
        queues = tuple(header["q"])
        if queues != sup.queues:  # add_consumer or cancel_consumer: its processes follow
            sup.queues = queues
            for wid in sup.procs & self.procs.keys():
                self.procs[wid].queues = queues
        reply = {"k": "hb"}
        if header.get("as"):  # an autoscaling worker: how many tasks wait (up to its maximum)
            reply["ql"] = self._queued(queues, header["as"])
        self._send(peer, reply)

    def _queued(self, queues: tuple, most: int) -> int:
        """How many tasks wait in these queues, counted up to most."""
        n = 0
        for q in queues:
            for task in self.queues.get(q, ()):
                n += task.where == "queued"
                if n >= most:
                    return n
        return n

    def _on_lost(self, peer, header, frames, body):
        at = header.get("at") or (header.get("run") and [header["run"], None])
        self._proc_gone(header["w"], died=True, how=header.get("how", "died"), at=at or None,
                        end=header.get("end"))

    def check_heartbeats(self, now: float) -> None:
        """Declare supervisors silent for longer than the timeout dead, with their processes."""
        for sup in [s for s in self.supervisors.values()
                    if now - s.seen > self.heartbeat_timeout]:
            log.warning("worker %s stopped sending heartbeats; re-queueing its tasks", sup.sid)
            del self.supervisors[sup.sid]
            for wid in sup.procs:  # a worker gone whole says nothing about its tasks (deaths.py)
                self._proc_gone(wid, died=False)

    def _proc_gone(self, wid: str, died: bool, how: str = "", at: list | None = None,
                   end: dict | None = None) -> None:
        proc = self.procs.pop(wid, None)
        if proc is None:
            return
        sup = self.supervisors.get(proc.sid)
        if sup:
            sup.procs.discard(wid)
        for task in proc.running:
            if task.where != wid or task.id not in self.tasks:
                continue
            if task.retrying:  # its retry is lost with the process: it runs again from the start
                self._tell_state(task, "STARTED")
            if died:
                self._retry_after_death(task, f"worker process {proc.pid} {how}", at, end)
            else:
                task.where = "queued"
                self._queue(task.item).appendleft(task)

    def _retry_after_death(self, task: Task, why: str, at: list | None,
                           end: dict | None = None) -> None:
        """Re-run the undelivered items of a task whose process died (rules: deaths.py)."""
        fail, item = deaths.after_death(task.item, task.undelivered(), at, end)
        if item is task.item:  # the death does not count against it: queued again as it came
            task.where = "queued"
            self._queue(item).appendleft(task)
            return
        for pos in fail:
            self._deliver(task, *deaths.ending(task.item, pos, why, end))
        if item is None:
            self._finish(task.id)
            return
        retry = Task(item, task.frames, None, delivered=task.delivered, ndelivered=task.ndelivered)
        self.tasks[task.id] = retry
        self._queue(item).appendleft(retry)

    def _fail_items(self, task: Task, start: int, n: int, exc: Exception) -> None:
        """Deliver exc as the result of items start..start+n of task."""
        self._deliver(task, *deaths.failure(task.item, start, n, exc))

    def _on_rej(self, peer, header, frames, body):
        """A worker dropped a message whose signature failed: fail its tasks, free the worker."""
        proc = self.procs.get(header["w"])
        if proc is None:
            return
        for tid in header["ids"]:
            task = self.tasks.get(tid)
            if task is not None and task.where == proc.wid:
                for pos in task.undelivered():
                    self._fail_items(task, pos, 1, SignatureError(
                        f"worker process {proc.pid} refused task {tid}: its message's signature "
                        "does not match the shared key (tampered with, or sent with another key)"))
        proc.running = [t for t in proc.running if t.id in self.tasks]
        proc.idle = not proc.running

    def _on_res(self, peer, header, frames, body):
        proc = self.procs.get(header.get("w", ""))
        parts = []
        for item, payload in protocol.split(header["t"], frames):
            task = self.tasks.get(item["id"])
            # a late answer from a process since declared dead still counts: items are deduplicated
            if (task is not None and (proc is None or task.where == proc.wid)
                    and item.get("s", 0) + item.get("n", 1) <= len(task.delivered)):
                parts.append((task, item, payload))
        owners = {task.item["c"] for task, _, _ in parts}
        whole = len(owners) == 1 and len(parts) == len(header["t"])
        for task, item, payload in parts:
            d = item.get("d")
            if d is not None:
                h = task.item.get("h")
                old = self.cost.get(h)
                self.cost[h] = d if old is None else 0.8 * old + 0.2 * d
            self._deliver(task, item, payload, forward=not whole,
                          raw=body if len(header["t"]) == 1 else None)
        if whole:
            self._to_client(owners.pop(), body)
        if proc is not None and header.get("rdy"):
            # what it still holds (tasks due later) stays its own; a ready process takes more
            proc.running = [t for t in proc.running if t.where == proc.wid and t.id in self.tasks]
            proc.idle = True

    def _on_ntc(self, peer, header, frames, body):
        """A worker's state notice (a retry's RETRY, STARTED when it runs again): to the
        task's client and watchers; remembered for later watchers.  Nothing is stored."""
        proc = self.procs.get(header.get("w", ""))
        state = header["s"]
        for tid in header["ids"]:
            task = self.tasks.get(tid)
            if task is not None and proc is not None and task.where == proc.wid:
                self._tell_state(task, state)

    def _tell_state(self, task: Task, state: str) -> None:
        """A state message (RETRY or STARTED) to a task's client and watchers."""
        task.retrying = state == "RETRY"
        msg = self.signer.encode({"k": "state", "ids": [task.id], "s": state})
        for cid in {task.item["c"]} | self.watchers.get(task.id, set()):
            self._to_client(cid, msg)

    def _deliver(self, task: Task, item: dict, payload: list, forward: bool = True,
                 raw: list | None = None) -> None:
        """Store a result part, forward it to its client and watchers, finish the task when complete.

        raw is the message it came in, when it holds this part alone: forwarded as it
        came (a large result is not signed again).
        """
        part = (dict(item, s0=task.item.get("s0", 0)), payload, raw)
        self.results.add(task.id, part)
        if forward:
            self._to_client(task.item["c"], self._result_message(part))
        for cid in self.watchers.get(task.id, ()):
            if cid != task.item["c"]:
                self._to_client(cid, self._result_message(part))
        start, n = item.get("s", 0), item.get("n", 1)
        fresh = n - task.delivered.count(1, start, start + n)
        task.delivered[start:start + n] = b"\x01" * n
        task.ndelivered += fresh
        if task.ndelivered >= len(task.delivered):
            self._finish(task.id)

    def _finish(self, tid: str) -> None:
        task = self.tasks.pop(tid, None)
        if task is not None and task.where == "queued":  # a re-sent copy answered by a late result
            task.where = "done"
        self.watchers.pop(tid, None)
        self._expire_later("res", tid)

    def _store_part(self, tid: str, part: tuple) -> None:
        self.results.add(tid, part)
        self._expire_later("res", tid)

    def _result_message(self, part: tuple) -> list:
        item, payload, raw = part
        return raw if raw is not None else self.signer.encode({"k": "res", "t": [item]}, payload)

    def _expire_later(self, kind: str, key: str) -> None:
        self.expiry.append((time.time() + self.result_expires, kind, key))

    def expire(self, now: float) -> None:
        """Drop results, map records, joins and watches of unknown tasks older than result_expires."""
        tables = {"res": self.results, "map": self.maps, "join": self.joins, "watch": self.watchers}
        while self.expiry and self.expiry[0][0] <= now:
            _, kind, key = self.expiry.popleft()
            if kind != "watch" or key not in self.tasks:
                tables[kind].pop(key, None)

    # -- dispatch -------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued tasks to idle worker processes, batching short ones."""
        now = time.monotonic()
        for proc in self.procs.values():
            if not proc.idle or proc.away_until > now:
                continue
            batch = self._take(proc)
            if not batch:
                continue
            peer = b"w" + proc.wid.encode()
            for h in {t.item["h"] for t in batch} - proc.functions:
                fn = self.functions.get(h)
                if fn is None:  # sent again to a restarted broker ahead of its function
                    batch = self._park(batch, h)  # _on_fn queues them again
                elif self._send(peer, {"k": "fn", "h": h}, fn):
                    proc.functions.add(h)
            if not batch:
                continue
            proc.idle = False
            proc.running.extend(batch)
            for t in batch:
                t.where = proc.wid
                if t.item.get("f"):
                    self._started.append((now, t))
            if len(batch) == 1 and batch[0].original is not None:
                sent = self._send_raw(peer, batch[0].original)
            else:
                items, frames = [], []
                for t in batch:
                    items.append(t.item)
                    frames.extend(t.frames)
                sent = self._send(peer, {"k": "tasks", "t": items}, frames)
            if not sent:
                self._put_back(proc, batch, now)

    def _put_back(self, proc: Proc, batch: list, now: float) -> None:
        """Queue again, first, a batch that could not reach its process: one gone without a
        word (its worker killed, not yet missed by heartbeats), or away for a moment (it
        stays idle, and is tried again after a while: it gets work once it is back)."""
        proc.running = [t for t in proc.running if t.where != proc.wid or t not in batch]
        proc.idle = True
        proc.away_until = now + HEARTBEAT / 2
        for t in reversed(batch):
            t.where = "queued"
            self._queue(t.item).appendleft(t)

    def _park(self, batch: list, h: str) -> list:
        """Set aside the tasks of batch whose function (hash h) has not arrived; the rest."""
        parked = self.parked.setdefault(h, [])
        for t in batch:
            if t.item["h"] == h:
                t.where = "parked"
                parked.append(t)
        return [t for t in batch if t.item["h"] != h]

    def _take(self, proc: Proc) -> list:
        for q in proc.queues:
            lanes = self.queues.get(q)
            dq = lanes.head() if lanes is not None else None
            if dq is None:
                continue
            first = dq.popleft()
            cost = self.cost.get(first.item.get("h"))
            if cost is None or cost > BATCH_SECONDS / 2 or not dq:
                return [first]
            limit = min(BATCH_MAX, int(BATCH_SECONDS / max(cost, 1e-6)),
                        max(1, len(dq) // max(1, len(self.procs))))
            batch = [first]
            while dq and len(batch) < limit:
                t = dq.popleft()
                if t.where == "queued":
                    batch.append(t)
            return batch
        return []

    def _flush_started(self, now: float) -> None:
        """Report STARTED for tasks still running STARTED_DELAY after dispatch.

        A quick task's result is its only message; a long one is seen STARTED
        within ~10 ms.
        """
        due: dict[str, list] = {}
        keep = []
        for t0, task in self._started:
            if self.tasks.get(task.id) is not task or task.where == "queued":
                continue
            if now - t0 >= STARTED_DELAY:
                due.setdefault(task.item["c"], []).append(task.id)
            else:
                keep.append((t0, task))
        self._started = keep
        for cid, ids in due.items():
            self._to_client(cid, self.signer.encode({"k": "started", "ids": ids}))

