"""Message layout, signing and pickling: the one format every transport carries.

A message is a list of frames::

    [header, signature, payload_0, ..., payload_n]

* ``header`` is compact JSON (never pickle; made and read with orjson), so a broker can route a message
  without loading anything a sender chose.  ``header["k"]`` is the kind.
  ``encode`` adds the message's id and time, signed with the rest: ``ms``
  the sender (random per Signer, new after fork), ``mn`` its message number
  (counting up), ``mt`` when it was sent (epoch seconds).  Receivers that
  refuse replays keep a window of them (replay.py).
* ``signature`` is HMAC-SHA256 under the shared key over the header and every
  payload frame, each preceded by its length, so frames cannot be re-cut.  A frame of
  LARGE_FRAME bytes or more may enter the HMAC as its keyed BLAKE3 digest (a key derived
  from the shared key) instead of its bytes: 3-4x faster than SHA-256 here, multithreaded
  for large inputs.  Such a signature is 33 bytes, its last BULK_SCHEME (itself signed); a
  32-byte one fed every frame whole.  Hash-then-MAC: forging needs a BLAKE3 collision.
* payload frames are what the kind defines; pickled objects take one frame
  for the pickle stream plus one per protocol-5 out-of-band buffer (large
  arrays and bytes travel as their own frames, never copied into the pickle).

The receiver that unpickles a payload always verifies the signature first
(``decode``); a bad one raises SignatureError and nothing is loaded.

Several items may share one message (a batch): the header lists them, each
with ``nf``, the number of payload frames it owns, in order (``split``).

FIELDS and ITEM_FIELDS name every header field and what it means: one meaning each.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import pickle
import re
import secrets
import time
import traceback
import weakref
from typing import Any, Iterable, Sequence

import cloudpickle
import orjson

try:  # optional: without it large frames are signed whole by HMAC-SHA256
    import blake3
except ImportError:  # pragma: no cover - blake3 is a dependency; this is the fallback
    blake3 = None

from . import shm
from .errors import RemoteError, RemoteTraceback, SerializationError, SignatureError

#: Buffers at least this large leave the pickle stream as their own frame.
OUT_OF_BAND_MIN = 64 * 1024
#: Frames at least this large are signed by their keyed BLAKE3 digest (when blake3 imports).
LARGE_FRAME = 1 << 20
#: The signature's last byte when large frames entered it by digest.
BULK_SCHEME = b"\x03"
_THREADED = 16 << 20  # BLAKE3 hashes a frame this large on several threads

#: Every header field of every kind of message, with its one meaning.  Short on the wire
#: (a header travels with every task); schema.py checks them where the broker acts.
FIELDS = {
    "k": "kind of message",
    "ms": "sender of a signed message (random per signer)", "mn": "its message number",
    "mt": "when it was sent (epoch seconds)",
    "c": "client id", "rq": "request number, echoed in the reply", "r": "a reply's answer",
    "b": "a broker's boot id (welcome)", "mx": "the broker's largest message (welcome)",
    "refused": "why a hello was refused (a key mismatch)", "fp": "a key's fingerprint (keyfp)",
    "h": "function hash", "t": "task or result items (ITEM_FIELDS)", "ids": "task ids",
    "id": "task id", "maps": "map ids", "mp": "map id", "total": "a map's item count",
    "key": "a join's or claim's key", "member": "a join's member", "ttl": "a claim's seconds",
    "cmd": "control command", "args": "its arguments", "dest": "worker names it goes to",
    "ci": "a control command's collection id (answers carry it)",
    "sup": "worker (supervisor) id",
    "name": "worker name, an initializer's name, or a shipped function's (fn, for events)",
    "host": "host name", "spid": "supervisor pid", "pid": "worker process pid",
    "conc": "worker processes", "queues": "queues served", "mem": "resident bytes",
    "autoscale": "an autoscaling worker's most processes", "queued": "tasks waiting for it",
    "lo": "shared memory locality (hello) or the broker's segment prefix (welcome), shm.py",
    "w": "worker process id", "how": "how a process died", "at": "[task id, item] it ran",
    "run": "task id it ran", "end": "why its supervisor ended a task (deaths.py)",
    "was": "the death a replacement process's hello names (w, how, at, run, end of lost)",
    "rdy": "a worker process is ready for more", "state": "RETRY or STARTED (a notice)",
    "why": "why an entry was dropped", "e": "a dropped entry's stream and id",
    "sub": "an event subscription's id", "since": "events stored from (epoch s; null: none)",
    "live": "subscribe (1) or unsubscribe (0)", "ev": "events (events.py's dicts)",
    "ld": "the host's one-minute load average (hb)", "act": "tasks its processes run (hb)",
}

#: Fields of a task item (in ``tasks``) and a result item (in ``res``).
ITEM_FIELDS = {
    "id": "task id", "h": "function hash", "q": "queue", "pr": "priority 0-9",
    "nf": "payload frames it owns", "c": "client id (the owner)",
    "f": "report STARTED", "m": "mode: call, map or star", "mp": "map id",
    "s0": "position of a chunk's first item in its map", "n": "items",
    "s": "first item of a result part, within its chunk", "ok": "succeeded (a call)",
    "rv": "revoked", "d": "seconds it ran", "rt": "retries so far", "eta": "not before (epoch s)",
    "x": "expires (epoch s)", "md": "most deaths allowed", "a": "deaths of a chunk's first run",
    "dp": "deaths per item position", "st": "run item by item", "skip": "items to skip",
    "ex": "item positions that failed already",
    "ar": "a short repr of the arguments (task-sent)", "pa": "parent task id (canvas)",
    "ro": "root task id (canvas)", "tot": "its map's item count, when known",
    "xn": "a failure's exception type", "tb": "its traceback, truncated",
    "nx": "items of a result part that failed",
}

_json_encode = json.JSONEncoder(separators=(",", ":")).encode


def _dumps_json(obj) -> bytes:
    """Compact JSON of a header: orjson (a header is made per message), else the standard
    library's for what orjson refuses (integers past 64 bits)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return _json_encode(obj).encode()


