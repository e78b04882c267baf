"""Who serves the broker: supervisors (``nbq worker``) and their worker processes, their
heartbeats, control commands to them, and what becomes of a process's tasks when it
dies, goes silent or leaves.

A supervisor registers with its first heartbeat (or its first process's hello),
and a worker process with its hello; after a broker restart both come back that way.
A process started in place of a dead one names that death in its hello (``was``, the
fields of its supervisor's ``lost``), which comes on another connection and may come
later: the death is acted on first, and once, whichever brings it, so the replacement is
never handed the tasks queued behind the dead process's before those are queued again.

A task whose process died while running it, its worker alive, runs again
until such deaths reach its limit (max_task_deaths), then fails with WorkerLost;
a chunk re-run after a death reports item by item, so the item that kills its
process fails alone.  The tasks a dead process only held, and every task of a
worker that stopped answering heartbeats, run again as they were (deaths.py).

Control: the broker sends a client's ctl to every supervisor whose name is in
``dest`` (all when null) and replies {"n": how many}; each answers with ctlr, which
the broker forwards to the client, which collects n answers or stops at its
timeout.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .. import deaths, events
from ..errors import SignatureError
from .outbox import Outbox
from .queues import QueuedTask, Queues
from .ready import Ready
from .results import Results

log = logging.getLogger("nbq.broker")


@dataclass(eq=False)
class ProcessRecord:
    """One worker process (a child of a supervisor), as the broker sees it."""
    wid: str
    sid: str
    pid: int
    queues: tuple
    running: list = field(default_factory=list)
    functions: set = field(default_factory=set)
    idle: bool = False  # set by Ready.add and Ready.discard, which index the idle ones
    away_until: float = 0.0  # unreachable at the last send: not tried again before then
    sharing: bool = False    # of the broker's host: sent shared memory descriptors (shm.py)


@dataclass(eq=False)
class SupervisorRecord:
    """One worker (an ``nbq worker`` supervisor), as the broker sees it."""
    sid: str
    host: str
    pid: int
    concurrency: int
    queues: tuple
    seen: float
    name: str = ""
    procs: set = field(default_factory=set)
    memory: int | None = None  # resident bytes of it and its processes, as its heartbeat said
    processed: int = 0  # items its processes finished (results), for its heartbeat events
    failed: int = 0     # of which failed


class Members:
    """The supervisors and worker processes the broker knows, by id."""

    def __init__(self, queues: Queues, results: Results, outbox: Outbox,
                 heartbeat_timeout: float, max_message_size: int) -> None:
        self.queues = queues
        self.results = results
        self.outbox = outbox
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_size = max_message_size  # told to each process in its welcome
        self.procs: dict[str, ProcessRecord] = {}
        self.ready = Ready()  # the idle ones, by the queues they serve
        self.supervisors: dict[str, SupervisorRecord] = {}

    def supervisor(self, header: dict) -> SupervisorRecord:
        """The supervisor a heartbeat or worker hello names, registered on first sight."""
        sid = header["sup"]
        sup = self.supervisors.get(sid)
        if sup is None:
            sup = self.supervisors[sid] = SupervisorRecord(
                sid, header["host"], header["spid"], header["conc"], tuple(header["queues"]),
                time.monotonic(), header.get("name", sid))
            log.info("worker %s joined (%s pid %s, %s processes)", sid, sup.host, sup.pid,
                     sup.concurrency)
            self.results.events.event(events.worker_event(
                events.WORKER_ONLINE, time.time(), sid, {"host": sup.host, "pid": sup.pid,
                                                         "name": sup.name, "queues": list(sup.queues)}))
        return sup

    # -- handlers -----------------------------------------------------------------

    def on_process_hello(self, peer, header, frames, body):
        """A worker process is ready (new, or reconnected): registered idle, welcomed; the
        death it replaces (``was``) acted on first, if not heard yet."""
        sup = self.supervisor(header)
        if header.get("was"):
            self.on_lost(peer, header["was"], frames, body)
        if header["w"] in self.procs:  # reconnected: what it ran was lost with the link
            self.proc_gone(header["w"], died=False)
        proc = ProcessRecord(header["w"], header["sup"], header["pid"], tuple(sup.queues),
                             sharing=self.outbox.shares(header.get("lo")))
        self.procs[proc.wid] = proc
        self.ready.add(proc)
        sup.procs.add(proc.wid)
        self.outbox.send(peer, {"k": "welcome", "mx": self.max_message_size,
                                "lo": self.outbox.shared if proc.sharing else None})

    def on_hb(self, peer, header, frames, body):
        sup = self.supervisor(header)
        sup.seen = time.monotonic()
        sup.concurrency = header["conc"]
        sup.memory = header.get("mem")
        queues = tuple(header["queues"])
        if queues != sup.queues:  # add_consumer or cancel_consumer: its processes follow
            sup.queues = queues
            for wid in sup.procs & self.procs.keys():
                proc = self.procs[wid]
                idle = proc.idle
                self.ready.discard(proc)  # indexed by its queues: moved to its new group
                proc.queues = queues
                if idle:
                    self.ready.add(proc)
        if self.results.events.on:
            self.results.events.event(self._heartbeat_event(sup, header.get("ld")))
        reply = {"k": "hb"}
        if header.get("autoscale"):  # an autoscaling worker: how many tasks wait (up to its maximum)
            reply["queued"] = self.queues.queued(queues, header["autoscale"])
        self.outbox.send(peer, reply)

    def on_supervisor_bye(self, peer, header, frames, body):
        """A supervisor leaving on purpose: its processes' tasks run again, no death counted."""
        sup = self.supervisors.pop(header["sup"], None)
        if sup:
            self._offline(sup)
            for wid in sup.procs:
                self.proc_gone(wid, died=False)

    def on_lost(self, peer, header, frames, body):
        """A supervisor's word that a process died (or a replacement's ``was``): what it ran
        runs again, by deaths.py's rules; nothing the second time."""
        at = header.get("at") or (header.get("run") and [header["run"], None])
        self.proc_gone(header["w"], died=True, how=header.get("how", "died"), at=at or None,
                       end=header.get("end"))

    def on_rej(self, peer, header, frames, body):
        """A worker dropped a message whose signature failed: fail its tasks, free the worker."""
        proc = self.procs.get(header["w"])
        if proc is None:
            return
        for tid in header["ids"]:
            task = self.queues.tasks.get(tid)
            if task is not None and task.where == proc.wid:
                self.results.events.task(time.time(), events.TASK_REJECTED, task, proc.wid)
                for pos in task.undelivered():
                    self.results.fail_items(task, pos, 1, SignatureError(
                        f"worker process {proc.pid} refused task {tid}: its message's signature "
                        "does not match the shared key (tampered with, or sent with another key)"))
        proc.running = [t for t in proc.running if t.id in self.queues.tasks]
        if not proc.running:
            self.ready.add(proc)

    def on_ntc(self, peer, header, frames, body):
        """A worker's state notice (a retry's RETRY, STARTED when it runs again): to the
        task's client and watchers; remembered for later watchers.  Nothing is stored."""
        proc = self.procs.get(header.get("w", ""))
        state = header["state"]
        for tid in header["ids"]:
            task = self.queues.tasks.get(tid)
            if task is not None and proc is not None and task.where == proc.wid:
                self.results.tell_state(task, state)
                self.results.events.task(time.time(), events.TASK_RETRIED if state == "RETRY"
                                         else events.TASK_STARTED, task, proc.wid)

    def on_ctl(self, peer, header, frames, body):
        """Send a client's control command to the supervisors it names; tell it how many."""
        dest = header.get("dest")
        sups = [s for s in self.supervisors.values()
                if dest is None or s.name in dest or s.sid in dest]
        for sup in sups:
            self.outbox.send(b"s" + sup.sid.encode(), header)
        self.outbox.reply(header, {"n": len(sups)})

    def on_ctlr(self, peer, header, frames, body):
        """A supervisor's answer to a control command: to its client, as it came."""
        self.outbox.to_client(header["c"], body)

    # -- deaths -------------------------------------------------------------------

    def check_heartbeats(self, now: float) -> None:
        """Declare supervisors silent for longer than the timeout dead, with their processes."""
        for sup in [s for s in self.supervisors.values()
                    if now - s.seen > self.heartbeat_timeout]:
            log.warning("worker %s stopped sending heartbeats; re-queueing its tasks", sup.sid)
            del self.supervisors[sup.sid]
            self._offline(sup)
            for wid in sup.procs:  # a worker gone whole says nothing about its tasks (deaths.py)
                self.proc_gone(wid, died=False)

    def proc_gone(self, wid: str, died: bool, how: str = "", at: list | None = None,
                  end: dict | None = None) -> None:
        """Forget a worker process; what it ran runs again (a death counted when it died)."""
        proc = self.procs.pop(wid, None)
        if proc is None:
            return
        self.ready.discard(proc)
        sup = self.supervisors.get(proc.sid)
        if sup:
            sup.procs.discard(wid)
        for task in reversed(proc.running):  # each goes first: the last first keeps their order
            if task.where != wid or task.id not in self.queues.tasks:
                continue
            if task.retrying:  # its retry is lost with the process: it runs again from the start
                self.results.tell_state(task, "STARTED")
            if died:
                self._retry_after_death(task, f"worker process {proc.pid} {how}", at, end)
            else:
                self.queues.requeue(task)

    def _retry_after_death(self, task: QueuedTask, why: str, at: list | None,
                           end: dict | None = None) -> None:
        """Re-run the undelivered items of a task whose process died (rules: deaths.py)."""
        was, frames = task.item, task.frames
        fail, item = deaths.after_death(was, task.undelivered(), at, end)
        if item is was:  # the death does not count against it: queued again as it came
            self.queues.requeue(task)
            return
        for pos in fail:
            self.results.deliver(task, *deaths.ending(was, pos, why, end))
        if item is None:
            self.results.finish(task.id)
            return
        retry = QueuedTask(item, frames, None, delivered=task.delivered)
        self.queues.tasks[task.id] = retry
        self.queues.requeue(retry)

    # -- events -------------------------------------------------------------------

    def _heartbeat_event(self, sup: SupervisorRecord, load: float | None) -> dict:
        procs = [self.procs[w] for w in sup.procs if w in self.procs]
        return events.worker_event(events.WORKER_HEARTBEAT, time.time(), sup.sid, {
            "processed": sup.processed, "failed": sup.failed,
            "active": sum(len(p.running) for p in procs), "load": load, "memory": sup.memory,
            "processes": sorted(p.pid for p in procs), "host": sup.host, "pid": sup.pid,
            "queues": list(sup.queues), "name": sup.name, "concurrency": sup.concurrency})

    def _offline(self, sup: SupervisorRecord) -> None:
        self.results.events.event(events.worker_event(events.WORKER_OFFLINE, time.time(), sup.sid,
                                                      {"host": sup.host, "pid": sup.pid}))

    # -- for info and shutdown ----------------------------------------------------

    def workers(self) -> list[dict]:
        """Each supervisor as ``info`` shows it (status.py's form)."""
        return [{
            "id": s.sid, "name": s.name, "host": s.host, "pid": s.pid, "concurrency": s.concurrency,
            "queues": list(s.queues),
            "active": sum(len(self.procs[w].running) for w in s.procs if w in self.procs),
            "processes": sorted(self.procs[w].pid for w in s.procs if w in self.procs),
            "memory": s.memory,
        } for s in self.supervisors.values()]

    def stop_all(self) -> None:
        """Tell every supervisor to stop (the broker is shutting down)."""
        for sup in self.supervisors.values():
            self.outbox.send(b"s" + sup.sid.encode(), {"k": "stop"})
