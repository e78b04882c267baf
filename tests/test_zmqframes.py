"""Multipart sends and receives with integer flags (nbq/zmqframes.py), over inproc."""
import pytest
import zmq

from nbq import zmqframes


def test_frames_arrive_whole_and_in_order_and_a_nonblocking_send_can_fail():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://zmqframes-test")
        b.connect("inproc://zmqframes-test")
        large = memoryview(bytes(range(256)) * 1024)  # above pyzmq's copy threshold
        zmqframes.send(a, [b"head", zmq.Frame(b"sig"), large])
        zmqframes.send(a, [b"one"])
        got = zmqframes.receive(b)
        assert [f.bytes for f in got] == [b"head", b"sig", bytes(large)]
        assert [f.bytes for f in zmqframes.receive(b)] == [b"one"]
        with pytest.raises(zmq.Again):
            zmqframes.receive(b, zmq.NOBLOCK)
        lonely = ctx.socket(zmq.DEALER)  # connected to nothing: a non-blocking send fails
        lonely.setsockopt(zmq.LINGER, 0)
        with pytest.raises(zmq.Again):
            zmqframes.send(lonely, [b"x", b"y"], zmq.NOBLOCK)
        lonely.close()
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