def _loads_json(data):
    """A header from JSON: orjson, else the standard library's for what orjson refuses
    (integers past 64 bits, NaN); ValueError for what is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


_signers: "weakref.WeakSet[Signer]" = weakref.WeakSet()


def _new_senders() -> None:
    """In a forked child: each Signer a sender of its own again, not a copy of its parent's."""
    for signer in list(_signers):
        signer._new_sender()


os.register_at_fork(after_in_child=_new_senders)


class Signer:
    """HMAC-SHA256 over a header and payload frames under one key.

    Each Signer is a sender of its own (``ms``, numbering its messages ``mn``), so a
    receiver's replay window (replay.py) sees each sender's numbers in about the order
    they were sent, whatever else signs in the same process (an embedded broker, say).
    """

    def __init__(self, key: bytes) -> None:
        base = hmac.new(key, digestmod=hashlib.sha256)
        # OpenSSL's HMAC object itself where hmac wraps one: its copy, update and digest are
        # C calls (the wrapper's are Python, a few µs per message)
        self._base = getattr(base, "_hmac", None) or base
        self._bulk_key = hmac.new(key, b"nbq blake3 large frames", hashlib.sha256).digest()
        self._new_sender()
        _signers.add(self)

    def _new_sender(self) -> None:
        self._sender = secrets.token_hex(8)
        self._numbers = itertools.count()

    def sign(self, header: bytes, frames: Sequence, bulk: bool | None = None) -> bytes:
        """The signature of header and frames; bulk (default: blake3 imports and a frame is
        LARGE_FRAME or more) signs large frames by their keyed BLAKE3 digest."""
        if bulk is None:
            bulk = blake3 is not None and any(map(_large, frames))
        mac = self._base.copy()
        if bulk:
            mac.update(BULK_SCHEME)
        mac.update(header)
        for buf in frames:
            # bytes as they are; a zmq.Frame (or other) by a memoryview, 4x cheaper than its .buffer
            if type(buf) is bytes:
                n = len(buf)
            else:
                buf = buf.buffer if type(buf) is shm.Held else memoryview(buf)
                n = buf.nbytes
            mac.update(n.to_bytes(8, "little"))
            mac.update(self.digest(buf) if bulk and n >= LARGE_FRAME else buf)
        return mac.digest() + BULK_SCHEME if bulk else mac.digest()

    def digest(self, buf) -> bytes:
        """Keyed BLAKE3 of a large frame (it lets go of the GIL; threads for the largest)."""
        n = memoryview(buf).nbytes
        return blake3.blake3(buf, key=self._bulk_key,
                             max_threads=blake3.blake3.AUTO if n >= _THREADED else 1).digest()

    def encode(self, header: dict, frames: Sequence = ()) -> list:
        """Frames to send: header (with this message's id and time), signature, payload."""
        h = _dumps_json(dict(header, ms=self._sender, mn=next(self._numbers),
                             mt=time.time()))
        return [h, self.sign(h, frames), *frames]

    def decode(self, msg: Sequence) -> tuple[dict, list]:
        """Split a received message into (header, payload frames), checking the signature."""
        if len(msg) < 2:
            raise SignatureError("message has no signature frame")
        h = _bytes(msg[0])
        payload = list(msg[2:])
        signature = _bytes(msg[1])
        bulk = len(signature) == 33 and signature[32:] == BULK_SCHEME
        if bulk and blake3 is None:
            raise SignatureError("message is signed with BLAKE3 digests of its large frames, and "
                                 "blake3 is not installed here: pip install blake3")
        if not hmac.compare_digest(self.sign(h, payload, bulk), signature):
            raise SignatureError("message signature does not match the shared key")
        try:
            header = _loads_json(h)
        except ValueError as e:
            raise SignatureError(f"message header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise SignatureError("message header is not a JSON object")
        return header, payload


def _large(frame) -> bool:
    """Whether a frame is signed by its digest (LARGE_FRAME bytes or more)."""
    n = (len(frame) if type(frame) is bytes else frame.size if type(frame) is shm.Held
         else memoryview(frame).nbytes)
    return n >= LARGE_FRAME


def refusal(fingerprint: str) -> list:
    """A broker's unsigned answer to a hello whose signature failed: its key's fingerprint,
    which tells the sender that the keys differ and reveals nothing of the broker's key."""
    return [_dumps_json({"k": "keyfp", "fp": fingerprint}), b""]


def refused(msg: Sequence) -> str | None:
    """The key fingerprint of a refusal (16 hex digits); None for any other message."""
    if len(msg) != 2 or len(_bytes(msg[1])) or len(_bytes(msg[0])) > 100:
        return None
    try:
        header = _loads_json(_bytes(msg[0]))
    except ValueError:
        return None
    fp = header.get("fp") if isinstance(header, dict) and header.get("k") == "keyfp" else None
    return fp if isinstance(fp, str) and re.fullmatch("[0-9a-f]{16}", fp) else None


def loads_header(frame) -> dict:
    """Parse a header frame (JSON, never pickle: safe before the signature is checked)."""
    return _loads_json(_bytes(frame))


def _bytes(frame) -> bytes:
    return frame if type(frame) is bytes else frame.bytes if hasattr(frame, "bytes") else \
        bytes(frame)


def frame_size(frames: Iterable) -> int:
    """Total payload bytes of frames (bytes, zmq.Frame, shm.Held or a memoryview)."""
    return sum(f.nbytes if type(f) is memoryview else len(f) for f in frames)


def split(items: list[dict], frames: list) -> Iterable[tuple[dict, list]]:
    """Pair each batch item with its own payload frames (``nf`` of them)."""
    i = 0
    for item in items:
        n = item.get("nf", 0)
        yield item, frames[i:i + n]
        i += n


# -- pickling ---------------------------------------------------------------

#: Types that pickle alike by reference and by value, never out of band: values made of
#: these (_plain) skip cloudpickle's Pickler (10x dearer than pickle's).
PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})
_PLAIN_MAX = 64  # entries of a container dumps checks item by item before pickling it plainly


