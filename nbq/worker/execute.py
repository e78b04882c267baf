"""Running one task item: the function cache, the three call modes, error records.

Modes (header ``m``): ``call`` runs fn(*args, **kwargs) once; ``map`` runs fn(x)
and ``star`` fn(*x) for each item of a chunk, each item failing alone.
Results are pairs (header item, payload frames) ready for the transport.
"""
from __future__ import annotations

import socket
import time
from collections import OrderedDict
from typing import Callable

from .. import protocol
from ..events import failure_fields, name_of
from ..errors import MessageTooLarge, SerializationError
from .context import Reschedule, TaskContext, running

FUNCTION_CACHE = 512
NAME_MAX = 300  # bytes of a function's name kept for ``inspect active``


class Functions:
    """Functions by content hash, unpickled on first use; payloads come from ``fetch``.

    Given ``failed`` (the process's initializer raised it), every function raises it instead.
    """

    def __init__(self, fetch: Callable[[str], list], failed: BaseException | None = None) -> None:
        self._fetch = fetch
        self._failed = failed
        self._loaded: OrderedDict[str, tuple[object, bytes]] = OrderedDict()

    def __contains__(self, h: str) -> bool:
        return h in self._loaded

    def get(self, h: str) -> tuple[object, bytes]:
        """(the function, its name as ``inspect active`` shows it, encoded)."""
        try:
            self._loaded.move_to_end(h)
            return self._loaded[h]
        except KeyError:
            pass
        try:
            payload = self._fetch(h)
        except Exception as e:  # not stored, or refused: fetched again for the next task (the
            fn = _Unloadable(e)  # client ships a refused function again), so not kept
            return fn, name_of(fn).encode()[:NAME_MAX]
        try:
            fn = protocol.loads(payload)
        except Exception as e:  # a module missing here, a broken pickle: every task of it fails
            fn = _Unloadable(unimportable(e, "the function of this task"))
        name = name_of(fn).encode()[:NAME_MAX]
        if self._failed is not None:
            fn = _Unloadable(self._failed)
        entry = self._loaded[h] = fn, name
        if len(self._loaded) > FUNCTION_CACHE:
            self._loaded.popitem(last=False)
        return entry


def unimportable(error: BaseException, needed_by: str) -> BaseException:
    """A ModuleNotFoundError met unpickling, restated to say where and what to do; others as is.

    cloudpickle sends what an importable module defines by reference, so a helper
    module on the client's path only must be installed here, or shipped by value.
    """
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return error
    name = error.name
    return ModuleNotFoundError(
        f"worker host {socket.gethostname()} cannot import module {name!r}, which {needed_by} "
        f"needs: install it on the workers, start `nbq worker` in the folder that holds it, or "
        f"send its code with the task from the client with nbq.ship({name}) or "
        f"nbq.Client(..., ship=[{name}])", name=name)


