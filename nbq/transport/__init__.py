"""Choosing a transport by the broker address's scheme."""
from __future__ import annotations

from typing import Callable

from ..errors import NbqError
from .base import ClientConnection, SupervisorConnection, WorkerConnection

ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


def _check(address: str) -> None:
    if not address.startswith(ZMQ_SCHEMES):
        raise NbqError(f"unsupported broker address {address!r}: use tcp://host:port "
                       "(an `nbq broker`) or ipc://path")


def client_connection(address: str, key: bytes, client_id: str, context=None) -> ClientConnection:
    """A client's connection to the broker at address."""
    _check(address)
    from .zmq import ZmqClient
    return ZmqClient(address, key, client_id, context)


def supervisor_connector(address: str, key: bytes) -> Callable[[str], SupervisorConnection]:
    """A factory of supervisor connections (called in the supervisor process)."""
    _check(address)
    from .zmq import ZmqSupervisor
    return lambda sid: ZmqSupervisor(address, key, sid)


def worker_connector(address: str, key: bytes) -> Callable[[str, dict], WorkerConnection]:
    """A factory of worker-process connections (called after fork, in each process)."""
    _check(address)
    from .zmq import ZmqWorker
    return lambda wid, hello: ZmqWorker(address, key, wid, hello)
