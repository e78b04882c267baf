"""What clients, supervisors and workers share: a connection, the key, the scripts, verifying
what is read, storing results (with the next batch taken in the same step), keeping and dropping."""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import redis

from ... import protocol
from ...errors import NbqError, SignatureError
from . import scripts
from .connection import (
    Batch,
    claim_key,
    compare_key,
    connect,
    parse_address,
    raise_errors,
    retrying,
    send_batch,
    settings,
)
from .frames import BadMessage, Frames, entry_frames, pack, unpack
from .keys import P, queue_key, text

log = logging.getLogger("nbq.transport.redis")

DROP_LOG_EVERY = 1.0      # seconds between log lines about dropped messages
TRIM_DONE_EVERY = 1.0     # seconds between one side's trims of the done set (older than ttl)


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


class Store:
    """One side's link to Redis: every call retried through outages (retry), every message
    read verified before use (verify), results stored atomically (store)."""

    def __init__(self, address: str, key: bytes) -> None:
        self.url, self.safe, self.ttl = parse_address(address)
        self.settings = settings(address)
        self.ttl_s = max(1, int(round(self.ttl)))
        self.r = connect(self.url, self.safe)
        self.signer = protocol.Signer(key)
        self.troubles = 0  # connection errors so far: a reply lost with one may hide a delivery
        self.dropped = dict.fromkeys(("signature", "invalid", "replay", "size"), 0)
        self._drop_log_at = 0.0
        self._trim_done_at = 0.0
        self.frames = Frames(self.r, self.retry, self.ttl_s, self.settings.max_message_size)
        self.report = self.r.register_script(scripts.REPORT)
        self.submit = self.r.register_script(scripts.SUBMIT)
        self.start = self.r.register_script(scripts.START)
        self.pickup = self.r.register_script(scripts.PICKUP)
        self.cancel = self.r.register_script(scripts.CANCEL)
        self.join = self.r.register_script(scripts.JOIN)
        self.notice = self.r.register_script(scripts.NOTICE)
        self._drop = self.r.register_script(scripts.DROP)
        self._keep = self.r.register_script(scripts.KEEP)

    def retry(self, what: str, fn: Callable[[], Any], give_up: Callable[[], bool] = lambda: False):
        """fn() through outages (connection.retrying), each connection error counted."""
        return retrying(what, self.safe, fn, give_up, self._trouble)

    def _trouble(self) -> None:
        self.troubles += 1

    def check_key(self, key: bytes) -> None:
        """Refuse to go on (KeyMismatch) when key is not the cluster's (see nbq:keyfp)."""
        def read():
            pipe = self.r.pipeline(transaction=False)
            claim_key(pipe, key)
            return pipe.execute()[-1]

        compare_key(key, self.retry("checking the signing key", read), self.safe)

    def close(self) -> None:
        """Release the connections and the spill thread."""
        self.frames.close()
        self.r.close()

    def verify(self, raw, split: Callable[[Any], list] = unpack) -> tuple[dict, list]:
        """The verified (header, payload) of a message read from Redis: split(raw) gives its
        frames (unpack for a packed string, entry_frames for a stream entry's fields); frames
        stored apart are read first (the signature covers them too).  Any failure to parse,
        read or verify raises BadMessage, never anything else."""
        try:
            return self.signer.decode(self.frames.resolve(split(raw)))
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

    def bad(self, e: BadMessage, where: str) -> None:
        """Count a dropped message; log it unless another was logged within DROP_LOG_EVERY."""
        self.dropped[e.reason] += 1
        now = time.monotonic()
        if now >= self._drop_log_at:
            self._drop_log_at = now + DROP_LOG_EVERY
            log.warning("dropped %s: %s (dropped here so far: %s)", where, e,
                        ", ".join(f"{n} {k}" for k, n in self.dropped.items() if n))

    def drop(self, entries: list) -> None:
        """Acknowledge, delete and count bad entries [(queue key, entry id, fields, BadMessage)]
        (DROP), telling the client an entry's header names (unverified) which entry was dropped
        and why: a ``dropped`` notice that client acts on only for an entry it knows as its own."""
        args: list = [P, self.ttl_s, len(entries)]
        for qk, eid, fields, e in entries:
            tid, c = _claimed(fields)
            notice = pack(self.signer.encode({"k": "dropped", "id": tid, "e": f"{qk} {text(eid)}",
                                              "why": str(e)[:500]})) if c else b""
            args += [qk, eid, e.reason, c, notice]
        self.retry("dropping bad entries", lambda: self._drop(args=args))

    def keep(self, parts: list[tuple[str, int, list[bytes]]]) -> None:
        """Results read from a result stream whose frames are stored apart [(task id, bytes,
        keys)]: kept for by-id lookups within result_budget, oldest evicted first (KEEP)."""
        args: list = [P, self.settings.result_budget, time.time(), self.ttl, len(parts)]
        for tid, size, keys in parts:
            args += [tid, size, b" ".join(keys)]
        try:
            self.retry("keeping results", lambda: self._keep(args=args))
        except NbqError as e:  # they expire with result_expires anyway
            log.warning("could not count delivered results against result_budget: %s", e)

    def store(self, parts: list[tuple[dict, dict, list]], adds=(), acks=(),
              take: tuple = ("", 0, "", ()), extra: Callable[[Any], None] | None = None) -> list:
        """Store result parts [(task item, result item, payload)], add entries [(queue key,
        fields)], ack entries [(queue key, entry id, task id or "")]: atomically.

        Each part goes to the task's result list and watchers; the parts of one
        client travel to its result stream as one message (the part's own when
        it is the only one); large frames are stored apart, once.
        take = (worker id, n, function hash, queue names) takes and starts up to
        n entries for that worker in the same step, most urgent first; they are returned as
        [(queue key, entry id, fields)].  extra(batch) adds commands sent in the same round
        trip, after (events).
        """
        spill = self.frames.spiller([f for _, _, payload in parts for f in payload])
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
        trim = bool(acks) and time.monotonic() >= self._trim_done_at
        if trim:  # entries done longer ago than ttl leave the done set: not at every ack
            self._trim_done_at = time.monotonic() + TRIM_DONE_EVERY
        args.append(int(trim))
        wid, n, h, queues = take
        args += [wid, n, h, len(queues), *queues]
        got = self.retry("storing results", lambda: self.run_script(self.report, args, after=extra))
        return [scripts.taken(e) for e in got]

    def run_script(self, script, args: list, before: Callable[[Any], None] | None = None,
                   after: Callable[[Any], None] | None = None, whole: bool = False):
        """A registered script's raw reply on args (EVALSHA: its text is not sent and hashed
        each time), with the commands before(batch) and after(batch) add around it sent in the
        same write (a Batch: none of redis-py's per-command bookkeeping, ~30 us less per round
        trip, alone too); whole: every command's reply, in order.
        A Redis that does not hold the script (it restarted) gets it loaded and runs it alone
        again: the other commands ran once."""
        batch = Batch()
        if before is not None:
            before(batch)
        at = len(batch.commands)
        batch.evalsha(script.sha, 0, *args)
        if after is not None:
            after(batch)
        got = send_batch(self.r, batch.commands)
        if isinstance(got[at], redis.exceptions.NoScriptError):
            got[at] = script(args=args)
        return raise_errors(got) if whole else raise_errors(got)[at]

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
