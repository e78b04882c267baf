"""What a well-formed message looks like, per kind: the broker checks each one before acting.

A schema maps each header field to a check of its type and range (a check
returns True, or False or a string saying what is wrong); required fields are
listed apart.  Fields no schema names are not read by the broker
and travel as they came (signed, so a receiver that reads them trusts them as
much as the rest).  ``refuse`` also checks who may send a kind (the first byte
of the peer's identity, broker/loop.py) and that the payload frames add up to what
the header says, so a handler never meets a field it cannot use.
"""
from __future__ import annotations

from typing import Callable

ID_MAX = 256        # characters of an id, name, queue or function hash
LIST_MAX = 100_000  # entries of a list of ids or of a batch
PRIORITY_MAX = 9
TEXT_MAX = 4096     # characters of an event's text (an args repr, a traceback)

Check = Callable[[object], "bool | str"]


def _str(v) -> bool:
    return type(v) is str and len(v) <= ID_MAX


def _count(v) -> bool:
    return type(v) is int and 0 <= v < 1 << 53


def _flag(v) -> bool:
    return type(v) in (int, bool) and (v == 0 or v == 1)


def _time(v) -> bool:
    return type(v) in (int, float) and 0 <= v < 1e11


def _seconds(v) -> bool:
    return type(v) in (int, float) and 0 <= v < 1e9


def _text(v) -> bool:
    return type(v) is str and len(v) <= TEXT_MAX


def _any(v) -> bool:
    return True  # a JSON value the broker only passes on (control arguments and replies)


def _ints(lo: int, hi: int) -> Check:
    return lambda v: type(v) is int and lo <= v <= hi


def _one_of(*values: str) -> Check:
    return lambda v: type(v) is str and v in values


def _list(check: Check) -> Check:
    def check_list(v) -> bool | str:
        if type(v) is not list or len(v) > LIST_MAX:
            return False
        for i, x in enumerate(v):
            fault = check(x)
            if fault is not True:
                return f"item {i}: {fault}" if fault else False
        return True
    return check_list


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _object(fields: dict[str, Check], required: tuple = ()) -> Check:
    return lambda v: type(v) is dict and (_fault(fields, required, v) or True)


def _fault(fields: dict[str, Check], required: tuple, obj: dict) -> str | None:
    """The first field of obj that is missing or fails its check, or None."""
    for name in required:
        if name not in obj:
            return f"it has no {name!r}"
    for name, value in obj.items():
        check = fields.get(name)
        if check is not None:
            fault = check(value)
            if fault is not True:
                return (f"in its {name!r}, {fault}" if fault else
                        f"its {name!r} is {str(value)[:60]!r}: not what a {name!r} may be")
    return None


#: A task as a client sends it (the broker reads id, h, q, pr, f, m, mp, s0, n, nf, a;
#: deaths.py and workers the rest).
TASK = {"id": _str, "h": _str, "q": _str, "pr": _ints(0, PRIORITY_MAX), "f": _flag,
        "m": _one_of("call", "map", "star"), "mp": _str, "s0": _count, "n": _ints(1, 1 << 53),
        "nf": _ints(0, LIST_MAX), "a": _count, "st": _flag, "skip": _count, "ex": _list(_count),
        "rt": _count, "eta": _time, "x": _time, "md": _ints(0, 1 << 20),
        "dp": lambda v: type(v) is dict and all(map(_count, v.values())),
        "ar": _text, "pa": _str, "ro": _str, "tot": _count}
#: A result part as a worker sends it.
RESULT = {"id": _str, "s": _count, "n": _ints(1, 1 << 53), "nf": _ints(0, LIST_MAX), "ok": _flag,
          "rv": _flag, "s0": _count, "d": _seconds, "xn": _text, "tb": _text, "nx": _count}
_task = _object(TASK, ("id", "h", "nf"))
_result = _object(RESULT, ("id", "nf"))
_queues = _list(_str)
_end = _optional(_object({"id": _optional(_str), "how": _str,
                          "text": lambda v: type(v) is str}, ("how", "text")))
_at = _optional(lambda v: type(v) is list and len(v) == 2 and _str(v[0]) and _count(v[1]))
#: A process's death, as a supervisor's lost and its replacement's hello (was) say it.
_DEATH = {"w": _str, "how": lambda v: type(v) is str, "at": _at, "run": _optional(_str),
          "end": _end}
_SUPERVISOR = {"sup": _str, "name": _str, "host": _str, "spid": _count, "conc": _ints(1, 1 << 20),
               "queues": _queues, "autoscale": _count, "ld": _seconds,
               "act": _count}

CLIENT, SENDER, SUPERVISOR, WORKER, OUTPUT = b"c", b"t", b"s", b"w", b"o"

