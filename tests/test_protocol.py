"""Signing, frame layout and pickling, without any sockets."""
import pickle

import numpy as np
import pytest

from nbq import protocol
from nbq.errors import RemoteError, SerializationError, SignatureError


def test_roundtrip_and_tamper():
    s = protocol.Signer(b"k1")
    msg = s.encode({"k": "x", "n": 1}, [b"abc", b"def"])
    header, frames = s.decode(msg)
    ids = {k: header.pop(k) for k in ("ms", "mn", "mt")}  # message id and time, signed too
    assert header == {"k": "x", "n": 1} and frames == [b"abc", b"def"]
    assert s.decode(s.encode({"k": "x"}))[0]["mn"] == ids["mn"] + 1
    for i in range(len(msg)):
        bad = list(msg)
        bad[i] = bytes(bad[i]) + b"!"
        with pytest.raises(SignatureError):
            s.decode(bad)
    with pytest.raises(SignatureError):
        protocol.Signer(b"k2").decode(msg)
    # re-cutting frames keeps the bytes but must not keep the signature
    with pytest.raises(SignatureError):
        s.decode([msg[0], msg[1], b"abcd", b"ef"])
    with pytest.raises(SignatureError):
        s.decode([msg[0]])


def test_a_tampered_large_frame_is_refused_before_unpickling(monkeypatch):
    """Large frames are signed by their keyed BLAKE3 digest: one flipped byte, a frame cut
    shorter, a downgrade to the whole-frame scheme or another key is refused, and nothing
    is unpickled."""
    s = protocol.Signer(b"k" * 32)
    big = np.arange(protocol.LARGE_FRAME // 4, dtype=np.float64)
    msg = s.encode({"k": "x"}, protocol.dumps(big))
    assert len(msg[1]) == 33 and msg[1][32:] == protocol.BULK_SCHEME
    assert np.array_equal(protocol.loads(s.decode(msg)[1]), big)
    loaded = []
    monkeypatch.setattr(protocol.pickle, "loads", lambda *a, **k: loaded.append(a))
    flipped = bytearray(msg[3])
    flipped[len(flipped) // 2] ^= 1
    for bad in ([msg[0], msg[1], msg[2], flipped],
                [msg[0], msg[1], msg[2], bytes(msg[3])[:-8]],
                [msg[0], msg[1][:32], *msg[2:]],
                [msg[0], s.sign(msg[0], msg[2:], bulk=False), *msg[2:]][:2] + [msg[2], flipped]):
        with pytest.raises(SignatureError):
            s.decode(bad)
    with pytest.raises(SignatureError):
        protocol.Signer(b"j" * 32).decode(msg)
    # a receiver without blake3 says what to install instead of failing the signature silently
    monkeypatch.setattr(protocol, "blake3", None)
    with pytest.raises(SignatureError, match="pip install blake3"):
        s.decode(msg)
    assert not loaded
    # and without blake3 large frames are signed whole (32 bytes), which any receiver checks
    plain = s.encode({"k": "x"}, protocol.dumps(big))
    assert len(plain[1]) == 32 and s.decode(plain)


def test_large_buffers_travel_out_of_band():
    a = np.arange(1_000_000, dtype=np.float64)
    frames = protocol.dumps({"a": a, "small": np.arange(3)})
    assert len(frames) == 2 and len(frames[0]) < 10_000
    assert frames[1].nbytes == a.nbytes
    out = protocol.loads(frames)
    assert np.array_equal(out["a"], a) and list(out["small"]) == [0, 1, 2]


def test_plain_values_skip_cloudpickle_and_nothing_else_does():
    """Scalars and small containers of them take the C pickler alone (one frame); a lambda
    inside a container still goes by value, an array inside one still leaves the stream."""
    for value in [1, -2.5, "é", None, True, 1j, b"x" * 100, (1, "a"), ((1,), {}),
                  {"a": [1, 2]}, [[[1]]], list(range(1000))]:
        frames = protocol.dumps(value)
        assert len(frames) == 1 and protocol.loads(frames) == value
    assert protocol.loads(protocol.dumps(((lambda x: x + 1),)))[0](1) == 2
    assert protocol.loads(protocol.dumps({"f": [lambda: 3]}))["f"][0]() == 3
    frames = protocol.dumps((np.ones(protocol.OUT_OF_BAND_MIN),))
    assert len(frames) == 2 and protocol.loads(frames)[0].sum() == protocol.OUT_OF_BAND_MIN


def test_unpicklable_argument_is_named():
    import threading
    with pytest.raises(SerializationError, match=r"keyword argument 'lock' \(lock\) of f"):
        protocol.dumps_call("f", (1, 2), {"lock": threading.Lock()})
    with pytest.raises(SerializationError, match=r"argument 1 \(generator\) of g"):
        protocol.dumps_call("g", (1, (x for x in [])), {})


class Odd(Exception):
    def __init__(self, a, b):
        super().__init__(a)


def test_error_records_keep_type_or_become_remote_error():
    try:
        raise KeyError("missing")
    except KeyError as e:
        rec = protocol.error_record(e)
    exc = protocol.rebuild_error(pickle.loads(pickle.dumps(rec)))
    assert type(exc) is KeyError and "raise KeyError" in str(exc.__cause__)
    rec = protocol.error_record(Odd(1, 2))  # pickles, but will not unpickle
    exc = protocol.rebuild_error(rec)
    assert isinstance(exc, RemoteError) and exc.type_name.endswith("Odd") and exc.message == "1"


def test_every_field_the_broker_checks_has_one_entry_in_the_field_table():
    """schema.py's checks name only fields protocol.FIELDS / ITEM_FIELDS define, so a new
    field gets a meaning in the table (and a name not already taken) before it is used."""
    from nbq import schema
    header_fields = {f for _, checks, _ in schema.KINDS.values() for f in checks}
    assert header_fields - set(protocol.FIELDS) == set()
    assert set(schema.TASK) - set(protocol.ITEM_FIELDS) == set()
    assert set(schema.RESULT) - set(protocol.ITEM_FIELDS) == set()
