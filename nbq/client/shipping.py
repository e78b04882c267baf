"""Function shipping: each function's pickle goes to the broker once, by content hash.

A client's ``FunctionCache`` caches each function's hash by its fingerprint (so a plain
function is pickled again only when its code, defaults, closure or the globals it
names are rebound: a notebook edit is always seen), keeps the newest pickles to send
again to a restarted broker, and ships again a function a worker refused.
``ship_modules`` (``nbq.ship``) has modules pickled by value.
"""
from __future__ import annotations

import importlib
import threading
import types
import weakref
from collections import OrderedDict
from typing import Callable

import cloudpickle

from .. import protocol
from ..events import name_of

FUNCTION_CACHE = 256
FUNCTION_KEEP = 64 << 20  # bytes of function pickles kept to re-send to a restarted broker

_all: "weakref.WeakSet[FunctionCache]" = weakref.WeakSet()  # every client's, for ship_modules


class FunctionCache:
    """One client's shipped functions: hashes by fingerprint, pickles kept, what the broker has.

    ``lock`` is the client's send lock: a function is shipped under it, so that no task
    naming it can overtake it.
    """

    def __init__(self, conn, lock: threading.Lock) -> None:
        self._conn = conn
        self._lock = lock
        self._cache: OrderedDict = OrderedDict()  # fingerprint -> hash, oldest first
        self._sent: set[str] = set()              # hashes the broker has been sent
        self._kept: OrderedDict = OrderedDict()   # hash -> pickle, oldest first (FUNCTION_KEEP)
        self._kept_bytes = 0
        self._names: dict[str, str] = {}          # hash -> the name its events show, while kept
        self._refused: set[str] = set()  # shipped, then refused by a worker: shipped again
        _all.add(self)

    def ship(self, fn: Callable) -> str:
        """Send fn's pickle to the broker once; returns its content hash."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        key = fingerprint(fn)
        h = self._cache.get(key) if key is not None else None
        if h is not None and h not in self._sent and h not in self._kept:
            h = None  # a restarted broker lacks it, and its pickle is no longer kept: make it again
        if h is None or h in self._refused:
            payload = protocol.dumps_named(fn, f"the function {function_name(fn)}")
            h = protocol.function_hash(b"".join(bytes(memoryview(f)) for f in payload))
            with self._lock:
                self._keep(h, payload, name_of(fn))
                if h in self._refused:  # shipped again below, replacing what is stored
                    self._sent.discard(h)
                    self._refused.discard(h)
            if key is not None:
                self._cache[key] = h
                if len(self._cache) > FUNCTION_CACHE:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if h not in self._sent:
            with self._lock:
                if h not in self._sent and h in self._kept:
                    self._conn.ship(h, self._kept[h], self._names.get(h, ""))
                    self._sent.add(h)
        return h

    def _keep(self, h: str, payload: list, name: str) -> None:
        """Keep a function's pickle (and name) to send again to a restarted broker (under the
        lock): the newest FUNCTION_CACHE, within FUNCTION_KEEP bytes."""
        if h in self._kept:
            self._kept.move_to_end(h)
            return
        self._kept[h] = payload
        self._names[h] = name
        self._kept_bytes += protocol.frame_size(payload)
        while len(self._kept) > 1 and (len(self._kept) > FUNCTION_CACHE
                                       or self._kept_bytes > FUNCTION_KEEP):
            old, dropped = self._kept.popitem(last=False)
            self._names.pop(old, None)
            self._kept_bytes -= protocol.frame_size(dropped)

    def refused(self, h: str) -> None:
        """A worker refused function h (FunctionRefused): ship it again with its next call."""
        self._refused.add(h)

    def forget_sent(self) -> None:
        """The broker restarted and has none of them (under the lock)."""
        self._sent = set()

    def send_again(self, h: str) -> bool:
        """Ship h to a restarted broker unless sent already (under the lock); False when its
        pickle is no longer kept."""
        if h not in self._sent:
            if h not in self._kept:
                return False
            self._conn.ship(h, self._kept[h], self._names.get(h, ""))
            self._sent.add(h)
        return True

    def clear_cache(self) -> None:
        """Pickle every function again at its next call (ship_modules changed how)."""
        self._cache.clear()


def ship_modules(*modules: types.ModuleType | str) -> None:
    """Send the functions and classes of these modules (and their submodules) by value.

    cloudpickle sends what an importable module defines by reference: the worker
    imports the module.  A shipped module's code travels in the pickle instead, so a
    notebook's local helper module needs no install on the workers.  This holds for
    every client of this process (cloudpickle.register_pickle_by_value); ``nbq.ship``.
    """
    for module in modules:
        if isinstance(module, str):
            module = importlib.import_module(module)
        if not isinstance(module, types.ModuleType):
            raise TypeError(f"nbq.ship takes modules or module names, not {module!r}")
        cloudpickle.register_pickle_by_value(module)
    for functions in list(_all):  # functions pickled before by reference: pickle again
        functions.clear_cache()


def function_name(fn) -> str:
    """fn's name for messages and a map's label."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def fingerprint(fn) -> tuple | None:
    """What decides whether a cached pickle of fn is still right; None: pickle every time.

    An object may say for itself, with a ``__nbq_fingerprint__()`` method.
    """
    if type(fn) is not types.FunctionType:  # (a plain function's type has no method of its own)
        custom = getattr(type(fn), "__nbq_fingerprint__", None)
        return custom(fn) if custom is not None else None
    code = fn.__code__
    names = _NAMES.get(id(code))
    if names is None or names[0] is not code:  # (the code is held: its id is not reused)
        if len(_NAMES) >= FUNCTION_CACHE:
            _NAMES.clear()
        names = _NAMES[id(code)] = (code, _global_names(code))
    g = fn.__globals__
    closure = fn.__closure__
    cells = tuple(id(c.cell_contents) if _filled(c) else None for c in closure) if closure else ()
    return (fn, code, id(fn.__defaults__), id(fn.__kwdefaults__), cells,
            tuple([id(g.get(n)) for n in names[1]]))


_NAMES: dict[int, tuple] = {}  # id(code) -> (code, the global names it and its inner code read)


def _global_names(code) -> tuple:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return tuple(names)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False
