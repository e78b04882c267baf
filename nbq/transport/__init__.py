"""Choosing a transport by the broker address's scheme."""
from __future__ import annotations

from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..errors import AddressError, NbqError
from .base import ClientConnection, SupervisorConnection, WorkerConnection

ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+unix://")
AMQP_SCHEMES = ("amqp://", "amqps://")
MEMORY_SCHEME = "memory://"


def unsplit(parts) -> str:
    """urlunsplit that keeps the ``//`` of an address with no host (``unix:///path``), which
    urlunsplit drops, so a Unix socket's path survives being rewritten."""
    url = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return f"{url}?{parts.query}" if parts.query else url


def is_memory(address: "str | None") -> bool:
    """Whether address names an in-process broker (transport/memory/): ``memory://`` or
    ``memory://name``."""
    return isinstance(address, str) and address.startswith(MEMORY_SCHEME)


def across_processes(address: str, what: str) -> None:
    """Raise NbqError when address is an in-process broker, which what (a worker, a broker,
    a command) in another process cannot reach."""
    if is_memory(address):
        raise NbqError(
            f"{what} cannot use {address}: a memory:// broker lives inside the process of the "
            "nbq.Client that made it, and its workers are threads of that process; nothing in "
            "another process can reach it.  Use nbq.Client('memory://') in that process, or a "
            "broker other processes can reach (tcp://, redis://)")


def is_amqp(address: str) -> bool:
    """Whether address names a RabbitMQ (transport/amqp/)."""
    return address.startswith(AMQP_SCHEMES)


def _check(address: str) -> bool:
    """Whether address is a Redis one (else ZeroMQ or RabbitMQ); raises for any other scheme."""
    if address.startswith(REDIS_SCHEMES):
        return True
    if not address.startswith(ZMQ_SCHEMES + AMQP_SCHEMES):
        raise AddressError(f"unsupported broker address {address!r}: use tcp://host:port "
                       "(an `nbq broker`), ipc://path, redis://[user:password@]host:port/db, "
                       "unix:///path/to/redis.sock, amqp://user:password@host:port/vhost, "
                       "or memory:// (in-process)")
    return False


def with_result_expires(address: str, seconds: float | None) -> str:
    """A Redis address carrying ``?result_expires=seconds`` (any other address as it is).

    On Redis the client and every worker store results, so the setting travels
    in the URL that local workers are started with; a ZeroMQ broker has its own.
    """
    if seconds is None or is_memory(address) or not (_check(address) or is_amqp(address)):
        return address
    parts = urlsplit(address)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "result_expires"]
    query.append(("result_expires", f"{seconds:g}"))
    return unsplit(parts._replace(query=urlencode(query)))


def client_connection(address: str, key: bytes, client_id: str) -> ClientConnection:
    """A client's connection to the broker at address (a memory:// one: memory.MemoryClient,
    which runs no task itself; the cluster layer adds threads or inline running)."""
    if is_memory(address):
        from .memory import MemoryClient
        return MemoryClient(address, client_id)
    if is_amqp(address):
        from .amqp import AmqpClient
        return AmqpClient(address, key, client_id)
    if _check(address):
        from .redis import RedisClient
        return RedisClient(address, key, client_id)
    from .zmq import ZmqClient
    return ZmqClient(address, key, client_id)


def supervisor_connector(address: str, key: bytes) -> Callable[[str], SupervisorConnection]:
    """A factory of supervisor connections (called in the supervisor process)."""
    across_processes(address, "nbq worker")
    if is_amqp(address):
        from .amqp import AmqpSupervisor
        return lambda sid: AmqpSupervisor(address, key, sid)
    if _check(address):
        from .redis import RedisSupervisor
        return lambda sid: RedisSupervisor(address, key, sid)
    from .zmq import ZmqSupervisor
    return lambda sid: ZmqSupervisor(address, key, sid)


def worker_connector(address: str, key: bytes) -> Callable[[str, dict], WorkerConnection]:
    """A factory of worker-process connections (called after fork, in each process)."""
    across_processes(address, "nbq worker")
    if is_amqp(address):
        from .amqp import AmqpWorker
        return lambda wid, hello: AmqpWorker(address, key, wid, hello)
    if _check(address):
        from .redis import RedisWorker
        return lambda wid, hello: RedisWorker(address, key, wid, hello)
    from .zmq import ZmqWorker
    return lambda wid, hello: ZmqWorker(address, key, wid, hello)