#: kind -> (peers that may send it, field checks, required fields: a tuple, or a dict by peer)
KINDS: dict[str, tuple[bytes, dict[str, Check], tuple | dict]] = {
    "hello": (CLIENT + WORKER, dict(_SUPERVISOR, c=_str, rq=_optional(_count), w=_str, pid=_count,
                                                 lo=_optional(_str),
                                                 was=_optional(_object(_DEATH, ("w",)))),
              {CLIENT: ("c",), WORKER: ("w", "sup", "pid", "host", "spid", "conc", "queues")}),
    "fn": (SENDER, {"c": _str, "h": _str, "name": _text}, ("c", "h")),
    "events": (SENDER, {"c": _str, "sub": _str, "since": _optional(_time), "live": _flag},
               ("c", "sub", "live")),
    "tasks": (SENDER, {"c": _str, "t": _list(_task)}, ("c", "t")),
    "cancel": (SENDER, {"c": _str, "rq": _count, "ids": _list(_str)}, ("c", "ids", "rq")),
    "watch": (SENDER, {"c": _str, "rq": _count, "ids": _list(_str), "maps": _list(_str)},
              ("c", "rq")),
    "mapend": (SENDER, {"c": _str, "mp": _str, "total": _count}, ("c", "mp", "total")),
    "info": (SENDER, {"c": _str, "rq": _count}, ("c", "rq")),
    "join": (SENDER, {"c": _str, "rq": _count, "key": _str, "member": _str, "total": _count},
             ("c", "key", "member", "total", "rq")),
    "claim": (SENDER, {"c": _str, "rq": _count, "key": _str, "ttl": _seconds},
              ("c", "key", "ttl", "rq")),
    "ctl": (SENDER, {"c": _str, "rq": _count, "cmd": _str, "dest": _optional(_queues), "ci": _str,
                     "args": _any}, ("c", "cmd", "ci", "rq")),
    "bye": (SENDER + SUPERVISOR, {"c": _str, "sup": _str}, {SENDER: ("c",), SUPERVISOR: ("sup",)}),
    "hb": (SUPERVISOR, _SUPERVISOR, ("sup", "host", "spid", "conc", "queues")),
    "lost": (SUPERVISOR, dict(_DEATH, sup=_str), ("sup", "w")),
    "ctlr": (SUPERVISOR, {"sup": _str, "c": _str, "ci": _str, "name": _str, "r": _any},
             ("sup", "c", "ci", "name")),
    "res": (WORKER, {"w": _str, "t": _list(_result), "rdy": _flag}, ("w", "t")),
    "rej": (WORKER, {"w": _str, "ids": _list(_str)}, ("w", "ids")),
    "out": (OUTPUT, {"w": _str, "id": _str}, ("w", "id")),
    "ntc": (WORKER, {"w": _str, "ids": _list(_str), "state": _one_of("RETRY", "STARTED")},
            ("w", "ids", "state")),
}


def refuse(peer: bytes, header: dict, frames: list) -> str | None:
    """Why a verified message cannot be acted on (not a kind this peer sends, a bad field,
    payload frames that do not add up), or None when it is well formed."""
    kind = header.get("k")
    spec = KINDS.get(kind) if type(kind) is str else None
    if spec is None:
        return f"{str(kind)[:40]!r} is not a kind of message the broker knows"
    peers, fields, required = spec
    if len(peer) < 2 or peer[:1] not in peers:
        return f"a {kind!r} message may not come from {peer[:1]!r}"
    if type(required) is dict:
        required = required[peer[:1]]
    fault = _fault(fields, required, header)
    if fault is not None:
        return f"a {kind!r} message: {fault}"
    if kind == "tasks" or kind == "res":
        return _frames_fault(kind, header["t"], frames)
    if kind in ("fn", "out") and not frames:
        return f"a {kind!r} message has no payload"
    if frames and kind not in ("fn", "out"):
        return f"a {kind!r} message has payload frames"
    return None


def _frames_fault(kind: str, items: list, frames: list) -> str | None:
    """The items' frame counts must add up to the frames; a chunk's n is at most its pickle's
    size (each item takes at least one byte of the stream), so n never outgrows the payload."""
    if not items and kind == "tasks":  # a res with none says its worker is ready
        return "a 'tasks' message with no tasks"
    at = 0
    for item in items:
        nf = item["nf"]
        if kind == "tasks":
            if nf < 1:
                return "a task with no payload frame"
            if at >= len(frames) or item.get("n", 1) > len(frames[at]):
                return f"task {item['id'][:60]!r}: its n is larger than its payload"
        at += nf
    if at != len(frames):
        return f"a {kind!r} message: its items name {at} payload frames, it has {len(frames)}"
    return None
