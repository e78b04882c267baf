"""Reaching Redis: the address and its settings, connecting, retrying with backoff, the key check.

Driver errors stop here: what leaves this module's retrying() and check() is an NbqError
(BrokerUnavailable when Redis cannot be reached) naming the Redis by its safe URL (no
password), never a redis-py exception.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Callable, NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import CoreCommands
from redis.connection import Encoder, PythonRespSerializer
from redis.utils import HIREDIS_AVAILABLE
from redis.retry import Retry

from ... import policy
from ...errors import BrokerUnavailable, NbqError
from ...keys import fingerprint
from .. import unsplit
from ..base import check_key
from .keys import KEYFP

if HIREDIS_AVAILABLE:
    import hiredis

log = logging.getLogger("nbq.transport.redis")

T = TypeVar("T")
REKEY = f"; if the whole cluster changed its key, delete {KEYFP} in this Redis database"


class RedisSettings(NamedTuple):
    """nbq's own settings in a Redis address's query (``?result_expires=...``): every
    client and worker of one Redis must agree on them (local workers get the same URL)."""
    result_expires: float = policy.RESULT_EXPIRES
    max_message_size: int = policy.MAX_MESSAGE_SIZE  # bytes: larger tasks refused by the
    #                                                  sender, larger messages dropped by the reader
    result_budget: int = policy.RESULT_BUDGET  # bytes of delivered results kept for by-id lookups
    events: int = 1  # 0: this party writes no events (redis/events.py)
    events_keep: float = policy.EVENTS_KEEP  # seconds of events kept
    events_max: int = policy.EVENTS_MAX      # event entries kept at most


def _settings(address: str) -> tuple[RedisSettings, list]:
    """nbq's settings in an address, and the rest of its query (redis-py's options)."""
    kept, given = [], {}
    for k, v in parse_qsl(urlsplit(address).query):
        if k in RedisSettings._fields:
            try:
                given[k] = type(RedisSettings._field_defaults[k])(float(v))
            except ValueError:
                raise NbqError(f"bad {k}={v!r} in the Redis address: give a number") from None
        else:
            kept.append((k, v))
    if given.get("max_message_size", policy.MAX_MESSAGE_SIZE) < 1 << 16:
        raise NbqError("max_message_size in the Redis address must be at least 65536 bytes "
                       "(a client sends tasks below 64 KiB in batches)")
    return RedisSettings(**given), kept


def settings(address: str) -> RedisSettings:
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


LARGE_ARGUMENT = 64 << 10  # bytes: a command with an argument this large is packed in Python


def _large(arg) -> bool:
    """Whether a command's argument is LARGE_ARGUMENT bytes or more."""
    if isinstance(arg, bytes):
        return len(arg) >= LARGE_ARGUMENT
    return not isinstance(arg, (str, int, float)) and memoryview(arg).nbytes >= LARGE_ARGUMENT


class _Packer:
    """Commands packed by hiredis (4x faster than Python for a SUBMIT of many small tasks), but
    one with a large argument in Python, which sends that argument as it is where hiredis
    copies it (a 100 MB SET took ~4x as long); replies are parsed by hiredis either way."""

    def __init__(self) -> None:
        self._python = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
        self._hiredis = HIREDIS_AVAILABLE

    def pack(self, *args) -> list:
        if self._hiredis:
            for arg in args:  # most are str or int: no call for them
                if type(arg) is not str and type(arg) is not int and _large(arg):
                    break
            else:
                name = args[0]  # "XGROUP CREATE" is two words
                if (" " if isinstance(name, str) else b" ") in name:
                    args = (*name.split(), *args[1:])
                try:
                    return [hiredis.pack_command(args)]
                except TypeError:  # a type hiredis does not take (a PickleBuffer, a bytearray)
                    pass
        return self._python.pack(*args)


_PACKER = _Packer()


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


class Batch(CoreCommands):
    """Commands recorded by redis-py's own command methods, to send in one write (send_batch):
    a pipeline without redis-py's per-command bookkeeping (~30 us less per round trip)."""

    def __init__(self) -> None:
        self.commands: list[tuple] = []

    def execute_command(self, *args, **options) -> None:
        self.commands.append(args)


_PINNED = threading.local()  # .conns: id(pool) -> (pool's weakref, pid, this thread's connection)


