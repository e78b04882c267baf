"""nbq.worker.context: what a call running on a worker knows of itself and may use."""
import os
import threading
import time

from nbq.worker import context


def describe_and_stream(flag: str) -> tuple:
    """On a worker: the current call's id and retries; streams b"ping" output until the test
    has seen it (it creates flag), at most 10 s."""
    ctx = context.current()
    deadline = time.monotonic() + 10
    while not os.path.exists(flag) and time.monotonic() < deadline:
        ctx.output([b"ping"])  # best effort: sent again until the client has it
        time.sleep(0.02)
    return ctx.id, ctx.retries, os.path.exists(flag)


def test_no_call_no_context():
    assert context.current() is None


def test_a_call_sees_its_context_and_streams_output(shared_client, tmp_path):
    flag = str(tmp_path / "seen")
    got = threading.Event()

    def on_output(frames):
        assert frames == [b"ping"]
        open(flag, "w").close()
        got.set()

    fut = shared_client.apply(describe_and_stream, (flag,), task_id=f"ctx-{os.getpid()}-{time.time()}")
    fut.stream_output(on_output)
    assert fut.result(timeout=30) == (fut.id, 0, True)
    assert got.is_set()
