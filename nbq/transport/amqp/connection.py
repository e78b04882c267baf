"""Reaching RabbitMQ: the address and its settings, a connection that reconnects with backoff,
and the signing-key check.

Driver errors stop here: what leaves Link.call is an NbqError (BrokerUnavailable when
RabbitMQ cannot be reached) naming the broker by its safe URL (no password), never a pika
exception.  Each Link is used by one thread at a time (pika's BlockingConnection is not
thread-safe; only add_callback_threadsafe may be called from elsewhere).
"""
from __future__ import annotations

import logging
import ssl
import time
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

import pika
import pika.exceptions

from ... import policy
from ...errors import BrokerUnavailable, NbqError
from ...keys import fingerprint
from .. import unsplit
from ..base import check_key
from .names import KEYFP

log = logging.getLogger("nbq.transport.amqp")
# pika logs every lost connection as an error with a traceback; Link reports them itself
logging.getLogger("pika").setLevel(logging.CRITICAL)

AMQP_SCHEMES = ("amqp://", "amqps://")
REKEY = f"; if the whole cluster changed its key, delete the queue {KEYFP} in this vhost"


class AmqpSettings(NamedTuple):
    """nbq's own settings in an amqp:// address's query; every client and worker of one
    vhost must agree on them (local workers get the same URL)."""
    result_expires: float = policy.RESULT_EXPIRES
    max_message_size: int = 128 << 20  # RabbitMQ 3.10's max_message_size default
    result_backend: str = ""           # redis://... : where results by id and task states live


def parse(address: str) -> tuple[pika.URLParameters, str, AmqpSettings]:
    """(pika's parameters, the URL safe to print, nbq's settings) of an amqp[s]:// address."""
    parts = urlsplit(address)
    kept, given = [], {}
    for k, v in parse_qsl(parts.query):
        if k in AmqpSettings._fields:
            kind = type(AmqpSettings._field_defaults[k])
            try:
                given[k] = v if kind is str else kind(float(v))
            except ValueError:
                raise NbqError(f"bad {k}={v!r} in the RabbitMQ address: give a number") from None
        else:
            kept.append((k, v))
    conf = AmqpSettings(**given)
    if conf.result_backend and not conf.result_backend.startswith(("redis://", "rediss://")):
        raise NbqError(f"result_backend={conf.result_backend!r} in the RabbitMQ address: "
                       "give a redis:// or rediss:// URL (URL-encoded), or none")
    kept.append(("heartbeat", "0"))  # none: a worker busy in a long task reads nothing;
    # a dead peer's TCP connection is closed by its kernel, which RabbitMQ sees at once
    params = pika.URLParameters(unsplit(parts._replace(query=urlencode(kept))))
    if parts.scheme == "amqps" and params.ssl_options is None:
        params.ssl_options = pika.SSLOptions(ssl.create_default_context(), parts.hostname)
    params.connection_attempts = 1
    params.blocked_connection_timeout = 60
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return params, unsplit(parts._replace(netloc=netloc, query="")), conf


DRIVER_ERRORS = (pika.exceptions.AMQPError, OSError)


def _unreachable(e: Exception) -> bool:
    """A lost or refused connection (not a refused login or a channel error): worth retrying."""
    return isinstance(e, (pika.exceptions.AMQPConnectionError, pika.exceptions.StreamLostError,
                          OSError)) and not isinstance(
        e, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError))


class Link:
    """One connection and one channel, made again after a loss (on_connect redeclares what
    the user of the link needs); call() runs an operation through outages."""

    def __init__(self, address: str, on_connect: Callable[["Link"], None] = lambda link: None,
                 transactional: bool = True) -> None:
        self.params, self.safe, self.settings = parse(address)
        self.on_connect = on_connect
        self.transactional = transactional
        self.conn: pika.BlockingConnection | None = None
        self.ch = None
        self.generation = 0  # connections made so far: a new one means deliveries were lost

    def connect(self) -> None:
        self.close()
        self.conn = pika.BlockingConnection(self.params)
        self.ch = self.conn.channel()
        if self.transactional:
            self.ch.tx_select()
        self.generation += 1
        self.on_connect(self)

    def call(self, what: str, fn: Callable[[], Any], give_up: Callable[[], bool] | None = None,
             timeout: float = policy.CONNECT_TIMEOUT):
        """fn() until it works, reconnecting with backoff and saying so; BrokerUnavailable once
        give_up() (default: timeout seconds of failures) says so, NbqError for other errors."""
        delay, start, logged = 0.0, time.monotonic(), False
        give_up = give_up or (lambda: time.monotonic() - start > timeout)
        while True:
            try:
                if self.conn is None or not self.conn.is_open or not self.ch.is_open:
                    self.connect()
                got = fn()
                if logged:
                    log.warning("%s: RabbitMQ at %s is back", what, self.safe)
                return got
            except DRIVER_ERRORS as e:
                self.close()
                if not _unreachable(e):
                    raise NbqError(f"{what}: RabbitMQ at {self.safe} refused: "
                                   f"{type(e).__name__}: {e}") from None
                if give_up():
                    raise BrokerUnavailable(f"no RabbitMQ answered at {self.safe} ({what}): "
                                            f"{type(e).__name__} {e}: start it, or check its "
                                            "address and the network") from None
                delay = policy.backoff(delay)
                log.warning("%s: RabbitMQ at %s unavailable (%s); retrying in %.1f s",
                            what, self.safe, type(e).__name__, delay)
                logged = True
                time.sleep(delay)

    def close(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a dead connection: nothing to release
                pass


def check_cluster_key(link: Link, key: bytes) -> None:
    """Refuse to go on (KeyMismatch) when key is not the cluster's: the first party to
    connect stores its fingerprint in nbq.keyfp (one message, the first publish wins)."""
    mine = fingerprint(key).encode()

    def read() -> bytes | None:
        ch = link.conn.channel()
        try:
            ch.queue_declare(KEYFP, durable=True, arguments={"x-max-length": 1,
                                                             "x-overflow": "reject-publish"})
            for _ in range(2):
                method, _, body = ch.basic_get(KEYFP, auto_ack=False)
                if method is not None:
                    ch.basic_nack(method.delivery_tag, requeue=True)
                    return body
                ch.confirm_delivery()
                try:
                    ch.basic_publish("", KEYFP, mine, pika.BasicProperties(delivery_mode=2))
                except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
                    pass  # another party's came first: read it
            return None
        finally:
            ch.close()

    cluster = link.call("checking the signing key", read)
    check_key(key, cluster.decode() if cluster else None, link.safe, REKEY)