def _pinned(r: redis.Redis):
    """The connection of r's pool that the calling thread keeps for its batches: taken from the
    pool once, not for each batch (the pool's bookkeeping and its can-read check cost ~40 us a
    round trip); a new one in a forked child.  A lost one reconnects on its next send."""
    try:
        conns = _PINNED.conns
    except AttributeError:
        conns = _PINNED.conns = {}
    pool = r.connection_pool
    got = conns.get(id(pool))
    if got is None or got[0]() is not pool or got[1] != os.getpid():
        for k in [k for k, v in conns.items() if v[0]() is None]:
            del conns[k]  # pools closed and gone
        got = conns[id(pool)] = (weakref.ref(pool), os.getpid(), pool.get_connection())
    return got[2]


def send_batch(r: redis.Redis, commands: list[tuple]) -> list:
    """The raw replies (no redis-py callbacks) to commands sent in one write on the connection of
    r's pool the calling thread keeps (_pinned); an error reply is returned in its place, a
    connection error raised."""
    conn = _pinned(r)
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        out: list = []
        for _ in commands:
            try:
                out.append(conn.read_response())
            except redis.ResponseError as e:
                out.append(e)
        return out
    except BaseException:
        conn.disconnect()  # replies may be left unread on it
        raise


def raise_errors(replies: list) -> list:
    """replies (send_batch's), or the first error reply among them raised."""
    for x in replies:
        if isinstance(x, Exception):
            raise x
    return replies


def nbq_error(what: str, safe: str, e: redis.RedisError) -> NbqError:
    """The nbq error for a redis-py error met while doing `what` with the Redis at safe."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, redis.AuthenticationError):
        return NbqError(f"Redis at {safe} refused the credentials (wrong password or user): "
                        f"{first}")
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        return BrokerUnavailable(f"{what}: Redis at {safe} is unavailable ({first}): start it, "
                                 "or check its address and the network")
    return NbqError(f"{what}: Redis at {safe} answered with an error: {first}")


def unreachable(e: Exception) -> bool:
    """Whether e is a lost or refused connection (not a wrong password): worth retrying."""
    return (isinstance(e, (redis.ConnectionError, redis.TimeoutError))
            and not isinstance(e, redis.AuthenticationError))


class Backoff:
    """The waits between retries of a lost connection (policy.backoff: doubling up to
    BACKOFF_MAX), for a loop that sleeps (retrying) and for one that must not (heartbeats)."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.until = 0.0

    def failed(self) -> float:
        """One more failure: the wait before the next try (also noted in `until`)."""
        self.delay = policy.backoff(self.delay)
        self.until = time.monotonic() + self.delay
        return self.delay

    def waiting(self) -> bool:
        """Whether the wait after the last failure is still on."""
        return time.monotonic() < self.until

    def reset(self) -> None:
        """It worked: the next failure waits the shortest again."""
        self.delay = self.until = 0.0


def retrying(what: str, safe: str, fn: Callable[[], T], give_up: Callable[[], bool] = lambda: False,
             on_error: Callable[[], None] | None = None) -> T:
    """fn() until it works, waiting with backoff and saying so while Redis is unreachable.

    Raises BrokerUnavailable when give_up() says so after a connection error, and NbqError
    for any other Redis error (a wrong password, an error reply).
    """
    backoff = Backoff()
    logged = False
    while True:
        try:
            result = fn()
        except redis.RedisError as e:
            if unreachable(e):
                if on_error is not None:
                    on_error()
                if give_up():
                    raise nbq_error(what, safe, e) from None
            elif not (isinstance(e, redis.ResponseError)
                      and ("LOADING" in str(e) or "MASTERDOWN" in str(e))):
                raise nbq_error(what, safe, e) from None
            delay = backoff.failed()
            if unreachable(e) and (not logged or delay >= policy.BACKOFF_MAX):
                log.warning("%s: Redis at %s unavailable (%s); retrying in %.1f s",
                            what, safe, e, delay)
                logged = True
            time.sleep(delay)
            continue
        if logged:
            log.warning("%s: Redis at %s is back", what, safe)
        return result


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


def check(r: redis.Redis, safe: str, timeout: float = policy.CONNECT_TIMEOUT) -> None:
    """Ping Redis: a wrong password is a one-line NbqError, no answer a BrokerUnavailable."""
    deadline = time.monotonic() + timeout
    try:
        retrying("connecting", safe, r.ping, give_up=lambda: time.monotonic() > deadline)
    except BrokerUnavailable as e:  # its context: the driver's error, as retrying() met it
        raise BrokerUnavailable(f"no Redis answered at {safe} within {timeout:g} s: "
                                f"{e.__context__}: start it, or check its address and the "
                                "network") from None
