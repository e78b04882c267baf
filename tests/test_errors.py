"""Every error nbq defines is an nbq.NbqError, so one ``except nbq.NbqError`` catches them all."""
import os
import signal

import pytest

import nbq
import nbq.errors
import nbq.exceptions
from conftest import start_broker


def _exception_classes():
    """The exception classes nbq defines among the public names of nbq, nbq.exceptions and
    nbq.errors (not Python's own that nbq.exceptions re-exports under Celery's names, and
    not warnings, which are not errors)."""
    for module in (nbq, nbq.exceptions, nbq.errors):
        for name in getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]:
            obj = getattr(module, name)
            if (isinstance(obj, type) and issubclass(obj, BaseException)
                    and not issubclass(obj, Warning) and obj.__module__.startswith("nbq")):
                yield f"{module.__name__}.{name}", obj


def test_every_public_error_is_an_nbq_error():
    found = dict(_exception_classes())
    assert [name for name, cls in found.items() if not issubclass(cls, nbq.NbqError)] == []
    assert {"nbq.exceptions.Retry", "nbq.BrokerTimeout", "nbq.errors.RemoteTraceback"} <= set(found)


@pytest.mark.parametrize("address", ["http://127.0.0.1:5555", "localhost:5555"])
def test_an_unusable_broker_address_is_a_value_error_naming_the_schemes(address):
    """As a malformed URL is for redis-py and urllib: ValueError, still an NbqError."""
    with pytest.raises(ValueError, match=r"unsupported broker address .*use tcp://host:port") as e:
        nbq.Client(address)
    assert isinstance(e.value, nbq.NbqError)


def test_broker_timeout_is_a_timeout_error_that_says_what_to_do(procs):
    """A broker that does not answer a request, and one no worker joins, raise BrokerTimeout:
    an NbqError that ``except TimeoutError`` still catches."""
    address = start_broker(procs)
    broker = procs.procs[-1]
    client = nbq.Client(address)
    try:
        with pytest.raises(nbq.BrokerTimeout, match="nbq worker --broker"):
            client.wait_for_workers(1, timeout=0.2)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError, match="did not answer 'info'.*`nbq broker`") as info:
                client._request("info", client._conn.info, timeout=0.3)  # within BROKER_SILENCE
            assert isinstance(info.value, nbq.NbqError)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
    finally:
        client.shutdown(wait=False)