class _Unloadable:
    """Stands in for a function whose payload would not unpickle on this worker."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self._tb = error.__traceback__

    def __call__(self, *args, **kwargs):
        raise self.error.with_traceback(self._tb)  # not one more frame in its traceback per call


def run(context: TaskContext, frames: list, fn, emit: Callable[[dict, list], None],
        mark: Callable[[str, int], None] | None = None,
        max_result: int | None = None) -> tuple[dict, list] | None:
    """Run one task (``context.item``), passing each result part to emit.

    ``max_result``: the largest result payload the broker takes (its max_message_size, less
    room for the header: the connection's ``max_result``), None while unknown; a larger
    result fails with MessageTooLarge instead.

    A call (mode ``call``) runs with context current (context.current()).
    A re-run after a death (``st`` set) goes item by item: each item is marked
    before it runs and reported when done, and items in ``ex`` (those that
    killed their process) are not run again.  A call past its expiry (``x``)
    is reported revoked without running; a call that raised Reschedule is
    returned as the (item, frames) to run at its new ``eta``.
    """
    item = context.item
    tid = item["id"]
    t0 = time.perf_counter()
    if item.get("m", "call") == "call":
        if item.get("x") is not None and time.time() > item["x"]:
            emit({"id": tid, "s0": item.get("s0", 0), "s": 0, "n": 1, "rv": 1, "nf": 0}, [])
            return None
        with running(context):
            try:
                try:
                    args, kwargs = protocol.loads(frames)
                except ModuleNotFoundError as e:
                    raise unimportable(e, "an argument of this task") from None
                value = fn(*args, **kwargs)
            except Reschedule as r:
                if r.new_args is not None or r.new_kwargs is not None:
                    frames = protocol.dumps((args if r.new_args is None else tuple(r.new_args),
                                             kwargs if r.new_kwargs is None else r.new_kwargs))
                return dict(item, eta=r.eta, rt=item.get("rt", 0) + 1, nf=len(frames)), frames
            except BaseException as e:
                record = protocol.error_record(e)
                payload, ok, failure = protocol.dumps(record), 0, failure_fields(record)
            else:
                payload, ok = _dump_value(value, f"the result of task {tid}", max_result)
                failure = None
        part = {"id": tid, "s0": item.get("s0", 0), "s": 0, "n": 1, "ok": ok, "nf": len(payload),
                "d": time.perf_counter() - t0}
        if failure:
            part.update(failure)
        emit(part, payload)
        return None
    base = {"id": tid, "s0": item.get("s0", 0)}
    try:
        items = protocol.loads(frames)
    except BaseException as e:  # the whole chunk's input is unreadable: every item fails
        items, load_error = None, protocol.error_record(unimportable(e, "an item of this map"))
    star = item["m"] == "star"
    start = item.get("skip", 0)
    n = item.get("n", 1)
    stream = item.get("st")
    exclude = set(item.get("ex", ()))
    values: list = []
    errors: dict = {}
    part = start
    for i in range(start, n):
        if stream:
            if i in exclude:
                part = i + 1
                continue
            if mark is not None:
                mark(tid, i)
        if items is None:
            values.append(None)
            errors[i - part] = load_error
        else:
            try:
                values.append(fn(*items[i]) if star else fn(items[i]))
            except BaseException as e:
                values.append(None)
                errors[i - part] = protocol.error_record(e)
        if stream:
            _emit_chunk(base, part, values, errors, t0, emit, max_result)
            values, errors, part, t0 = [], {}, i + 1, time.perf_counter()
    if values or not stream:
        _emit_chunk(base, part, values, errors, t0, emit, max_result)


def _emit_chunk(base: dict, start: int, values: list, errors: dict, t0: float, emit,
                max_result: int | None) -> None:
    try:
        payload = protocol.dumps((values, errors))
    except Exception:
        for i, v in enumerate(values):
            if i not in errors:
                bad, ok = _dump_value(v, f"the result of item {base['s0'] + start + i}", max_result)
                if not ok:
                    values[i] = None
                    errors[i] = protocol.loads(bad)
        payload = protocol.dumps((values, errors))
    if max_result is not None and protocol.frame_size(payload) > max_result:
        if len(values) > 1:  # send the items one by one: only those too large fail
            for i, v in enumerate(values):
                _emit_chunk(base, start + i, [v], {0: errors[i]} if i in errors else {}, t0, emit,
                            max_result)
            return
        if not errors:
            errors = {0: protocol.loads(_too_large(payload, f"the result of item "
                                                            f"{base['s0'] + start}", max_result))}
            payload = protocol.dumps(([None], errors))
    part = dict(base, s=start, n=len(values), nf=len(payload), d=time.perf_counter() - t0)
    if errors:  # for its events: how many failed, the first one's exception
        part.update(failure_fields(errors[min(errors)]), nx=len(errors))
    emit(part, payload)


def _dump_value(value, what: str, max_result: int | None) -> tuple[list, int]:
    """Pickle a result; an unpicklable one becomes the error record saying so."""
    try:
        payload = protocol.dumps(value)
        if max_result is not None and protocol.frame_size(payload) > max_result:
            return _too_large(payload, what, max_result), 0
        return payload, 1
    except Exception as e:
        err = SerializationError(f"{what} ({type(value).__name__}) could not be pickled: "
                                 f"{type(e).__name__}: {e}")
        return protocol.dumps(protocol.error_record(err)), 0


def _too_large(payload: list, what: str, max_result: int) -> list:
    """The error record (pickled) of a result larger than the broker takes."""
    err = MessageTooLarge(f"{what} is {protocol.frame_size(payload):,} bytes pickled, more than "
                          f"the broker's max_message_size allows ({max_result:,}): return less "
                          "(write large data to a file and return its path), or start the "
                          "broker with a larger --max-message-size")
    return protocol.dumps(protocol.error_record(err))
