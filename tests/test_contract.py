"""Operations of the transport contract (transport/base.py) that the layers above rely on,
checked on every transport through the public client."""
from __future__ import annotations

import time

import pytest

import nbq

pytestmark = pytest.mark.conformance  # every transport, memory:// too (conftest.py)


def test_claim_once_is_won_by_one_client_per_key_until_its_ttl(shared_client):
    """Two clients claim the same keys: each key is won once; after its ttl, once again."""
    a = shared_client
    key = f"test:{time.time_ns()}"
    with nbq.Client(a.address) as other:
        assert a.claim(key + ":1", 60) is True
        assert other.claim(key + ":1", 60) is False
        assert a.claim(key + ":1", 60) is False
        assert other.claim(key + ":2", 0.2) is True
        assert a.claim(key + ":2", 0.2) is False
        deadline = time.monotonic() + 10
        while not a.claim(key + ":2", 0.2):
            assert time.monotonic() < deadline, "a claim was never won again after its ttl"