def _plain(obj: Any, depth: int = 2) -> bool:
    """Whether obj is scalars only, or small tuples, lists and str-keyed dicts of them (depth
    levels): pickled the same by the C pickler alone, without cloudpickle's setup per call
    (a few µs: a task's arguments and result are often just this)."""
    t = type(obj)
    if t in PLAIN:
        return True
    if t not in (tuple, list, dict) or not depth or len(obj) > _PLAIN_MAX:
        return False
    if t is dict:
        return all(type(k) is str and _plain(v, depth - 1) for k, v in obj.items())
    return all(_plain(x, depth - 1) for x in obj)


def dumps(obj: Any) -> list:
    """Pickle obj (cloudpickle, protocol 5) to frames: the stream, then out-of-band buffers."""
    if _plain(obj):  # (nothing in it could leave the stream: no buffers)
        return [pickle.dumps(obj, protocol=5)]
    buffers: list = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    return [cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large), *buffers]


def loads(frames: Sequence) -> Any:
    """Inverse of dumps; frames may be bytes or zmq.Frame (zero copy)."""
    if len(frames) == 1:  # most payloads: no out-of-band buffers
        return pickle.loads(shm.view(frames[0]))
    views = [shm.view(f) for f in frames]  # a shared memory descriptor (shm.py) is mapped
    return pickle.loads(views[0], buffers=views[1:])


def dumps_named(obj: Any, what: str) -> list:
    """dumps, turning any failure into a SerializationError that says what failed."""
    try:
        return dumps(obj)
    except Exception as e:  # pickling raises many types: TypeError, PicklingError, AttributeError...
        raise SerializationError(f"{what} could not be pickled: {type(e).__name__}: {e}") from e


def dumps_call(fn_name: str, args: tuple, kwargs: dict) -> list:
    """Pickle a call's arguments; on failure name the argument that cannot be pickled."""
    if all(type(a) in PLAIN for a in args) and all(type(v) in PLAIN for v in kwargs.values()):
        return [pickle.dumps((args, kwargs), protocol=5)]  # (flat: cheaper checked than _plain)
    try:
        return dumps((args, kwargs))
    except Exception:
        for i, a in enumerate(args):
            dumps_named(a, f"argument {i} ({type(a).__name__}) of {fn_name}")
        for k, v in kwargs.items():
            dumps_named(v, f"keyword argument {k!r} ({type(v).__name__}) of {fn_name}")
        raise


def function_hash(payload: bytes) -> str:
    """Content hash naming a pickled function on brokers and workers."""
    return hashlib.sha256(payload).hexdigest()[:32]


# -- errors -------------------------------------------------------------------

def error_record(exc: BaseException) -> tuple:
    """A picklable description of exc: (type name, message, traceback text, pickled exc or None)."""
    tb = "".join(traceback.format_exception(exc))
    try:
        blob = cloudpickle.dumps(exc, protocol=5)
        pickle.loads(blob)  # exceptions with odd __init__ signatures pickle but do not load
    except Exception:
        blob = None
    return (f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb, blob)


def rebuild_error(record: tuple) -> BaseException:
    """The exception a record describes, with the remote traceback as its cause."""
    type_name, message, tb, blob = record
    exc = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(tb)
    exc.remote_traceback = tb
    return exc
